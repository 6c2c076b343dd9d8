"""Admission rules: what a reservation may take from a scope, and the headroom a scope has left.

These functions are the single statement of the rules. The SQLite store calls :func:`violations` inside its
``BEGIN IMMEDIATE`` transaction to decide; the Redis store's Lua script makes the same comparisons atomically and,
when it rejects, hands the numbers it saw back so :func:`violations` explains the rejection with the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.budget.model import Scope, ScopeSnapshot, Window
from services.budget.windows import window_reset_ms

RATE_WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class Violation:
    """One limit a reservation would pass. ``what`` is cost_micros, tokens, requests_per_minute or tokens_per_minute."""

    scope: Scope
    what: str
    window: Window | None
    limit: int
    used: int
    reserved: int
    requested: int
    retry_after_ms: int | None

    @property
    def subject(self) -> str:
        window = self.window.name.lower() if self.window is not None else "minute"
        return f"{self.scope.label()}/{window}/{self.what}"

    def describe(self) -> str:
        unit = "micro-USD" if self.what == "cost_micros" else ("requests" if self.what.startswith("req") else "tokens")
        if self.window is None:
            return (
                f"{self.what} cap {self.limit} {unit} per rolling minute: {self.used} in the last minute, "
                f"requested {self.requested}"
            )
        return (
            f"{self.window.name.lower()} limit {self.limit} {unit}: spent {self.used}, reserved {self.reserved}, "
            f"requested {self.requested}"
        )

    @property
    def is_rate(self) -> bool:
        return self.window is None


def violations(snap: ScopeSnapshot, *, est_cost: int, est_tokens: int, now_ms: int) -> list[Violation]:
    """Every limit of ``snap``'s policy that admitting (est_cost, est_tokens) would pass; empty = admit.

    Hard limit: spent(current bucket) + reserved + estimate <= limit, for cost and tokens of each window.
    Rate caps: requests in the rolling minute + 1 <= requests_per_minute; estimated tokens + estimate <=
    tokens_per_minute.
    """
    policy = snap.policy
    out: list[Violation] = []
    for limit in policy.limits:
        spent_c, spent_t = snap.spent_in(limit.window)
        reset = window_reset_ms(limit.window, now_ms)
        retry = None if reset == 0 else reset - now_ms
        if limit.cost_micros is not None and spent_c + snap.reserved_micros + est_cost > limit.cost_micros:
            out.append(
                Violation(
                    policy.scope,
                    "cost_micros",
                    limit.window,
                    limit.cost_micros,
                    spent_c,
                    snap.reserved_micros,
                    est_cost,
                    retry,
                )
            )
        if limit.tokens is not None and spent_t + snap.reserved_tokens + est_tokens > limit.tokens:
            out.append(
                Violation(
                    policy.scope,
                    "tokens",
                    limit.window,
                    limit.tokens,
                    spent_t,
                    snap.reserved_tokens,
                    est_tokens,
                    retry,
                )
            )
    if policy.rate_capped:
        retry_rate = max(1, (snap.rate_oldest_s + RATE_WINDOW_S) * 1000 - now_ms) if snap.rate_requests else 1000
        if policy.requests_per_minute and snap.rate_requests + 1 > policy.requests_per_minute:
            out.append(
                Violation(
                    policy.scope,
                    "requests_per_minute",
                    None,
                    policy.requests_per_minute,
                    snap.rate_requests,
                    0,
                    1,
                    retry_rate,
                )
            )
        if policy.tokens_per_minute and snap.rate_tokens + est_tokens > policy.tokens_per_minute:
            out.append(
                Violation(
                    policy.scope,
                    "tokens_per_minute",
                    None,
                    policy.tokens_per_minute,
                    snap.rate_tokens,
                    0,
                    est_tokens,
                    retry_rate,
                )
            )
    return out


@dataclass(frozen=True, slots=True)
class Headroom:
    """Headroom of one scope in one limited window (the domain twin of ``ScopeHeadroom``)."""

    scope: Scope
    window: Window
    limit_micros: int | None
    spent_micros: int
    reserved_micros: int
    remaining_micros: int | None
    limit_tokens: int | None
    used_tokens: int
    soft_exceeded: bool
    resets_unix_ms: int


def headroom(snap: ScopeSnapshot, *, now_ms: int) -> list[Headroom]:
    """One :class:`Headroom` per limit of ``snap``'s policy."""
    policy = snap.policy
    out: list[Headroom] = []
    for limit in policy.limits:
        spent_c, spent_t = snap.spent_in(limit.window)
        used_c = spent_c + snap.reserved_micros
        used_t = spent_t + snap.reserved_tokens
        soft = (limit.cost_micros is not None and used_c >= policy.soft_value(limit.cost_micros)) or (
            limit.tokens is not None and used_t >= policy.soft_value(limit.tokens)
        )
        out.append(
            Headroom(
                scope=policy.scope,
                window=limit.window,
                limit_micros=limit.cost_micros,
                spent_micros=spent_c,
                reserved_micros=snap.reserved_micros,
                remaining_micros=None if limit.cost_micros is None else limit.cost_micros - used_c,
                limit_tokens=limit.tokens,
                used_tokens=used_t,
                soft_exceeded=soft,
                resets_unix_ms=window_reset_ms(limit.window, now_ms),
            )
        )
    return out


def min_remaining(rows: list[Headroom]) -> int | None:
    """Smallest remaining_micros across cost limits; None when no cost limit applies."""
    values = [h.remaining_micros for h in rows if h.remaining_micros is not None]
    return min(values) if values else None


def max_tokens_cap(snaps: list[ScopeSnapshot]) -> int:
    """Smallest non-zero max_tokens_per_request among the policies; 0 = no cap."""
    caps = [s.policy.max_tokens_per_request for s in snaps if s.policy.max_tokens_per_request > 0]
    return min(caps) if caps else 0
