"""WebSocket fan-out: one bounded queue and one sender task per client.

The service calls `EventHub.publish(event)` (through its listener callback) on the event-loop thread.
`publish` serialises the event once and puts the text into every client's queue without awaiting:
it never blocks, whatever the clients do. When a client's queue is full, the oldest message is
dropped and the client is told to resynchronise (``{"type": "resync"}``, then it re-reads
/api/status and the lists). A client whose send stalls longer than `send_timeout_s` is closed; the
aiohttp heartbeat closes connections whose peer stopped answering pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

__all__ = ["EventHub", "WsClient", "json_dumps", "json_ready"]

_RESYNC = json.dumps({"type": "resync", "data": {}, "ts": 0.0})


def json_ready(value: Any) -> Any:
    """A copy of `value` that json.dumps accepts and browsers parse: NaN and infinities become None,
    numpy scalars and arrays become Python numbers and lists, tuples become lists."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_ready(v) for v in value]
    return str(value)


def json_dumps(value: Any) -> str:
    """Strict JSON text (no NaN) of `value` after `json_ready`."""
    return json.dumps(json_ready(value), allow_nan=False, separators=(",", ":"))


class WsClient:
    """One connected WebSocket: its bounded queue of serialised messages and its sender task."""

    def __init__(self, ws: web.WebSocketResponse, *, queue_size: int, send_timeout_s: float) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self.send_timeout_s = send_timeout_s
        self.dropped = 0
        self.sent = 0
        self._resync = False
        self.task: asyncio.Task[None] | None = None

    def offer(self, text: str) -> None:
        """Queue `text` without blocking; on overflow drop the oldest and mark a resync."""
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
            self._resync = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(text)

    async def sender(self) -> None:
        """Send queued messages in order until the socket closes or a send stalls."""
        try:
            while not self.ws.closed:
                text = await self.queue.get()
                if self._resync:
                    self._resync = False
                    await asyncio.wait_for(self.ws.send_str(_RESYNC), self.send_timeout_s)
                await asyncio.wait_for(self.ws.send_str(text), self.send_timeout_s)
                self.sent += 1
        except (TimeoutError, ConnectionError, RuntimeError):
            pass  # stalled or gone: the handler closes the socket
        finally:
            if not self.ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(), 1.0)


class EventHub:
    """The set of connected clients and the publish side used by the service listener."""

    def __init__(self, *, queue_size: int = 256, send_timeout_s: float = 10.0, heartbeat_s: float = 20.0) -> None:
        self.queue_size = queue_size
        self.send_timeout_s = send_timeout_s
        self.heartbeat_s = heartbeat_s
        self.clients: set[WsClient] = set()
        self.published = 0
        self.publish_time_max_s = 0.0

    def publish(self, event: Mapping[str, Any]) -> None:
        """Fan one event out to every client; never awaits, never raises for a bad client."""
        t0 = time.perf_counter()
        text = json_dumps(event)
        for client in tuple(self.clients):
            client.offer(text)
        self.published += 1
        self.publish_time_max_s = max(self.publish_time_max_s, time.perf_counter() - t0)

    async def handle(self, request: web.Request, hello: Mapping[str, Any]) -> web.WebSocketResponse:
        """Serve one WebSocket: send `hello`, then events, until either side closes."""
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, max_msg_size=4096)
        await ws.prepare(request)
        client = WsClient(ws, queue_size=self.queue_size, send_timeout_s=self.send_timeout_s)
        client.offer(json_dumps({"type": "hello", "data": hello, "ts": time.time()}))
        self.clients.add(client)
        client.task = asyncio.create_task(client.sender())
        try:
            async for msg in ws:  # clients send nothing useful; read to see pongs and close frames
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.clients.discard(client)
            client.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await client.task
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1.0)
        return ws

    async def close_all(self) -> None:
        """Close every client (server shutdown); the page reconnects by itself."""
        for client in tuple(self.clients):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.ws.close(code=1001, message=b"server shutdown"), 1.0)
