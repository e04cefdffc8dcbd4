"""Serve the web app on 127.0.0.1 from a background thread with its own event loop (browser and load
tests). The service's methods that emit events run on that loop through `call`."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from stackwatch.web.app import ServiceView, create_app

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, service: ServiceView, *, token: str = "tok", port: int | None = None, **app_kw: Any) -> None:
        self.service = service
        self.token = token
        self.port = port or free_port()
        self.app_kw = app_kw
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)  # type: ignore[no-any-return]

    def start(self) -> None:
        async def go() -> None:
            self.app = create_app(self.service, token=self.token, **self.app_kw)
            self.runner = web.AppRunner(self.app, shutdown_timeout=2.0)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

        self.run(go())

    def stop(self) -> None:
        if self.runner is not None:
            self.run(self.runner.cleanup())
            self.runner = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
