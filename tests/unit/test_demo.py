"""The demo's workload and report arithmetic (the replay itself runs against the real mesh in `make run`)."""

from __future__ import annotations

from collections import Counter

from costmesh.budget.v1 import budget_pb2
from services.cli.demo import Outcome, summarize
from services.cli.workload import BUDGETED_FEATURE, build, expand_bursts


def test_workload_has_every_ingredient_and_is_reproducible() -> None:
    w = build(run_id="abc")
    assert w == build(run_id="abc")
    kinds = Counter(r.kind for r in w)
    assert kinds["unique"] >= 30 and kinds["repeat"] >= 20 and kinds["burst"] == 3
    assert {r.tenant for r in w} == {"acme-abc", "globex-abc"}
    assert (f"{BUDGETED_FEATURE[0]}-abc", BUDGETED_FEATURE[1]) in {(r.tenant, r.feature) for r in w}
    # repeats differ from some earlier prompt only in whitespace, case or volatile fields
    assert any(r.kind == "repeat" and r.prompt not in {u.prompt for u in w if u.kind == "unique"} for r in w)
    groups = expand_bursts(w, 12)
    assert sum(len(g) for g in groups) == len(w) + 3 * 11


def test_report_compares_full_tier_baseline_with_what_was_charged() -> None:
    outcomes = [
        Outcome("a", "f", "unique", 10, True, tier="cheap", cost_micros=20, saved_micros=380, baseline_micros=400),
        Outcome("a", "f", "repeat", 1, True, tier="cheap", cache_hit=True, saved_micros=400, baseline_micros=400),
        Outcome("a", "g", "unique", 30, True, tier="full", cost_micros=500, saved_micros=0, baseline_micros=500),
        Outcome("a", "g", "unique", 2, False, status="RESOURCE_EXHAUSTED"),
    ]
    rows = [
        budget_pb2.UsageRow(tenant="a", feature="f", cost_micros=20),
        budget_pb2.UsageRow(tenant="a", feature="g", cost_micros=500),
    ]
    r = summarize(outcomes, rows, coalesced=1, wall_s=1.0)
    assert (r.requests, r.served, r.baseline_micros, r.cost_micros) == (4, 3, 1300, 520)
    assert round(r.savings_pct, 1) == 60.0
    assert (r.cache_hits, r.routed_cheap, r.routed_full, r.stopped_by_budget) == (1, 1, 1, 1)
    assert r.ledger_matches and r.ledger_micros == 520
    r2 = summarize(outcomes, rows[:1], coalesced=0, wall_s=1.0)
    assert not r2.ledger_matches
