"""What cache hits saved, recorded in the budget ledger in batches.

A hit costs nothing, but the ledger records what it avoided (``saved_micros`` and ``cache_hits`` in the usage
rollups: the figures ``costmesh usage``, the demo report and the savings dashboards read). One ``RecordSavings`` per
hit made a ledger write and, traced, two more spans for every hit — about a quarter of a hit's CPU in the stop-13
profile. The router queues each hit's record instead and sends a tenant's queued records in one
``RecordSavingsBatch`` (one ledger transaction): a round at most every ``flush_s``, each batch at most ``max_batch``
records; what arrives while a round is in flight goes in the next.

Nothing waits on a record: a hit's response is sent before it is recorded, and savings are reporting figures, never
money (reservations and charges never go through here). So:

* a round that meets an unreachable budget is retried with backoff (records are idempotent on ``request_id``, so a
  batch the ledger did record before the error is not counted twice); a record still unsent ``retry_s`` after it
  was queued is given up with an error log;
* at most ``max_pending`` records wait; past that, new ones are dropped with an error log (a budget outage under
  load must not grow the router's memory without bound);
* a batch the ledger rejects (INVALID_ARGUMENT: a bug, not an outage) is logged and dropped, not retried;
* :meth:`SavingsBatcher.drain` (shutdown) sends what is queued at once, retrying for ``wait_s`` at most.

Tracing (when the router traces: a ``tracer`` is given): a batch is sent outside any request, in a root span
``costmesh.savings.flush`` (its own trace) that links to the span of every hit it records, so a hit's trace leads to
the ledger write that recorded it; the span carries the tenant, the number of records (``costmesh.savings.records``)
and their sum (``costmesh.cache.saved_micros``).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import structlog
from opentelemetry import trace

from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.errors import TRANSIENT, CostmeshError
from services.common.pricing import TokenUsage
from services.router.classifier.types import Tier

log = structlog.get_logger("costmesh.router.savings")

FLUSH_SPAN = "costmesh.savings.flush"


@dataclass(frozen=True, slots=True)
class SavingsRecord:
    """One cache hit's saving: the full-tier baseline of the answer it served."""

    request_id: str
    attribution: Attribution
    saved_micros: int
    model: str
    tier: Tier
    usage: TokenUsage
    #: The hit's span, linked from the batch's span (None or invalid: no link).
    span: trace.SpanContext | None = None


class SavingsSink(Protocol):
    async def record_savings(self, tenant: str, records: Sequence[SavingsRecord]) -> None:
        """Record ``records`` (all of ``tenant``) in one call; raises ``CostmeshError`` when it could not."""
        ...


@dataclass(frozen=True, slots=True)
class SavingsSettings:
    flush_s: float = 0.05
    #: 128 is also OpenTelemetry's default cap on a span's links: every hit of a batch gets one.
    max_batch: int = 128
    max_pending: int = 100_000
    retry_s: float = 120.0


@dataclass(slots=True)
class _Queued:
    record: SavingsRecord
    at: float


class SavingsBatcher:
    """Queues savings records and sends them per tenant in batches. Single event loop: no locks."""

    def __init__(
        self,
        sink: SavingsSink,
        settings: SavingsSettings | None = None,
        *,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._s = settings or SavingsSettings()
        self._tracer = tracer
        self._clock = clock
        self._pending: dict[str, list[_Queued]] = {}
        self._count = 0  # queued plus in flight: what max_pending bounds
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._drain_until: float | None = None
        self.dropped = 0
        self.given_up = 0

    @property
    def pending(self) -> int:
        """Records queued or in flight."""
        return self._count

    def add(self, record: SavingsRecord) -> None:
        if self._count >= self._s.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("savings_dropped", dropped=self.dropped, pending=self._count, request_id=record.request_id)
            return
        self._pending.setdefault(record.attribution.tenant, []).append(_Queued(record, self._clock()))
        self._count += 1
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            # Its own, empty context: the sender is no request's child (not its trace, deadline or log fields).
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="savings-batcher", context=contextvars.Context())

    async def drain(self, wait_s: float = 10.0) -> None:
        """Send everything queued now; give up what is still unsent after ``wait_s`` (shutdown)."""
        if self._task is None or self._task.done():
            return
        self._drain_until = self._clock() + wait_s
        self._wake.set()
        try:
            await self._idle.wait()
        finally:
            self._drain_until = None

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            await self._wake.wait()
            if self._drain_until is None:
                await asyncio.sleep(max(self._s.flush_s, backoff))
            elif backoff:
                await asyncio.sleep(max(0.0, min(backoff, self._drain_until - self._clock())))
            self._wake.clear()
            retry = await self._round()
            if retry:
                backoff = min(max(0.25, backoff * 2), 5.0)
                self._wake.set()
            else:
                backoff = 0.0
            if self._count == 0:
                self._idle.set()

    async def _round(self) -> bool:
        """Send every queued record (one batch per tenant and ``max_batch``); True when some must be retried."""
        taken, self._pending = self._pending, {}
        batches = [
            (tenant, queued[i : i + self._s.max_batch])
            for tenant, queued in taken.items()
            for i in range(0, len(queued), self._s.max_batch)
        ]
        outcomes = await asyncio.gather(*(self._send(tenant, batch) for tenant, batch in batches))
        now = self._clock()
        retry = False
        for (tenant, batch), ok in zip(batches, outcomes, strict=True):
            if ok:  # recorded, or given up for good
                self._count -= len(batch)
                continue
            give_up_at = self._drain_until
            keep = [q for q in batch if now < (give_up_at if give_up_at is not None else q.at + self._s.retry_s)]
            self._give_up(tenant, len(batch) - len(keep), "budget unreachable")
            self._count -= len(batch) - len(keep)
            if keep:  # ahead of what arrived meanwhile: oldest first
                self._pending[tenant] = keep + self._pending.get(tenant, [])
                retry = True
        return retry

    async def _send(self, tenant: str, batch: list[_Queued]) -> bool:
        """True when the batch is done with (recorded, or rejected for good); False to retry it."""
        records = [q.record for q in batch]
        with self._flush_span(tenant, records) as span:
            try:
                await self._sink.record_savings(tenant, records)
            except TRANSIENT as err:
                span.set_status(trace.Status(trace.StatusCode.ERROR, err.message))
                log.warning("savings_deferred", tenant=tenant, records=len(records), error=err.message)
                return False
            except CostmeshError as err:  # rejected: retrying cannot help
                self._give_up(tenant, len(records), err.message)
            except Exception as err:  # a bug must cost this batch, not the sender (drain would wait on it forever)
                log.exception("savings_send_failed", tenant=tenant, records=len(records))
                self._give_up(tenant, len(records), repr(err))
        return True

    def _flush_span(self, tenant: str, records: list[SavingsRecord]) -> AbstractContextManager[trace.Span]:
        """The batch's root span, linked to each hit's span; no span without a tracer (tracing off)."""
        if self._tracer is None:
            return nullcontext(trace.INVALID_SPAN)
        attributes: dict[str, str | int] = {
            sc.TENANT: tenant,
            sc.SAVINGS_RECORDS: len(records),
            sc.CACHE_SAVED_MICROS: sum(r.saved_micros for r in records),
        }
        return self._tracer.start_as_current_span(
            FLUSH_SPAN,
            context=trace.set_span_in_context(trace.INVALID_SPAN),
            kind=trace.SpanKind.INTERNAL,
            links=[trace.Link(r.span) for r in records if r.span is not None and r.span.is_valid],
            attributes=attributes,
        )

    def _give_up(self, tenant: str, n: int, why: str) -> None:
        if n:
            self.given_up += n
            log.error("savings_unrecorded", tenant=tenant, records=n, error=why)
