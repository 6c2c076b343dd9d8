"""What the services export to Prometheus, derived from their instrument definitions, and PromQL name extraction.

``exported_series()`` builds every service's metrics objects (router, cache, budget, infer, the shared
``rpc.server.duration`` and the router's ``http.server.request.duration``) against one ``MeterProvider`` whose
Prometheus reader writes to a private registry, feeds each instrument one representative domain event, and parses
the text exposition: metric name → label names, exactly as a scrape of a running service shows them.
``selectors()`` pulls the metric names and label matchers out of a PromQL expression so dashboards and alert rules
can be checked against it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from services.budget.ledger import CommitInput, CommitResult, Reservation, ReserveInput, SavingsInput
from services.budget.metrics import BudgetMetrics
from services.budget.model import Scope, ScopeKind, Window
from services.budget.policy import Headroom
from services.cache.keys import Message as CacheMessage
from services.cache.keys import Role
from services.cache.keys import Sampling as CacheSampling
from services.cache.metrics import CacheMetrics
from services.cache.singleflight import FillResult, LookupQuery, LookupResult, Outcome
from services.common.attribution import Attribution
from services.common.errors import ResourceExhausted, Unavailable
from services.common.http_telemetry import HttpMetrics
from services.common.pricing import TokenUsage
from services.common.rpc_telemetry import RpcMetrics
from services.infer.domain import FinishReason, GenerationRequest, GenerationSummary, QueueClass
from services.infer.metrics import InferMetrics
from services.infer.stats import InferStats
from services.router.classifier.types import Message as RouterMessage
from services.router.classifier.types import Tier
from services.router.metrics import RouterMetrics
from services.router.pipeline import Decision, GenerateInput, GenerateResult
from services.router.pipeline import FinishReason as RouterFinish

#: Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset({"job", "instance"})}
#: Target labels the scrape configuration adds (deploy/observability/prometheus/prometheus.yml: service, tier).
TARGET_LABELS = frozenset({"job", "instance", "service"})

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(?:\\.|[^"\\])*"')


def parse_exposition(text: str) -> dict[str, frozenset[str]]:
    """Prometheus text format → {series name: label names seen on it}."""
    out: dict[str, set[str]] = defaultdict(set)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        out[m.group(1)].update(_LABEL.findall(m.group(2) or ""))
    return {name: frozenset(labels) for name, labels in out.items()}


def _exercise(provider: MeterProvider) -> None:
    who = Attribution(tenant="acme", team="search", feature="faq")
    # router
    router = RouterMetrics(provider.get_meter("costmesh.router"))
    inp = GenerateInput(request_id="r", attribution=who, messages=(RouterMessage("user", "hi"),))
    decision = Decision(Tier.CHEAP, 0.2, 0.5, False, (), Tier.CHEAP)
    result = GenerateResult(
        request_id="r",
        text="x",
        usage=TokenUsage(10, 5, 2),
        cost_micros=10,
        tier=Tier.CHEAP,
        model="m",
        decision=decision,
        cache_hit=False,
        saved_micros=90,
        budget_remaining_micros=None,
        finish_reason=RouterFinish.STOP,
        ttft_ms=1.0,
        escalated=False,
        baseline_micros=100,
    )
    router.observe(inp, result)
    router.observe(inp, error=Unavailable("down"))
    # cache
    cache = CacheMetrics(provider.get_meter("costmesh.cache"), waiting=lambda: 0)
    query = LookupQuery("acme", "faq", "m", (CacheMessage(Role.USER, "hi"),), CacheSampling(max_tokens=1))
    cache.lookup(who, query, LookupResult(Outcome.HIT, "k", coalesced=True))
    cache.fill(who, abandon=False, result=FillResult(True))
    # budget
    budget = BudgetMetrics(provider.get_meter("costmesh.budget"))
    reserve = ReserveInput("r", who, 100, 10, model="m", tier=1)
    scope = Scope(ScopeKind.TENANT, "acme")
    row = Headroom(scope, Window.DAY, 1000, 10, 5, 985, None, 0, False, 0)
    budget.reserved(reserve, Reservation("res", 0, [row], False, False, 0, 985))
    budget.rejected(reserve, ResourceExhausted("over", reason="BUDGET_EXCEEDED"))
    budget.committed(CommitInput("acme", "res", 10, TokenUsage(1, 1), "m", 1, 5), CommitResult(10, False, False, 975))
    late = CommitResult(10, False, False, 965, late="expired")
    budget.committed(CommitInput("acme", "res2", 10, TokenUsage(1, 1), "m", 1), late)
    budget.renewed("acme", "res", "renewed")
    budget.savings(SavingsInput("r", who, 5, 1, "m", 1), replayed=False)
    # infer
    infer = InferMetrics(
        provider.get_meter("costmesh.infer"),
        stats=InferStats(),
        tier="cheap",
        model="m",
        capacity={QueueClass.INTERACTIVE: 1, QueueClass.ASYNC: 1},
    )
    summary = GenerationSummary(TokenUsage(10, 5, 2), FinishReason.STOP, 10.0, 50.0, "m", "cheap")
    infer.generation(
        GenerationRequest("r", prompt="hi", attribution=who),
        QueueClass.INTERACTIVE,
        max_tokens=5,
        summary=summary,
        cost_micros=3,
    )
    # every service
    RpcMetrics(provider.get_meter("costmesh.rpc")).record("/costmesh.x.v1.X/Y", grpc.StatusCode.OK, 1.0)
    # the router's HTTP front door
    http = HttpMetrics(provider.get_meter("costmesh.http"))
    base = {"http.request.method": "POST", "url.scheme": "http", "network.protocol.version": "1.1"}
    http.record({**base, "http.route": "/v1/chat/completions", "http.response.status_code": 200}, 0.01)
    http.record({**base, "http.response.status_code": 500, "error.type": "500"}, 0.01)


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the services export over Prometheus, with its label names."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(resource=Resource.create({"service.name": "costmesh-test"}), metric_readers=[reader])
    try:
        _exercise(provider)
        return parse_exposition(generate_latest(registry).decode())
    finally:
        provider.shutdown()


@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"})
_KEYWORDS_CI = frozenset({"inf", "nan"})


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression: each metric name with the label names it matches on."""
    text = _STRING.sub('""', expr)  # matcher values cannot look like names
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries, e.g. [5m] or [$__rate_interval]
    text = re.sub(r"\boffset\s+-?\w+", "", text)
    text = re.sub(r"@\s*\S+", "", text)
    text = _CLAUSE.sub(" ", text)
    found: list[Selector] = []
    pos = 0
    while True:
        m = _IDENT.search(text, pos)
        if m is None:
            return found
        pos = m.end()
        name = m.group(0)
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] in "$."):
            continue  # part of a number (1e6) or a Grafana variable
        while pos < len(text) and text[pos].isspace():
            pos += 1
        rest = text[pos:]
        if rest.startswith("("):
            continue  # a function or an aggregation
        if name in _KEYWORDS or name.lower() in _KEYWORDS_CI:
            continue
        labels: frozenset[str] = frozenset()
        matchers = _MATCHERS.match(rest)
        if matchers is not None:
            labels = frozenset(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers.group(1)))
            pos += matchers.end()
        found.append(Selector(name, labels))
