"""Admission to the engine: an interactive class that goes in at once and an async class that only uses spare room.

vLLM batches whatever it is given; what it cannot do is keep a flood of batch work from filling every sequence slot
ahead of a user who is waiting. So this worker decides *when* a request enters the engine:

* **interactive** — admitted immediately while fewer than ``interactive_slots`` interactive requests are in the
  engine (vLLM priority 0, so the engine's own priority scheduler also puts them first). Beyond that a request waits in
  a short bounded line for at most ``interactive_max_wait_s``.
* **async** — admitted only while this worker's requests in the engine (both classes) stay below
  ``async_slots = max_num_seqs - interactive_reserve`` and async ones below ``async_concurrency``: the reserve is
  always free for interactive arrivals. Waiters are served first come, first served; the line is bounded.

A full line or a wait that runs out raises ``ResourceExhausted`` with a retry hint (RetryInfo on the wire). Counts are
exact (this worker is the only client of its engine), so no engine round trip is needed to decide.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import QuotaViolation, ResourceExhausted
from services.infer.domain import QueueClass
from services.infer.stats import InferStats


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_num_seqs: int
    interactive_slots: int
    interactive_max_waiting: int
    interactive_max_wait_s: float
    async_slots: int  # max_num_seqs - interactive_reserve
    async_concurrency: int
    async_max_waiting: int
    async_max_wait_s: float

    def __post_init__(self) -> None:
        if not 0 < self.async_slots <= self.max_num_seqs:
            raise ValueError("async_slots must be in (0, max_num_seqs]")
        if not 0 < self.async_concurrency <= self.async_slots:
            raise ValueError("async_concurrency must be in (0, async_slots]")
        if not 0 < self.interactive_slots <= self.max_num_seqs:
            raise ValueError("interactive_slots must be in (0, max_num_seqs]")


@dataclass(slots=True)
class _Ewma:
    value: float
    alpha: float = 0.2

    def add(self, x: float) -> None:
        self.value += self.alpha * (x - self.value)


class Slot:
    """A place in the engine for one request; ``release()`` (idempotent) gives it back."""

    __slots__ = ("_admission", "_released", "acquired_at", "queue_class", "waited_s")

    def __init__(self, admission: Admission, queue_class: QueueClass, waited_s: float) -> None:
        self._admission = admission
        self.queue_class = queue_class
        self.waited_s = waited_s
        self.acquired_at = admission.clock()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Waiter:
    future: asyncio.Future[Slot]
    enqueued_at: float
    bounded: bool  # counted in the class's waiting line


@dataclass
class Admission:
    limits: AdmissionLimits
    stats: InferStats = field(default_factory=InferStats)
    clock: Callable[[], float] = time.monotonic
    _waiters: dict[QueueClass, deque[_Waiter]] = field(
        default_factory=lambda: {QueueClass.INTERACTIVE: deque(), QueueClass.ASYNC: deque()}
    )
    _hold_s: dict[QueueClass, _Ewma] = field(
        default_factory=lambda: {QueueClass.INTERACTIVE: _Ewma(1.0), QueueClass.ASYNC: _Ewma(5.0)}
    )

    # --- counts ---

    def in_engine(self, cls: QueueClass) -> int:
        return self.stats.classes[cls].in_engine

    def waiting(self, cls: QueueClass) -> int:
        return self.stats.classes[cls].waiting

    def has_room(self, cls: QueueClass) -> bool:
        inter = self.in_engine(QueueClass.INTERACTIVE)
        if cls is QueueClass.INTERACTIVE:
            return inter < self.limits.interactive_slots
        asyn = self.in_engine(QueueClass.ASYNC)
        return inter + asyn < self.limits.async_slots and asyn < self.limits.async_concurrency

    def can_admit_now(self, cls: QueueClass) -> bool:
        """Whether ``acquire(cls)`` would grant a slot without waiting."""
        return self.has_room(cls) and not self._waiters[cls]

    def retry_after_s(self, cls: QueueClass, depth: int | None = None) -> float:
        """A hint for clients turned away: how long until the line ahead of them has likely drained."""
        hold = self._hold_s[cls].value
        if cls is QueueClass.INTERACTIVE:
            return round(min(30.0, max(0.1, hold)), 3)
        ahead = self.waiting(cls) if depth is None else depth
        per_slot = max(1, self.limits.async_concurrency)
        return round(min(600.0, max(1.0, hold * (ahead + 1) / per_slot)), 3)

    # --- acquire / release ---

    async def acquire(self, cls: QueueClass, *, max_wait_s: float | None = None, bounded: bool = True) -> Slot:
        """A slot of class ``cls``; waits (first come, first served) while there is no room.

        ``bounded`` requests count against the class's waiting line and fail fast when it is full; the durable job
        runner waits unbounded (its queue is the job store). ``max_wait_s`` defaults to the class's limit.
        """
        stats = self.stats.classes[cls]
        if self.can_admit_now(cls):
            return self._grant(cls, waited_s=0.0)
        limit = self.limits.interactive_max_waiting if cls is QueueClass.INTERACTIVE else self.limits.async_max_waiting
        if bounded and stats.waiting >= limit:
            stats.rejected_total += 1
            raise ResourceExhausted(
                f"{cls.value} queue is full ({limit} waiting)",
                violations=[QuotaViolation(f"queue:{cls.value}", f"at most {limit} requests may wait")],
                retry_after_s=self.retry_after_s(cls),
                reason="QUEUE_FULL",
            )
        if max_wait_s is None and bounded:
            max_wait_s = (
                self.limits.interactive_max_wait_s if cls is QueueClass.INTERACTIVE else self.limits.async_max_wait_s
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), self.clock(), bounded)
        self._waiters[cls].append(waiter)
        if bounded:
            stats.waiting += 1
        try:
            await asyncio.wait({waiter.future}, timeout=max_wait_s)
        except asyncio.CancelledError:
            self._forget(cls, waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()
            raise
        if waiter.future.done():
            # _pump already removed it from the line and did the waiting bookkeeping.
            return waiter.future.result()
        self._forget(cls, waiter)
        waiter.future.cancel()
        stats.rejected_total += 1
        raise ResourceExhausted(
            f"no {cls.value} capacity within {max_wait_s:g}s",
            violations=[QuotaViolation(f"queue:{cls.value}", f"waited {max_wait_s:g}s for an engine slot")],
            retry_after_s=self.retry_after_s(cls),
            reason="QUEUE_TIMEOUT",
        )

    def _forget(self, cls: QueueClass, waiter: _Waiter) -> None:
        line = self._waiters[cls]
        if waiter in line:
            line.remove(waiter)
            if waiter.bounded:
                self.stats.classes[cls].waiting -= 1

    def _grant(self, cls: QueueClass, waited_s: float) -> Slot:
        s = self.stats.classes[cls]
        s.in_engine += 1
        s.admitted_total += 1
        return Slot(self, cls, waited_s)

    def _release(self, slot: Slot) -> None:
        cls = slot.queue_class
        self.stats.classes[cls].in_engine -= 1
        self._hold_s[cls].add(self.clock() - slot.acquired_at)
        self._pump()

    def _pump(self) -> None:
        """Hand free room to waiters: interactive first, then async, each in arrival order."""
        now = self.clock()
        for cls in (QueueClass.INTERACTIVE, QueueClass.ASYNC):
            line = self._waiters[cls]
            while line and self.has_room(cls):
                waiter = line.popleft()
                if waiter.future.done():
                    continue
                if waiter.bounded:  # the runner's unbounded waits are not in `waiting`
                    self.stats.classes[cls].waiting -= 1
                waiter.future.set_result(self._grant(cls, waited_s=now - waiter.enqueued_at))
