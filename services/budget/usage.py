"""Usage reporting: which rollup cells a range needs, and how records are grouped into rows."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.budget.model import Buckets, Scope, ScopeKind, UsageCounters, UsageDims, UsageRecord, Window
from services.budget.windows import cover, window_start_ms


class GroupBy(enum.IntEnum):
    TENANT = 1
    TEAM = 2
    FEATURE = 3
    MODEL = 4
    TIER = 5
    END_USER = 6


@dataclass(slots=True)
class UsageRow:
    """One group: the values of the grouped dimensions (others empty) and the summed counters."""

    tenant: str = ""
    team: str = ""
    feature: str = ""
    model: str = ""
    tier: int = 0
    end_user: str = ""
    counters: UsageCounters = field(default_factory=UsageCounters)


def group(records: Iterable[UsageRecord], by: Sequence[GroupBy]) -> tuple[list[UsageRow], UsageRow]:
    """Rows grouped by ``by`` (in that order), sorted by cost descending then key; plus the total row."""
    wanted = set(by)
    rows: dict[tuple[str, str, str, str, int, str], UsageRow] = {}
    total = UsageRow()
    for rec in records:
        d = rec.dims
        key = (
            rec.tenant if GroupBy.TENANT in wanted else "",
            d.team if GroupBy.TEAM in wanted else "",
            d.feature if GroupBy.FEATURE in wanted else "",
            d.model if GroupBy.MODEL in wanted else "",
            d.tier if GroupBy.TIER in wanted else 0,
            d.end_user if GroupBy.END_USER in wanted else "",
        )
        row = rows.get(key)
        if row is None:
            row = rows[key] = UsageRow(*key)
        row.counters.add(rec.counters)
        total.counters.add(rec.counters)
    ordered = sorted(
        rows.values(),
        key=lambda r: (-r.counters.cost_micros, r.tenant, r.team, r.feature, r.model, r.tier, r.end_user),
    )
    return ordered, total


def seed_cells(at: Buckets) -> dict[Window, list[tuple[str, int]]]:
    """The rollup cells holding everything recorded so far in the current bucket of each window."""
    return {
        Window.HOUR: [("h", at.hour)],
        Window.DAY: [("d", at.day)],
        Window.MONTH: cover(window_start_ms(Window.MONTH, at.now_ms), at.now_ms + 1),
        Window.LIFETIME: [("L", 0)],
    }


def matches(scope: Scope, tenant: str, dims: UsageDims) -> bool:
    """Whether usage of ``tenant`` with ``dims`` is charged to ``scope``."""
    if scope.kind is ScopeKind.GLOBAL:
        return True
    if tenant != scope.tenant:
        return False
    if scope.kind is ScopeKind.TENANT:
        return True
    if scope.kind is ScopeKind.TEAM:
        return dims.team == scope.name
    if scope.kind is ScopeKind.FEATURE:
        return dims.feature == scope.name
    return dims.end_user == scope.name


def seed_from(scope: Scope, per_window: dict[Window, list[UsageRecord]]) -> tuple[tuple[int, int], ...]:
    """(cost, tokens) already spent by ``scope`` in each window, in WINDOWS order, from rollup records."""
    out: list[tuple[int, int]] = []
    for window in (Window.HOUR, Window.DAY, Window.MONTH, Window.LIFETIME):
        cost = tokens = 0
        for rec in per_window.get(window, []):
            if matches(scope, rec.tenant, rec.dims):
                cost += rec.counters.cost_micros
                tokens += rec.counters.input_tokens + rec.counters.output_tokens
        out.append((cost, tokens))
    return tuple(out)
