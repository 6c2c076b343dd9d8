"""The adversarial money suite: hostile callers against the mesh as real processes (budget, cache, two vLLM workers,
router), judged by one oracle.

The oracle, for every tenant a test uses: once nothing is reserved, the budget's ledger equals what the workers
themselves counted as generated for that tenant (``costmesh_infer_cost_micros_total``, every prompt and output token
at the worker's price, and the token counts by type), reserved money is back to zero, and no tenant's spend passes
its hard limit. The callers: streams cancelled after k chunks; deadlines shorter than the generation; a client
process killed mid-stream (the connection drops); ``SubmitAsync`` retried around a stalled budget and a stalled
worker; a worker stalled past the reservation's original lifetime; duplicate request ids among cache hits; a router
killed with async jobs that nobody polls; and a tenant that cancels every stream early to stretch its hard limit.

Interactive reservations here live 6 s (renewed every 2 s), so the lifetime paths run in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import Iterator

import grpc
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from tests.support.mesh import Mesh, free_layout, running
from tests.support.oracle import assert_ledger_is_the_truth
from tests.support.traffic import settled, track, user

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

TTL_S = 6
ROUTER_ENV = {
    "COSTMESH_ROUTER_RESERVATION_TTL_S": str(TTL_S),
    "COSTMESH_ROUTER_ASYNC_RESERVATION_TTL_S": "60",
    "COSTMESH_ROUTER_ASYNC_SETTLE_EVERY_S": "0.5",
    "COSTMESH_ROUTER_JOB_TIMEOUT_S": "3",
    "COSTMESH_ROUTER_GRACE_PERIOD_S": "2",
}
TIERS = {"cheap": common_pb2.TIER_CHEAP, "full": common_pb2.TIER_FULL}
LONG = "Write a very long story about a lighthouse keeper and the sea, with many chapters."


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    layout = free_layout(tmp_path_factory.mktemp("mesh-money"))
    with running(layout, {"router": ROUTER_ENV}, timeout_s=900) as m:
        yield m


def new_tenant() -> str:
    return "m" + uuid.uuid4().hex[:10]


def request(
    tenant: str, text: str, *, max_tokens: int, tier: str = "cheap", request_id: str = ""
) -> router_pb2.GenerateStreamRequest:
    return router_pb2.GenerateStreamRequest(
        request_id=request_id,
        attribution=common_pb2.Attribution(tenant=tenant, feature="adversarial"),
        messages=user(f"{text} ({uuid.uuid4().hex[:8]})"),
        # temperature > 0: never cached, so every request is a generation the ledger must account for
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.8),
        tier=TIERS[tier],
    )


def unary(r: router_pb2.GenerateStreamRequest) -> router_pb2.GenerateRequest:
    out = router_pb2.GenerateRequest()
    out.ParseFromString(r.SerializeToString())  # same fields, same numbers
    return out


def signal_group(m: Mesh, name: str, sig: int) -> None:
    """Signal a service and every process of its group (vLLM's engine core stalls with its worker)."""
    os.killpg(m.procs[name].pid, sig)


@contextlib.contextmanager
def stalled(m: Mesh, name: str) -> Iterator[None]:
    signal_group(m, name, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_group(m, name, signal.SIGCONT)


async def read_k(stub: router_pb2_grpc.RouterServiceStub, r: router_pb2.GenerateStreamRequest, k: int) -> int:
    """Open a stream, read ``k`` text chunks, then cancel it. Returns the characters received."""
    call = stub.GenerateStream(r, timeout=120)
    chars = 0
    got = 0
    try:
        async for chunk in call:
            chars += len(chunk.text)
            got += 1
            if got >= k:
                break
    finally:
        call.cancel()
    return chars


@pytest.mark.parametrize("k", [1, 4, 16])
async def test_streams_cancelled_after_k_chunks_pay_for_every_generated_token(mesh: Mesh, k: int) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for _ in range(3):
            await read_k(stub, request(t, LONG, max_tokens=96), k)
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert usage.cost_micros > 0 and usage.usage.output_tokens >= 3 * k


async def test_deadlines_shorter_than_the_generation_pay_for_what_ran(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    codes = []
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for _ in range(3):
            try:
                await stub.Generate(unary(request(t, LONG, max_tokens=512, tier="full")), timeout=0.5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert usage.cost_micros > 0


CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import grpc
    from costmesh.router.v1 import router_pb2, router_pb2_grpc

    async def main() -> None:
        request = router_pb2.GenerateStreamRequest.FromString(bytes.fromhex(sys.argv[2]))
        async with grpc.aio.insecure_channel(sys.argv[1]) as ch:
            async for chunk in router_pb2_grpc.RouterServiceStub(ch).GenerateStream(request, timeout=120):
                if chunk.text:
                    print("chunk", flush=True)
            print("done", flush=True)

    asyncio.run(main())
    """
)


async def test_a_client_whose_process_dies_mid_stream_pays_for_what_was_generated(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    r = request(t, LONG, max_tokens=256, tier="full")
    # a real client process; SIGKILL drops its connection with no goodbye
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        mesh.layout.target("router"),
        r.SerializeToString().hex(),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 300)
        assert line.strip() == b"chunk"
    finally:
        proc.kill()
        await proc.wait()
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert 0 < usage.usage.output_tokens < 256


async def submit_until_accepted(
    stub: router_pb2_grpc.RouterServiceStub, r: router_pb2.SubmitAsyncRequest, errors: list[grpc.StatusCode]
) -> router_pb2.SubmitAsyncResponse:
    """A client's retry loop: the same request id until the router accepts it."""
    for _ in range(60):
        try:
            return await stub.SubmitAsync(r, timeout=15)
        except grpc.aio.AioRpcError as err:
            errors.append(err.code())
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err.details()
            await asyncio.sleep(0.5)
    raise AssertionError("SubmitAsync never accepted")


async def wait_result(
    stub: router_pb2_grpc.RouterServiceStub, tenant: str, job_id: str
) -> router_pb2.GetAsyncResultResponse:
    for _ in range(600):
        reply = await stub.GetAsyncResult(
            router_pb2.GetAsyncResultRequest(job_id=job_id, attribution=common_pb2.Attribution(tenant=tenant)),
            timeout=15,
        )  # a FAILED_PRECONDITION here (an unfunded job's commit) raises and fails the test
        if reply.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED):
            return reply
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} never finished")


def async_request(tenant: str, request_id: str) -> router_pb2.SubmitAsyncRequest:
    return router_pb2.SubmitAsyncRequest(
        request_id=request_id,
        attribution=common_pb2.Attribution(tenant=tenant, feature="adversarial"),
        messages=user(f"Summarise the tides. ({request_id})"),
        sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0.8),
        tier=common_pb2.TIER_CHEAP,
    )


@pytest.mark.parametrize("stall", ["budget", "infer-cheap"])
async def test_submit_async_retried_around_a_stalled_service_runs_once_and_is_billed(mesh: Mesh, stall: str) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    errors: list[grpc.StatusCode] = []
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        r = async_request(t, "retry-" + uuid.uuid4().hex[:8])
        with stalled(mesh, stall):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitAsync(r, timeout=15)
            errors.append(err.value.code())
        sub = await submit_until_accepted(stub, r, errors)
        reply = await wait_result(stub, t, sub.job_id)
    assert reply.state == common_pb2.JOB_STATE_SUCCEEDED and reply.result.cost_micros > 0
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert usage.cost_micros == reply.result.cost_micros  # one job ran, billed once
    assert errors and set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def test_a_worker_stalled_past_the_reservation_lifetime_keeps_it_renewed(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        call = router_pb2_grpc.RouterServiceStub(ch).GenerateStream(
            request(t, LONG, max_tokens=48, tier="full"), timeout=180
        )
        chunks = aiter(call)
        await anext(chunks)
        with stalled(mesh, "infer-full"):
            await asyncio.sleep(TTL_S + 4)  # past the reservation's original life
        result = None
        async for chunk in chunks:
            if chunk.HasField("result"):
                result = chunk.result
    assert result is not None and result.cost_micros > 0
    usage = await assert_ledger_is_the_truth(mesh, t)  # late_commits == 0: it never expired
    assert usage.cost_micros == result.cost_micros


async def test_duplicate_request_ids_among_cache_hits_are_recorded_once_and_drop_nothing(mesh: Mesh) -> None:
    t = new_tenant()
    budget = mesh.layout.target("budget")
    await track(budget, t)
    prompt = f"Name a colour. ({uuid.uuid4().hex[:6]})"

    def hit(request_id: str) -> router_pb2.GenerateRequest:
        return router_pb2.GenerateRequest(
            request_id=request_id,
            attribution=common_pb2.Attribution(tenant=t, feature="adversarial"),
            messages=user(prompt),
            sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0),
            tier=common_pb2.TIER_CHEAP,
        )

    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        miss = (await stub.Generate(hit("warm"), timeout=120)).result
        for i in range(100):  # the fill lands in the background
            if (await stub.Generate(hit(f"probe{i}"), timeout=60)).result.cache_hit:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the probe's saving has been flushed
        before, _ = await settled(budget, t)
        ids = ["d1", "d1", "d2", "d3", "d3", "d4"]  # one flush window: one batch with repeats in it
        hits = [r.result for r in await asyncio.gather(*(stub.Generate(hit(i), timeout=60) for i in ids))]
    assert not miss.cache_hit and all(h.cache_hit for h in hits)
    for _ in range(100):  # savings reach the ledger within a flush interval or so
        after, _ = await settled(budget, t)
        if after.cache_hits - before.cache_hits >= 4:
            break
        await asyncio.sleep(0.1)
    assert after.cache_hits - before.cache_hits == 4  # each distinct request id once; the batch was not dropped
    assert after.saved_micros - before.saved_micros == 4 * hits[0].saved_micros
    await assert_ledger_is_the_truth(mesh, t)


async def test_async_jobs_of_a_killed_router_are_settled_without_anyone_polling(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        subs = [
            await stub.SubmitAsync(async_request(t, f"orphan-{i}-{uuid.uuid4().hex[:6]}"), timeout=30) for i in range(3)
        ]
    assert all(s.state == common_pb2.JOB_STATE_QUEUED for s in subs)
    mesh.kill("router", signal.SIGKILL)
    mesh.start("router")
    await mesh.wait_serving("router", timeout_s=120)
    usage = await assert_ledger_is_the_truth(mesh, t, timeout_s=180)  # nobody called GetAsyncResult
    assert usage.requests == 3


async def test_a_tenant_cancelling_every_stream_early_stops_at_the_same_hard_limit(mesh: Mesh) -> None:
    """The measured hole: under one 0.001 USD limit, a tenant cancelling each stream after 40 chunks got 1.5x the
    text of an honest one and was charged for 12 of 52 requests. Now both pay for every token; both are stopped."""
    limit = 400
    budget = mesh.layout.target("budget")
    received: dict[str, int] = {}
    async with grpc.aio.insecure_channel(mesh.layout.target("router")) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for name, k in (("honest", 10**6), ("hostile", 5)):
            t = new_tenant()
            policy = budget_pb2.BudgetPolicy(
                scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=t),
                limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=limit)],
            )
            async with grpc.aio.insecure_channel(budget) as bch:
                await budget_pb2_grpc.BudgetServiceStub(bch).SetBudget(
                    budget_pb2.SetBudgetRequest(policy=policy), timeout=10
                )
            chars = 0
            stopped = False
            for _ in range(200):
                try:
                    chars += await read_k(stub, request(t, LONG, max_tokens=64), k)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                    stopped = True
                    break
            assert stopped, f"{name} was never stopped by its hard limit"
            usage = await assert_ledger_is_the_truth(mesh, t)
            assert 0 < usage.cost_micros <= limit
            received[name] = chars
    print(f"\nchars received under a {limit} micro-USD limit: {received}")
    assert received["hostile"] <= received["honest"] * 1.25  # cancelling early buys no more text
