"""Per-tenant admission at the router: how many requests a tenant may have in flight, and how fast it may send them.

The router is the front door, so one tenant's burst must not take every worker slot, budget call and socket from
the others. Two limits per tenant, each off when 0:

* ``max_concurrent`` — requests in flight at once (Generate, GenerateStream, SubmitAsync, Classify); a stream holds
  its slot until it ends;
* ``requests_per_s`` with ``burst`` — a token bucket: ``burst`` requests at once, refilled at ``requests_per_s``.

Past either, the call is rejected at once with ``RESOURCE_EXHAUSTED`` (reason ``TENANT_CONCURRENCY`` or
``TENANT_RATE``, a ``QuotaFailure`` naming the tenant, and ``RetryInfo``): queueing would only turn a burst into
latency for everyone. These limits protect the router's capacity; the money limits (and per-scope request and token
rates over a minute) are the budget service's.

Settings (``router:`` YAML section, or ``COSTMESH_ROUTER_LIMITS__DEFAULT__MAX_CONCURRENT=32``)::

    limits:
      default: {max_concurrent: 128, requests_per_s: 0, burst: 0}
      tenants:
        acme: {max_concurrent: 16, requests_per_s: 20, burst: 40}

State is kept per tenant seen; idle tenants (nothing in flight, bucket full) are dropped once more than
``max_tracked_tenants`` are tracked, so a stream of made-up tenant names cannot grow the router's memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import QuotaViolation, ResourceExhausted


class TenantLimit(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrent: int = Field(128, ge=0, description="Requests in flight at once; 0 = no limit.")
    requests_per_s: float = Field(0.0, ge=0, description="Sustained requests per second; 0 = no rate limit.")
    burst: int = Field(0, ge=0, description="Requests admitted at once by the rate limit; 0 = max(1, requests_per_s).")

    @property
    def capacity(self) -> float:
        return float(self.burst or max(1.0, self.requests_per_s))


class LimitSettings(BaseModel):
    """The router's ``limits`` settings section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: TenantLimit = Field(default_factory=TenantLimit, description="Limits of every tenant not listed.")
    tenants: dict[str, TenantLimit] = Field(default_factory=dict, description="Per-tenant overrides.")
    max_tracked_tenants: int = Field(10_000, ge=1, description="Idle tenants are forgotten beyond this many.")

    def for_tenant(self, tenant: str) -> TenantLimit:
        return self.tenants.get(tenant, self.default)


@dataclass(slots=True)
class _TenantState:
    limit: TenantLimit
    in_flight: int
    tokens: float
    updated: float


class TenantLimiter:
    """Admission by tenant. Single-threaded (the router's event loop): no locks needed."""

    def __init__(self, settings: LimitSettings | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings or LimitSettings()
        self._clock = clock
        self._state: dict[str, _TenantState] = {}

    def __len__(self) -> int:
        return len(self._state)

    def in_flight(self, tenant: str) -> int:
        state = self._state.get(tenant)
        return state.in_flight if state is not None else 0

    def _get(self, tenant: str, now: float) -> _TenantState:
        state = self._state.get(tenant)
        if state is None:
            if len(self._state) >= self._settings.max_tracked_tenants:
                self._forget_idle(now)
            limit = self._settings.for_tenant(tenant)
            state = _TenantState(limit, 0, limit.capacity, now)
            self._state[tenant] = state
        return state

    def _refill(self, state: _TenantState, now: float) -> None:
        rate = state.limit.requests_per_s
        if rate > 0:
            state.tokens = min(state.limit.capacity, state.tokens + (now - state.updated) * rate)
        state.updated = now

    def _forget_idle(self, now: float) -> None:
        for tenant, state in list(self._state.items()):
            self._refill(state, now)
            if state.in_flight == 0 and state.tokens >= state.limit.capacity:
                del self._state[tenant]

    def acquire(self, tenant: str) -> None:
        """Take a slot (and a rate token) for ``tenant`` or raise ``ResourceExhausted``; pair with :meth:`release`."""
        now = self._clock()
        state = self._get(tenant, now)
        limit = state.limit
        if limit.max_concurrent and state.in_flight >= limit.max_concurrent:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {state.in_flight} requests in flight (limit {limit.max_concurrent})",
                violations=[QuotaViolation(f"tenant:{tenant}", f"at most {limit.max_concurrent} requests in flight")],
                retry_after_s=1.0,
                reason="TENANT_CONCURRENCY",
                metadata={"tenant": tenant, "limit": str(limit.max_concurrent)},
            )
        if limit.requests_per_s > 0:
            self._refill(state, now)
            if state.tokens < 1.0:
                wait_s = (1.0 - state.tokens) / limit.requests_per_s
                raise ResourceExhausted(
                    f"tenant {tenant!r} is over {limit.requests_per_s:g} requests/s",
                    violations=[QuotaViolation(f"tenant:{tenant}", f"at most {limit.requests_per_s:g} requests/s")],
                    retry_after_s=math.ceil(wait_s * 1000) / 1000,
                    reason="TENANT_RATE",
                    metadata={"tenant": tenant, "limit": f"{limit.requests_per_s:g}"},
                )
            state.tokens -= 1.0
        state.in_flight += 1

    def release(self, tenant: str) -> None:
        state = self._state.get(tenant)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    @contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Hold a slot for ``tenant`` for the duration of the block (released on every exit path)."""
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)


def admission(limiter: TenantLimiter | None, tenant: str) -> contextlib.AbstractContextManager[None]:
    """The tenant's concurrency/rate slot for one request, for either front door; requests without a valid tenant
    are not counted (validation rejects them instead)."""
    if limiter is None or not tenant or len(tenant) > 64:
        return contextlib.nullcontext()
    return limiter.admit(tenant)
