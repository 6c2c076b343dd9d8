"""Several cache replicas on one real Redis: cross-replica single flight and takeover, and a Redis outage."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from costmesh.cache.v1 import cache_pb2
from tests.integration.test_cache_grpc import (
    HIT,
    MISS,
    client,
    fill_request,
    lookup_request,
    running,
    settings,
    single_flight,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("wake", ["pubsub", "poll"])
async def test_identical_misses_on_two_replicas_make_one_fill(redis_url: str, wake: str) -> None:
    s = settings("redis", redis_url, redis_wake=wake)
    async with running(s) as a, running(s) as b, client(a.target) as stub_a, client(b.target) as stub_b:
        results = await single_flight([a, b], [stub_a, stub_b])
        assert Counter(r.outcome for r in results) == {MISS: 1, HIT: 49}
        assert all(r.coalesced for r in results if r.outcome == HIT)
        # Counters live in Redis: either replica reports the whole picture.
        stats_b = await stub_b.GetStats(cache_pb2.GetStatsRequest(tenant="acme"))
        stats_a = await stub_a.GetStats(cache_pb2.GetStatsRequest(tenant="acme"))
    for stats in (stats_a, stats_b):
        assert (stats.total.fills, stats.total.misses, stats.total.hits, stats.total.coalesced_waits) == (1, 1, 49, 49)


async def test_waiters_on_another_replica_take_over_from_a_dead_holder(redis_url: str) -> None:
    s = settings("redis", redis_url, lease_ttl_ms=300)
    async with running(s) as a, running(s) as b:
        async with client(a.target) as dying:
            dead = await dying.Lookup(lookup_request())
            assert dead.outcome == MISS
        async with client(b.target) as stub:
            calls = [asyncio.ensure_future(stub.Lookup(lookup_request(wait_ms=5_000))) for _ in range(5)]
            first = await next(asyncio.as_completed(calls))
            assert first.outcome == MISS and first.lease.lease_id != dead.lease.lease_id
            assert (await stub.Fill(fill_request(first))).stored
            results = await asyncio.gather(*calls)
    assert Counter(r.outcome for r in results) == {MISS: 1, HIT: 4}


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may stop and start (the session one is shared)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_redis_outage_fails_open_then_recovers(own_redis: RedisServer) -> None:
    s = settings(
        "redis", own_redis.url, redis_timeout_ms=200, breaker_base_ms=50, breaker_max_ms=200, lease_ttl_ms=2_000
    )
    async with running(s) as replica, client(replica.target) as stub:
        miss = await stub.Lookup(lookup_request())
        assert (await stub.Fill(fill_request(miss))).stored
        assert (await stub.Lookup(lookup_request())).outcome == HIT
        holder = await stub.Lookup(lookup_request(question="Another question?"))
        assert holder.outcome == MISS

        own_redis.stop()
        for _ in range(5):
            result = await stub.Lookup(lookup_request(wait_ms=1_000))
            assert result.outcome == cache_pb2.LOOKUP_OUTCOME_UNAVAILABLE
            assert result.key == miss.key and not result.lease.lease_id
            await asyncio.sleep(0.02)
        filled = await stub.Fill(fill_request(holder))
        assert (filled.stored, filled.reason) == (False, "STORE_UNAVAILABLE")
        with pytest.raises(grpc.aio.AioRpcError) as admin:
            await stub.GetStats(cache_pb2.GetStatsRequest(tenant="acme"))
        assert admin.value.code() == grpc.StatusCode.UNAVAILABLE

        own_redis.start()  # same port, empty (no persistence)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            recovered = await stub.Lookup(lookup_request())
            if recovered.outcome != cache_pb2.LOOKUP_OUTCOME_UNAVAILABLE:
                break
            assert loop.time() < deadline, "the cache did not recover after Redis came back"
            await asyncio.sleep(0.05)
        assert recovered.outcome == MISS and recovered.lease.lease_id
        # Single flight works again, including the wake-up of waiters.
        waiter = asyncio.ensure_future(stub.Lookup(lookup_request(wait_ms=5_000)))
        await asyncio.sleep(0.05)
        assert (await stub.Fill(fill_request(recovered))).stored
        woken = await asyncio.wait_for(waiter, 5)
        assert woken.outcome == HIT and woken.coalesced
        stats = await stub.GetStats(cache_pb2.GetStatsRequest(tenant="acme"))
    assert stats.total.store_errors >= 6  # five lookups and one fill, counted by this replica
