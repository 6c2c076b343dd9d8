"""One contract for every cache store, run against the in-process LRU and a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.cache.memory_store import MemoryStore
from services.cache.redis_store import RedisStore
from services.cache.store import CacheStore, Entry, Probe, ProbeState

KEY = "a" * 64
OTHER = "b" * 64
ENTRY = Entry(payload=b"\x00\xffbinary \xe2\x82\xac payload", feature="faq", cost_micros=1234, tenant="acme")
LEASE_MS = 5_000


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CacheStore]:
    s: CacheStore
    if request.param == "memory":
        s = MemoryStore(max_bytes=1 << 20)
    else:
        s = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix="contract")
    await s.start()
    if isinstance(s, RedisStore):
        assert await s.wait_subscribed(5.0)
    yield s
    await s.close()


async def probe(
    store: CacheStore,
    lease_id: str | None,
    *,
    ns: str = "acme",
    key: str = KEY,
    tenant: str = "acme",
    feature: str = "faq",
    lease_ms: int = LEASE_MS,
    coalesced: bool = False,
) -> Probe:
    return await store.probe(
        ns, key, tenant=tenant, feature=feature, lease_id=lease_id, lease_ttl_ms=lease_ms, coalesced=coalesced
    )


async def test_absent_then_leased_then_held(store: CacheStore) -> None:
    assert (await probe(store, None)).state is ProbeState.ABSENT
    first = await probe(store, "lease-1")
    assert first.state is ProbeState.LEASED
    assert first.lease_ttl_ms == LEASE_MS
    second = await probe(store, "lease-2")
    assert second.state is ProbeState.HELD
    assert 0 < second.lease_ttl_ms <= LEASE_MS


async def test_fill_with_the_lease_stores_and_hits(store: CacheStore) -> None:
    await probe(store, "lease-1")
    assert await store.fill("acme", KEY, lease_id="lease-1", entry=ENTRY, ttl_ms=60_000)
    hit = await probe(store, "lease-2")
    assert hit.state is ProbeState.HIT
    assert hit.entry == ENTRY
    # The lease was used up: a second fill with it is refused.
    assert not await store.fill("acme", KEY, lease_id="lease-1", entry=ENTRY, ttl_ms=60_000)


async def test_fill_without_the_lease_is_refused(store: CacheStore) -> None:
    assert not await store.fill("acme", KEY, lease_id="never-issued", entry=ENTRY, ttl_ms=60_000)
    await probe(store, "lease-1")
    assert not await store.fill("acme", KEY, lease_id="someone-else", entry=ENTRY, ttl_ms=60_000)
    assert (await probe(store, None)).state is ProbeState.ABSENT


async def test_abandon_hands_the_lease_to_the_next_caller(store: CacheStore) -> None:
    await probe(store, "lease-1")
    assert not await store.abandon("acme", KEY, lease_id="not-the-holder")
    assert await store.abandon("acme", KEY, lease_id="lease-1")
    assert not await store.abandon("acme", KEY, lease_id="lease-1")
    assert (await probe(store, "lease-2")).state is ProbeState.LEASED


async def test_expired_lease_is_taken_over(store: CacheStore) -> None:
    await probe(store, "dead-holder", lease_ms=100)
    assert (await probe(store, "waiter", lease_ms=100)).state is ProbeState.HELD
    await asyncio.sleep(0.15)
    assert (await probe(store, "waiter")).state is ProbeState.LEASED
    assert not await store.fill("acme", KEY, lease_id="dead-holder", entry=ENTRY, ttl_ms=60_000)
    assert await store.fill("acme", KEY, lease_id="waiter", entry=ENTRY, ttl_ms=60_000)


async def test_entries_expire_after_their_ttl(store: CacheStore) -> None:
    await probe(store, "lease-1")
    assert await store.fill("acme", KEY, lease_id="lease-1", entry=ENTRY, ttl_ms=500)
    assert (await probe(store, None)).state is ProbeState.HIT
    await asyncio.sleep(0.6)
    assert (await probe(store, None)).state is ProbeState.ABSENT
    assert (await store.stats(None, None)).entries == 0


async def test_namespaces_are_isolated(store: CacheStore) -> None:
    await probe(store, "lease-a", ns="acme")
    assert not await store.fill("globex", KEY, lease_id="lease-a", entry=ENTRY, ttl_ms=60_000)
    assert await store.fill("acme", KEY, lease_id="lease-a", entry=ENTRY, ttl_ms=60_000)
    assert (await probe(store, None, ns="globex", tenant="globex")).state is ProbeState.ABSENT
    assert (await probe(store, "lease-g", ns="globex", tenant="globex")).state is ProbeState.LEASED


@pytest.mark.parametrize("how", ["fill", "abandon"])
async def test_watchers_wake_on_fill_and_abandon(store: CacheStore, how: str) -> None:
    await probe(store, "holder")
    with store.watch("acme", KEY) as waiter, store.watch("acme", OTHER) as bystander:
        waiter.arm()
        bystander.arm()

        async def finish() -> None:
            await asyncio.sleep(0.05)
            if how == "fill":
                assert await store.fill("acme", KEY, lease_id="holder", entry=ENTRY, ttl_ms=60_000)
            else:
                assert await store.abandon("acme", KEY, lease_id="holder")

        task = asyncio.create_task(finish())
        loop = asyncio.get_running_loop()
        started = loop.time()
        woken = await waiter.wait(5.0)
        await task
        assert woken, "the waiter timed out instead of being woken"
        assert loop.time() - started < 2.0
        assert not await bystander.wait(0.05), "a waiter on another key was woken"


async def test_invalidate_by_key_feature_and_namespace(store: CacheStore) -> None:
    keys = [f"{i:064x}" for i in range(6)]
    for i, k in enumerate(keys):
        feature = "faq" if i < 4 else "chat"
        await probe(store, f"l{i}", key=k)
        entry = Entry(payload=b"x", feature=feature, cost_micros=1, tenant="acme")
        assert await store.fill("acme", k, lease_id=f"l{i}", entry=entry, ttl_ms=60_000)
    await probe(store, "g", ns="globex", key=keys[0], tenant="globex")
    assert await store.fill("globex", keys[0], lease_id="g", entry=ENTRY, ttl_ms=60_000)

    assert await store.invalidate("acme", key=keys[0]) == 1
    assert await store.invalidate("acme", key=keys[0]) == 0
    assert await store.invalidate("acme", key=keys[4], feature="faq") == 0  # key of another feature
    assert await store.invalidate("acme", feature="faq") == 3
    assert await store.invalidate("acme") == 2
    assert (await store.stats(["acme"], None)).entries == 0
    assert (await store.stats(["globex"], None)).entries == 1
    assert (await probe(store, None, ns="globex", key=keys[0], tenant="globex")).state is ProbeState.HIT


async def test_counters_per_tenant_and_feature(store: CacheStore) -> None:
    await probe(store, "l1")  # miss, lease
    await probe(store, "l2")  # held: neither hit nor miss
    assert await store.fill("acme", KEY, lease_id="l1", entry=ENTRY, ttl_ms=60_000)
    await probe(store, "l3", coalesced=True)  # a coalesced hit
    await probe(store, "l4", feature="")  # a plain hit, no feature
    await probe(store, "g1", ns="globex", tenant="globex")  # another tenant's miss

    acme = await store.stats(["acme"], "acme")
    assert acme.groups[("acme", "faq")] == {
        "hits": 1,
        "misses": 1,
        "coalesced_waits": 1,
        "fills": 1,
        "saved_micros": 1234,
    }
    assert acme.groups[("acme", "")]["hits"] == 1
    assert acme.groups[("acme", "")]["saved_micros"] == 1234
    assert ("globex", "faq") not in acme.groups
    assert acme.entries == 1
    assert acme.bytes >= len(ENTRY.payload)

    everything = await store.stats(None, None)
    assert everything.groups[("globex", "faq")]["misses"] == 1
    assert everything.entries == 1
