"""Threshold calibration: map a target cheap share to a score threshold, with an uncertainty band that routes up.

A calibration is the score distribution of representative traffic, kept as a table of quantiles: the threshold for
a cheap share ``s`` is the ``s``-quantile of the scores, so a share ``s`` of that traffic scores below it (and the
classifier alone would send it to the cheap tier). The band is the score range just below the threshold that holds
``band_share`` of the traffic: requests whose score falls within ``band`` of the threshold are *uncertain* and go
to the full tier. So the share that really goes cheap is about ``s - band_share``: the band buys safety with a
little of the saving, and ``calibrate`` reports both.

Because the whole quantile table is kept, any tenant's own cheap-share target maps to its threshold at run time
without recalibrating.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.router.classifier.types import Tier

#: Points of the quantile table (cheap shares 0, 0.005, ..., 1).
DEFAULT_POINTS = 201
DEFAULT_CHEAP_SHARE = 0.8
DEFAULT_BAND_SHARE = 0.05


@dataclass(frozen=True, slots=True)
class Verdict:
    """The classifier's tier for one score under one cheap-share target."""

    tier: Tier  # after the uncertainty band
    classifier_tier: Tier  # the threshold alone
    threshold: float
    band: float
    uncertain: bool


def _check_share(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True, slots=True)
class Calibration:
    """Score quantiles at evenly spaced cheap shares, plus the default target and band."""

    thresholds: tuple[float, ...]  # thresholds[i] = score quantile at share i / (len - 1); non-decreasing
    cheap_share: float = DEFAULT_CHEAP_SHARE
    band_share: float = DEFAULT_BAND_SHARE
    _grid: tuple[float, ...] = field(init=False, repr=False, compare=False)  # the shares of ``thresholds``

    def __post_init__(self) -> None:
        if len(self.thresholds) < 2:
            raise ValueError("a calibration needs at least two quantiles")
        if any(b < a for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError("calibration thresholds must be non-decreasing")
        _check_share("cheap_share", self.cheap_share)
        _check_share("band_share", self.band_share)
        object.__setattr__(self, "_grid", tuple(np.linspace(0.0, 1.0, len(self.thresholds)).tolist()))

    def threshold_for(self, cheap_share: float | None = None) -> float:
        """Score below which a share ``cheap_share`` of the calibration traffic falls."""
        s = self.cheap_share if cheap_share is None else cheap_share
        _check_share("cheap_share", s)
        if s >= 1.0:
            return math.inf  # everything cheap
        if s <= 0.0:
            return -math.inf  # nothing cheap
        return self._quantile(s)

    def _quantile(self, share: float) -> float:
        """``np.interp(share, grid, thresholds)``, with numpy's arithmetic, in plain Python: it runs three times per
        request, and numpy's per-call overhead on a 201-point table was most of the router's classifier cost."""
        grid, values = self._grid, self.thresholds
        if share >= grid[-1]:
            return values[-1]
        if share <= grid[0]:
            return values[0]
        j = bisect_right(grid, share) - 1
        if grid[j] == share:
            return values[j]
        slope = (values[j + 1] - values[j]) / (grid[j + 1] - grid[j])
        result = slope * (share - grid[j]) + values[j]
        if math.isnan(result):  # as numpy: try from the other end, then a flat segment's value
            result = slope * (share - grid[j + 1]) + values[j + 1]
            if math.isnan(result) and values[j] == values[j + 1]:
                result = values[j]
        return result

    def band_for(self, cheap_share: float | None = None) -> float:
        """Half-width of the uncertainty band: the score range just below the threshold holding ``band_share``."""
        s = self.cheap_share if cheap_share is None else cheap_share
        if self.band_share <= 0.0 or s <= 0.0 or s >= 1.0:
            return 0.0
        return self._quantile(s) - self._quantile(max(s - self.band_share, 0.0))

    def route(self, score: float, cheap_share: float | None = None) -> Verdict:
        """The tier for ``score``: cheap below the threshold, unless within the band of it (then full, uncertain)."""
        threshold = self.threshold_for(cheap_share)
        band = self.band_for(cheap_share)
        classifier_tier = Tier.CHEAP if score < threshold else Tier.FULL
        uncertain = band > 0.0 and abs(score - threshold) < band
        tier = Tier.FULL if uncertain else classifier_tier
        return Verdict(tier=tier, classifier_tier=classifier_tier, threshold=threshold, band=band, uncertain=uncertain)

    def to_dict(self) -> dict[str, object]:
        return {
            "cheap_share": self.cheap_share,
            "band_share": self.band_share,
            "thresholds": list(self.thresholds),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Calibration:
        raw = data["thresholds"]
        if not isinstance(raw, list):
            raise ValueError("calibration.thresholds must be a list")
        return cls(
            thresholds=tuple(float(t) for t in raw),
            cheap_share=float(data.get("cheap_share", DEFAULT_CHEAP_SHARE)),  # type: ignore[arg-type]
            band_share=float(data.get("band_share", DEFAULT_BAND_SHARE)),  # type: ignore[arg-type]
        )


def fit_calibration(
    scores: Sequence[float] | npt.NDArray[np.float64],
    *,
    cheap_share: float = DEFAULT_CHEAP_SHARE,
    band_share: float = DEFAULT_BAND_SHARE,
    points: int = DEFAULT_POINTS,
) -> Calibration:
    """Calibrate on the scores of representative traffic."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("cannot calibrate on no scores")
    if points < 2:
        raise ValueError("points must be >= 2")
    # Linearly interpolated quantiles (as pd.qcut), made monotone against float rounding.
    q = np.quantile(s, np.linspace(0.0, 1.0, points), method="linear")
    q = np.maximum.accumulate(q)
    return Calibration(thresholds=tuple(float(x) for x in q), cheap_share=cheap_share, band_share=band_share)


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    """What a calibration does on the traffic it was fitted to."""

    threshold: float
    band: float
    classifier_cheap_share: float  # share below the threshold
    effective_cheap_share: float  # share that really goes cheap (below threshold - band)
    routed_up_share: float  # share the band moved from cheap to full (just below the threshold)


def report(calibration: Calibration, scores: Sequence[float] | npt.NDArray[np.float64]) -> CalibrationReport:
    s = np.asarray(scores, dtype=np.float64)
    t = calibration.threshold_for()
    b = calibration.band_for()
    return CalibrationReport(
        threshold=t,
        band=b,
        classifier_cheap_share=float((s < t).mean()),
        effective_cheap_share=float((s < t - b).mean()) if b > 0 else float((s < t).mean()),
        routed_up_share=float(((s >= t - b) & (s < t)).mean()) if b > 0 else 0.0,
    )
