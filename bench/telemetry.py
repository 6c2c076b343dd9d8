"""Telemetry benchmark: what each service's per-request metrics and span annotations cost in-process, and a scrape.

For each hook a service calls once per request (router ``observe``, cache ``lookup``, budget ``reserved`` and
``committed``, infer ``generation``, ``rpc.server.duration``), the median time per call over many calls, measured
twice: outside any span (metrics only) and inside a recording span (metrics + attributes; infer adds its
first-token event). Then the time to render ``/metrics`` (Prometheus text) once the hooks have created a given number
of label combinations (tenant × feature series). Then what encoding a finished span for OTLP export costs per span,
with the exporter library's encoder and with costmesh's (``services/common/span_export.py``), on spans shaped like a
router server span. The end-to-end cost of tracing (export included) is measured by ``bench/mesh.py --tracing``; this
isolates the parts.

    .venv/bin/python bench/telemetry.py [--json PATH] [--calls N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest

from services.budget.ledger import CommitInput, CommitResult, Reservation, ReserveInput
from services.budget.metrics import BudgetMetrics
from services.budget.model import Scope, ScopeKind, Window
from services.budget.policy import Headroom
from services.cache.keys import Message as CacheMessage
from services.cache.keys import Role
from services.cache.keys import Sampling as CacheSampling
from services.cache.metrics import CacheMetrics
from services.cache.singleflight import LookupQuery, LookupResult, Outcome
from services.common.attribution import Attribution
from services.common.pricing import TokenUsage
from services.common.rpc_telemetry import RpcMetrics
from services.infer.domain import FinishReason, GenerationRequest, GenerationSummary, QueueClass
from services.infer.metrics import InferMetrics
from services.infer.stats import InferStats
from services.router.classifier.types import Message, Tier
from services.router.metrics import RouterMetrics
from services.router.pipeline import Decision, GenerateInput, GenerateResult
from services.router.pipeline import FinishReason as RouterFinish


@dataclass
class Row:
    hook: str
    span: bool
    calls: int
    median_us: float
    p99_us: float


@dataclass
class EncodeRow:
    encoder: str
    spans: int
    us_per_span: float  # median over repeats of (encode + serialize a 512-span batch) / 512


@dataclass
class ScrapeRow:
    series_per_metric: int
    bytes: int
    median_ms: float


def hooks(provider: MeterProvider) -> dict[str, Callable[[int], None]]:
    """name -> one call of the hook for the i-th request (tenant/feature cycle over a small set)."""
    router = RouterMetrics(provider.get_meter("costmesh.router"))
    cache = CacheMetrics(provider.get_meter("costmesh.cache"), waiting=lambda: 0)
    budget = BudgetMetrics(provider.get_meter("costmesh.budget"))
    infer = InferMetrics(provider.get_meter("costmesh.infer"), stats=InferStats(), tier="cheap", model="m")
    rpc = RpcMetrics(provider.get_meter("costmesh.rpc"))
    who = [Attribution(tenant=f"t{i % 4}", team="search", feature=f"f{i % 8}") for i in range(8)]
    decision = Decision(Tier.CHEAP, 0.2, 0.5, False, (), Tier.CHEAP)
    usage = TokenUsage(200, 40, 64)

    def result(i: int) -> GenerateResult:
        return GenerateResult(
            f"r{i}", "x", usage, 90, Tier.CHEAP, "m", decision, False, 900, None, RouterFinish.STOP, 5.0, False, 0, 990
        )

    inputs = [GenerateInput(f"r{i}", who[i], (Message("user", "hi"),)) for i in range(8)]
    results = [result(i) for i in range(8)]
    queries = [
        LookupQuery(a.tenant, a.feature, "m", (CacheMessage(Role.USER, "hi"),), CacheSampling(max_tokens=8))
        for a in who
    ]
    hit = LookupResult(Outcome.HIT, "k")
    room = [
        Headroom(
            Scope(ScopeKind.TENANT, f"t{i}"), Window.DAY, 10**9, 10**6, 10**4, 10**9 - 10**6 - 10**4, None, 0, False, 0
        )
        for i in range(4)
    ]
    reserves = [ReserveInput(f"r{i}", who[i], 500, 300, "m", 1) for i in range(8)]
    reservation = Reservation("res", 0, room[:1], False, False, 0, 10**8)
    commit = CommitInput("t0", "res", 90, usage, "m", 1, 900)
    committed = CommitResult(90, False, False, 10**8)
    summary = GenerationSummary(usage, FinishReason.STOP, 120.0, 900.0, "m", "cheap")
    requests = [GenerationRequest(f"r{i}", prompt="hi", attribution=who[i]) for i in range(8)]
    return {
        "router observe (per request)": lambda i: router.observe(inputs[i % 8], results[i % 8]),
        "cache lookup (per Lookup)": lambda i: cache.lookup(who[i % 8], queries[i % 8], hit),
        "budget reserved (per Reserve)": lambda i: budget.reserved(reserves[i % 8], reservation),
        "budget committed (per Commit)": lambda i: budget.committed(commit, committed),
        "infer generation (per generation)": lambda i: infer.generation(
            requests[i % 8], QueueClass.INTERACTIVE, max_tokens=40, summary=summary, cost_micros=90
        ),
        "rpc.server.duration (per call)": lambda i: rpc.record(
            "/costmesh.cache.v1.CacheService/Lookup", grpc.StatusCode.OK, 1.5
        ),
    }


def time_hook(fn: Callable[[int], None], calls: int, tracer: Any | None) -> tuple[float, float]:
    samples: list[float] = []
    for i in range(calls):
        scope = tracer.start_as_current_span("rpc") if tracer is not None else nullcontext()
        with scope:
            t0 = time.perf_counter_ns()
            fn(i)
            samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def scrape_cost(series: int, repeats: int) -> ScrapeRow:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    router = RouterMetrics(provider.get_meter("costmesh.router"))
    decision = Decision(Tier.CHEAP, 0.2, 0.5, False, (), Tier.CHEAP)
    for i in range(series):
        inp = GenerateInput(
            f"r{i}", Attribution(tenant=f"t{i % 50}", team="x", feature=f"f{i}"), (Message("user", "hi"),)
        )
        router.observe(
            inp,
            GenerateResult(
                "r",
                "x",
                TokenUsage(1, 1, 1),
                1,
                Tier.CHEAP,
                "m",
                decision,
                False,
                1,
                None,
                RouterFinish.STOP,
                1.0,
                False,
                0,
                2,
            ),
        )
    times = []
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        size = len(generate_latest(registry))
        times.append((time.perf_counter() - t0) * 1000)
    provider.shutdown()
    return ScrapeRow(series, size, statistics.median(times))


def encode_cost(batches: int) -> list[EncodeRow]:
    """µs per span to build and serialize the OTLP request for 512 router-like spans, library vs costmesh."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import SpanKind

    from services.common.span_export import encode_spans as costmesh

    finished: list[ReadableSpan] = []

    class Keep(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            finished.extend(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "costmesh-router"}))
    provider.add_span_processor(SimpleSpanProcessor(Keep()))
    tracer = provider.get_tracer("costmesh.rpc")
    for i in range(512):
        attrs: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": "costmesh.router.v1.RouterService",
            "rpc.method": "Generate",
            "rpc.grpc.status_code": 0,
            "net.peer.ip": "127.0.0.1",
            "net.peer.port": str(40000 + i % 50),
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "cheap",
            "gen_ai.request.max_tokens": 64,
            "gen_ai.usage.input_tokens": 20 + i % 30,
            "gen_ai.usage.output_tokens": 64,
            "costmesh.cost.micros": 100 + i,
            "costmesh.tier": "cheap",
            "costmesh.route.score": 0.25,
            "costmesh.cache.hit": i % 2 == 0,
            "costmesh.tenant": f"tenant-{i % 4}",
            "costmesh.feature": "chat",
            "costmesh.request_id": f"req-{i}",
        }
        tracer.start_span("/costmesh.router.v1.RouterService/Generate", kind=SpanKind.SERVER, attributes=attrs).end()
    provider.shutdown()
    rows = []
    for name, encode in (("opentelemetry-exporter-otlp (library)", library), ("costmesh span_export", costmesh)):
        encode(finished).SerializeToString()  # warm
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            encode(finished).SerializeToString()
            times.append((time.perf_counter() - t0) / len(finished) * 1e6)
        rows.append(EncodeRow(name, len(finished), round(statistics.median(times), 2)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per hook and mode")
    parser.add_argument("--quick", action="store_true", help="2000 calls, smaller scrapes")
    args = parser.parse_args()
    calls = 2000 if args.quick else args.calls
    tracer = TracerProvider().get_tracer("bench")  # recording spans, no exporter: annotation cost only
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=CollectorRegistry())])
    rows: list[Row] = []
    for name, fn in hooks(provider).items():
        for span in (False, True):
            fn(0)  # warm the attribute sets
            median, p99 = time_hook(fn, calls, tracer if span else None)
            rows.append(Row(name, span, calls, round(median, 2), round(p99, 2)))
    provider.shutdown()
    encodes = encode_cost(5 if args.quick else 30)
    scrapes = [
        scrape_cost(n, 5 if args.quick else 20) for n in ((10, 100, 1000) if args.quick else (10, 100, 1000, 5000))
    ]

    print(f"{'hook':<36} {'span':>5} {'calls':>7} {'median µs':>10} {'p99 µs':>8}")
    for r in rows:
        print(f"{r.hook:<36} {'yes' if r.span else 'no':>5} {r.calls:>7} {r.median_us:>10.2f} {r.p99_us:>8.2f}")
    print()
    print(f"{'OTLP encoder (512 router-like spans)':<40} {'µs per span':>12}")
    for e in encodes:
        print(f"{e.encoder:<40} {e.us_per_span:>12.2f}")
    print()
    print(f"{'series per router metric':>25} {'bytes':>10} {'render ms':>10}")
    for s in scrapes:
        print(f"{s.series_per_metric:>25} {s.bytes:>10} {s.median_ms:>10.2f}")
    if args.json:
        env = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count()}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "env": env,
                    "hooks": [asdict(r) for r in rows],
                    "encode": [asdict(e) for e in encodes],
                    "scrape": [asdict(s) for s in scrapes],
                },
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
