"""Events from the service to its listeners (the web view's WebSocket, logs, tests).

An event is ``{"type": str, "data": dict, "ts": float}`` with type one of ``EVENT_TYPES``.
``EventBus.emit`` runs on the event-loop thread and calls every listener there; a listener must not
block, and one that raises is logged and kept (one bad client never silences the others). Worker
threads use ``emit_threadsafe``, which hands the event to the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EVENT_TYPES", "Event", "EventBus", "Listener"]

EVENT_TYPES = ("frame_received", "frame_processed", "stack_updated", "master_updated", "warning", "status")

Event = dict[str, Any]
Listener = Callable[[Event], None]

_log = logging.getLogger("stackwatch.events")


class EventBus:
    """Listeners registered by the web app; events emitted by the service.

    Parameters
    ----------
    clock : callable, optional
        Seconds for the ``ts`` field. Default is ``time.time``.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._listeners: list[Listener] = []
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop on which listeners are called (set by the service at start-up)."""
        self._loop = loop

    def add_listener(self, callback: Listener) -> None:
        if callback not in self._listeners:
            self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def emit(self, type: str, data: dict[str, Any] | None = None) -> Event:
        """Call every listener with the event (on the calling thread: the loop's); returns it."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event: Event = {"type": type, "data": data or {}, "ts": self._clock()}
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:  # a listener's bug must not stop the service
                _log.exception("event listener %r failed on %s", callback, type)
        return event

    def emit_threadsafe(self, type: str, data: dict[str, Any] | None = None) -> None:
        """From a worker thread: schedule ``emit`` on the bound loop."""
        if self._loop is None:
            self.emit(type, data)
            return
        self._loop.call_soon_threadsafe(self.emit, type, data)
