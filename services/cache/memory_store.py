"""The embedded store (the default): an in-process LRU bounded in bytes, with TTLs, leases and counters.

Everything runs on the service's event loop and no method awaits in the middle, so each operation is atomic with
respect to the others; waiters block on :class:`asyncio.Event` (no polling). One replica only: several replicas
that must coalesce with each other use the Redis store.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass

from services.cache.store import COUNTERS, Entry, Probe, ProbeState, StoreStats, Waiter, WaiterRegistry

#: Bytes charged per entry on top of its payload and names (the dict slot, the objects around it).
ENTRY_OVERHEAD_BYTES = 256
_SWEEP_EVERY = 4096


@dataclass(slots=True)
class _Stored:
    entry: Entry
    charged: int
    expires_at: float


class MemoryStore:
    """Byte-bounded LRU of entries plus leases; ``clock`` (monotonic seconds) is injectable for tests."""

    def __init__(self, *, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Stored] = OrderedDict()
        self._leases: dict[tuple[str, str], tuple[str, float]] = {}
        self._counters: defaultdict[tuple[str, str, str], dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(COUNTERS, 0)
        )
        self._waiters = WaiterRegistry()
        self._bytes = 0
        self._evictions = 0
        self._ops = 0

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._waiters.wake_all()

    def waiting(self) -> int:
        return self._waiters.waiting()

    def watch(self, namespace: str, key: str) -> AbstractContextManager[Waiter]:
        return self._waiters.watch(namespace, key)

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
        slot = (namespace, key)
        now = self._clock()
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep_leases(now)
        stored = self._entries.get(slot)
        if stored is not None:
            if stored.expires_at > now:
                self._entries.move_to_end(slot)
                counters = self._counters[(namespace, tenant, feature)]
                counters["hits"] += 1
                counters["saved_micros"] += stored.entry.cost_micros
                if coalesced:
                    counters["coalesced_waits"] += 1
                return Probe(ProbeState.HIT, stored.entry)
            self._drop(slot)
        if lease_id is None:
            return Probe(ProbeState.ABSENT)
        held = self._leases.get(slot)
        if held is not None and held[1] > now:
            return Probe(ProbeState.HELD, lease_ttl_ms=max(1, round((held[1] - now) * 1000)))
        self._leases[slot] = (lease_id, now + lease_ttl_ms / 1000)
        self._counters[(namespace, tenant, feature)]["misses"] += 1
        return Probe(ProbeState.LEASED, lease_ttl_ms=lease_ttl_ms, lease_id=lease_id)

    def _holds(self, slot: tuple[str, str], lease_id: str) -> bool:
        held = self._leases.get(slot)
        return held is not None and held[0] == lease_id and held[1] > self._clock()

    async def fill(self, namespace: str, key: str, *, lease_id: str, entry: Entry, ttl_ms: int) -> bool:
        slot = (namespace, key)
        if not self._holds(slot, lease_id):
            return False
        del self._leases[slot]
        self._counters[(namespace, entry.tenant, entry.feature)]["fills"] += 1
        charged = entry.size + len(key) + len(namespace) + len(entry.feature) + ENTRY_OVERHEAD_BYTES
        if charged <= self.max_bytes:
            if slot in self._entries:
                self._drop(slot)
            self._entries[slot] = _Stored(entry, charged, self._clock() + ttl_ms / 1000)
            self._bytes += charged
            self._evict()
        else:
            self._evictions += 1
        self._waiters.wake(namespace, key)
        return True

    async def abandon(self, namespace: str, key: str, *, lease_id: str) -> bool:
        slot = (namespace, key)
        if not self._holds(slot, lease_id):
            return False
        del self._leases[slot]
        self._waiters.wake(namespace, key)
        return True

    async def invalidate(self, namespace: str, *, feature: str | None = None, key: str | None = None) -> int:
        if key is not None:
            candidates = [(namespace, key)] if (namespace, key) in self._entries else []
        else:
            candidates = [slot for slot in self._entries if slot[0] == namespace]
        removed = 0
        for slot in candidates:
            if feature is None or self._entries[slot].entry.feature == feature:
                self._drop(slot)
                removed += 1
        return removed

    async def stats(self, namespaces: Collection[str] | None, tenant: str | None) -> StoreStats:
        self._sweep_entries(self._clock())
        wanted = None if namespaces is None else set(namespaces)
        report = StoreStats(evictions=self._evictions)
        for (namespace, group_tenant, feature), counters in self._counters.items():
            if (wanted is None or namespace in wanted) and (tenant is None or group_tenant == tenant):
                group = report.groups.setdefault((group_tenant, feature), dict.fromkeys(COUNTERS, 0))
                for name, value in counters.items():
                    group[name] += value
        for (namespace, _), stored in self._entries.items():
            if wanted is None or namespace in wanted:
                report.entries += 1
                report.bytes += stored.charged
        return report

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, slot: tuple[str, str]) -> None:
        stored = self._entries.pop(slot)
        self._bytes -= stored.charged

    def _evict(self) -> None:
        now = self._clock()
        while self._bytes > self.max_bytes:
            _, stored = self._entries.popitem(last=False)
            self._bytes -= stored.charged
            if stored.expires_at > now:  # an expired entry leaving is not an eviction
                self._evictions += 1

    def _sweep_entries(self, now: float) -> None:
        for slot in [slot for slot, stored in self._entries.items() if stored.expires_at <= now]:
            self._drop(slot)

    def _sweep_leases(self, now: float) -> None:
        for slot in [slot for slot, (_, expires_at) in self._leases.items() if expires_at <= now]:
            del self._leases[slot]
