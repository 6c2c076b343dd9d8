"""Each service's metrics: what its instruments record for known domain events (in-memory metric reader and span
exporter; no sockets). The names the services export over Prometheus are checked in test_telemetry_dashboards.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.budget.ledger import CommitInput, CommitResult, Reservation, ReserveInput, SavingsInput
from services.budget.metrics import BudgetMetrics
from services.budget.model import Scope, ScopeKind, Window
from services.budget.policy import Headroom
from services.cache.keys import Message as CacheMessage
from services.cache.keys import Role
from services.cache.keys import Sampling as CacheSampling
from services.cache.metrics import CacheMetrics
from services.cache.singleflight import FillResult, LookupQuery, LookupResult, Outcome
from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.errors import ResourceExhausted, Unavailable
from services.common.pricing import PriceTable, TokenUsage
from services.infer.domain import FinishReason, GenerationRequest, GenerationSummary, Message, QueueClass
from services.infer.metrics import InferMetrics
from services.infer.stats import InferStats
from services.router.classifier.types import Tier
from services.router.metrics import RouterMetrics
from services.router.pipeline import Pipeline
from tests.unit.test_router_pipeline import BASELINE, FULL_COST, FixedDecider, Ledger, MemCache, Tokens, Workers, req

Labels = frozenset[tuple[str, Any]]


class Telemetry:
    """A meter provider with an in-memory reader and a tracer provider with an in-memory exporter."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer = self.tracer_provider.get_tracer("test")

    def meter(self, name: str = "test") -> Any:
        return self.meter_provider.get_meter(name)

    def points(self) -> dict[str, dict[Labels, Any]]:
        """metric name -> {labels: value (numbers) or data point (histograms)}"""
        out: dict[str, dict[Labels, Any]] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    series = out.setdefault(metric.name, {})
                    for p in metric.data.data_points:
                        labels = frozenset((p.attributes or {}).items())
                        series[labels] = p.value if isinstance(p, NumberDataPoint) else p
        return out

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


@pytest.fixture
def tel() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.meter_provider.shutdown()
    t.tracer_provider.shutdown()


def value(series: dict[Labels, Any], **labels: Any) -> Any:
    """The value of the one series whose labels include ``labels``."""
    matches = [v for k, v in series.items() if set(labels.items()) <= set(k)]
    assert len(matches) == 1, (labels, series)
    return matches[0]


def total(series: dict[Labels, Any], **labels: Any) -> Any:
    return sum(v for k, v in series.items() if set(labels.items()) <= set(k))


# -- router --------------------------------------------------------------------------------------------------------


def pipeline(tel: Telemetry, ledger: Ledger | None = None) -> Pipeline:
    return Pipeline(
        decider=FixedDecider(),
        cache=MemCache(),
        budget=ledger or Ledger(),
        infer=Workers(),
        tokens=Tokens(),
        prices=PriceTable(),
        models={Tier.CHEAP: "cheap-model", Tier.FULL: "full-model"},
        metrics=RouterMetrics(tel.meter()),
    )


async def test_router_counts_spend_tokens_and_savings_split_by_cache_and_routing(tel: Telemetry) -> None:
    p = pipeline(tel)
    miss = await p.generate(req("What is 2+2?", rid="a"))
    await p.drain()
    hit = await p.generate(req("what is 2+2?", rid="b"))
    await p.drain()
    assert not miss.cache_hit and hit.cache_hit
    m = tel.points()
    who = {"tenant": "acme", "team": "t", "feature": "f", "model": "full-model", "tier": "full"}
    assert value(m["costmesh.requests"], **who, cache_hit="false", outcome="ok") == 1
    assert value(m["costmesh.requests"], **who, cache_hit="true", outcome="ok") == 1
    assert value(m["costmesh.cost.micros"], **who) == FULL_COST == miss.cost_micros
    assert value(m["costmesh.cost.baseline_micros"], **who) == 2 * BASELINE
    assert value(m["costmesh.savings.micros"], reason="routing") == BASELINE - FULL_COST
    assert value(m["costmesh.savings.micros"], reason="cache") == BASELINE == hit.saved_micros
    # the hit reports the stored usage: tokens are counted twice, once per answered request
    assert total(m["costmesh.tokens"], type="input") == 200
    assert total(m["costmesh.tokens"], type="output") == 40
    assert total(m["costmesh.tokens"], type="cached_input", cache_hit="false") == 40
    assert value(m["costmesh.route.decisions"], tier="full", classifier_tier="full", cache_hit="false") == 1
    score = value(m["costmesh.route.score"], tier="full")
    assert isinstance(score, HistogramDataPoint) and score.count == 2 and score.sum == pytest.approx(1.8)


async def test_router_counts_a_hard_stop_as_resource_exhausted_and_charges_nothing(tel: Telemetry) -> None:
    p = pipeline(tel, Ledger(limit=1))
    with pytest.raises(ResourceExhausted):
        await p.generate(req())
    m = tel.points()
    assert value(m["costmesh.requests"], outcome="resource_exhausted", tenant="acme", feature="f") == 1
    assert "costmesh.cost.micros" not in m or total(m["costmesh.cost.micros"]) == 0


async def test_router_counts_a_failed_stream_once(tel: Telemetry) -> None:
    p = Pipeline(
        decider=FixedDecider(min_tier=Tier.FULL),
        cache=MemCache(),
        budget=Ledger(),
        infer=Workers(fail_after_first=True),
        tokens=Tokens(),
        prices=PriceTable(),
        models={Tier.CHEAP: "cheap-model", Tier.FULL: "full-model"},
        metrics=RouterMetrics(tel.meter()),
    )
    with pytest.raises(Unavailable):
        await p.generate(req())
    assert total(tel.points()["costmesh.requests"]) == 1
    assert value(tel.points()["costmesh.requests"], outcome="unavailable") == 1


# -- cache ---------------------------------------------------------------------------------------------------------


def query(tenant: str = "acme", feature: str = "faq") -> LookupQuery:
    return LookupQuery(
        tenant=tenant,
        feature=feature,
        model="full-model",
        messages=(CacheMessage(Role.USER, "hi"),),
        sampling=CacheSampling(max_tokens=8, temperature=0.0),
    )


def test_cache_counts_lookups_by_outcome_coalesced_waits_and_fills(tel: Telemetry) -> None:
    m = CacheMetrics(tel.meter(), waiting=lambda: 3)
    who = Attribution(tenant="acme", team="support", feature="faq")
    with tel.tracer.start_as_current_span("Lookup"):
        m.lookup(who, query(), LookupResult(Outcome.HIT, "k", coalesced=True))
    m.lookup(who, query(), LookupResult(Outcome.HIT, "k"))
    m.lookup(who, query(), LookupResult(Outcome.MISS, "k"))
    m.fill(who, abandon=False, result=FillResult(True))
    m.fill(who, abandon=False, result=FillResult(False, "TOO_LARGE"))
    m.fill(who, abandon=True, result=FillResult(False, "ABANDONED"))
    p = tel.points()
    assert value(p["costmesh.cache.lookups"], outcome="hit", tenant="acme", feature="faq") == 2
    assert value(p["costmesh.cache.lookups"], outcome="miss") == 1
    assert value(p["costmesh.cache.coalesced_waits"], tenant="acme") == 1
    assert value(p["costmesh.cache.fills"], result="stored") == 1
    assert value(p["costmesh.cache.fills"], result="too_large") == 1
    assert value(p["costmesh.cache.fills"], result="abandoned") == 1
    assert value(p["costmesh.cache.waiting"]) == 3
    (span,) = tel.finished()
    attrs = dict(span.attributes or {})
    assert attrs[sc.CACHE_HIT] is True and attrs[sc.CACHE_COALESCED] is True and attrs[sc.CACHE_OUTCOME] == "hit"
    assert attrs[sc.TENANT] == "acme" and attrs[sc.TEAM] == "support" and attrs[sc.GEN_AI_REQUEST_MODEL] == "full-model"


# -- budget --------------------------------------------------------------------------------------------------------


def reserve_input(tier: int = 2) -> ReserveInput:
    return ReserveInput(
        request_id="r1",
        attribution=Attribution(tenant="acme", team="search", feature="faq"),
        estimated_cost_micros=500,
        estimated_tokens=100,
        model="full-model",
        tier=tier,
    )


def room(kind: ScopeKind, name: str, limit: int, spent: int, reserved: int) -> Headroom:
    return Headroom(
        scope=Scope(kind, "acme", name),
        window=Window.DAY,
        limit_micros=limit,
        spent_micros=spent,
        reserved_micros=reserved,
        remaining_micros=limit - spent - reserved,
        limit_tokens=None,
        used_tokens=0,
        soft_exceeded=False,
        resets_unix_ms=0,
    )


def test_budget_counts_reservations_rejections_and_reports_headroom(tel: Telemetry) -> None:
    m = BudgetMetrics(tel.meter())
    rows = [room(ScopeKind.TENANT, "", 10_000, 4_000, 500), room(ScopeKind.END_USER, "u1", 100, 0, 0)]
    with tel.tracer.start_as_current_span("Reserve"):
        m.reserved(reserve_input(), Reservation("res1", 0, rows, False, False, 0, 5_500))
    m.reserved(reserve_input(), Reservation("res1", 0, rows, False, True, 0, 5_500))
    m.rejected(
        reserve_input(),
        ResourceExhausted("over", reason="BUDGET_EXCEEDED", metadata={"window": "day", "limit": "cost"}),
    )
    p = tel.points()
    assert value(p["costmesh.budget.reservations"], outcome="reserved", tier="full", team="search") == 1
    assert value(p["costmesh.budget.reservations"], outcome="replayed") == 1
    assert value(p["costmesh.budget.reservations"], outcome="rejected") == 1
    assert value(p["costmesh.budget.rejections"], reason="BUDGET_EXCEEDED", window="day", feature="faq") == 1
    tenant_day = {"tenant": "acme", "scope_kind": "tenant", "scope_name": "", "window": "day"}
    assert value(p["costmesh.budget.remaining.micros"], **tenant_day) == 5_500
    assert value(p["costmesh.budget.used.micros"], **tenant_day) == 4_500
    assert value(p["costmesh.budget.limit.micros"], **tenant_day) == 10_000
    assert len(p["costmesh.budget.limit.micros"]) == 1  # end-user scopes are not exported
    (span,) = tel.finished()
    attrs = dict(span.attributes or {})
    assert attrs[sc.BUDGET_REMAINING_MICROS] == 5_500 and attrs[sc.BUDGET_ESTIMATED_MICROS] == 500
    assert attrs[sc.BUDGET_OUTCOME] == "reserved" and attrs[sc.TIER] == "full" and attrs[sc.TEAM] == "search"


def test_budget_counts_spend_and_savings_once_and_drops_old_scopes(tel: Telemetry) -> None:
    m = BudgetMetrics(tel.meter(), max_scopes=2)
    commit = CommitInput(
        tenant="acme",
        reservation_id="res1",
        actual_cost_micros=700,
        usage=TokenUsage(10, 5, 2),
        model="cheap-model",
        tier=1,
        saved_micros=300,
    )
    with tel.tracer.start_as_current_span("Commit"):
        m.committed(commit, CommitResult(700, False, False, 9_300))
    m.committed(commit, CommitResult(700, False, True, 9_300))  # a replay settles nothing new
    savings = SavingsInput("r2", Attribution(tenant="acme", feature="faq"), 1_000, reason=1, model="m", tier=2)
    m.savings(savings, replayed=False)
    m.savings(savings, replayed=True)
    p = tel.points()
    assert value(p["costmesh.budget.committed.micros"], tenant="acme", tier="cheap", model="cheap-model") == 700
    assert value(p["costmesh.budget.saved.micros"], reason="routing") == 300
    assert value(p["costmesh.budget.saved.micros"], reason="cache", feature="faq") == 1_000
    (span,) = tel.finished()
    attrs = dict(span.attributes or {})
    assert attrs[sc.COST_MICROS] == 700 and attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 5 and attrs[sc.TIER] == "cheap"
    m.headroom([room(ScopeKind.FEATURE, f"f{i}", 100, 0, 0) for i in range(3)])
    assert {dict(k)["scope_name"] for k in tel.points()["costmesh.budget.limit.micros"]} == {"f1", "f2"}


def test_budget_counts_late_commits_once_with_their_money_and_renewals_by_outcome(tel: Telemetry) -> None:
    m = BudgetMetrics(tel.meter())
    commit = CommitInput(tenant="acme", reservation_id="res1", actual_cost_micros=900, model="m", tier=2)
    with tel.tracer.start_as_current_span("Commit"):
        m.committed(commit, CommitResult(900, False, False, -100, late="expired"))
    m.committed(commit, CommitResult(900, False, True, -100, late="expired"))  # a replay: not another event
    m.committed(replace(commit, reservation_id="res2"), CommitResult(40, False, False, None, late="released"))
    m.committed(replace(commit, reservation_id="res3"), CommitResult(10, False, False, None))  # on time
    p = tel.points()
    assert value(p["costmesh.budget.late_commits"], tenant="acme", reason="expired") == 1
    assert value(p["costmesh.budget.late_commits"], tenant="acme", reason="released") == 1
    assert value(p["costmesh.budget.late_committed.micros"], reason="expired") == 900
    assert total(p["costmesh.budget.late_committed.micros"], tenant="acme") == 940
    assert total(p["costmesh.budget.committed.micros"], tenant="acme") == 950  # late spend is spend too
    (span,) = tel.finished()
    assert dict(span.attributes or {})[sc.BUDGET_OUTCOME] == "committed_late"
    for outcome in ("renewed", "renewed", "expired", "settled", "not_found"):
        m.renewed("acme", "res1", outcome)
    renewals = tel.points()["costmesh.budget.renewals"]
    assert value(renewals, tenant="acme", outcome="renewed") == 2
    assert value(renewals, outcome="expired") == value(renewals, outcome="settled") == 1


def test_budget_savings_batch_counts_each_new_record_and_annotates_the_span_once(tel: Telemetry) -> None:
    m = BudgetMetrics(tel.meter())
    records = [
        SavingsInput("h1", Attribution(tenant="acme", feature="faq"), 1_000, reason=1, model="m", tier=2),
        SavingsInput("h2", Attribution(tenant="acme", feature="chat"), 300, reason=1, model="m", tier=1),
        SavingsInput("h3", Attribution(tenant="acme", feature="faq"), 50, reason=1, model="m", tier=2),
    ]
    with tel.tracer.start_as_current_span("RecordSavingsBatch"):
        m.savings_batch("acme", records, [False, False, True])  # h3 replays: not counted again
    saved = tel.points()["costmesh.budget.saved.micros"]
    assert value(saved, feature="faq", tier="full", reason="cache") == 1_000
    assert value(saved, feature="chat", tier="cheap") == 300
    assert total(saved, tenant="acme") == 1_300
    (span,) = tel.finished()
    attrs = dict(span.attributes or {})
    assert attrs[sc.TENANT] == "acme" and sc.FEATURE not in attrs
    assert attrs[sc.CACHE_SAVED_MICROS] == 1_350 and attrs[sc.SAVINGS_RECORDS] == 3


# -- infer ---------------------------------------------------------------------------------------------------------


def test_infer_exports_queue_depth_per_class_with_tier_and_capacity(tel: Telemetry) -> None:
    stats = InferStats()
    InferMetrics(
        tel.meter(),
        stats=stats,
        tier="cheap",
        model="m-cheap",
        capacity={QueueClass.INTERACTIVE: 64, QueueClass.ASYNC: 1000},
    )
    stats.classes[QueueClass.INTERACTIVE].waiting = 5
    stats.classes[QueueClass.ASYNC].waiting = 1
    stats.jobs_queued = 7
    stats.classes[QueueClass.INTERACTIVE].rejected_total = 2
    stats.serving = True
    p = tel.points()
    assert value(p["costmesh.infer.interactive_queue_depth"], tier="cheap", model="m-cheap") == 5
    assert value(p["costmesh.infer.queue_depth"], queue_class="interactive") == 5
    assert value(p["costmesh.infer.queue_depth"], queue_class="async") == 8
    assert value(p["costmesh.infer.queue_capacity"], queue_class="async") == 1000
    assert value(p["costmesh.infer.requests"], queue_class="interactive", outcome="rejected") == 2
    assert value(p["costmesh.infer.jobs"], state="queued") == 7
    assert value(p["costmesh.infer.serving"], tier="cheap") == 1


def test_infer_records_ttft_tpot_tokens_cost_and_annotates_the_span(tel: Telemetry) -> None:
    m = InferMetrics(tel.meter(), tier="full", model="m-full")
    request = GenerationRequest(
        request_id="r1",
        messages=(Message("user", "hi"),),
        attribution=Attribution(tenant="acme", team="search", feature="faq"),
    )
    summary = GenerationSummary(
        usage=TokenUsage(12, 11, 4),
        finish_reason=FinishReason.LENGTH,
        time_to_first_token_ms=250.0,
        latency_ms=1250.0,
        model="m-full",
        tier="full",
    )
    with tel.tracer.start_as_current_span("Generate"):
        m.generation(request, QueueClass.INTERACTIVE, max_tokens=11, summary=summary, cost_micros=123)
    p = tel.points()
    ttft = value(p["gen_ai.server.time_to_first_token"], tier="full", queue_class="interactive")
    assert ttft.count == 1 and ttft.sum == pytest.approx(0.25)
    tpot = value(p["gen_ai.server.time_per_output_token"], tier="full")
    assert tpot.sum == pytest.approx(1.0 / 10)  # 1 s of decoding over the 10 tokens after the first
    assert value(p["gen_ai.server.request.duration"], tier="full").sum == pytest.approx(1.25)
    assert value(p["costmesh.infer.tokens"], type="output", feature="faq") == 11
    assert value(p["costmesh.infer.tokens"], type="cached_input") == 4
    assert value(p["costmesh.infer.cost.micros"], tenant="acme", queue_class="interactive") == 123
    (span,) = tel.finished()
    attrs = dict(span.attributes or {})
    assert attrs[sc.COST_MICROS] == 123 and attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == 12
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",) and attrs[sc.QUEUE_CLASS] == "interactive"
    assert attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] == 11 and attrs[sc.TIER] == "full" and attrs[sc.TENANT] == "acme"
    (event,) = span.events
    assert event.name == sc.EVENT_FIRST_TOKEN and dict(event.attributes or {})[sc.TTFT_MS] == 250.0
    assert span.end_time is not None
    # stamped when the first token came out: one second of decoding before the span ended
    assert span.end_time - event.timestamp >= 1_000_000_000
