"""Deadline propagation: a servicer records its caller's deadline; clients give downstream calls no more time."""

from __future__ import annotations

import contextvars
import time

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("costmesh_deadline", default=None)


def set_remaining(seconds: float | None) -> None:
    """Record the caller's remaining time (``context.time_remaining()``) for the current task."""
    _deadline.set(None if seconds is None else time.monotonic() + seconds)


def timeout(default_s: float) -> float:
    """Seconds a downstream call may take: the default, capped by the caller's deadline (never below 1 ms)."""
    deadline = _deadline.get()
    if deadline is None:
        return default_s
    return max(0.001, min(default_s, deadline - time.monotonic()))
