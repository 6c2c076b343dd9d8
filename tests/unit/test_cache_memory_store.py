"""The embedded store's own guarantees: a byte bound with LRU eviction, and TTLs on an injected clock."""

from __future__ import annotations

from services.cache.memory_store import ENTRY_OVERHEAD_BYTES, MemoryStore
from services.cache.store import Entry, ProbeState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def k(i: int) -> str:
    return f"{i:064x}"


def charged(payload_len: int) -> int:
    return payload_len + 64 + len("ns") + len("f") + ENTRY_OVERHEAD_BYTES


async def put(store: MemoryStore, i: int, payload: bytes, ttl_ms: int = 60_000) -> None:
    probe = await store.probe("ns", k(i), tenant="t", feature="f", lease_id=f"l{i}", lease_ttl_ms=1000, coalesced=False)
    assert probe.state is ProbeState.LEASED
    assert await store.fill("ns", k(i), lease_id=f"l{i}", entry=Entry(payload, "f", 1, "t"), ttl_ms=ttl_ms)


async def state(store: MemoryStore, i: int) -> ProbeState:
    probe = await store.probe("ns", k(i), tenant="t", feature="f", lease_id=None, lease_ttl_ms=1000, coalesced=False)
    return probe.state


async def test_bytes_stay_within_the_bound_and_the_least_recently_used_goes_first() -> None:
    store = MemoryStore(max_bytes=3 * charged(1000))
    for i in range(3):
        await put(store, i, b"x" * 1000)
    assert store.bytes_used == 3 * charged(1000)
    assert await state(store, 0) is ProbeState.HIT  # 0 is now the most recently used
    await put(store, 3, b"y" * 1000)
    assert store.bytes_used <= store.max_bytes
    assert [await state(store, i) for i in range(4)] == [
        ProbeState.HIT,
        ProbeState.ABSENT,  # evicted: least recently used
        ProbeState.HIT,
        ProbeState.HIT,
    ]
    assert (await store.stats(None, None)).evictions == 1


async def test_one_large_entry_evicts_as_many_as_needed() -> None:
    store = MemoryStore(max_bytes=4 * charged(100))
    for i in range(4):
        await put(store, i, b"x" * 100)
    await put(store, 9, b"z" * (2 * charged(100)))
    assert store.bytes_used <= store.max_bytes
    assert len(store) == 2
    assert await state(store, 9) is ProbeState.HIT


async def test_an_entry_larger_than_the_whole_store_is_not_kept() -> None:
    store = MemoryStore(max_bytes=1000)
    await put(store, 0, b"x" * 2000)
    assert len(store) == 0
    assert store.bytes_used == 0
    assert await state(store, 0) is ProbeState.ABSENT


async def test_ttl_on_the_injected_clock() -> None:
    clock = Clock()
    store = MemoryStore(max_bytes=1 << 20, clock=clock)
    await put(store, 0, b"short", ttl_ms=10_000)
    await put(store, 1, b"long", ttl_ms=60_000)
    clock.now += 9.999
    assert await state(store, 0) is ProbeState.HIT
    clock.now += 0.002
    assert await state(store, 0) is ProbeState.ABSENT
    assert await state(store, 1) is ProbeState.HIT
    stats = await store.stats(None, None)
    assert stats.entries == 1
    assert store.bytes_used == charged(len(b"long"))


async def test_lease_expiry_on_the_injected_clock() -> None:
    clock = Clock()
    store = MemoryStore(max_bytes=1 << 20, clock=clock)
    first = await store.probe("ns", k(0), tenant="t", feature="f", lease_id="a", lease_ttl_ms=500, coalesced=False)
    assert first.state is ProbeState.LEASED
    clock.now += 0.2
    held = await store.probe("ns", k(0), tenant="t", feature="f", lease_id="b", lease_ttl_ms=500, coalesced=False)
    assert held.state is ProbeState.HELD
    assert held.lease_ttl_ms == 300
    clock.now += 0.3
    taken = await store.probe("ns", k(0), tenant="t", feature="f", lease_id="b", lease_ttl_ms=500, coalesced=False)
    assert taken.state is ProbeState.LEASED
    assert not await store.fill("ns", k(0), lease_id="a", entry=Entry(b"late", "f", 1, "t"), ttl_ms=1000)
