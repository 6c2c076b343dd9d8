"""Observability of the mesh end to end: the four services as processes, exporting OTLP to a real receiver.

What must hold: one trace per request, spanning router, cache, budget and infer with correct parent links (router
server span → its client spans → the cache/budget/infer server spans); span attributes that agree with the response
and with the budget ledger (cost, tokens, tier, cache hit); tenant/team/feature carried as baggage to hops whose
request does not carry them; log lines inside a request carrying its trace and span ids; an async job's span linked
to the trace that submitted it; a cache hit's saving recorded by a savings batch whose trace links to the hit; and
Prometheus counters on every service that move as requests are made.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.client import RouterClient
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.common import semconv as sc
from services.router.savings import FLUSH_SPAN
from tests.support.mesh import Mesh, free_layout, running_async
from tests.support.otlp import CLIENT, CONSUMER, SERVER, Link, Span, SpanReceiver
from tests.support.prom import Samples, scrape, total
from tests.support.telemetry import exported_series

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

TIERS = {common_pb2.TIER_CHEAP: "cheap", common_pb2.TIER_FULL: "full"}
SERVICES = {"router": "costmesh-router", "cache": "costmesh-cache", "budget": "costmesh-budget"}
ROUTER_GENERATE = "/costmesh.router.v1.RouterService/Generate"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[SpanReceiver]:
    r = SpanReceiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture(scope="module")
async def mesh(receiver: SpanReceiver, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    layout = free_layout(tmp_path_factory.mktemp("mesh-obs"), otlp_endpoint=f"127.0.0.1:{receiver.port}")
    debug = {"budget": {"COSTMESH_BUDGET_LOG_LEVEL": "debug"}, "cache": {"COSTMESH_CACHE_LOG_LEVEL": "debug"}}
    async with running_async(layout, {**debug, "router": {"COSTMESH_ROUTER_CACHE_WAIT_MS": "30000"}}) as m:
        yield m


def new_tenant() -> str:
    return "obs" + uuid.uuid4().hex[:10]


async def set_limit(m: Mesh, tenant: str, micros: int) -> None:
    scope = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant)
    policy = budget_pb2.BudgetPolicy(
        scope=scope, limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=micros)]
    )
    async with grpc.aio.insecure_channel(m.layout.target("budget")) as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(budget_pb2.SetBudgetRequest(policy=policy), timeout=10)


async def ledger_usage(m: Mesh, tenant: str) -> budget_pb2.UsageRow:
    async with grpc.aio.insecure_channel(m.layout.target("budget")) as ch:
        reply = await budget_pb2_grpc.BudgetServiceStub(ch).GetUsage(
            budget_pb2.GetUsageRequest(tenant=tenant), timeout=10
        )
    return reply.total


async def ledger_cost(m: Mesh, tenant: str) -> int:
    return (await ledger_usage(m, tenant)).cost_micros


async def ledger_saved(m: Mesh, tenant: str) -> int:
    return (await ledger_usage(m, tenant)).saved_micros


def root_of(receiver: SpanReceiver, request_id: str) -> Span | None:
    for s in receiver.spans:
        if s.kind == SERVER and s.attributes.get(sc.REQUEST_ID) == request_id and s.service == SERVICES["router"]:
            return s
    return None


def server_span(spans: list[Span], service: str, method: str) -> Span:
    found = [s for s in spans if s.kind == SERVER and s.service == service and s.name.endswith("/" + method)]
    assert len(found) == 1, (service, method, [(s.service, s.name) for s in spans])
    return found[0]


def parent(spans: list[Span], child: Span) -> Span:
    (p,) = [s for s in spans if s.span_id == child.parent_span_id]
    return p


async def request_trace(receiver: SpanReceiver, request_id: str, expected: set[tuple[str, str]]) -> list[Span]:
    """The spans of the request's trace, once the (service, method) server spans in ``expected`` have arrived."""

    def complete() -> bool:
        root = root_of(receiver, request_id)
        if root is None:
            return False
        spans = receiver.trace(root.trace_id)
        ids = {s.span_id for s in spans}
        # each process exports in its own batches: wait for the router's client spans too (Fill ends after the
        # request, so it may come in a later batch than the root)
        have = {(s.service, s.name.rsplit("/", 1)[-1]) for s in spans if s.kind == SERVER and s.parent_span_id in ids}
        return expected <= have

    await receiver.wait_for(complete, timeout_s=90)
    root = root_of(receiver, request_id)
    assert root is not None
    return receiver.trace(root.trace_id)


async def savings_trace(receiver: SpanReceiver, hit_root: Span) -> list[Span]:
    """The trace of the savings batch that recorded the hit (its root first), once the budget's span has arrived."""

    def flush() -> Span | None:
        for s in receiver.spans:
            if s.name == FLUSH_SPAN and Link(hit_root.trace_id, hit_root.span_id) in s.links:
                return s
        return None

    def complete() -> bool:
        root = flush()
        return root is not None and any(s.kind == SERVER for s in receiver.trace(root.trace_id))

    await receiver.wait_for(complete, timeout_s=90)
    root = flush()
    assert root is not None
    return [root, *(s for s in receiver.trace(root.trace_id) if s is not root)]


def check_links(spans: list[Span], root: Span, downstream: Span) -> None:
    """downstream server span ← router client span of the same method ← the router's server span."""
    client = parent(spans, downstream)
    assert client.kind == CLIENT and client.service == SERVICES["router"], client
    assert client.name == downstream.name
    assert parent(spans, client) == root


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


async def test_one_trace_per_request_across_the_mesh_with_costs_that_agree(mesh: Mesh, receiver: SpanReceiver) -> None:
    tenant = new_tenant()
    await set_limit(mesh, tenant, 50_000_000)  # a cost limit, so remaining budget is reported
    prompt = f"Name one primary colour. ({uuid.uuid4().hex[:8]})"
    async with RouterClient(mesh.layout.target("router"), tenant=tenant, team="qa", feature="obs") as client:
        miss = await client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, request_id="miss-" + tenant)
        hit = await client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, request_id="hit-" + tenant)
    assert not miss.cache_hit and hit.cache_hit and miss.cost_micros > 0 and hit.cost_micros == 0
    tier = TIERS[miss.tier]

    paid = await request_trace(
        receiver,
        miss.request_id,
        {
            (SERVICES["cache"], "Lookup"),
            (SERVICES["cache"], "Fill"),
            (SERVICES["budget"], "Reserve"),
            (SERVICES["budget"], "Commit"),
            ("costmesh-infer", "Generate"),
        },
    )
    free = await request_trace(receiver, hit.request_id, {(SERVICES["cache"], "Lookup")})

    # one trace per request, and every span of it in that trace
    assert paid[0].trace_id != free[0].trace_id
    assert {s.service for s in paid} == {*SERVICES.values(), "costmesh-infer"}
    root = root_of(receiver, miss.request_id)
    assert root is not None and root.parent_span_id == "" and root.name == ROUTER_GENERATE
    lookup = server_span(paid, SERVICES["cache"], "Lookup")
    fill = server_span(paid, SERVICES["cache"], "Fill")
    reserve = server_span(paid, SERVICES["budget"], "Reserve")
    commit = server_span(paid, SERVICES["budget"], "Commit")
    generate = server_span(paid, "costmesh-infer", "Generate")
    for downstream in (lookup, fill, reserve, commit, generate):
        check_links(paid, root, downstream)

    # the router's span agrees with the response
    r = root.attributes
    assert r[sc.COST_MICROS] == miss.cost_micros and r[sc.TIER] == tier and r[sc.CACHE_HIT] is False
    assert r[sc.GEN_AI_USAGE_INPUT_TOKENS] == miss.usage.input_tokens
    assert r[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == miss.usage.output_tokens
    assert r[sc.GEN_AI_REQUEST_MODEL] == miss.model and r[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert r[sc.GEN_AI_REQUEST_MAX_TOKENS] == MAX_TOKENS and len(r[sc.GEN_AI_RESPONSE_FINISH_REASONS]) == 1
    assert r[sc.ROUTE_SCORE] == pytest.approx(miss.route.score)
    assert r[sc.BUDGET_REMAINING_MICROS] == miss.budget_remaining_micros
    assert (r[sc.TENANT], r[sc.TEAM], r[sc.FEATURE], r[sc.QUEUE_CLASS]) == (tenant, "qa", "obs", "interactive")
    assert any(e.name == sc.EVENT_FIRST_TOKEN for e in root.events)

    # the worker's span: the same tokens, tier and cost (same price table), and its first-token event
    g = generate.attributes
    assert (g[sc.GEN_AI_USAGE_INPUT_TOKENS], g[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == (
        miss.usage.input_tokens,
        miss.usage.output_tokens,
    )
    assert g[sc.TIER] == tier and g[sc.COST_MICROS] == miss.cost_micros and g[sc.QUEUE_CLASS] == "interactive"
    (first_token,) = [e for e in generate.events if e.name == sc.EVENT_FIRST_TOKEN]
    assert generate.start_unix_nano <= first_token.time_unix_nano <= generate.end_unix_nano

    # the ledger: what Commit's span says was charged is what the ledger holds and what the response says
    c = commit.attributes
    assert c[sc.COST_MICROS] == miss.cost_micros == await ledger_cost(mesh, tenant)
    assert c[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == miss.usage.output_tokens and c[sc.TIER] == tier
    assert c[sc.BUDGET_REMAINING_MICROS] == miss.budget_remaining_micros
    # CommitRequest names only the tenant: team and feature arrived as W3C baggage from the router
    assert (c[sc.TENANT], c[sc.TEAM], c[sc.FEATURE]) == (tenant, "qa", "obs")
    assert reserve.attributes[sc.BUDGET_OUTCOME] == "reserved" and reserve.attributes[sc.TIER] == tier
    assert reserve.attributes[sc.BUDGET_ESTIMATED_MICROS] >= miss.cost_micros
    assert lookup.attributes[sc.CACHE_HIT] is False and lookup.attributes[sc.CACHE_OUTCOME] == "miss"

    # the hit: cache says hit, nothing ran on a worker, the saving recorded matches the response
    hit_root = root_of(receiver, hit.request_id)
    assert hit_root is not None
    assert hit_root.attributes[sc.CACHE_HIT] is True and hit_root.attributes[sc.COST_MICROS] == 0
    assert hit_root.attributes[sc.CACHE_SAVED_MICROS] == hit.saved_micros > 0
    assert server_span(free, SERVICES["cache"], "Lookup").attributes[sc.CACHE_HIT] is True
    assert not any(s.service in ("costmesh-infer", SERVICES["budget"]) for s in free)
    # its saving went to the ledger in a batch (services/router/savings.py): a trace of its own, whose root links to
    # the hit's span, with the router's RecordSavingsBatch client span and the budget's server span under it
    recorded = await savings_trace(receiver, hit_root)
    flush = recorded[0]
    assert (flush.service, flush.parent_span_id) == (SERVICES["router"], "")
    assert Link(hit_root.trace_id, hit_root.span_id) in flush.links
    savings = server_span(recorded, SERVICES["budget"], "RecordSavingsBatch")
    check_links(recorded, flush, savings)
    for span in (flush, savings):  # the test's tenant is new: the batch holds this one hit only
        assert span.attributes[sc.TENANT] == tenant and span.attributes[sc.SAVINGS_RECORDS] == 1
        assert span.attributes[sc.CACHE_SAVED_MICROS] == hit.saved_micros
    assert await ledger_saved(mesh, tenant) == hit.saved_micros + miss.saved_micros

    # logs: the budget's lines for this request carry its trace id; every line inside an RPC carries ids
    budget_lines = json_lines(mesh.log("budget"))
    reserved = [x for x in budget_lines if x.get("event") == "budget_reserved" and x.get("trace_id") == root.trace_id]
    assert len(reserved) == 1 and reserved[0]["span_id"] == reserve.span_id
    for name in ("router", "cache", "budget", "infer-cheap", "infer-full"):
        inside = [x for x in json_lines(mesh.log(name)) if "rpc" in x]  # bound for the duration of each call
        assert all("trace_id" in x and "span_id" in x for x in inside), (name, inside[:3])
        if name == "budget":
            assert len(inside) >= 1


async def test_an_async_job_links_back_to_the_trace_that_submitted_it(mesh: Mesh, receiver: SpanReceiver) -> None:
    tenant = new_tenant()
    attribution = common_pb2.Attribution(tenant=tenant, team="qa", feature="batch")
    request = router_pb2.SubmitAsyncRequest(
        request_id="job-" + tenant,
        attribution=attribution,
        messages=RouterClient.messages(f"Say hello. ({uuid.uuid4().hex[:8]})"),
        sampling=RouterClient.sampling(max_tokens=MAX_TOKENS, temperature=0),
        cache_mode=router_pb2.CACHE_MODE_BYPASS,
    )
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        submitted = await stub.SubmitAsync(request, timeout=60)
        for _ in range(600):
            reply = await stub.GetAsyncResult(
                router_pb2.GetAsyncResultRequest(job_id=submitted.job_id, attribution=attribution), timeout=10
            )
            if reply.state == common_pb2.JOB_STATE_SUCCEEDED:
                break
            await asyncio.sleep(0.2)
    assert reply.state == common_pb2.JOB_STATE_SUCCEEDED, reply

    def submissions() -> list[Span]:
        return [
            s
            for s in receiver.spans
            if s.kind == SERVER
            and s.name.endswith("/SubmitJob")
            and s.attributes.get(sc.REQUEST_ID) == request.request_id
        ]

    def submitted_by_router() -> bool:  # SubmitJob ← router client span ← SubmitAsync, all arrived
        for s in submissions():
            ids = {x.span_id: x for x in receiver.trace(s.trace_id)}
            client = ids.get(s.parent_span_id)
            if client is not None and client.parent_span_id in ids:
                return True
        return False

    await receiver.wait_for(submitted_by_router, timeout_s=90)
    (submit_job,) = submissions()
    submit_trace = receiver.trace(submit_job.trace_id)
    router_client = parent(submit_trace, submit_job)
    assert router_client.kind == CLIENT and router_client.service == SERVICES["router"]
    assert parent(submit_trace, router_client).name == "/costmesh.router.v1.RouterService/SubmitAsync"
    assert submit_job.attributes[sc.JOB_ID] in submitted.job_id

    def job_spans() -> list[Span]:
        return [
            s
            for s in receiver.spans
            if s.kind == CONSUMER and any(link.span_id == submit_job.span_id for link in s.links)
        ]

    await receiver.wait_for(lambda: bool(job_spans()), timeout_s=90)
    (job,) = job_spans()
    assert job.service == "costmesh-infer" and job.parent_span_id == "" and job.trace_id != submit_job.trace_id
    (link,) = job.links
    assert link.trace_id == submit_job.trace_id
    a = job.attributes
    assert a[sc.TENANT] == tenant and a[sc.QUEUE_CLASS] == "async" and a[sc.JOB_ATTEMPT] == 1
    assert a[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == reply.result.usage.output_tokens
    assert a[sc.COST_MICROS] == reply.result.cost_micros and a[sc.TIER] == TIERS[reply.result.tier]
    assert (a[sc.TEAM], a[sc.FEATURE]) == ("qa", "batch")


# -- metrics -------------------------------------------------------------------------------------------------------


def scrape_all(m: Mesh) -> dict[str, Samples]:
    return {name: scrape(port) for name, port in m.layout.metrics_ports.items()}


async def test_metrics_counters_move_as_requests_are_made(mesh: Mesh) -> None:
    tenant, stopped = new_tenant(), new_tenant()
    await set_limit(mesh, tenant, 50_000_000)
    await set_limit(mesh, stopped, 1)  # every request of this tenant is a hard stop
    before = scrape_all(mesh)
    prompt = f"Count to three. ({uuid.uuid4().hex[:8]})"
    async with RouterClient(mesh.layout.target("router"), tenant=tenant, team="qa", feature="metrics") as client:
        results = await asyncio.gather(
            *(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0) for _ in range(3))
        )
    async with RouterClient(mesh.layout.target("router"), tenant=stopped, feature="metrics") as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.generate("Hello?", max_tokens=MAX_TOKENS, temperature=0, tier="full")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = scrape_all(mesh)
    paid = [r for r in results if not r.cache_hit]
    assert len(paid) == 1 and paid[0].cost_micros > 0
    tier = TIERS[paid[0].tier]

    def delta(service: str, name: str, **labels: str) -> float:
        return total(after[service], name, **labels) - total(before[service], name, **labels)

    # router: requests, spend, savings, tokens, decisions
    assert delta("router", "costmesh_requests_total", tenant=tenant, outcome="ok") == 3
    assert delta("router", "costmesh_requests_total", tenant=stopped, outcome="resource_exhausted") == 1
    assert delta("router", "costmesh_cost_micros_total", tenant=tenant, feature="metrics", tier=tier) == (
        paid[0].cost_micros
    )
    cache_saved = sum(r.saved_micros for r in results if r.cache_hit)
    assert delta("router", "costmesh_savings_micros_total", tenant=tenant, reason="cache") == cache_saved > 0
    assert delta("router", "costmesh_tokens_total", tenant=tenant, type="output", cache_hit="false") == (
        paid[0].usage.output_tokens
    )
    assert delta("router", "costmesh_route_decisions_total", feature="metrics") == 3
    # cache: one miss, two hits, at least one of them by waiting on the in-flight miss
    assert delta("cache", "costmesh_cache_lookups_total", tenant=tenant, outcome="miss") == 1
    assert delta("cache", "costmesh_cache_lookups_total", tenant=tenant, outcome="hit") == 2
    assert delta("cache", "costmesh_cache_coalesced_waits_total", tenant=tenant) >= 1
    # budget: one reservation committed at the response's cost, one hard stop, headroom of the limited tenant
    assert delta("budget", "costmesh_budget_reservations_total", tenant=tenant, outcome="reserved") == 1
    assert delta("budget", "costmesh_budget_committed_micros_total", tenant=tenant, tier=tier) == paid[0].cost_micros
    assert delta("budget", "costmesh_budget_rejections_total", tenant=stopped, reason="BUDGET_EXCEEDED") == 1
    remaining = total(after["budget"], "costmesh_budget_remaining_micros", tenant=tenant, scope_kind="tenant")
    assert remaining == 50_000_000 - paid[0].cost_micros
    # workers: one generation on the tier that served it, with its tokens, cost and latency histograms
    worker = f"infer-{tier}"
    assert delta(worker, "costmesh_infer_tokens_total", tenant=tenant, type="output") == paid[0].usage.output_tokens
    assert delta(worker, "costmesh_infer_cost_micros_total", tenant=tenant) == paid[0].cost_micros
    assert delta(worker, "gen_ai_server_time_to_first_token_seconds_count", tier=tier) >= 1
    assert delta(worker, "gen_ai_server_time_per_output_token_seconds_count", tier=tier) >= 1
    for t in ("cheap", "full"):  # KEDA scales each tier on this one
        depth = [ls for n, ls in after[f"infer-{t}"] if n == "costmesh_infer_interactive_queue_depth"]
        assert depth and all(("tier", t) in ls for ls in depth)
        assert total(after[f"infer-{t}"], "costmesh_infer_serving", tier=t) == 1
    # every service: calls timed by method and status code (the hard stop is a RESOURCE_EXHAUSTED = 8)
    assert delta("router", "rpc_server_duration_milliseconds_count", rpc_method="Generate") == 4
    assert (
        delta("budget", "rpc_server_duration_milliseconds_count", rpc_method="Reserve", rpc_grpc_status_code="8") >= 1
    )

    # what the real processes export is what the instrument definitions say (the CI check relies on that)
    derived = exported_series()
    for service, samples in after.items():
        for name, labels in samples:
            if name.startswith(("costmesh_", "gen_ai_", "rpc_")):
                assert name in derived, (service, name)
                assert {k for k, _ in labels} <= derived[name], (service, name, labels)
