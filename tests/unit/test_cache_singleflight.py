"""The domain cache on the embedded store: single flight, lease takeover, fill rules, fail-open, isolation."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection
from contextlib import AbstractContextManager

import pytest

from services.cache.keys import Message, Role, Sampling
from services.cache.memory_store import MemoryStore
from services.cache.namespaces import Namespaces, TenantConfig
from services.cache.policy import CachePolicy, FeaturePolicy, FinishReason
from services.cache.singleflight import Breaker, LookupQuery, LookupResult, Outcome, ResponseCache
from services.cache.store import Entry, Probe, StoreStats, StoreUnavailable, Waiter
from services.common.errors import InvalidArgument, NotFound


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """The real memory store, with probe calls counted and an outage switch (a seam, not a mock)."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.probes = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("switched off by the test")

    async def start(self) -> None:
        await self.inner.start()

    async def probe(
        self,
        namespace: str,
        key: str,
        *,
        tenant: str,
        feature: str,
        lease_id: str | None,
        lease_ttl_ms: int,
        coalesced: bool,
    ) -> Probe:
        self.probes += 1
        self._check()
        return await self.inner.probe(
            namespace,
            key,
            tenant=tenant,
            feature=feature,
            lease_id=lease_id,
            lease_ttl_ms=lease_ttl_ms,
            coalesced=coalesced,
        )

    async def fill(self, namespace: str, key: str, *, lease_id: str, entry: Entry, ttl_ms: int) -> bool:
        self._check()
        return await self.inner.fill(namespace, key, lease_id=lease_id, entry=entry, ttl_ms=ttl_ms)

    async def abandon(self, namespace: str, key: str, *, lease_id: str) -> bool:
        self._check()
        return await self.inner.abandon(namespace, key, lease_id=lease_id)

    def watch(self, namespace: str, key: str) -> AbstractContextManager[Waiter]:
        return self.inner.watch(namespace, key)

    def waiting(self) -> int:
        return self.inner.waiting()

    async def invalidate(self, namespace: str, *, feature: str | None = None, key: str | None = None) -> int:
        self._check()
        return await self.inner.invalidate(namespace, feature=feature, key=key)

    async def stats(self, namespaces: Collection[str] | None, tenant: str | None) -> StoreStats:
        self._check()
        return await self.inner.stats(namespaces, tenant)

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        await self.inner.close()


QUESTION = (Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "What is the capital of Australia?"))


def query(
    tenant: str = "acme", *, wait_ms: int = 5_000, peek: bool = False, feature: str = "faq", **kw: object
) -> LookupQuery:
    return LookupQuery(
        tenant=tenant,
        feature=feature,
        model="cheap",
        messages=kw.get("messages", QUESTION),  # type: ignore[arg-type]
        sampling=kw.get("sampling", Sampling(max_tokens=64, temperature=0.0)),  # type: ignore[arg-type]
        wait_ms=wait_ms,
        peek=peek,
    )


def make(
    *,
    lease_ttl_ms: int = 30_000,
    policy: CachePolicy | None = None,
    tenants: dict[str, TenantConfig] | None = None,
    breaker: Breaker | None = None,
) -> tuple[ResponseCache, CountingStore]:
    store = CountingStore(MemoryStore(max_bytes=1 << 20))
    cache = ResponseCache(
        store=store,
        namespaces=Namespaces(policy=policy, tenants=tenants),
        lease_ttl_ms=lease_ttl_ms,
        breaker=breaker,
    )
    return cache, store


async def fill(cache: ResponseCache, result: LookupResult, text: bytes = b"Canberra", tenant: str = "acme") -> bool:
    assert result.lease is not None
    outcome = await cache.fill(
        tenant=tenant,
        feature="faq",
        key=result.key,
        lease_id=result.lease.lease_id,
        payload=text,
        cost_micros=420,
        finish_reason=FinishReason.STOP,
    )
    return outcome.stored


async def test_fifty_identical_misses_pay_for_one_fill() -> None:
    cache, store = make()
    results: list[LookupResult] = []

    async def caller() -> None:
        result = await cache.lookup(query())
        results.append(result)
        if result.outcome is Outcome.MISS:
            await asyncio.sleep(0.3)  # "inference"
            assert await fill(cache, result)

    await asyncio.gather(*(caller() for _ in range(50)))
    outcomes = Counter(r.outcome for r in results)
    assert outcomes == {Outcome.MISS: 1, Outcome.HIT: 49}
    assert all(r.coalesced and r.entry is not None and r.entry.payload == b"Canberra" for r in results[1:])
    stats = await cache.stats("acme")
    assert (stats.total.misses, stats.total.hits, stats.total.coalesced_waits, stats.total.fills) == (1, 49, 49, 1)
    assert stats.total.saved_micros == 49 * 420
    # Waiting is event-driven, not polling: a waiter probes to find the lease held, once more after registering
    # as a waiter, and once after the fill woke it, however long the holder takes.
    assert store.probes <= 1 + 3 * 49


async def test_abandoned_lease_goes_to_exactly_one_waiter() -> None:
    cache, _ = make()
    holder = await cache.lookup(query())
    assert holder.outcome is Outcome.MISS and holder.lease is not None
    waiters = [asyncio.create_task(cache.lookup(query())) for _ in range(10)]
    await asyncio.sleep(0.02)
    assert not any(w.done() for w in waiters)
    await cache.abandon(tenant="acme", feature="faq", key=holder.key, lease_id=holder.lease.lease_id)
    await asyncio.sleep(0.02)
    done = [w.result() for w in waiters if w.done()]
    assert [r.outcome for r in done] == [Outcome.MISS]
    new_holder = done[0]
    assert new_holder.lease is not None and new_holder.lease.lease_id != holder.lease.lease_id
    assert await fill(cache, new_holder)
    rest = await asyncio.gather(*waiters)
    assert Counter(r.outcome for r in rest) == {Outcome.MISS: 1, Outcome.HIT: 9}


async def test_a_dead_holder_is_replaced_when_its_lease_expires() -> None:
    cache, _ = make(lease_ttl_ms=150)
    dead = await cache.lookup(query())  # takes the lease and never fills
    assert dead.outcome is Outcome.MISS
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiters = [asyncio.create_task(cache.lookup(query(wait_ms=5_000))) for _ in range(5)]
    first = await next(asyncio.as_completed(waiters))
    assert first.outcome is Outcome.MISS and first.lease is not None
    assert 0.1 <= loop.time() - started < 1.0
    assert await fill(cache, first)
    results = await asyncio.gather(*waiters)
    assert Counter(r.outcome for r in results) == {Outcome.MISS: 1, Outcome.HIT: 4}
    with pytest.raises(NotFound):  # the dead holder's lease is gone
        await fill(cache, dead)


async def test_wait_is_bounded() -> None:
    cache, _ = make()
    await cache.lookup(query())
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await cache.lookup(query(wait_ms=60))
    assert result.outcome is Outcome.WAIT_TIMEOUT
    assert result.lease is None
    assert 0.05 <= loop.time() - started < 1.0


async def test_peek_neither_leases_nor_waits() -> None:
    cache, _ = make()
    holder = await cache.lookup(query())
    peeked = await cache.lookup(query(peek=True))
    assert (peeked.outcome, peeked.lease) == (Outcome.MISS, None)
    assert await fill(cache, holder)
    assert (await cache.lookup(query(peek=True))).outcome is Outcome.HIT


async def test_nondeterministic_requests_are_uncacheable() -> None:
    cache, store = make()
    result = await cache.lookup(query(sampling=Sampling(temperature=0.7)))
    assert (result.outcome, result.key, result.reason) == (Outcome.UNCACHEABLE, "", "NONDETERMINISTIC")
    assert store.probes == 0
    assert (await cache.stats("acme")).total.uncacheable == 1


async def test_same_prompt_from_two_tenants_never_hits_across() -> None:
    cache, _ = make()
    a = await cache.lookup(query("acme"))
    assert await fill(cache, a, b"acme's answer")
    b = await cache.lookup(query("globex"))
    assert b.outcome is Outcome.MISS and b.key != a.key
    # acme's lease cannot be used to write into globex's namespace either
    assert b.lease is not None
    with pytest.raises(NotFound):
        await cache.fill(
            tenant="acme",
            feature="faq",
            key=b.key,
            lease_id=b.lease.lease_id,
            payload=b"x",
            cost_micros=1,
            finish_reason=FinishReason.STOP,
        )


async def test_explicitly_shared_namespace_hits_across_its_tenants() -> None:
    cache, _ = make(tenants={"docs-a": TenantConfig(share_as="docs"), "docs-b": TenantConfig(share_as="docs")})
    a = await cache.lookup(query("docs-a"))
    assert await fill(cache, a, b"shared", tenant="docs-a")
    b = await cache.lookup(query("docs-b"))
    assert b.outcome is Outcome.HIT and b.entry is not None and b.entry.payload == b"shared"
    assert (await cache.lookup(query("acme"))).outcome is Outcome.MISS


@pytest.mark.parametrize(
    ("finish", "reason"),
    [(FinishReason.LENGTH, "INCOMPLETE"), (FinishReason.ERROR, "ERROR"), (FinishReason.ABORT, "INCOMPLETE")],
)
async def test_partial_or_failed_responses_are_not_stored_and_release_the_lease(
    finish: FinishReason, reason: str
) -> None:
    cache, _ = make()
    holder = await cache.lookup(query())
    assert holder.lease is not None
    waiter = asyncio.create_task(cache.lookup(query()))
    await asyncio.sleep(0.01)
    result = await cache.fill(
        tenant="acme", feature="faq", key=holder.key, lease_id=holder.lease.lease_id,
        payload=b"partial", cost_micros=1, finish_reason=finish,
    )  # fmt: skip
    assert (result.stored, result.reason) == (False, reason)
    took_over = await asyncio.wait_for(waiter, 1.0)
    assert took_over.outcome is Outcome.MISS and took_over.lease is not None


async def test_oversized_response_is_an_invalid_argument_and_releases_the_lease() -> None:
    cache, _ = make(policy=CachePolicy(max_entry_bytes=10))
    holder = await cache.lookup(query())
    assert holder.lease is not None
    with pytest.raises(InvalidArgument) as err:
        await cache.fill(
            tenant="acme", feature="faq", key=holder.key, lease_id=holder.lease.lease_id,
            payload=b"x" * 11, cost_micros=1, finish_reason=FinishReason.STOP,
        )  # fmt: skip
    assert err.value.reason == "ENTRY_TOO_LARGE"
    assert [v.field for v in err.value.violations] == ["response"]
    assert (await cache.lookup(query(wait_ms=50))).outcome is Outcome.MISS


async def test_unknown_lease_is_not_found() -> None:
    cache, _ = make()
    holder = await cache.lookup(query())
    with pytest.raises(NotFound) as err:
        await cache.fill(
            tenant="acme", feature="faq", key=holder.key, lease_id="made-up",
            payload=b"x", cost_micros=1, finish_reason=FinishReason.STOP,
        )  # fmt: skip
    assert err.value.reason == "LEASE_NOT_FOUND"
    with pytest.raises(NotFound):
        await cache.abandon(tenant="acme", feature="faq", key=holder.key, lease_id="made-up")


async def test_feature_ttl_zero_is_never_cached() -> None:
    cache, _ = make(policy=CachePolicy(features={"chat": FeaturePolicy(ttl_s=0)}))
    assert (await cache.lookup(query(feature="chat"))).outcome is Outcome.UNCACHEABLE
    assert (await cache.lookup(query(feature="faq"))).outcome is Outcome.MISS


async def test_store_outage_fails_open_and_the_breaker_spares_the_store() -> None:
    clock = Clock()
    cache, store = make(breaker=Breaker(base_s=1.0, max_s=4.0, clock=clock))
    store.down = True
    first = await cache.lookup(query())
    assert (first.outcome, first.lease, first.reason) == (Outcome.UNAVAILABLE, None, "STORE_UNAVAILABLE")
    assert first.key  # the key is still reported
    probes = store.probes
    assert (await cache.lookup(query())).outcome is Outcome.UNAVAILABLE
    assert store.probes == probes, "an open breaker must not touch the store"
    clock.now += 1.0
    assert (await cache.lookup(query())).outcome is Outcome.UNAVAILABLE  # half-open probe fails: 2 s now
    clock.now += 1.5
    assert (await cache.lookup(query())).outcome is Outcome.UNAVAILABLE
    assert store.probes == probes + 1
    store.down = False
    clock.now += 0.5
    assert (await cache.lookup(query())).outcome is Outcome.MISS
    assert (await cache.stats("acme")).total.store_errors == 4


async def test_fill_during_an_outage_is_not_an_error() -> None:
    cache, store = make()
    holder = await cache.lookup(query())
    store.down = True
    assert holder.lease is not None
    result = await cache.fill(
        tenant="acme", feature="faq", key=holder.key, lease_id=holder.lease.lease_id,
        payload=b"x", cost_micros=1, finish_reason=FinishReason.STOP,
    )  # fmt: skip
    assert (result.stored, result.reason) == (False, "STORE_UNAVAILABLE")


async def test_ttl_expiry_through_the_domain() -> None:
    clock = Clock()
    store = MemoryStore(max_bytes=1 << 20, clock=clock)
    cache = ResponseCache(store=store, namespaces=Namespaces(policy=CachePolicy(ttl_s=60)))
    assert await fill(cache, await cache.lookup(query()))
    clock.now += 59
    assert (await cache.lookup(query())).outcome is Outcome.HIT
    clock.now += 2
    assert (await cache.lookup(query())).outcome is Outcome.MISS


async def test_invalidate_by_feature_and_key() -> None:
    cache, _ = make()
    a = await cache.lookup(query())
    assert await fill(cache, a)
    other = await cache.lookup(query(messages=(Message(Role.USER, "And of Canada?"),)))
    assert await fill(cache, other)
    assert await cache.invalidate(tenant="globex") == 0
    assert await cache.invalidate(tenant="acme", key=a.key) == 1
    assert (await cache.lookup(query(peek=True))).outcome is Outcome.MISS
    assert await cache.invalidate(tenant="acme", feature="faq") == 1
    assert (await cache.stats("acme")).entries == 0
