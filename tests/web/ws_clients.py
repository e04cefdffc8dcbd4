"""WebSocket load for test_load.py, run as a separate process: N-1 reading clients and one that
connects and never reads (tiny receive buffer, so the server's send to it really stalls).

Usage: python ws_clients.py URL N. Prints "ready" when connected, then one JSON line with the
per-client message counts when every reader has seen the event {"type": "warning", "data":
{"message": "load-test-done"}} (or after 120 s).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
from typing import Any
from urllib.parse import urlparse

import aiohttp


async def reader(session: aiohttp.ClientSession, url: str, ready: asyncio.Event, counts: dict[str, int]) -> None:
    async with session.ws_connect(url + "/ws", heartbeat=None) as ws:
        ready.set()
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            ev = json.loads(msg.data)
            counts[ev["type"]] = counts.get(ev["type"], 0) + 1
            if ev["type"] == "warning" and ev["data"].get("message") == "load-test-done":
                return


async def never_reads(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (u.hostname or "127.0.0.1", u.port or 80))
    key = base64.b64encode(os.urandom(16)).decode()
    req = (f"GET /ws HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await loop.sock_sendall(sock, req.encode())
    return sock  # and never read from it again


async def main(url: str, n: int) -> None:
    stalled = await never_reads(url)
    counts: list[dict[str, int]] = [{} for _ in range(n - 1)]
    readies = [asyncio.Event() for _ in range(n - 1)]
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/api/stacks/s1/preview?size=256") as r:  # a viewer, as a browser would
            await r.read()
        tasks = [asyncio.create_task(reader(session, url, readies[i], counts[i])) for i in range(n - 1)]
        await asyncio.gather(*(e.wait() for e in readies))
        print("ready", flush=True)
        done, pending = await asyncio.wait(tasks, timeout=120)
        for t in pending:
            t.cancel()
    result: dict[str, Any] = {"counts": counts, "finished": len(done)}
    print(json.dumps(result), flush=True)
    stalled.close()


if __name__ == "__main__":
    os.nice(19)  # stand-ins for browsers on other machines: take only idle CPU of the shared machine
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
