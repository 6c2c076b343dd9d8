"""Grouping usage records into rows, and seeding a new policy from recorded usage."""

from __future__ import annotations

from services.budget.model import Scope, ScopeKind, UsageCounters, UsageDims, UsageRecord, Window
from services.budget.usage import GroupBy, group, matches, seed_from


def rec(tenant: str, team: str, model: str, tier: int, cost: int, saved: int = 0) -> UsageRecord:
    return UsageRecord(
        tenant,
        UsageDims(team=team, feature="faq", model=model, tier=tier, end_user="u"),
        UsageCounters(
            cost_micros=cost, input_tokens=10, output_tokens=5, requests=1 if cost else 0, saved_micros=saved
        ),
    )


RECORDS = [
    rec("acme", "search", "big", 2, 300),
    rec("acme", "search", "small", 1, 100),
    rec("acme", "ads", "small", 1, 50, saved=7),
    rec("globex", "search", "small", 1, 400),
    rec("acme", "search", "big", 2, 300),
]


def test_group_sums_and_sorts_by_cost() -> None:
    rows, total = group(RECORDS, [GroupBy.TENANT, GroupBy.TEAM])
    assert [(r.tenant, r.team, r.model, r.counters.cost_micros) for r in rows] == [
        ("acme", "search", "", 700),
        ("globex", "search", "", 400),
        ("acme", "ads", "", 50),
    ]
    assert total.counters.cost_micros == 1_150 and total.counters.saved_micros == 7
    assert total.counters.requests == 5 and total.counters.input_tokens == 50
    (one,), total2 = group(RECORDS, [])
    assert one.counters == total2.counters and one.tenant == ""
    by_tier, _ = group(RECORDS, [GroupBy.TIER])
    assert [(r.tier, r.counters.cost_micros) for r in by_tier] == [(2, 600), (1, 550)]


def test_group_of_nothing_is_an_empty_report() -> None:
    rows, total = group([], [GroupBy.MODEL])
    assert rows == [] and total.counters == UsageCounters()


def test_scope_matching_and_seed() -> None:
    team = Scope(ScopeKind.TEAM, "acme", "search")
    assert matches(team, "acme", RECORDS[0].dims)
    assert not matches(team, "globex", RECORDS[3].dims)
    assert not matches(team, "acme", RECORDS[2].dims)
    assert matches(Scope(ScopeKind.GLOBAL), "globex", RECORDS[3].dims)
    assert matches(Scope(ScopeKind.END_USER, "acme", "u"), "acme", RECORDS[2].dims)
    seed = seed_from(team, {Window.DAY: RECORDS, Window.LIFETIME: RECORDS[:1]})
    assert seed == ((0, 0), (700, 45), (0, 0), (300, 15))
