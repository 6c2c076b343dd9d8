"""The storage protocol of the budget service, and the commands and outcomes that cross it.

Two implementations keep one contract (tests/integration/test_budget_store_contract.py runs against both):
:class:`services.budget.sqlite_store.SqliteBudgetStore` (embedded default) and
:class:`services.budget.redis_store.RedisBudgetStore` (production). Every method that decides or changes money is
one atomic step in the store (one Lua script, one ``BEGIN IMMEDIATE`` transaction), and each such step first
returns the money of every reservation whose TTL has passed, so expired reservations never count — no sweeper is
needed for correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from services.budget.model import (
    Buckets,
    Policy,
    ReservationState,
    Scope,
    ScopeSnapshot,
    UsageDims,
    UsageRecord,
)
from services.common.attribution import Attribution
from services.common.pricing import TokenUsage


class StoreUnavailable(Exception):
    """The store cannot be reached (connection refused, timeout, database locked past the busy timeout)."""


@dataclass(frozen=True, slots=True)
class ReserveCommand:
    reservation_id: str
    """Id to give the reservation if it is admitted (a replay returns the original id instead)."""
    request_id: str
    attribution: Attribution
    est_cost: int
    est_tokens: int
    expires_ms: int
    model: str
    tier: int
    at: Buckets
    retention_ms: int
    """How long the record stays after it expires, for idempotent replays of Reserve, Commit and Release."""


ReserveStatus = Literal["admitted", "rejected", "replayed"]


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    """A request id whose reservation is held or committed replays it; one whose reservation was released or
    expired is admitted afresh under ``ReserveCommand.reservation_id`` (or rejected, if the limits now refuse)."""

    status: ReserveStatus
    reservation_id: str
    expires_ms: int
    scopes: tuple[ScopeSnapshot, ...]
    """Every applicable scope with a policy: after the reservation (admitted), as seen when rejecting (rejected),
    or now (replayed)."""
    state: ReservationState = ReservationState.HELD
    """HELD, or COMMITTED when it replays a reservation settled with a commit (meaningless when rejected)."""


@dataclass(frozen=True, slots=True)
class CommitCommand:
    tenant: str
    reservation_id: str
    actual_cost: int
    usage: TokenUsage
    model: str
    tier: int
    saved_micros: int
    at: Buckets
    retention_ms: int
    """How long the settled record stays for replays (from the commit on)."""


CommitStatus = Literal["committed", "replayed", "not_found"]
LateReason = Literal["", "expired", "released"]


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    status: CommitStatus
    charged_micros: int = 0
    over_estimate: bool = False
    late: LateReason = ""
    """Why the commit was late: the reservation had ``expired`` or been ``released`` (its money was already
    returned) before this commit charged the spend in full; "" when it was held. A replay answers the first
    commit's value."""
    scopes: tuple[ScopeSnapshot, ...] = ()


ReleaseStatus = Literal["released", "replayed", "not_found"]


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    status: ReleaseStatus
    released_micros: int = 0


@dataclass(frozen=True, slots=True)
class RenewCommand:
    tenant: str
    reservation_id: str
    expires_ms: int
    """The wanted expiry (now + TTL); a reservation that already expires later keeps its expiry."""
    at: Buckets
    retention_ms: int


RenewStatus = Literal["renewed", "not_found", "settled", "expired"]


@dataclass(frozen=True, slots=True)
class RenewOutcome:
    status: RenewStatus
    """``settled``: committed or released; ``expired``: its TTL passed first (its money already went back)."""
    expires_ms: int = 0
    """When a renewed reservation now expires."""


@dataclass(frozen=True, slots=True)
class SavingsCommand:
    tenant: str
    request_id: str
    dims: UsageDims
    saved_micros: int
    cache_hit: bool
    at: Buckets
    retention_ms: int


class BudgetStore(Protocol):
    """Where policies, counters, reservations and usage rollups live."""

    async def put_policy(self, policy: Policy, *, at: Buckets) -> bool:
        """Create or replace the policy of ``policy.scope``; True when it was created.

        A new policy starts its spent counters from the usage already recorded in the current windows, so a
        budget set mid-month knows what the month has spent.
        """
        ...

    async def get_policy(self, scope: Scope) -> Policy | None: ...

    async def snapshot(self, scope: Scope, *, at: Buckets) -> ScopeSnapshot | None:
        """The scope's counters now (expired reservations returned first); None when it has no policy."""
        ...

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome: ...

    async def commit(self, cmd: CommitCommand) -> CommitOutcome: ...

    async def release(self, tenant: str, reservation_id: str, *, at: Buckets) -> ReleaseOutcome: ...

    async def renew(self, cmd: RenewCommand) -> RenewOutcome:
        """Extend a held reservation's expiry to max(its expiry, ``cmd.expires_ms``), on every scope it holds, in one
        atomic step; a settled, expired or unknown (or another tenant's) reservation is left as it is."""
        ...

    async def record_savings(self, cmds: Sequence[SavingsCommand]) -> list[bool]:
        """Add savings to the usage rollups: one transaction (SQLite) or one pipelined round trip (Redis) for all of
        ``cmds``. Replaying is per command: True, in order, where its (tenant, ``request_id``) was already recorded,
        by an earlier call or an earlier command of ``cmds`` (that command changes nothing; the others still
        count)."""
        ...

    async def usage(self, tenant: str, cells: Sequence[tuple[str, int]]) -> list[UsageRecord]:
        """Usage rollup cells of ``tenant``: (level, bucket) with level m/h/d, or ("L", 0) for lifetime."""
        ...

    async def tenants(self) -> list[str]:
        """Every tenant with recorded usage or a policy."""
        ...

    async def first_activity_ms(self, tenant: str) -> int | None:
        """When ``tenant`` first recorded usage; None if never."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers."""
        ...

    async def close(self) -> None: ...
