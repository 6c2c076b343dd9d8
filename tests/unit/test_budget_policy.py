"""Admission rules and headroom: the formulas both stores apply."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.budget.ledger import LimitInput, PolicyInput, ScopeInput, validate_policy
from services.budget.model import Limit, Policy, Scope, ScopeKind, ScopeSnapshot, Window, applicable_scopes
from services.budget.policy import headroom, max_tokens_cap, min_remaining, violations
from services.common.attribution import Attribution
from services.common.errors import InvalidArgument

NOW = int(datetime(2026, 3, 30, 22, 30, tzinfo=UTC).timestamp() * 1000)
TEAM = Scope(ScopeKind.TEAM, "acme", "search")


def snap(policy: Policy, **kw: object) -> ScopeSnapshot:
    return ScopeSnapshot(policy, **kw)  # type: ignore[arg-type]


def test_applicable_scopes_follow_the_attribution() -> None:
    assert [s.label() for s in applicable_scopes(Attribution("acme"))] == ["global", "tenant:acme"]
    full = applicable_scopes(Attribution("acme", "search", "faq", "u-1"))
    assert [s.key for s in full] == ["g", "t", "T:search", "F:faq", "U:u-1"]
    assert all(Scope.from_key(s.tenant, s.key) == s for s in full)


def test_limit_counts_spent_reserved_and_the_estimate() -> None:
    p = Policy(TEAM, (Limit(Window.DAY, 1_000, 100),))
    s = snap(p, reserved_micros=300, reserved_tokens=10, spent=((0, 0), (600, 80), (0, 0), (0, 0)))
    assert violations(s, est_cost=100, est_tokens=10, now_ms=NOW) == []  # exactly at both limits
    (v,) = violations(s, est_cost=101, est_tokens=10, now_ms=NOW)
    assert (v.what, v.window, v.limit, v.used, v.reserved, v.requested) == (
        "cost_micros",
        Window.DAY,
        1_000,
        600,
        300,
        101,
    )
    assert v.subject == "tenant:acme/team:search/day/cost_micros"
    assert v.retry_after_ms == 90 * 60_000  # midnight UTC
    both = violations(s, est_cost=101, est_tokens=11, now_ms=NOW)
    assert [x.what for x in both] == ["cost_micros", "tokens"]


def test_only_the_current_window_counts_and_lifetime_never_resets() -> None:
    p = Policy(TEAM, (Limit(Window.HOUR, 500), Limit(Window.LIFETIME, 10_000)))
    s = snap(p, spent=((0, 0), (9_000, 0), (9_000, 0), (9_900, 0)))
    (v,) = violations(s, est_cost=200, est_tokens=0, now_ms=NOW)
    assert v.window is Window.LIFETIME and v.retry_after_ms is None


def test_rate_caps_use_the_rolling_minute() -> None:
    p = Policy(TEAM, requests_per_minute=10, tokens_per_minute=1_000)
    now_s = NOW // 1000
    s = snap(p, rate_requests=9, rate_tokens=900, rate_oldest_s=now_s - 50)
    assert violations(s, est_cost=0, est_tokens=100, now_ms=NOW) == []
    s = snap(p, rate_requests=10, rate_tokens=950, rate_oldest_s=now_s - 50)
    found = violations(s, est_cost=0, est_tokens=100, now_ms=NOW)
    assert [x.what for x in found] == ["requests_per_minute", "tokens_per_minute"]
    assert all(x.retry_after_ms == 10_000 and x.is_rate for x in found)


def test_headroom_soft_threshold_and_remaining() -> None:
    p = Policy(TEAM, (Limit(Window.DAY, 1_000, None), Limit(Window.MONTH, None, 100)), soft_threshold_ppm=750_000)
    s = snap(p, reserved_micros=250, reserved_tokens=5, spent=((0, 0), (500, 70), (2_000, 70), (0, 0)))
    day, month = headroom(s, now_ms=NOW)
    assert (day.remaining_micros, day.soft_exceeded) == (250, True)  # 750 of 1,000 reached 75 %
    assert (month.limit_micros, month.remaining_micros, month.used_tokens, month.soft_exceeded) == (
        None,
        None,
        75,
        True,
    )
    assert min_remaining([day, month]) == 250
    p2 = Policy(TEAM, (Limit(Window.DAY, 1_000, None),))
    assert not headroom(snap(p2, spent=((0, 0), (799, 0), (0, 0), (0, 0))), now_ms=NOW)[0].soft_exceeded
    assert min_remaining([]) is None


def test_max_tokens_cap_is_the_smallest_set_cap() -> None:
    a = snap(Policy(TEAM, max_tokens_per_request=0))
    b = snap(Policy(Scope(ScopeKind.TENANT, "acme"), max_tokens_per_request=2048))
    c = snap(Policy(Scope(ScopeKind.FEATURE, "acme", "faq"), max_tokens_per_request=256))
    assert max_tokens_cap([a, b, c]) == 256
    assert max_tokens_cap([a]) == 0


def test_policy_json_round_trips() -> None:
    p = Policy(TEAM, (Limit(Window.DAY, 10**15, None), Limit(Window.LIFETIME, None, 0)), 1, 5, 6, 7)
    assert Policy.from_json(TEAM, p.to_json()) == p


def test_validate_policy_fills_defaults_and_sorts_limits() -> None:
    p = validate_policy(
        PolicyInput(
            ScopeInput(int(ScopeKind.FEATURE), "acme", "faq"),
            [LimitInput(int(Window.MONTH), 5, None), LimitInput(int(Window.HOUR), None, 9)],
        )
    )
    assert p.scope == Scope(ScopeKind.FEATURE, "acme", "faq")
    assert [x.window for x in p.limits] == [Window.HOUR, Window.MONTH]
    assert p.soft_threshold_ppm == 800_000


@pytest.mark.parametrize(
    ("scope", "field"),
    [
        (ScopeInput(0), "policy.scope.kind"),
        (ScopeInput(99, "acme"), "policy.scope.kind"),
        (ScopeInput(int(ScopeKind.GLOBAL), "acme"), "policy.scope.tenant"),
        (ScopeInput(int(ScopeKind.TENANT), ""), "policy.scope.tenant"),
        (ScopeInput(int(ScopeKind.TENANT), "acme", "x"), "policy.scope.name"),
        (ScopeInput(int(ScopeKind.END_USER), "acme", "u" * 129), "policy.scope.name"),
        (ScopeInput(int(ScopeKind.TEAM), "{t:acme}", "x"), "policy.scope.tenant"),
    ],
)
def test_validate_policy_rejects_bad_scopes(scope: ScopeInput, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_policy(PolicyInput(scope))
    assert field in [v.field for v in exc.value.violations]


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (PolicyInput(ScopeInput(1), [LimitInput(int(Window.DAY))]), "policy.limits[0]"),
        (PolicyInput(ScopeInput(1), [LimitInput(int(Window.DAY), 10**15 + 1)]), "policy.limits[0].cost_micros"),
        (PolicyInput(ScopeInput(1), soft_threshold=0.0), "policy.soft_threshold"),
        (PolicyInput(ScopeInput(1), soft_threshold=float("nan")), "policy.soft_threshold"),
        (PolicyInput(ScopeInput(1), requests_per_minute=-1), "policy.requests_per_minute"),
        (PolicyInput(ScopeInput(1), tokens_per_minute=10**16), "policy.tokens_per_minute"),
    ],
)
def test_validate_policy_rejects_bad_numbers(policy: PolicyInput, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_policy(policy)
    assert field in [v.field for v in exc.value.violations]
