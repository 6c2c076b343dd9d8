"""The router's savings batcher: cache hits' savings reach the ledger per tenant in batches, exactly once, through
budget outages (retried), never past their bounds (time, memory), and each batch in its own trace linked to the hits.

The sink here is a unit-test seam standing in for the budget client; the real RecordSavingsBatch path is exercised
end to end by tests/e2e/test_observability.py (traces) and tests/e2e/test_mesh.py (ledger totals).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.errors import InvalidArgument, Unavailable
from services.common.pricing import TokenUsage
from services.router.classifier.types import Tier
from services.router.savings import FLUSH_SPAN, SavingsBatcher, SavingsRecord, SavingsSettings


@dataclass
class Ledger:
    """Idempotent on request id, like the budget service; fails while ``down`` > 0 (counting down) or ``reject``."""

    down: int = 0
    reject: bool = False
    crash: bool = False
    gate: asyncio.Event | None = None  # calls wait for it (a call in flight)
    recorded: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    async def record_savings(self, tenant: str, records: Sequence[SavingsRecord]) -> None:
        self.calls.append((tenant, [r.request_id for r in records]))
        assert all(r.attribution.tenant == tenant for r in records)
        if self.gate is not None:
            await self.gate.wait()
        if self.crash:
            self.crash = False
            raise RuntimeError("bug")
        if self.reject:
            raise InvalidArgument("invalid RecordSavingsBatchRequest")
        if self.down:
            self.down -= 1
            raise Unavailable("budget store unavailable", reason="STORE_UNAVAILABLE")
        for r in records:
            self.recorded.setdefault(r.request_id, r.saved_micros)


def record(rid: str, tenant: str = "acme", saved: int = 10, span: trace.SpanContext | None = None) -> SavingsRecord:
    return SavingsRecord(rid, Attribution(tenant=tenant, team="t"), saved, "m", Tier.CHEAP, TokenUsage(5, 5), span)


FAST = SavingsSettings(flush_s=0.01)


async def until(ready: Callable[[], bool], timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if ready():
            return
        await asyncio.sleep(0.01)


async def test_queued_records_go_in_one_batch_per_tenant_and_drain_sends_them() -> None:
    ledger = Ledger()
    b = SavingsBatcher(ledger, FAST)
    for i in range(5):
        b.add(record(f"a{i}"))
    b.add(record("z0", tenant="zeta"))
    assert b.pending == 6 and ledger.calls == []  # nothing is sent inline with the hit
    await b.drain()
    assert sorted(ledger.calls) == [("acme", ["a0", "a1", "a2", "a3", "a4"]), ("zeta", ["z0"])]
    assert sum(ledger.recorded.values()) == 60 and b.pending == 0


async def test_records_are_sent_without_a_drain_within_the_flush_interval() -> None:
    ledger = Ledger()
    b = SavingsBatcher(ledger, FAST)
    b.add(record("a"))
    await until(lambda: bool(ledger.recorded))
    assert ledger.recorded == {"a": 10}
    b.add(record("b"))  # the sender goes on after its first round
    await b.drain()
    assert ledger.recorded == {"a": 10, "b": 10}


async def test_a_batch_holds_at_most_max_batch_records() -> None:
    ledger = Ledger()
    b = SavingsBatcher(ledger, SavingsSettings(flush_s=0.01, max_batch=4))
    for i in range(10):
        b.add(record(f"r{i}"))
    await b.drain()
    assert sorted(len(ids) for _, ids in ledger.calls) == [2, 4, 4] and len(ledger.recorded) == 10


async def test_a_budget_outage_is_retried_and_every_saving_is_recorded_once() -> None:
    ledger = Ledger(down=2)
    b = SavingsBatcher(ledger, FAST)
    for i in range(3):
        b.add(record(f"r{i}"))
    await b.drain()
    assert len(ledger.calls) == 3 and ledger.recorded == {"r0": 10, "r1": 10, "r2": 10}
    assert b.given_up == 0 and b.pending == 0


async def test_records_arriving_during_an_outage_keep_their_order_behind_the_retried_ones() -> None:
    ledger = Ledger(down=1, gate=asyncio.Event())
    b = SavingsBatcher(ledger, FAST)
    b.add(record("first"))
    await until(lambda: bool(ledger.calls))
    b.add(record("second"))  # while the call that will fail is in flight
    assert ledger.gate is not None
    ledger.gate.set()
    await b.drain()
    assert ledger.calls[-1] == ("acme", ["first", "second"])


async def test_records_are_given_up_after_retry_s_not_retried_forever() -> None:
    ledger = Ledger(down=10**6)
    b = SavingsBatcher(ledger, SavingsSettings(flush_s=0.01, retry_s=0.3))
    b.add(record("a"))
    b.add(record("b"))
    await until(lambda: b.pending == 0)
    assert b.pending == 0 and b.given_up == 2 and ledger.recorded == {}
    await b.drain()  # nothing left: returns at once


async def test_drain_gives_up_after_its_wait_when_the_budget_stays_down() -> None:
    ledger = Ledger(down=10**6)
    b = SavingsBatcher(ledger, FAST)
    b.add(record("a"))
    await asyncio.wait_for(b.drain(wait_s=0.5), timeout=5)
    assert b.given_up == 1 and b.pending == 0 and len(ledger.calls) >= 2


async def test_past_max_pending_new_records_are_dropped_not_queued() -> None:
    ledger = Ledger()
    b = SavingsBatcher(ledger, SavingsSettings(flush_s=0.01, max_pending=3))
    for i in range(5):
        b.add(record(f"r{i}"))
    assert b.pending == 3 and b.dropped == 2
    await b.drain()
    assert sorted(ledger.recorded) == ["r0", "r1", "r2"]


@pytest.mark.parametrize("failure", ["reject", "crash"])
async def test_a_rejected_or_failing_batch_is_dropped_and_the_sender_goes_on(failure: str) -> None:
    ledger = Ledger(reject=failure == "reject", crash=failure == "crash")
    b = SavingsBatcher(ledger, FAST)
    b.add(record("a"))
    await b.drain()
    assert len(ledger.calls) == 1 and b.given_up == 1 and ledger.recorded == {}
    ledger.reject = False
    b.add(record("b"))
    await b.drain()
    assert ledger.recorded == {"b": 10}


async def test_a_batch_has_its_own_trace_linking_to_every_hit() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    ledger = Ledger()
    b = SavingsBatcher(ledger, FAST, tracer=tracer)
    hits = []
    for i in range(3):
        with tracer.start_as_current_span(f"hit{i}") as span:  # the hit's request span is current when it adds
            hits.append(span.get_span_context())
            b.add(record(f"r{i}", saved=10 * (i + 1), span=span.get_span_context()))
    await b.drain()
    (flush,) = [s for s in exporter.get_finished_spans() if s.name == FLUSH_SPAN]
    assert flush.parent is None and flush.context.trace_id not in {h.trace_id for h in hits}
    assert [link.context for link in flush.links] == hits
    assert flush.attributes is not None
    assert flush.attributes[sc.TENANT] == "acme" and flush.attributes[sc.SAVINGS_RECORDS] == 3
    assert flush.attributes[sc.CACHE_SAVED_MICROS] == 60
    provider.shutdown()
