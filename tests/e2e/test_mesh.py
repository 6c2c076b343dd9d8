"""The mesh end to end: five real processes (budget, cache, two vLLM workers, router), embedded and Redis.

What must hold: the ledger equals the sum of per-request costs; no request passes a hard limit; normalized repeats
hit the cache; a burst of identical requests costs one inference; a cancelled request pays for what it generated; a
killed worker tier escalates to the other tier.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.client import RouterClient
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2
from tests.support.mesh import Mesh, free_layout, running
from tests.support.oracle import assert_ledger_is_the_truth
from tests.support.redis_server import RedisServer
from tests.support.traffic import track

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

SIMPLE = "What is the capital of France?"
HARD = (
    "Prove that there are infinitely many primes p such that p + 2 is also prime, or explain step by step why this "
    "is an open problem, then write a Python function that enumerates twin primes below n efficiently."
)


@pytest.fixture(scope="module", params=["embedded", "redis"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    redis: RedisServer | None = None
    if request.param == "redis":
        redis = RedisServer()
        redis.start()
    layout = free_layout(tmp_path_factory.mktemp(f"mesh-{request.param}"), redis_url=redis.url if redis else None)
    try:
        with running(layout, {"router": {"COSTMESH_ROUTER_CACHE_WAIT_MS": "30000"}}) as m:
            yield m
    finally:
        if redis is not None:
            redis.stop()


def tenant() -> str:
    return "t" + uuid.uuid4().hex[:10]


async def usage_total(m: Mesh, tenant_id: str) -> budget_pb2.UsageRow:
    async with grpc.aio.insecure_channel(m.layout.target("budget")) as ch:
        reply = await budget_pb2_grpc.BudgetServiceStub(ch).GetUsage(
            budget_pb2.GetUsageRequest(tenant=tenant_id), timeout=10
        )
    return reply.total


async def tenant_headroom(m: Mesh, tenant_id: str) -> list[budget_pb2.ScopeHeadroom]:
    async with grpc.aio.insecure_channel(m.layout.target("budget")) as ch:
        reply = await budget_pb2_grpc.BudgetServiceStub(ch).GetBudget(
            budget_pb2.GetBudgetRequest(scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant_id)),
            timeout=10,
        )
    return list(reply.headroom)


async def set_limit(m: Mesh, scope: budget_pb2.Scope, micros: int) -> None:
    policy = budget_pb2.BudgetPolicy(
        scope=scope, limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=micros)]
    )
    async with grpc.aio.insecure_channel(m.layout.target("budget")) as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(budget_pb2.SetBudgetRequest(policy=policy), timeout=10)


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[RouterClient]:
    async with RouterClient(mesh.layout.target("router"), tenant=tenant(), team="qa", feature="e2e") as c:
        yield c


async def test_ledger_equals_the_sum_of_response_costs(mesh: Mesh, client: RouterClient) -> None:
    prompts = [SIMPLE, HARD, "Name three primary colours.", SIMPLE.upper(), f"  {SIMPLE}  "]
    results = await asyncio.gather(*(client.generate(p, max_tokens=16, temperature=0) for p in prompts))
    total = await usage_total(mesh, client.attribution.tenant)
    assert total.cost_micros == sum(r.cost_micros for r in results)
    assert total.cost_micros > 0
    assert all(r.usage.input_tokens > 0 for r in results)
    misses = [r for r in results if not r.cache_hit]
    assert all(r.cost_micros > 0 and r.usage.output_tokens > 0 for r in misses)
    assert {r.tier for r in results} <= {common_pb2.TIER_CHEAP, common_pb2.TIER_FULL}


async def test_normalized_repeats_hit_the_cache(mesh: Mesh, client: RouterClient) -> None:
    first = await client.generate(
        f"Ticket 1f0e6c1a-1b2c-4d5e-8f90-123456789abc at 2026-11-27T10:00:00Z: {SIMPLE}", max_tokens=16, temperature=0
    )
    again = await client.generate(
        f"Ticket 9a8b7c6d-0000-4111-8222-abcdefabcdef at 2026-11-28T17:45:12Z:   {SIMPLE}\n",
        max_tokens=16,
        temperature=0,
    )
    assert not first.cache_hit and again.cache_hit
    assert again.cost_micros == 0 and again.text == first.text and again.saved_micros > 0
    other = await client.generate(SIMPLE.replace("France", "Spain"), max_tokens=16, temperature=0)
    assert not other.cache_hit


async def test_a_burst_of_identical_requests_costs_one_inference(mesh: Mesh, client: RouterClient) -> None:
    prompt = f"Summarise the plot of Hamlet in one sentence. ({uuid.uuid4().hex})"
    results = await asyncio.gather(*(client.generate(prompt, max_tokens=24, temperature=0) for _ in range(10)))
    paid = [r for r in results if not r.cache_hit]
    assert len(paid) == 1 and paid[0].cost_micros > 0
    assert all(r.text == paid[0].text for r in results)
    for _ in range(100):  # savings of hits are recorded in the background
        total = await usage_total(mesh, client.attribution.tenant)
        if total.cache_hits == 9:
            break
        await asyncio.sleep(0.1)
    assert total.cost_micros == paid[0].cost_micros and total.cache_hits == 9
    async with grpc.aio.insecure_channel(mesh.layout.target("cache")) as ch:
        stats = await cache_pb2_grpc.CacheServiceStub(ch).GetStats(
            cache_pb2.GetStatsRequest(tenant=client.attribution.tenant), timeout=10
        )
    assert stats.total.coalesced_waits >= 1 and stats.total.fills == 1


async def test_no_request_passes_a_hard_limit(mesh: Mesh) -> None:
    t = tenant()
    limit = 2_000  # micro-USD: a handful of small full-tier requests
    await set_limit(mesh, budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=t), limit)
    async with RouterClient(mesh.layout.target("router"), tenant=t, feature="burst") as c:
        outcomes = await asyncio.gather(
            *(c.generate(f"{HARD} Variant {i}.", max_tokens=32, temperature=0, tier="full") for i in range(12)),
            return_exceptions=True,
        )
    ok = [o for o in outcomes if isinstance(o, router_pb2.GenerateResult)]
    stopped = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert ok and stopped, outcomes
    for err in stopped:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None
        assert any(d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in status.details)
    total = await usage_total(mesh, t)
    assert total.cost_micros == sum(o.cost_micros for o in ok) <= limit
    assert total.over_estimate_commits == 0  # every reservation was an upper bound
    assert all(h.reserved_micros == 0 for h in await tenant_headroom(mesh, t))


async def test_a_cancel_stops_the_worker_and_bills_what_it_generated(mesh: Mesh) -> None:
    t = tenant()
    await track(mesh.layout.target("budget"), t)
    async with RouterClient(mesh.layout.target("router"), tenant=t, feature="cancel") as c:
        stream = c.stream(HARD, max_tokens=1000, temperature=0.7, tier="full")
        first = await anext(stream)
        assert first.text or first.HasField("result")
        during = await tenant_headroom(mesh, t)
        assert any(h.reserved_micros > 0 for h in during)
        await stream.aclose()  # cancels the call
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert 0 < usage.usage.output_tokens < 1000 and usage.cost_micros > 0


async def test_a_killed_worker_tier_escalates(mesh: Mesh, client: RouterClient) -> None:
    """Destructive: runs last in this module."""
    mesh.kill("infer-cheap", signal.SIGKILL)
    result = await client.generate(f"{SIMPLE} ({uuid.uuid4().hex})", max_tokens=8, temperature=0, tier="cheap")
    assert result.escalated and result.tier == common_pb2.TIER_FULL and result.route.policy == "escalated"
    total = await usage_total(mesh, client.attribution.tenant)
    assert total.cost_micros == result.cost_micros
    assert all(h.reserved_micros == 0 for h in await tenant_headroom(mesh, client.attribution.tenant))
