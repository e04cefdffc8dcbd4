"""A small sd_notify(3) client: tells systemd READY, STATUS, WATCHDOG and STOPPING.

systemd passes the socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and
the watchdog period in ``WATCHDOG_USEC`` (for the process ``WATCHDOG_PID`` when set). Without
``NOTIFY_SOCKET`` every call is a no-op, so the service runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["SdNotifier"]


class SdNotifier:
    """Sends notifications over the ``NOTIFY_SOCKET`` datagram socket.

    Parameters
    ----------
    environ : mapping, optional
        Where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Default is
        ``os.environ``.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or (pid.isdigit() and int(pid) == os.getpid())):
            self._watchdog_usec = int(usec)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WatchdogSec), or None when no watchdog is set."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec > 0 else None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="...")``); False if not sent."""
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._address)
        except OSError:
            return False  # systemd went away or the socket is gone: nothing useful to do
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text.replace("\n", " "))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, STATUS=status) if status else self.notify(STOPPING=1)

    def reloading(self) -> bool:
        return self.notify(RELOADING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
