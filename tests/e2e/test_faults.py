"""Fault injection against the running mesh: five processes (budget, cache, two vLLM workers, router) on a Redis
that keeps an fsynced append-only file, so a killed Redis comes back with every write it acknowledged.

What must hold, fault by fault (tests/e2e/test_mesh.py already covers a dead tier escalating and a cancel
releasing; these extend it):

* the cache service down: requests are still served (uncached) and charged exactly; back up, it caches again;
* Redis killed and restarted under load: the budget fails closed (UNAVAILABLE, never a free request), then
  recovers; afterwards the ledger equals the sum of the costs of the answered requests (no double charge, nothing
  unbilled) and no reservation is left behind;
* the router restarted (SIGTERM) with calls in flight: they end cleanly (finished within the grace period, or
  UNAVAILABLE / CANCELLED), what the cut streams generated is billed and no money stays reserved; the new router
  serves;
* a worker killed mid-stream: the streams end UNAVAILABLE and are billed what they received (the dead worker cannot
  report); nothing stays reserved.

The tests run in file order and each leaves the mesh whole again, except the last (the worker stays dead).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.client import RouterClient
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from tests.support.mesh import Mesh, free_layout, running
from tests.support.oracle import assert_ledger_is_the_truth
from tests.support.redis_server import RedisServer
from tests.support.traffic import Traffic, money, settled, track, user

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.redis]

LONG = "Write a very long story about a lighthouse keeper and the sea, with many chapters."


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mesh(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    layout = free_layout(tmp_path_factory.mktemp("mesh-faults"), redis_url=redis.url)
    with running(layout, {"router": {"COSTMESH_ROUTER_GRACE_PERIOD_S": "2"}}, timeout_s=900) as m:
        yield m


def tenant() -> str:
    return "f" + uuid.uuid4().hex[:10]


async def new_tenant(m: Mesh) -> str:
    t = tenant()
    await track(m.layout.target("budget"), t)
    return t


async def test_the_cache_down_requests_are_still_served(mesh: Mesh) -> None:
    t = await new_tenant(mesh)
    budget = mesh.layout.target("budget")
    mesh.kill("cache", signal.SIGKILL)
    try:
        async with RouterClient(mesh.layout.target("router"), tenant=t, feature="faults") as c:
            prompts = ["What is the capital of France?", "Name a prime number.", "What is the capital of France?"]
            results = [await c.generate(p, max_tokens=8, temperature=0, tier="cheap") for p in prompts]
        assert not any(r.cache_hit for r in results)  # the repeat is paid again: no cache, but served
        assert all(r.cost_micros > 0 for r in results)
        usage, reserved = await settled(budget, t)
        assert reserved == 0 and usage.cost_micros == sum(r.cost_micros for r in results)
        assert usage.requests == len(results)
        print(f"\ncache down: {len(results)} served uncached, {usage.cost_micros} micro-USD charged = sum of responses")
    finally:
        mesh.start("cache")
        await mesh.wait_serving("cache", timeout_s=120)
    # Back up: the router's channel reconnects and the cache serves again.
    async with RouterClient(mesh.layout.target("router"), tenant=t, feature="faults") as c:
        prompt = f"Name a colour. ({uuid.uuid4().hex[:6]})"
        deadline = time.monotonic() + 90
        while True:
            first = await c.generate(prompt, max_tokens=8, temperature=0, tier="cheap")
            again = await c.generate(prompt, max_tokens=8, temperature=0, tier="cheap")
            if again.cache_hit:
                break
            assert time.monotonic() < deadline, "the cache never came back into use"
            prompt = f"Name a colour. ({uuid.uuid4().hex[:6]})"
            await asyncio.sleep(1)
        assert again.cost_micros == 0 and again.text == first.text


async def test_redis_killed_and_restarted_under_load(mesh: Mesh, redis: RedisServer) -> None:
    t = await new_tenant(mesh)
    budget = mesh.layout.target("budget")
    load = Traffic(mesh.layout.target("router"), t, concurrency=4)
    load.start()
    try:
        await load.until(lambda: len(load.ok) >= 4, timeout_s=180)
        redis.kill()
        killed_at = time.monotonic()
        # Fail closed: the budget refuses to reserve while its store is gone.
        async with grpc.aio.insecure_channel(budget) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await budget_pb2_grpc.BudgetServiceStub(ch).Reserve(
                    budget_pb2.ReserveRequest(
                        request_id=uuid.uuid4().hex,
                        attribution=common_pb2.Attribution(tenant=t + "-probe"),
                        estimated_cost_micros=10,
                    ),
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await load.until(lambda: any(at > killed_at for at, _, _ in load.errors), timeout_s=60)
        await asyncio.sleep(3)  # the outage, under load
        redis.start()
        restarted_at = time.monotonic()
        await load.until(lambda: load.served_after(restarted_at) >= 4, timeout_s=120)  # recovered
    finally:
        await load.stop()
    codes = load.codes()
    timeline = [(round(at - killed_at, 2), code.name, details[:120]) for at, code, details in load.errors]
    assert set(codes) == {"UNAVAILABLE"}, (round(restarted_at - killed_at, 2), timeline[:12])  # failed closed
    # Nothing sent while the store was gone was answered before it came back (in-flight requests reserved earlier
    # may finish during the outage: their commits are retried until the budget answers).
    assert load.admitted_between(killed_at + 0.5, restarted_at) == 0, "requests were served without a budget"
    usage, reserved = await settled(budget, t, timeout_s=60)
    assert reserved == 0, "a reservation was left behind"
    answered = [r for _, _, r in load.ok]
    assert usage.cost_micros == sum(r.cost_micros for r in answered), "ledger != sum of response costs"
    assert usage.requests == sum(1 for r in answered if not r.cache_hit)
    print(
        f"\nredis outage: {len(answered)} served, {sum(codes.values())} refused UNAVAILABLE, "
        f"{usage.cost_micros} micro-USD charged = sum of responses, 0 reserved after"
    )


async def _open_streams(mesh: Mesh, t: str, n: int, tier: int) -> list[tuple[grpc.aio.Channel, object]]:
    streams = []
    for _ in range(n):
        ch = grpc.aio.insecure_channel(mesh.layout.target("router"))
        call = router_pb2_grpc.RouterServiceStub(ch).GenerateStream(
            router_pb2.GenerateStreamRequest(
                attribution=common_pb2.Attribution(tenant=t, feature="faults"),
                messages=user(f"{LONG} ({uuid.uuid4().hex[:6]})"),
                sampling=common_pb2.SamplingParams(max_tokens=800, temperature=0.8),
                tier=tier,  # type: ignore[arg-type]
            ),
            timeout=300,
        )
        first = await anext(aiter(call))
        assert first.text or first.HasField("result")
        streams.append((ch, call))
    return streams


async def _finish(streams: list[tuple[grpc.aio.Channel, object]]) -> tuple[list[router_pb2.GenerateResult], list[str]]:
    results: list[router_pb2.GenerateResult] = []
    codes: list[str] = []
    for ch, call in streams:
        try:
            last = None
            async for chunk in call:  # type: ignore[attr-defined]
                last = chunk
            assert last is not None and last.HasField("result")
            results.append(last.result)
        except grpc.aio.AioRpcError as err:
            codes.append(err.code().name)
        finally:
            await ch.close()
    return results, codes


async def test_a_router_restart_ends_in_flight_calls_cleanly(mesh: Mesh) -> None:
    t = await new_tenant(mesh)
    budget = mesh.layout.target("budget")
    streams = await _open_streams(mesh, t, 3, common_pb2.TIER_FULL)
    _, reserved = await money(budget, t)
    assert reserved > 0
    stopping = asyncio.ensure_future(asyncio.to_thread(mesh.kill, "router", signal.SIGTERM))
    results, codes = await _finish(streams)
    await stopping
    assert mesh.procs["router"].returncode == 0, mesh.log("router")[-3000:]  # a clean exit, not a crash
    assert set(codes) <= {"UNAVAILABLE", "CANCELLED"}, codes
    assert len(results) + len(codes) == 3
    # Nothing stays reserved once the old router is gone, and what the cut streams generated was billed on the way out:
    # the ledger is exactly what the workers counted.
    usage = await assert_ledger_is_the_truth(mesh, t, timeout_s=30)
    assert usage.cost_micros >= sum(r.cost_micros for r in results)
    print(
        f"\nrouter restart: {len(results)} streams finished within the grace period, {codes} ended; 0 reserved after,"
        f" {usage.cost_micros - sum(r.cost_micros for r in results)} micro-USD billed for the cut streams"
    )
    mesh.start("router")
    await mesh.wait_serving("router", timeout_s=120)
    async with RouterClient(mesh.layout.target("router"), tenant=t, feature="faults") as c:
        after = await c.generate("Name a prime number.", max_tokens=8, temperature=0, tier="cheap")
    assert after.cost_micros > 0 or after.cache_hit


async def test_a_worker_killed_mid_stream_bills_what_its_streams_received(mesh: Mesh) -> None:
    """Destructive: runs last in this module (the cheap worker stays dead, its counters with it)."""
    t = await new_tenant(mesh)
    budget = mesh.layout.target("budget")
    streams = await _open_streams(mesh, t, 3, common_pb2.TIER_CHEAP)
    _, reserved = await money(budget, t)
    assert reserved > 0
    mesh.kill("infer-cheap", signal.SIGKILL)
    results, codes = await _finish(streams)
    assert set(codes) <= {"UNAVAILABLE"} and codes, (codes, results)
    usage, reserved = await settled(budget, t, timeout_s=30)
    assert reserved == 0, "a killed stream left its reservation"
    # The dead worker cannot report: each cut stream is billed its prompt and the tokens it had received (at least
    # the one chunk each stream read before the kill).
    answered = sum(r.cost_micros for r in results)
    assert usage.cost_micros > answered
    assert usage.usage.output_tokens >= sum(r.usage.output_tokens for r in results) + len(codes)
    print(
        f"\nworker killed: {codes} mid-stream, {len(results)} finished; 0 reserved after,"
        f" {usage.cost_micros - answered} micro-USD billed for what the cut streams received"
    )
