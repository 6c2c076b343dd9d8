"""Calendar windows in UTC, and how a time range is covered by usage rollup buckets.

Spent counters are kept per window *bucket*: the hour (``now_ms // 3_600_000``), the day (``// 86_400_000``), the
calendar month (``year * 12 + month - 1``) and one lifetime bucket (0). Usage rollups are kept per minute, hour and
day, plus one lifetime cell; :func:`cover` picks the fewest buckets that tile a range at minute precision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from services.budget.model import Buckets, Window

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

#: Rollup levels: minute, hour, day, lifetime.
LEVEL_MS: dict[str, int] = {"m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}


def month_bucket(now_ms: int) -> int:
    return _month_of_day(now_ms // DAY_MS)


@lru_cache(maxsize=64)
def _month_of_day(day: int) -> int:
    d = datetime.fromtimestamp(day * 86_400, tz=UTC)
    return d.year * 12 + d.month - 1


@lru_cache(maxsize=64)
def month_start_ms(bucket: int) -> int:
    year, month0 = divmod(bucket, 12)
    return int(datetime(year, month0 + 1, 1, tzinfo=UTC).timestamp() * 1000)


def buckets(now_ms: int) -> Buckets:
    return Buckets(now_ms=now_ms, hour=now_ms // HOUR_MS, day=now_ms // DAY_MS, month=month_bucket(now_ms))


def window_start_ms(window: Window, now_ms: int) -> int:
    """Start of the window containing ``now_ms`` (0 for LIFETIME)."""
    if window is Window.HOUR:
        return now_ms - now_ms % HOUR_MS
    if window is Window.DAY:
        return now_ms - now_ms % DAY_MS
    if window is Window.MONTH:
        return month_start_ms(month_bucket(now_ms))
    return 0


def window_reset_ms(window: Window, now_ms: int) -> int:
    """When the window containing ``now_ms`` ends (its counters reset); 0 for LIFETIME, which never resets."""
    if window is Window.HOUR:
        return now_ms - now_ms % HOUR_MS + HOUR_MS
    if window is Window.DAY:
        return now_ms - now_ms % DAY_MS + DAY_MS
    if window is Window.MONTH:
        return month_start_ms(month_bucket(now_ms) + 1)
    return 0


def cover(start_ms: int, end_ms: int) -> list[tuple[str, int]]:
    """The fewest (level, bucket) rollup cells that tile ``[start, end)`` widened to whole minutes.

    ``start`` is floored and ``end`` ceiled to the minute. Levels are ``m`` (minute), ``h`` (hour) and ``d`` (day);
    a bucket is ``t // level_ms``.
    """
    start = start_ms - start_ms % MINUTE_MS
    end = -(-end_ms // MINUTE_MS) * MINUTE_MS
    cells: list[tuple[str, int]] = []
    t = start
    while t < end:
        for level, size in (("d", DAY_MS), ("h", HOUR_MS), ("m", MINUTE_MS)):
            if t % size == 0 and t + size <= end:
                cells.append((level, t // size))
                t += size
                break
    return cells


def cover_with_retention(
    start_ms: int, end_ms: int, *, now_ms: int, minute_retention_ms: int, hour_retention_ms: int
) -> list[tuple[str, int]]:
    """Like :func:`cover`, but a minute (hour) cell older than its retention is replaced by its enclosing hour (day).

    Fine-grained rollups expire; a range edge that old is widened to the coarser cell that still exists, and cells
    inside a chosen coarser cell are dropped so nothing is counted twice.
    """
    chosen: set[tuple[str, int]] = set()
    for cell in cover(start_ms, end_ms):
        level, bucket = cell
        if level == "m" and (bucket + 1) * MINUTE_MS <= now_ms - minute_retention_ms:
            level, bucket = "h", bucket * MINUTE_MS // HOUR_MS
        if level == "h" and (bucket + 1) * HOUR_MS <= now_ms - hour_retention_ms:
            level, bucket = "d", bucket * HOUR_MS // DAY_MS
        chosen.add((level, bucket))
    days = {b for lv, b in chosen if lv == "d"}
    hours = {b for lv, b in chosen if lv == "h" and b * HOUR_MS // DAY_MS not in days}
    out = [("d", b) for b in sorted(days)] + [("h", b) for b in sorted(hours)]
    out += sorted(
        ("m", b)
        for lv, b in chosen
        if lv == "m" and b * MINUTE_MS // HOUR_MS not in hours and b * MINUTE_MS // DAY_MS not in days
    )
    return out
