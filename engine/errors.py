"""Errors a user can cause. Each carries one clear message naming the thing and the reason.

The command line prints ``str(error)`` for these and never a traceback; anything else is a bug.
"""

from __future__ import annotations

__all__ = ["FrameError", "StackwatchError"]


class StackwatchError(Exception):
    """Base of every user-facing error (bad file, bad argument, missing master, bad configuration)."""


class FrameError(StackwatchError):
    """A file that cannot be used as a frame: names the file and the reason."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
