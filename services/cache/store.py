"""The storage protocol of the cache, its value types, and the in-process waiter registry both stores share.

A store keeps entries (an opaque payload plus the metadata the service needs: feature, original cost, the tenant
that filled it), fill leases, and the shared counters. Every operation that decides single-flight is atomic in the
store (one Lua script in Redis, one synchronous step on the event loop in memory):

* :meth:`CacheStore.probe` — a hit returns the entry (and counts it); else, when a lease is requested, either takes
  the lease (``LEASED``) or reports the holder's remaining lease time (``HELD``).
* :meth:`CacheStore.fill` — stores the entry only while the caller still holds the lease, releases the lease and
  wakes the waiters.
* :meth:`CacheStore.abandon` — releases the lease and wakes the waiters so the next one takes over.

Waiters register with :meth:`CacheStore.watch` *before* they probe, so a fill that lands between the probe and the
wait is never missed. Stores raise :class:`StoreUnavailable` when their backend cannot be reached; the service
fails open on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class StoreUnavailable(Exception):
    """The store's backend cannot be reached (connection refused, timeout, …)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored response: the serialized payload and what the service needs to account for it."""

    payload: bytes
    feature: str
    cost_micros: int
    tenant: str

    @property
    def size(self) -> int:
        return len(self.payload)


class ProbeState(Enum):
    HIT = "hit"
    LEASED = "leased"
    HELD = "held"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Probe:
    """Result of :meth:`CacheStore.probe`. ``lease_ttl_ms``: our new lease's lifetime (LEASED) or what is left of
    the holder's (HELD)."""

    state: ProbeState
    entry: Entry | None = None
    lease_ttl_ms: int = 0
    lease_id: str | None = None  # ours, when LEASED


COUNTERS = ("hits", "misses", "coalesced_waits", "fills", "saved_micros")


@dataclass(slots=True)
class StoreStats:
    """Shared counters per (tenant, feature) plus what the store holds."""

    groups: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    entries: int = 0
    bytes: int = 0
    evictions: int = 0


class Waiter:
    """One caller waiting on a key. ``arm()`` before probing; ``wait()`` returns early when the key changes."""

    __slots__ = ("_event", "_poll", "polls", "waited")

    def __init__(self, poll: Callable[[int], float | None]) -> None:
        self._event = asyncio.Event()
        self._poll = poll
        self.polls = 0
        self.waited = False

    def arm(self) -> None:
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait for a change of the key, at most ``timeout_s``; True when woken by a change.

        The store's ``poll`` policy may cap one wait (a Redis store without a live pub/sub subscription polls with
        backoff); the caller re-probes after every return, so an early return costs one probe, never correctness.
        """
        self.waited = True
        cap = self._poll(self.polls)
        if cap is not None and cap < timeout_s:
            timeout_s = cap
            self.polls += 1
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


def _no_poll(_: int) -> float | None:
    return None


class WaiterRegistry:
    """Local waiters per (namespace, key); a store wakes them on fill / abandon (or a pub/sub message)."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], set[Waiter]] = {}

    @contextmanager
    def watch(self, namespace: str, key: str, poll: Callable[[int], float | None] = _no_poll) -> Iterator[Waiter]:
        slot = (namespace, key)
        waiter = Waiter(poll)
        waiters = self._waiters.setdefault(slot, set())
        waiters.add(waiter)
        try:
            yield waiter
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(slot) is waiters:
                del self._waiters[slot]

    def wake(self, namespace: str, key: str) -> int:
        waiters = self._waiters.get((namespace, key))
        if not waiters:
            return 0
        for waiter in waiters:
            waiter.wake()
        return len(waiters)

    def wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.wake()

    def __len__(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def waiting(self) -> int:
        """Callers of this process that have waited on an in-flight fill and are still waiting for it."""
        return sum(1 for waiters in self._waiters.values() for w in waiters if w.waited)


class CacheStore(Protocol):
    """Entries, leases and shared counters; implemented in memory (default) and on Redis."""

    async def start(self) -> None:
        """Open background resources (e.g. the pub/sub listener). Must not fail when the backend is down."""

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
        """A hit (counted under tenant/feature, plus ``coalesced_waits`` when ``coalesced``), else: without
        ``lease_id`` ABSENT; with one, LEASED (lease taken, counted as a miss) or HELD by someone else."""

    async def fill(self, namespace: str, key: str, *, lease_id: str, entry: Entry, ttl_ms: int) -> bool:
        """Store ``entry`` for ``ttl_ms`` if ``lease_id`` still holds the key's lease; release it; wake waiters."""

    async def abandon(self, namespace: str, key: str, *, lease_id: str) -> bool:
        """Release the lease if ``lease_id`` holds it, waking waiters; False when it does not."""

    def watch(self, namespace: str, key: str) -> AbstractContextManager[Waiter]:
        """Register a local waiter for changes of the key (fill or abandon from any replica)."""

    def waiting(self) -> int:
        """How many local callers are waiting on an in-flight fill now (a gauge)."""

    async def invalidate(self, namespace: str, *, feature: str | None = None, key: str | None = None) -> int:
        """Remove the namespace's entries (only ``feature``'s, only ``key``); returns how many."""

    async def stats(self, namespaces: Collection[str] | None, tenant: str | None) -> StoreStats:
        """Counters of the given namespaces (all when None), only ``tenant``'s groups when given."""

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` when the backend cannot be reached."""

    async def close(self) -> None: ...
