"""Deadline propagation: a servicer records its caller's deadline; clients give downstream calls no more time."""

from __future__ import annotations

import contextvars
import time

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("costmesh_deadline", default=None)


def set_remaining(seconds: float | None) -> None:
    """Record the caller's remaining time (``context.time_remaining()``) for the current task."""
    _deadline.set(None if seconds is None else time.monotonic() + seconds)


def timeout(default_s: float, grace_s: float = 0.0) -> float:
    """Seconds a downstream call may take: the default, capped by the caller's deadline plus ``grace_s`` (never
    below 1 ms). A grace outlives the caller on purpose: a generation whose caller's deadline passes must still be
    stopped and report what it generated, so it can be billed."""
    deadline = _deadline.get()
    if deadline is None:
        return default_s
    return max(0.001, min(default_s, deadline + grace_s - time.monotonic()))
