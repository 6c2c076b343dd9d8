"""The response cache: keys, policy, single-flight leases and fail-open, over any :class:`CacheStore`.

Lookup of a cacheable request:

1. build the key (namespace, model, sampling, normalized conversation, normalizer fingerprint);
2. probe the store atomically: a hit returns the entry; otherwise the caller takes the key's fill lease (MISS)
   — or, when another caller holds it, waits for that holder's fill, at most ``wait_ms`` and never past the
   holder's lease, then probes again: a fill serves the waiter (a *coalesced* hit); an abandoned or expired lease
   is taken over by the first waiter to probe (MISS with a new lease); the rest go on waiting;
3. if the store cannot be reached the lookup fails open: ``UNAVAILABLE``, a miss without a lease, logged and
   counted, never an error. A small circuit breaker then skips the store for a short, growing cool-down so a dead
   Redis costs no timeouts per request; the first probe after the cool-down closes it again.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from services.cache.keys import Message, Sampling, build_key
from services.cache.namespaces import Namespaces
from services.cache.policy import Decision, FinishReason
from services.cache.store import COUNTERS, CacheStore, Entry, Probe, ProbeState, StoreUnavailable
from services.common.errors import FieldViolation, InvalidArgument, NotFound, Unavailable

log = structlog.get_logger("costmesh.cache")

LOCAL_COUNTERS = ("uncacheable", "store_errors", "wait_timeouts")


class Outcome(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    UNCACHEABLE = "UNCACHEABLE"
    WAIT_TIMEOUT = "WAIT_TIMEOUT"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class LookupQuery:
    tenant: str
    feature: str
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    wait_ms: int = 0
    peek: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    key: str
    expires_unix_ms: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    outcome: Outcome
    key: str = ""
    entry: Entry | None = None
    lease: Lease | None = None
    coalesced: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FillResult:
    stored: bool
    reason: str = ""


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    coalesced_waits: int = 0
    uncacheable: int = 0
    fills: int = 0
    evictions: int = 0
    saved_micros: int = 0
    store_errors: int = 0
    wait_timeouts: int = 0

    def add(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(slots=True)
class StatsReport:
    total: Counters = field(default_factory=Counters)
    groups: dict[tuple[str, str], Counters] = field(default_factory=dict)
    entries: int = 0
    bytes: int = 0


class Breaker:
    """Skips an unreachable store for a cool-down that doubles per consecutive failure (capped)."""

    def __init__(self, *, base_s: float = 0.25, max_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._base_s = base_s
        self._max_s = max_s
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def allow(self) -> bool:
        return self._failures == 0 or self._clock() >= self._open_until

    def failure(self) -> bool:
        """Record a failure; True when this one opened the breaker (first of a run)."""
        self._failures += 1
        self._open_until = self._clock() + min(self._max_s, self._base_s * 2 ** (self._failures - 1))
        return self._failures == 1

    def success(self) -> bool:
        """Record a success; True when this one closed the breaker."""
        was_failing = self._failures > 0
        self._failures = 0
        return was_failing


class LeaseIds:
    """Lease ids unique across replicas and restarts: a random per-process prefix and a counter (cheaper than
    urandom per lookup). Guessing one gains nothing: a lease only admits a Fill within its own namespace."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._next):x}"


class ResponseCache:
    """The cache service's domain: lookup with single flight, fill, invalidate, stats."""

    def __init__(
        self,
        *,
        store: CacheStore,
        namespaces: Namespaces,
        lease_ttl_ms: int = 30_000,
        default_wait_ms: int = 15_000,
        max_wait_ms: int = 60_000,
        breaker: Breaker | None = None,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._store = store
        self._namespaces = namespaces
        self._lease_ttl_ms = lease_ttl_ms
        self._default_wait_ms = default_wait_ms
        self._max_wait_ms = max_wait_ms
        self._breaker = breaker or Breaker()
        self._wall_clock_ms = wall_clock_ms
        self._lease_ids = LeaseIds()
        self._local: defaultdict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(LOCAL_COUNTERS, 0)
        )

    @property
    def namespaces(self) -> Namespaces:
        return self._namespaces

    def waiting(self) -> int:
        """Callers of this replica waiting on an in-flight fill right now."""
        return self._store.waiting()

    # -- lookup -------------------------------------------------------------------------------------------------

    def key_for(self, query: LookupQuery) -> str:
        namespace = self._namespaces.resolve(query.tenant)
        return build_key(
            namespace=namespace.name,
            model=query.model,
            sampling=query.sampling,
            messages=query.messages,
            normalizer=namespace.normalizer,
        )

    async def lookup(self, query: LookupQuery) -> LookupResult:
        namespace = self._namespaces.resolve(query.tenant)
        decision = namespace.policy.cacheable(query.sampling, query.feature)
        if not decision.ok:
            self._local[(query.tenant, query.feature)]["uncacheable"] += 1
            return LookupResult(Outcome.UNCACHEABLE, reason=decision.reason)
        key = build_key(
            namespace=namespace.name,
            model=query.model,
            sampling=query.sampling,
            messages=query.messages,
            normalizer=namespace.normalizer,
        )
        if not self._breaker.allow():
            self._local[(query.tenant, query.feature)]["store_errors"] += 1
            return LookupResult(Outcome.UNAVAILABLE, key, reason="STORE_UNAVAILABLE")
        try:
            # Fast path: one atomic probe answers a hit, a miss (with our new lease) or a peek.
            probe = await self._probe(namespace.name, key, query, coalesced=False)
            if probe.state is not ProbeState.HELD:
                return self._answer(probe, key, coalesced=False)
            # Someone else holds the lease: register as a waiter *before* probing again, so that a fill landing
            # between the probe and the wait still wakes us; then wait (bounded) and re-probe until answered.
            wait_ms = min(query.wait_ms or self._default_wait_ms, self._max_wait_ms)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_ms / 1000
            with self._store.watch(namespace.name, key) as waiter:
                while True:
                    waiter.arm()
                    probe = await self._probe(namespace.name, key, query, coalesced=True)
                    if probe.state is not ProbeState.HELD:
                        return self._answer(probe, key, coalesced=True)
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        self._local[(query.tenant, query.feature)]["wait_timeouts"] += 1
                        return LookupResult(Outcome.WAIT_TIMEOUT, key, reason="LEASE_HELD")
                    await waiter.wait(min(remaining, probe.lease_ttl_ms / 1000 + 0.001))
        except StoreUnavailable as exc:
            self._store_failed(exc, "lookup")
            self._local[(query.tenant, query.feature)]["store_errors"] += 1
            return LookupResult(Outcome.UNAVAILABLE, key, reason="STORE_UNAVAILABLE")

    async def _probe(self, namespace: str, key: str, query: LookupQuery, *, coalesced: bool) -> Probe:
        probe = await self._store.probe(
            namespace,
            key,
            tenant=query.tenant,
            feature=query.feature,
            lease_id=None if query.peek else self._lease_ids.new(),
            lease_ttl_ms=self._lease_ttl_ms,
            coalesced=coalesced,
        )
        self._store_ok()
        return probe

    def _answer(self, probe: Probe, key: str, *, coalesced: bool) -> LookupResult:
        if probe.state is ProbeState.HIT:
            return LookupResult(Outcome.HIT, key, entry=probe.entry, coalesced=coalesced)
        if probe.lease_id is None:  # peek
            return LookupResult(Outcome.MISS, key)
        expires = self._wall_clock_ms() + probe.lease_ttl_ms
        return LookupResult(Outcome.MISS, key, lease=Lease(probe.lease_id, key, expires))

    def _store_ok(self) -> None:
        if self._breaker.failing and self._breaker.success():
            log.info("cache_store_recovered")

    def _store_failed(self, exc: StoreUnavailable, op: str) -> None:
        if self._breaker.failure():
            log.warning("cache_store_unavailable", op=op, error=str(exc))

    # -- fill ---------------------------------------------------------------------------------------------------

    async def fill(
        self,
        *,
        tenant: str,
        feature: str,
        key: str,
        lease_id: str,
        payload: bytes,
        cost_micros: int,
        finish_reason: FinishReason,
    ) -> FillResult:
        """Store a response for a held lease. Refused responses (errors, truncated, feature not cached) give the
        lease up so a waiter takes over; an oversized one is an invalid argument; an unknown lease is NOT_FOUND."""
        namespace = self._namespaces.resolve(tenant)
        decision = namespace.policy.storable(finish_reason, len(payload))
        ttl_ms = namespace.policy.ttl_ms(feature)
        if decision.ok and ttl_ms <= 0:
            decision = Decision(False, "FEATURE_NOT_CACHED")
        try:
            if not decision.ok:
                held = await self._store.abandon(namespace.name, key, lease_id=lease_id)
                self._store_ok()
                if decision.reason == "TOO_LARGE":
                    limit = namespace.policy.max_entry_bytes
                    raise InvalidArgument(
                        "response too large to cache",
                        reason="ENTRY_TOO_LARGE",
                        violations=[
                            FieldViolation("response", f"{len(payload)} bytes serialized; at most {limit} are cached")
                        ],
                    )
                if not held:
                    raise _lease_not_found(key)
                return FillResult(False, decision.reason)
            entry = Entry(payload=payload, feature=feature, cost_micros=cost_micros, tenant=tenant)
            stored = await self._store.fill(namespace.name, key, lease_id=lease_id, entry=entry, ttl_ms=ttl_ms)
            self._store_ok()
        except StoreUnavailable as exc:
            self._store_failed(exc, "fill")
            self._local[(tenant, feature)]["store_errors"] += 1
            return FillResult(False, "STORE_UNAVAILABLE")
        if not stored:
            raise _lease_not_found(key)
        return FillResult(True)

    async def abandon(self, *, tenant: str, feature: str, key: str, lease_id: str) -> FillResult:
        """Give a lease up (inference failed) so the next waiter takes over at once."""
        namespace = self._namespaces.resolve(tenant)
        try:
            held = await self._store.abandon(namespace.name, key, lease_id=lease_id)
            self._store_ok()
        except StoreUnavailable as exc:
            self._store_failed(exc, "abandon")
            self._local[(tenant, feature)]["store_errors"] += 1
            return FillResult(False, "STORE_UNAVAILABLE")
        if not held:
            raise _lease_not_found(key)
        return FillResult(False, "ABANDONED")

    # -- admin --------------------------------------------------------------------------------------------------

    async def invalidate(self, *, tenant: str, feature: str = "", key: str = "") -> int:
        namespace = self._namespaces.resolve(tenant)
        try:
            removed = await self._store.invalidate(namespace.name, feature=feature or None, key=key or None)
        except StoreUnavailable as exc:
            self._store_failed(exc, "invalidate")
            raise Unavailable("cache store unreachable", reason="STORE_UNAVAILABLE", retry_after_s=1.0) from exc
        log.info("cache_invalidated", namespace=namespace.name, feature=feature, key=key, removed=removed)
        return removed

    async def stats(self, tenant: str = "") -> StatsReport:
        namespaces = [self._namespaces.resolve(tenant).name] if tenant else None
        try:
            stored = await self._store.stats(namespaces, tenant or None)
        except StoreUnavailable as exc:
            self._store_failed(exc, "stats")
            raise Unavailable("cache store unreachable", reason="STORE_UNAVAILABLE", retry_after_s=1.0) from exc
        report = StatsReport(entries=stored.entries, bytes=stored.bytes)
        for group, values in stored.groups.items():
            report.groups.setdefault(group, Counters()).add(values)
        for (group_tenant, feature), values in self._local.items():
            if not tenant or group_tenant == tenant:
                report.groups.setdefault((group_tenant, feature), Counters()).add(values)
        for counters in report.groups.values():
            report.total.add({name: getattr(counters, name) for name in (*COUNTERS, *LOCAL_COUNTERS)})
        report.total.evictions = stored.evictions
        return report


def _lease_not_found(key: str) -> NotFound:
    return NotFound(
        f"no live lease for key {key} with this lease id (unknown, expired or already used)",
        reason="LEASE_NOT_FOUND",
        metadata={"key": key},
    )
