"""Calendar windows in UTC and the rollup cells that cover a time range."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from services.budget.model import Window
from services.budget.windows import (
    DAY_MS,
    HOUR_MS,
    LEVEL_MS,
    MINUTE_MS,
    buckets,
    cover,
    cover_with_retention,
    window_reset_ms,
    window_start_ms,
)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def test_buckets_and_resets_follow_the_utc_calendar() -> None:
    now = ms("2024-02-29T23:59:59.999")  # leap day, last millisecond
    b = buckets(now)
    assert (b.hour, b.day, b.month) == (now // HOUR_MS, now // DAY_MS, 2024 * 12 + 1)
    assert window_start_ms(Window.MONTH, now) == ms("2024-02-01T00:00:00")
    assert window_reset_ms(Window.MONTH, now) == ms("2024-03-01T00:00:00")
    assert window_reset_ms(Window.DAY, now) == ms("2024-03-01T00:00:00")
    assert window_reset_ms(Window.HOUR, now) == ms("2024-03-01T00:00:00")
    assert window_start_ms(Window.HOUR, now) == ms("2024-02-29T23:00:00")
    assert window_reset_ms(Window.LIFETIME, now) == 0
    assert window_start_ms(Window.LIFETIME, now) == 0
    # December rolls into the next year.
    assert window_reset_ms(Window.MONTH, ms("2025-12-15T12:00:00")) == ms("2026-01-01T00:00:00")
    assert buckets(ms("2026-01-01T00:00:00")).month == buckets(ms("2025-12-31T23:59:59")).month + 1


def test_cover_uses_the_coarsest_cells() -> None:
    start, end = ms("2026-03-01T22:58:00"), ms("2026-03-03T01:02:30")
    cells = cover(start, end)
    assert cells[:2] == [("m", start // MINUTE_MS), ("m", start // MINUTE_MS + 1)]
    assert ("h", ms("2026-03-01T23:00:00") // HOUR_MS) in cells
    assert ("d", ms("2026-03-02T00:00:00") // DAY_MS) in cells
    assert ("h", ms("2026-03-03T00:00:00") // HOUR_MS) in cells
    # The end is ceiled to the minute: 01:00, 01:01 and 01:02.
    assert cells[-3:] == [("m", ms("2026-03-03T01:00:00") // MINUTE_MS + i) for i in range(3)]
    assert len(cells) == 2 + 1 + 1 + 1 + 3


@given(st.integers(0, 10**13), st.integers(0, 40 * DAY_MS))
def test_cover_tiles_the_range_exactly(start: int, length: int) -> None:
    end = start + length
    cells = cover(start, end)
    spans = sorted((b * LEVEL_MS[lv], (b + 1) * LEVEL_MS[lv]) for lv, b in cells)
    lo = start - start % MINUTE_MS
    hi = -(-end // MINUTE_MS) * MINUTE_MS
    if lo == hi:
        assert cells == []
        return
    assert spans[0][0] == lo and spans[-1][1] == hi
    for (_, a_end), (b_start, _) in itertools.pairwise(spans):
        assert a_end == b_start  # contiguous, no overlap


def test_expired_fine_cells_are_widened_without_double_counting() -> None:
    now = ms("2026-03-20T12:00:00")
    start, end = ms("2026-03-01T10:30:00"), ms("2026-03-19T10:15:00")
    cells = cover_with_retention(start, end, now_ms=now, minute_retention_ms=HOUR_MS, hour_retention_ms=5 * DAY_MS)
    levels = {lv for lv, _ in cells}
    # The start edge is older than both retentions: its minutes and hours became the whole day of March 1.
    assert ("d", ms("2026-03-01T00:00:00") // DAY_MS) in cells
    assert not any(lv == "h" and b * HOUR_MS < ms("2026-03-02T00:00:00") for lv, b in cells)
    # The end edge is within the hour retention but past the minute retention: 10:00-11:00 as one hour.
    assert ("h", ms("2026-03-19T10:00:00") // HOUR_MS) in cells
    assert "m" not in levels
    spans = sorted((b * LEVEL_MS[lv], (b + 1) * LEVEL_MS[lv]) for lv, b in cells)
    for (_, a_end), (b_start, _) in itertools.pairwise(spans):
        assert a_end <= b_start
    # Recent ranges are untouched.
    recent = cover_with_retention(
        now - 90_000, now, now_ms=now, minute_retention_ms=2 * DAY_MS, hour_retention_ms=5 * DAY_MS
    )
    assert recent == cover(now - 90_000, now)
