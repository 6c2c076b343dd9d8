"""The budget ledger: validates requests, runs them against a :class:`BudgetStore`, and explains the answers.

This is the whole behaviour of the service minus the wire format: the servicer (``server.py``) only converts
protos to the inputs below and results back. Errors are the shared domain errors (``services.common.errors``):
bad input is ``InvalidArgument`` with one field violation per bad field (and nothing is written), unknown or
foreign reservation ids are ``NotFound``, a hard stop is ``ResourceExhausted`` with one quota violation per limit
passed plus the time until the window resets, renewing a reservation no longer held is ``FailedPrecondition``,
and an unreachable store is ``Unavailable`` (fail closed) unless ``fail_open`` is set.

The only ways past a hard limit are a commit above its estimate and a late commit (of a reservation that expired
or was released: the work ran, so the ledger records it); both are charged in full and counted.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from services.budget.model import (
    DEFAULT_SOFT_PPM,
    MAX_AMOUNT,
    PPM,
    Limit,
    Policy,
    ReservationState,
    Scope,
    ScopeKind,
    ScopeSnapshot,
    Tier,
    UsageDims,
    Window,
)
from services.budget.policy import Headroom, headroom, max_tokens_cap, min_remaining, violations
from services.budget.store import (
    BudgetStore,
    CommitCommand,
    LateReason,
    RenewCommand,
    ReserveCommand,
    SavingsCommand,
    StoreUnavailable,
)
from services.budget.usage import GroupBy, UsageRow, group
from services.budget.windows import buckets, cover_with_retention, window_start_ms
from services.common.attribution import Attribution
from services.common.errors import (
    FailedPrecondition,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
    Validator,
)
from services.common.pricing import TokenUsage

log = structlog.get_logger("costmesh.budget")

Clock = Callable[[], int]

_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Largest token count one request may carry.
MAX_REQUEST_TOKENS = 10**9
#: Most records one RecordSavingsBatch may carry.
MAX_SAVINGS_BATCH = 1000
OPEN_PREFIX = "open_"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def new_reservation_id() -> str:
    return "res_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    default_ttl_s: int = 300
    max_ttl_s: int = 3600
    retention_s: int = 86_400
    max_request_micros: int = 10**12
    minute_retention_s: int = 8 * 86_400
    hour_retention_s: int = 400 * 86_400
    fail_open: bool = False


# -- inputs and results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReserveInput:
    request_id: str
    attribution: Attribution
    estimated_cost_micros: int
    estimated_tokens: int
    ttl_seconds: int = 0
    model: str = ""
    tier: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    expires_unix_ms: int
    headroom: list[Headroom]
    soft_limit_exceeded: bool
    replayed: bool
    max_tokens_cap: int
    remaining_micros: int | None
    state: ReservationState = ReservationState.HELD
    """HELD, or COMMITTED when it replays a reservation already settled with a commit."""


@dataclass(frozen=True, slots=True)
class CommitInput:
    tenant: str
    reservation_id: str
    actual_cost_micros: int
    usage: TokenUsage = field(default_factory=TokenUsage)
    model: str = ""
    tier: int = 0
    saved_micros: int = 0


@dataclass(frozen=True, slots=True)
class CommitResult:
    charged_micros: int
    over_estimate: bool
    replayed: bool
    remaining_micros: int | None
    late: LateReason = ""
    """"expired" or "released" when nothing was held for it any more (charged in full all the same)."""


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    released_micros: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class RenewResult:
    expires_unix_ms: int


@dataclass(frozen=True, slots=True)
class SavingsInput:
    request_id: str
    attribution: Attribution
    saved_micros: int
    reason: int  # 1 cache hit, 2 routing
    model: str = ""
    tier: int = 0


@dataclass(frozen=True, slots=True)
class LimitInput:
    window: int
    cost_micros: int | None = None
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ScopeInput:
    kind: int
    tenant: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class PolicyInput:
    scope: ScopeInput
    limits: Sequence[LimitInput] = ()
    soft_threshold: float | None = None
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_tokens_per_request: int = 0


@dataclass(frozen=True, slots=True)
class BudgetView:
    policy: Policy | None
    headroom: list[Headroom]


@dataclass(frozen=True, slots=True)
class UsageQuery:
    tenant: str = ""
    start_unix_ms: int = 0
    end_unix_ms: int = 0
    window: int = 0
    group_by: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class UsageReport:
    rows: list[UsageRow]
    total: UsageRow


# -- validation helpers ---------------------------------------------------------------------------------------


def _check_tenant(v: Validator, value: str, path: str) -> None:
    if not value:
        v.add(path, "required", "REQUIRED")
    elif not _TENANT.fullmatch(value):
        v.add(path, "1-64 characters of [A-Za-z0-9._-]", "INVALID_FORMAT")


def _check_text(v: Validator, value: str, path: str, max_len: int, *, required: bool = False) -> None:
    if not value:
        if required:
            v.add(path, "required", "REQUIRED")
        return
    if len(value) > max_len:
        v.add(path, f"at most {max_len} characters", "TOO_LONG")
    elif _CONTROL.search(value):
        v.add(path, "must not contain control characters", "INVALID_FORMAT")


def _check_amount(v: Validator, value: int, path: str, maximum: int) -> None:
    if value < 0:
        v.add(path, "must be >= 0", "NEGATIVE")
    elif value > maximum:
        v.add(path, f"must be <= {maximum}", "TOO_LARGE")


def _check_attribution(v: Validator, a: Attribution, prefix: str = "attribution") -> None:
    _check_tenant(v, a.tenant, f"{prefix}.tenant")
    _check_text(v, a.team, f"{prefix}.team", 64)
    _check_text(v, a.feature, f"{prefix}.feature", 64)
    _check_text(v, a.end_user, f"{prefix}.end_user", 128)


def _check_savings(v: Validator, r: SavingsInput, prefix: str, max_micros: int) -> None:
    """The fields of one RecordSavingsRequest; ``prefix`` is "" for the single RPC, ``records[i].`` in a batch."""
    _check_text(v, r.request_id, prefix + "request_id", 128, required=True)
    _check_attribution(v, r.attribution, prefix + "attribution")
    _check_amount(v, r.saved_micros, prefix + "saved_micros", max_micros)
    if r.reason not in (1, 2):
        v.add(prefix + "reason", "required: CACHE_HIT or ROUTING", "REQUIRED")
    _check_text(v, r.model, prefix + "model", 128)
    _check_tier(v, r.tier, prefix + "tier")


def _check_tier(v: Validator, tier: int, path: str) -> None:
    if tier not in Tier._value2member_map_:
        v.add(path, "unknown tier", "UNKNOWN_ENUM")


def _check_reservation_id(v: Validator, value: str) -> None:
    _check_text(v, value, "reservation_id", 64, required=True)


def _scope_from(v: Validator, s: ScopeInput, prefix: str) -> Scope | None:
    if s.kind not in ScopeKind._value2member_map_:
        v.add(f"{prefix}.kind", "required: one of GLOBAL, TENANT, TEAM, FEATURE, END_USER", "REQUIRED")
        return None
    kind = ScopeKind(s.kind)
    if kind is ScopeKind.GLOBAL:
        if s.tenant:
            v.add(f"{prefix}.tenant", "must be empty for a GLOBAL scope", "NOT_ALLOWED")
        if s.name:
            v.add(f"{prefix}.name", "must be empty for a GLOBAL scope", "NOT_ALLOWED")
        return Scope(kind)
    _check_tenant(v, s.tenant, f"{prefix}.tenant")
    if kind is ScopeKind.TENANT:
        if s.name:
            v.add(f"{prefix}.name", "must be empty for a TENANT scope", "NOT_ALLOWED")
    else:
        _check_text(v, s.name, f"{prefix}.name", 128 if kind is ScopeKind.END_USER else 64, required=True)
    return Scope(kind, s.tenant, s.name if kind not in (ScopeKind.GLOBAL, ScopeKind.TENANT) else "")


def validate_policy(p: PolicyInput) -> Policy:
    """The :class:`Policy` of a SetBudget request, or ``InvalidArgument`` naming every bad field."""
    v = Validator()
    scope = _scope_from(v, p.scope, "policy.scope")
    limits: list[Limit] = []
    seen: set[int] = set()
    for i, lim in enumerate(p.limits):
        path = f"policy.limits[{i}]"
        if lim.window not in Window._value2member_map_:
            v.add(f"{path}.window", "required: HOUR, DAY, MONTH or LIFETIME", "REQUIRED")
            continue
        if lim.window in seen:
            v.add(f"{path}.window", "at most one limit per window", "DUPLICATE")
        seen.add(lim.window)
        if lim.cost_micros is None and lim.tokens is None:
            v.add(path, "set cost_micros, tokens or both", "EMPTY_LIMIT")
        if lim.cost_micros is not None:
            _check_amount(v, lim.cost_micros, f"{path}.cost_micros", MAX_AMOUNT)
        if lim.tokens is not None:
            _check_amount(v, lim.tokens, f"{path}.tokens", MAX_AMOUNT)
        limits.append(Limit(Window(lim.window), lim.cost_micros, lim.tokens))
    soft_ppm = DEFAULT_SOFT_PPM
    if p.soft_threshold is not None:
        if not (0.0 < p.soft_threshold <= 1.0):  # also rejects NaN
            v.add("policy.soft_threshold", "must be in (0, 1]", "OUT_OF_RANGE")
        else:
            soft_ppm = max(1, round(p.soft_threshold * PPM))
    _check_amount(v, p.requests_per_minute, "policy.requests_per_minute", MAX_REQUEST_TOKENS)
    _check_amount(v, p.tokens_per_minute, "policy.tokens_per_minute", MAX_AMOUNT)
    _check_amount(v, p.max_tokens_per_request, "policy.max_tokens_per_request", MAX_REQUEST_TOKENS)
    v.raise_if_any("invalid budget policy")
    assert scope is not None
    return Policy(
        scope=scope,
        limits=tuple(sorted(limits, key=lambda x: x.window)),
        soft_threshold_ppm=soft_ppm,
        requests_per_minute=p.requests_per_minute,
        tokens_per_minute=p.tokens_per_minute,
        max_tokens_per_request=p.max_tokens_per_request,
    )


def _unavailable(err: StoreUnavailable) -> Unavailable:
    return Unavailable("budget store unavailable", retry_after_s=1.0, reason="STORE_UNAVAILABLE")


# -- the ledger -----------------------------------------------------------------------------------------------


class BudgetLedger:
    """Reserve / Commit / Release / Renew / RecordSavings(Batch) / SetBudget / GetBudget / GetUsage over a store."""

    def __init__(
        self,
        *,
        store: BudgetStore,
        settings: LedgerSettings | None = None,
        clock: Clock = wall_clock_ms,
        new_id: Callable[[], str] = new_reservation_id,
    ) -> None:
        self._store = store
        self._s = settings or LedgerSettings()
        self._clock = clock
        self._new_id = new_id

    # Reserve ----------------------------------------------------------------------------------------------

    async def reserve(self, req: ReserveInput) -> Reservation:
        v = Validator()
        _check_text(v, req.request_id, "request_id", 128, required=True)
        _check_attribution(v, req.attribution)
        _check_amount(v, req.estimated_cost_micros, "estimated_cost_micros", self._s.max_request_micros)
        _check_amount(v, req.estimated_tokens, "estimated_tokens", MAX_REQUEST_TOKENS)
        if req.ttl_seconds < 0 or req.ttl_seconds > self._s.max_ttl_s:
            v.add("ttl_seconds", f"must be in [0, {self._s.max_ttl_s}] (0 = {self._s.default_ttl_s})", "OUT_OF_RANGE")
        _check_text(v, req.model, "model", 128)
        _check_tier(v, req.tier, "tier")
        v.raise_if_any("invalid ReserveRequest")

        now = self._clock()
        at = buckets(now)
        ttl_ms = (req.ttl_seconds or self._s.default_ttl_s) * 1000
        cmd = ReserveCommand(
            reservation_id=self._new_id(),
            request_id=req.request_id,
            attribution=req.attribution,
            est_cost=req.estimated_cost_micros,
            est_tokens=req.estimated_tokens,
            expires_ms=now + ttl_ms,
            model=req.model,
            tier=req.tier,
            at=at,
            retention_ms=self._s.retention_s * 1000,
        )
        try:
            outcome = await self._store.reserve(cmd)
        except StoreUnavailable as err:
            if not self._s.fail_open:
                raise _unavailable(err) from err
            rid = OPEN_PREFIX + secrets.token_hex(12)
            log.warning("budget_fail_open_reserve", reservation_id=rid, tenant=req.attribution.tenant, error=str(err))
            return Reservation(rid, now + ttl_ms, [], False, False, 0, None)

        snaps = list(outcome.scopes)
        if outcome.status == "rejected":
            raise self._rejection(snaps, req, now)
        rows = [h for s in snaps for h in headroom(s, now_ms=now)]
        result = Reservation(
            reservation_id=outcome.reservation_id,
            expires_unix_ms=outcome.expires_ms,
            headroom=rows,
            soft_limit_exceeded=any(h.soft_exceeded for h in rows),
            replayed=outcome.status == "replayed",
            max_tokens_cap=max_tokens_cap(snaps),
            remaining_micros=min_remaining(rows),
            state=outcome.state,
        )
        log.debug(
            "budget_reserved",
            reservation_id=result.reservation_id,
            estimated_cost_micros=req.estimated_cost_micros,
            replayed=result.replayed,
            state=result.state.name,
            soft_limit_exceeded=result.soft_limit_exceeded,
        )
        return result

    def _rejection(self, snaps: list[ScopeSnapshot], req: ReserveInput, now: int) -> ResourceExhausted:
        found = [
            x
            for s in snaps
            for x in violations(s, est_cost=req.estimated_cost_micros, est_tokens=req.estimated_tokens, now_ms=now)
        ]
        if not found:  # the store rejected but the numbers it saw admit: never expected
            log.error("budget_rejection_unexplained", tenant=req.attribution.tenant, request_id=req.request_id)
            return ResourceExhausted("budget exceeded", reason="BUDGET_EXCEEDED")
        rate_only = all(x.is_rate for x in found)
        retries = [x.retry_after_ms for x in found]
        retry_after_s = None if any(r is None for r in retries) else max(r or 0 for r in retries) / 1000
        first = found[0]
        log.info(
            "budget_rejected",
            request_id=req.request_id,
            subjects=[x.subject for x in found],
            estimated_cost_micros=req.estimated_cost_micros,
        )
        return ResourceExhausted(
            f"{'rate cap' if rate_only else 'budget'} exceeded: " + "; ".join(x.subject for x in found),
            violations=[QuotaViolation(x.subject, x.describe()) for x in found],
            retry_after_s=retry_after_s,
            reason="RATE_LIMITED" if rate_only else "BUDGET_EXCEEDED",
            metadata={
                "scope": first.scope.label(),
                "window": first.window.name.lower() if first.window is not None else "minute",
                "limit": first.what,
                "limit_value": str(first.limit),
                "spent": str(first.used),
                "reserved": str(first.reserved),
                "requested": str(first.requested),
            },
        )

    # Commit / Release -------------------------------------------------------------------------------------

    async def commit(self, req: CommitInput) -> CommitResult:
        v = Validator()
        _check_tenant(v, req.tenant, "tenant")
        _check_reservation_id(v, req.reservation_id)
        _check_amount(v, req.actual_cost_micros, "actual_cost_micros", self._s.max_request_micros)
        _check_amount(v, req.saved_micros, "saved_micros", self._s.max_request_micros)
        u = req.usage
        _check_amount(v, u.input_tokens, "usage.input_tokens", MAX_REQUEST_TOKENS)
        _check_amount(v, u.output_tokens, "usage.output_tokens", MAX_REQUEST_TOKENS)
        _check_amount(v, u.cached_input_tokens, "usage.cached_input_tokens", MAX_REQUEST_TOKENS)
        if u.cached_input_tokens > u.input_tokens:
            v.add("usage.cached_input_tokens", "must be <= usage.input_tokens", "OUT_OF_RANGE")
        _check_text(v, req.model, "model", 128)
        _check_tier(v, req.tier, "tier")
        v.raise_if_any("invalid CommitRequest")

        if req.reservation_id.startswith(OPEN_PREFIX):
            log.warning(
                "budget_commit_unrecorded",
                reservation_id=req.reservation_id,
                tenant=req.tenant,
                actual_cost_micros=req.actual_cost_micros,
            )
            return CommitResult(req.actual_cost_micros, False, False, None)
        now = self._clock()
        cmd = CommitCommand(
            tenant=req.tenant,
            reservation_id=req.reservation_id,
            actual_cost=req.actual_cost_micros,
            usage=req.usage,
            model=req.model,
            tier=req.tier,
            saved_micros=req.saved_micros,
            at=buckets(now),
            retention_ms=self._s.retention_s * 1000,
        )
        try:
            outcome = await self._store.commit(cmd)
        except StoreUnavailable as err:
            if not self._s.fail_open:
                raise _unavailable(err) from err
            log.error("budget_commit_unrecorded", reservation_id=req.reservation_id, error=str(err))
            return CommitResult(req.actual_cost_micros, False, False, None)
        if outcome.status == "not_found":
            raise NotFound(f"reservation {req.reservation_id!r} not found", reason="RESERVATION_NOT_FOUND")
        if outcome.status == "committed":
            if outcome.over_estimate:
                log.warning(
                    "budget_commit_over_estimate",
                    reservation_id=req.reservation_id,
                    actual_cost_micros=outcome.charged_micros,
                )
            if outcome.late:
                # Nothing was held for this spend any more: it may have passed a limit. An overspend event.
                log.error(
                    "budget_commit_late",
                    tenant=req.tenant,
                    reservation_id=req.reservation_id,
                    actual_cost_micros=outcome.charged_micros,
                    reason=outcome.late,
                )
        rows = [h for s in outcome.scopes for h in headroom(s, now_ms=now)]
        return CommitResult(
            outcome.charged_micros,
            outcome.over_estimate,
            outcome.status == "replayed",
            min_remaining(rows),
            outcome.late,
        )

    async def release(self, tenant: str, reservation_id: str) -> ReleaseResult:
        v = Validator()
        _check_tenant(v, tenant, "tenant")
        _check_reservation_id(v, reservation_id)
        v.raise_if_any("invalid ReleaseRequest")
        if reservation_id.startswith(OPEN_PREFIX):
            return ReleaseResult(0, False)
        try:
            outcome = await self._store.release(tenant, reservation_id, at=buckets(self._clock()))
        except StoreUnavailable as err:
            if not self._s.fail_open:
                raise _unavailable(err) from err
            return ReleaseResult(0, False)
        if outcome.status == "not_found":
            raise NotFound(f"reservation {reservation_id!r} not found", reason="RESERVATION_NOT_FOUND")
        return ReleaseResult(outcome.released_micros, outcome.status == "replayed")

    async def renew(self, tenant: str, reservation_id: str, ttl_seconds: int = 0) -> RenewResult:
        """Extend a held reservation to expire no sooner than ``ttl_seconds`` from now (0 = ``default_ttl_s``;
        capped at ``max_ttl_s``). ``NotFound`` for an unknown or another tenant's id; ``FailedPrecondition``
        RESERVATION_SETTLED (committed or released) or RESERVATION_EXPIRED (its money already went back: it is not
        held again)."""
        v = Validator()
        _check_tenant(v, tenant, "tenant")
        _check_reservation_id(v, reservation_id)
        if ttl_seconds < 0:
            v.add("ttl_seconds", "must be >= 0", "NEGATIVE")
        v.raise_if_any("invalid RenewReservationRequest")
        now = self._clock()
        ttl_ms = min(ttl_seconds or self._s.default_ttl_s, self._s.max_ttl_s) * 1000
        if reservation_id.startswith(OPEN_PREFIX):  # fail-open: nothing is held, nothing expires
            return RenewResult(now + ttl_ms)
        cmd = RenewCommand(tenant, reservation_id, now + ttl_ms, buckets(now), self._s.retention_s * 1000)
        try:
            outcome = await self._store.renew(cmd)
        except StoreUnavailable as err:
            raise _unavailable(err) from err
        if outcome.status == "not_found":
            raise NotFound(f"reservation {reservation_id!r} not found", reason="RESERVATION_NOT_FOUND")
        if outcome.status == "settled":
            raise FailedPrecondition(
                f"reservation {reservation_id!r} is already committed or released", reason="RESERVATION_SETTLED"
            )
        if outcome.status == "expired":
            raise FailedPrecondition(
                f"reservation {reservation_id!r} expired; its money went back and it is not held again",
                reason="RESERVATION_EXPIRED",
            )
        log.debug("budget_renewed", reservation_id=reservation_id, expires_unix_ms=outcome.expires_ms)
        return RenewResult(outcome.expires_ms)

    # Savings ----------------------------------------------------------------------------------------------

    async def record_savings(self, records: Sequence[SavingsInput], *, tenant: str | None = None) -> list[bool]:
        """Record savings; ``replayed`` per record, in order. ``tenant`` None: one RecordSavings (exactly one record,
        field paths as in RecordSavingsRequest). Else a RecordSavingsBatch of that tenant: 1 to
        :data:`MAX_SAVINGS_BATCH` records, each of ``tenant`` (paths ``records[i].…``); a request id repeated in the
        batch counts once (its later records are replays). All or nothing: any bad field rejects the whole call
        before the store is touched."""
        v = Validator()
        if tenant is None:
            if len(records) != 1:
                raise ValueError("record_savings without a batch tenant takes exactly one record")
            _check_savings(v, records[0], "", self._s.max_request_micros)
            v.raise_if_any("invalid RecordSavingsRequest")
        else:
            self._check_savings_batch(v, records, tenant)
            v.raise_if_any("invalid RecordSavingsBatchRequest")
        at = buckets(self._clock())
        cmds = [
            SavingsCommand(
                tenant=r.attribution.tenant,
                request_id=r.request_id,
                dims=UsageDims(r.attribution.team, r.attribution.feature, r.model, r.tier, r.attribution.end_user),
                saved_micros=r.saved_micros,
                cache_hit=r.reason == 1,
                at=at,
                retention_ms=self._s.retention_s * 1000,
            )
            for r in records
        ]
        try:
            return await self._store.record_savings(cmds)
        except StoreUnavailable as err:
            if not self._s.fail_open:
                raise _unavailable(err) from err
            log.error(
                "budget_savings_unrecorded",
                request_ids=[r.request_id for r in records],
                saved_micros=sum(r.saved_micros for r in records),
                error=str(err),
            )
            return [False] * len(records)

    def _check_savings_batch(self, v: Validator, records: Sequence[SavingsInput], tenant: str) -> None:
        _check_tenant(v, tenant, "tenant")
        if not records:
            v.add("records", f"1 to {MAX_SAVINGS_BATCH} records required", "REQUIRED")
        elif len(records) > MAX_SAVINGS_BATCH:
            v.add("records", f"at most {MAX_SAVINGS_BATCH} records", "TOO_MANY")
            return  # the count alone rejects it: no point checking thousands of records
        for i, r in enumerate(records):
            prefix = f"records[{i}]."
            _check_savings(v, r, prefix, self._s.max_request_micros)
            if tenant and r.attribution.tenant and r.attribution.tenant != tenant:
                v.add(prefix + "attribution.tenant", "must be empty or the batch's tenant", "TENANT_MISMATCH")

    # Admin ------------------------------------------------------------------------------------------------

    async def set_budget(self, req: PolicyInput) -> Policy:
        policy = validate_policy(req)
        try:
            created = await self._store.put_policy(policy, at=buckets(self._clock()))
        except StoreUnavailable as err:
            raise _unavailable(err) from err
        log.info("budget_policy_set", scope=policy.scope.label(), created=created, policy=policy.to_json())
        return policy

    async def get_budget(self, scope_in: ScopeInput) -> BudgetView:
        v = Validator()
        scope = _scope_from(v, scope_in, "scope")
        v.raise_if_any("invalid GetBudgetRequest")
        assert scope is not None
        now = self._clock()
        try:
            snap = await self._store.snapshot(scope, at=buckets(now))
        except StoreUnavailable as err:
            raise _unavailable(err) from err
        if snap is None:
            return BudgetView(None, [])
        return BudgetView(snap.policy, headroom(snap, now_ms=now))

    async def get_usage(self, q: UsageQuery) -> UsageReport:
        v = Validator()
        if q.tenant:
            _check_tenant(v, q.tenant, "tenant")
        if q.start_unix_ms < 0:
            v.add("start_unix_ms", "must be >= 0", "NEGATIVE")
        if q.end_unix_ms < 0:
            v.add("end_unix_ms", "must be >= 0", "NEGATIVE")
        if q.end_unix_ms and q.start_unix_ms >= q.end_unix_ms:
            v.add("end_unix_ms", "must be after start_unix_ms", "OUT_OF_RANGE")
        if q.window and q.window not in Window._value2member_map_:
            v.add("window", "unknown window", "UNKNOWN_ENUM")
        seen: set[int] = set()
        for i, g in enumerate(q.group_by):
            if g not in GroupBy._value2member_map_:
                v.add(f"group_by[{i}]", "unknown dimension", "UNKNOWN_ENUM")
            elif g in seen:
                v.add(f"group_by[{i}]", "duplicate dimension", "DUPLICATE")
            seen.add(g)
        v.raise_if_any("invalid GetUsageRequest")

        now = self._clock()
        # 'now' includes what was recorded this very millisecond; nothing is recorded later, so a later end only
        # adds empty cells (an end in the year 9999 once made the budget tile millennia into minutes until it ran
        # out of memory).
        end = min(q.end_unix_ms or now + 1, now + 1)
        start = q.start_unix_ms
        if not start and q.window and Window(q.window) is not Window.LIFETIME:
            start = window_start_ms(Window(q.window), now)
        try:
            tenants = [q.tenant] if q.tenant else await self._store.tenants()
            records = []
            for tenant in tenants:
                if start == 0 and end > now:
                    cells = [("L", 0)]
                else:
                    active = await self._store.first_activity_ms(tenant)
                    # nothing was recorded before the tenant's first activity: no cells before it either
                    first = None if active is None else max(start, active)
                    if first is None or first >= end:
                        continue
                    cells = cover_with_retention(
                        first,
                        end,
                        now_ms=now,
                        minute_retention_ms=self._s.minute_retention_s * 1000,
                        hour_retention_ms=self._s.hour_retention_s * 1000,
                    )
                records += await self._store.usage(tenant, cells)
        except StoreUnavailable as err:
            raise _unavailable(err) from err
        rows, total = group(records, [GroupBy(g) for g in q.group_by])
        return UsageReport(rows, total)
