"""The cache service on a real loopback server, for each store: single flight, isolation, TTL, errors, CLI."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.cache.__main__ import assemble
from services.cache.cli import app as cache_cli
from services.cache.config import CacheSettings
from services.cache.singleflight import ResponseCache
from services.common.channels import create_channel
from services.common.server import ServiceHost

HIT = cache_pb2.LOOKUP_OUTCOME_HIT
MISS = cache_pb2.LOOKUP_OUTCOME_MISS


def settings(store: str, redis_url: str = "", **overrides: Any) -> CacheSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "grace_period_s": 0.5,
        "store": store,
        "redis_url": redis_url or "redis://127.0.0.1:1/0",
        "redis_prefix": "test-cache",
        **overrides,
    }
    return CacheSettings(**values)


@dataclass(frozen=True)
class Replica:
    target: str
    cache: ResponseCache


@asynccontextmanager
async def running(s: CacheSettings) -> AsyncIterator[Replica]:
    """A real cache server on 127.0.0.1:<free port>."""
    host = ServiceHost(name="cache", settings=s)
    cache = await assemble(s, host)
    port = await host.start()
    await host.set_serving(True)
    try:
        yield Replica(f"127.0.0.1:{port}", cache)
    finally:
        await host.stop()


@asynccontextmanager
async def client(target: str) -> AsyncIterator[cache_pb2_grpc.CacheServiceAsyncStub]:
    async with create_channel(target, timeout_s=10.0) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[misc]


def lookup_request(
    tenant: str = "acme",
    question: str = "What is the capital of Australia?",
    *,
    feature: str = "faq",
    wait_ms: int = 0,
    temperature: float = 0.0,
    peek: bool = False,
) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(
        attribution=common_pb2.Attribution(tenant=tenant, feature=feature),
        model="cheap",
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question),
        ],
        sampling=common_pb2.SamplingParams(max_tokens=64, temperature=temperature),
        wait_ms=wait_ms,
        peek=peek,
    )


def answer(text: str = "Canberra.", cost_micros: int = 420) -> cache_pb2.CachedResponse:
    return cache_pb2.CachedResponse(
        text=text,
        usage=common_pb2.Usage(input_tokens=21, output_tokens=3),
        cost_micros=cost_micros,
        model="qwen-cheap",
        tier=common_pb2.TIER_CHEAP,
        finish_reason=common_pb2.FINISH_REASON_STOP,
    )


def fill_request(
    looked_up: cache_pb2.LookupResponse,
    response: cache_pb2.CachedResponse | None = None,
    tenant: str = "acme",
    feature: str = "faq",
) -> cache_pb2.FillRequest:
    return cache_pb2.FillRequest(
        attribution=common_pb2.Attribution(tenant=tenant, feature=feature),
        key=looked_up.lease.key,
        lease_id=looked_up.lease.lease_id,
        response=response or answer(),
    )


def detail(err: grpc.aio.AioRpcError, cls: Any) -> Any:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    for d in status.details:
        if d.Is(cls.DESCRIPTOR):
            msg = cls()
            d.Unpack(msg)
            return msg
    raise AssertionError(f"no {cls.__name__} in {status}")


async def single_flight(
    replicas: list[Replica], stubs: list[cache_pb2_grpc.CacheServiceAsyncStub], n: int = 50
) -> list[cache_pb2.LookupResponse]:
    """n identical concurrent lookups spread over ``stubs``; whoever gets the lease "infers" until every other
    caller is waiting on it (as the replicas report), then fills."""
    fills: list[cache_pb2.FillResponse] = []

    async def caller(i: int) -> cache_pb2.LookupResponse:
        stub = stubs[i % len(stubs)]
        result = await stub.Lookup(lookup_request(wait_ms=20_000))
        if result.outcome == MISS:
            async with asyncio.timeout(15):
                while sum(r.cache.waiting() for r in replicas) < n - 1:  # noqa: ASYNC110 - polls a gauge
                    await asyncio.sleep(0.01)
            fills.append(await stub.Fill(fill_request(result)))
        return result

    results = await asyncio.gather(*(caller(i) for i in range(n)))
    assert [f.stored for f in fills] == [True]
    return list(results)


@pytest.fixture(params=["memory", "redis"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    async with running(settings(request.param, redis_url)) as replica:
        yield replica


async def test_fifty_concurrent_identical_misses_make_one_fill(server: Replica) -> None:
    async with client(server.target) as stub:
        results = await single_flight([server], [stub])
        assert Counter(r.outcome for r in results) == {MISS: 1, HIT: 49}
        hits = [r for r in results if r.outcome == HIT]
        assert all(r.coalesced for r in hits)
        assert all(r.response.text == "Canberra." and r.response.cost_micros == 420 for r in hits)
        assert len({r.key for r in results}) == 1
        stats = await stub.GetStats(cache_pb2.GetStatsRequest(tenant="acme"))
    assert (stats.total.fills, stats.total.misses, stats.total.hits, stats.total.coalesced_waits) == (1, 1, 49, 49)
    assert stats.total.saved_micros == 49 * 420


async def test_hit_returns_the_stored_response_usage_and_cost(server: Replica) -> None:
    async with client(server.target) as stub:
        miss = await stub.Lookup(lookup_request())
        assert miss.outcome == MISS and miss.lease.lease_id and miss.lease.key == miss.key
        assert (await stub.Fill(fill_request(miss))).stored
        hit = await stub.Lookup(lookup_request(question="  What is the capital of   Australia? "))
    assert hit.outcome == HIT and not hit.coalesced and hit.key == miss.key
    expected = answer()
    assert hit.response.text == expected.text
    assert hit.response.usage == expected.usage
    assert hit.response.cost_micros == 420
    assert hit.response.finish_reason == common_pb2.FINISH_REASON_STOP
    assert hit.response.created_unix_ms > 0


async def test_the_same_prompt_from_two_tenants_never_hits_across(server: Replica) -> None:
    async with client(server.target) as stub:
        a = await stub.Lookup(lookup_request("acme"))
        assert (await stub.Fill(fill_request(a, answer("acme's private answer")))).stored
        b = await stub.Lookup(lookup_request("globex"))
        assert b.outcome == MISS and b.key != a.key
        with pytest.raises(grpc.aio.AioRpcError) as err:  # acme cannot fill globex's lease
            await stub.Fill(fill_request(b, tenant="acme"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        globex = await stub.GetStats(cache_pb2.GetStatsRequest(tenant="globex"))
    assert globex.total.hits == 0 and {g.tenant for g in globex.groups} == {"globex"}


async def test_tenant_may_come_from_metadata(server: Replica) -> None:
    async with client(server.target) as stub:
        request = lookup_request(tenant="")
        result = await stub.Lookup(request, metadata=(("x-costmesh-tenant", "acme"),))
    assert result.outcome == MISS


async def test_nondeterministic_requests_are_uncacheable(server: Replica) -> None:
    async with client(server.target) as stub:
        result = await stub.Lookup(lookup_request(temperature=0.7))
    assert result.outcome == cache_pb2.LOOKUP_OUTCOME_UNCACHEABLE and not result.key and not result.lease.lease_id


async def test_entries_expire_with_their_feature_ttl(redis_url: str) -> None:
    policy = {"features": {"faq": {"ttl_s": 0.6}}}
    for store in ("memory", "redis"):
        async with running(settings(store, redis_url, policy=policy)) as replica, client(replica.target) as stub:
            miss = await stub.Lookup(lookup_request())
            assert (await stub.Fill(fill_request(miss))).stored
            assert (await stub.Lookup(lookup_request())).outcome == HIT
            await asyncio.sleep(0.8)
            assert (await stub.Lookup(lookup_request())).outcome == MISS, store


async def test_holder_that_dies_is_replaced_after_its_lease(redis_url: str) -> None:
    for store in ("memory", "redis"):
        async with running(settings(store, redis_url, lease_ttl_ms=300)) as replica:
            loop = asyncio.get_running_loop()
            async with client(replica.target) as dying:
                dead = await dying.Lookup(lookup_request())
                leased_at = loop.time()
                assert dead.outcome == MISS
            # The holder's process is gone (channel closed, no Fill, no abandon).
            async with client(replica.target) as stub:
                calls = [asyncio.ensure_future(stub.Lookup(lookup_request(wait_ms=5_000))) for _ in range(5)]
                first = await next(asyncio.as_completed(calls))
                assert first.outcome == MISS and first.lease.lease_id != dead.lease.lease_id, store
                assert loop.time() - leased_at >= 0.2, "taken over before the dead holder's lease ran out"
                assert (await stub.Fill(fill_request(first))).stored
                results = await asyncio.gather(*calls)
                assert Counter(x.outcome for x in results) == {MISS: 1, HIT: 4}, store
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await stub.Fill(fill_request(dead))
                assert late.value.code() == grpc.StatusCode.NOT_FOUND


async def test_abandon_hands_the_lease_to_a_waiter(server: Replica) -> None:
    async with client(server.target) as stub:
        holder = await stub.Lookup(lookup_request())
        waiter = asyncio.ensure_future(stub.Lookup(lookup_request(wait_ms=5_000)))
        await asyncio.sleep(0.05)
        abandon = fill_request(holder)
        abandon.abandon = True
        abandon.ClearField("response")
        released = await stub.Fill(abandon)
        assert (released.stored, released.reason) == (False, "ABANDONED")
        took_over = await asyncio.wait_for(waiter, 5)
    assert took_over.outcome == MISS and took_over.lease.lease_id != holder.lease.lease_id


async def test_truncated_responses_are_not_stored(server: Replica) -> None:
    async with client(server.target) as stub:
        miss = await stub.Lookup(lookup_request())
        truncated = answer()
        truncated.finish_reason = common_pb2.FINISH_REASON_LENGTH
        result = await stub.Fill(fill_request(miss, truncated))
        assert (result.stored, result.reason) == (False, "INCOMPLETE")
        assert (await stub.Lookup(lookup_request())).outcome == MISS


async def test_wait_timeout_when_the_holder_is_slow(server: Replica) -> None:
    async with client(server.target) as stub:
        await stub.Lookup(lookup_request())
        result = await stub.Lookup(lookup_request(wait_ms=50))
    assert result.outcome == cache_pb2.LOOKUP_OUTCOME_WAIT_TIMEOUT and not result.lease.lease_id


async def test_invalidate_by_key_feature_and_namespace(server: Replica) -> None:
    async with client(server.target) as stub:
        keys = []
        for i, feature in enumerate(["faq", "faq", "chat"]):
            miss = await stub.Lookup(lookup_request(question=f"Question number {i}?", feature=feature))
            assert (await stub.Fill(fill_request(miss, feature=feature))).stored
            keys.append(miss.key)
        other = await stub.Lookup(lookup_request("globex"))
        assert (await stub.Fill(fill_request(other, tenant="globex"))).stored

        removed = await stub.Invalidate(cache_pb2.InvalidateRequest(tenant="acme", key=keys[0]))
        assert removed.removed == 1
        assert (await stub.Invalidate(cache_pb2.InvalidateRequest(tenant="acme", feature="faq"))).removed == 1
        assert (await stub.Invalidate(cache_pb2.InvalidateRequest(tenant="acme"))).removed == 1
        assert (await stub.GetStats(cache_pb2.GetStatsRequest(tenant="acme"))).entries == 0
        assert (await stub.Lookup(lookup_request("globex"))).outcome == HIT


@pytest.mark.parametrize(
    ("mutate", "fields"),
    [
        (lambda r: r.ClearField("messages"), ["messages"]),
        (lambda r: r.attribution.ClearField("tenant"), ["attribution.tenant"]),
        (lambda r: setattr(r.attribution, "tenant", "bad tenant!"), ["attribution.tenant"]),
        (lambda r: setattr(r.sampling, "temperature", 3.0), ["sampling.temperature"]),
        (lambda r: r.messages.add(role=common_pb2.ROLE_UNSPECIFIED, content="x"), ["messages[2].role"]),
        (lambda r: (r.ClearField("messages"), r.ClearField("model")), ["model", "messages"]),
    ],
)
async def test_bad_lookups_are_invalid_arguments_with_field_details(
    server: Replica, mutate: Any, fields: list[str]
) -> None:
    request = lookup_request()
    mutate(request)
    async with client(server.target) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Lookup(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(err.value, error_details_pb2.BadRequest).field_violations] == fields
    assert detail(err.value, error_details_pb2.ErrorInfo).domain == "costmesh.cache"


async def test_bad_fills(server: Replica) -> None:
    async with client(server.target) as stub:
        miss = await stub.Lookup(lookup_request())

        unknown = fill_request(miss)
        unknown.lease_id = "not-a-lease"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Fill(unknown)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert detail(err.value, error_details_pb2.ErrorInfo).reason == "LEASE_NOT_FOUND"

        huge = fill_request(miss, answer("x" * (300 * 1024)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Fill(huge)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail(err.value, error_details_pb2.ErrorInfo).reason == "ENTRY_TOO_LARGE"
        assert detail(err.value, error_details_pb2.BadRequest).field_violations[0].field == "response"

        bad_key = fill_request(miss)
        bad_key.key = "zz"
        bad_key.ClearField("response")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Fill(bad_key)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [v.field for v in detail(err.value, error_details_pb2.BadRequest).field_violations]
        assert fields == ["key", "response"]

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Invalidate(cache_pb2.InvalidateRequest(feature="faq"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cli_stats_and_invalidate(server: Replica) -> None:
    target = server.target
    async with client(server.target) as stub:
        miss = await stub.Lookup(lookup_request())
        assert (await stub.Fill(fill_request(miss))).stored
        assert (await stub.Lookup(lookup_request())).outcome == HIT

    runner = CliRunner()
    shown = await asyncio.to_thread(runner.invoke, cache_cli, ["stats", "--target", target, "--tenant", "acme"])
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if line.startswith("acme/faq"))
    assert row.split()[1:3] == ["1", "1"]  # hits, misses
    assert "entries=1" in shown.output

    as_json = await asyncio.to_thread(runner.invoke, cache_cli, ["stats", "--target", target, "--json"])
    assert as_json.exit_code == 0 and '"savedMicros": "420"' in as_json.output

    removed = await asyncio.to_thread(
        runner.invoke, cache_cli, ["invalidate", "--target", target, "--tenant", "acme", "--key", miss.key]
    )
    assert removed.exit_code == 0 and "removed 1" in removed.output

    bad = await asyncio.to_thread(runner.invoke, cache_cli, ["invalidate", "--target", target, "--tenant", "no pe"])
    assert bad.exit_code == 2 and "INVALID_ARGUMENT" in bad.output
