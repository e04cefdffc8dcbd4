"""WebSocket events: order, JSON validity, bounded per-client queues, stalled clients, shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from fake_service import FakeService
from stackwatch.web.app import HUB_KEY, create_app
from stackwatch.web.events import EventHub, WsClient, json_dumps

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


async def _recv(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == WSMsgType.TEXT, msg
    return dict(json.loads(msg.data))


async def _wait_clients(client: Client, n: int) -> None:
    for _ in range(200):
        if len(client.app[HUB_KEY].clients) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} clients, have {len(client.app[HUB_KEY].clients)}")


async def test_events_arrive_in_order_as_strict_json(aiohttp_client: MakeClient) -> None:
    svc = FakeService(seed=3, reject_every=2)
    client = await aiohttp_client(create_app(svc, token="t"))
    ws = await client.ws_connect("/ws")
    hello = await _recv(ws)
    assert hello["type"] == "hello" and "started_at" in hello["data"]
    await _wait_clients(client, 1)
    svc.add_frame()  # accepted: received, processed, stack_updated
    svc.add_frame()  # rejected: received, processed (weight NaN)
    types = [(await _recv(ws))["type"] for _ in range(5)]
    assert types == ["frame_received", "frame_processed", "stack_updated", "frame_received", "frame_processed"]
    svc.emit("warning", {"message": "disk almost full", "value": float("inf")})
    ev = await _recv(ws)
    assert ev == {"type": "warning", "data": {"message": "disk almost full", "value": None}, "ts": ev["ts"]}
    await ws.close()
    await _wait_clients(client, 0)


async def test_foreign_origin_websocket_refused(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(FakeService(), token="t"))
    with pytest.raises(Exception, match="403"):
        await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})


def test_offer_drops_oldest_and_marks_resync() -> None:
    async def go() -> None:
        client = WsClient(web.WebSocketResponse(), queue_size=3, send_timeout_s=1.0)
        for i in range(10):
            client.offer(str(i))
        assert client.queue.qsize() == 3 and client.dropped == 7
        assert [client.queue.get_nowait() for _ in range(3)] == ["7", "8", "9"]
        assert client._resync

    asyncio.run(go())


async def test_stalled_client_never_blocks_others(aiohttp_client: MakeClient) -> None:
    svc = FakeService(seed=4, reject_every=0, shape=(48, 64))
    app = create_app(svc, token="t", ws_queue_size=32)
    client = await aiohttp_client(app)
    hub = app[HUB_KEY]
    good = await client.ws_connect("/ws")
    await _wait_clients(client, 1)
    first = set(hub.clients)
    stalled = await client.ws_connect("/ws")
    await _wait_clients(client, 2)
    (stalled_client,) = hub.clients - first
    # Make the stalled client's socket never drain: its sender task blocks in send_str.
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def blocked_send(*_a: object, **_k: object) -> None:
        await never

    stalled_client.ws.send_str = blocked_send  # type: ignore[method-assign]
    received: list[str] = []
    await _recv(good)  # hello
    for _ in range(60):
        svc.add_frame()
        await asyncio.sleep(0.003)  # a fast night: 3 events every 3 ms
    while len(received) < 180:
        received.append((await _recv(good))["type"])
    assert received.count("frame_processed") == 60 and "resync" not in received
    assert hub.publish_time_max_s < 0.05
    assert stalled_client.queue.qsize() <= 32 and stalled_client.dropped > 0
    never.cancel()
    await good.close()
    await stalled.close()


async def test_shutdown_closes_clients(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(FakeService(), token="t"))
    ws = await client.ws_connect("/ws")
    await _recv(ws)
    await client.app.shutdown()
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)


def test_hub_publish_with_no_clients_and_json() -> None:
    hub = EventHub()
    hub.publish({"type": "status", "data": {"x": float("nan")}, "ts": 1.0})
    assert hub.published == 1
    assert json_dumps({"a": (1, 2), "b": {3}}) == '{"a":[1,2],"b":[3]}'
