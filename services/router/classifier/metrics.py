"""Router quality metrics exactly as RouteLLM computes them (``routellm/evals/benchmarks.py`` + ``evaluate.py``).

For one benchmark family: the classifier's scores are cut at ``num_results + 1`` quantile thresholds (RouteLLM:
``pd.qcut(scores, 10, retbins=True)``); at each threshold every prompt whose score is ``>=`` the threshold goes to
the full tier (``>`` for the last one, so the sweep ends at 0 %), and quality is the mean of what the tier each prompt
went to achieved. On that curve of (full-tier share, quality):

* ``APGR`` = (area under quality − area under cheap-only) / (area under full-only − area under cheap-only), by the
  trapezoid rule over full-tier share in [0, 1] — i.e. the average performance-gap-recovered; random ≈ 0.5.
* ``CPT(x)`` = the smallest full-tier share at which the (linearly interpolated) curve recovers ``x`` of the gap
  between cheap-only and full-only quality. RouteLLM reads it with ``np.interp(target, quality, share)``, which is
  the same number when quality rises with share; where the curve dips we take the first crossing, which is what
  "smallest share" means.

Quality per prompt is 0/1 correctness (gsm8k, mmlu) or a judge's 1–10 score (mt_bench).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: RouteLLM's default number of threshold bins (``--num-results 10``).
DEFAULT_NUM_RESULTS = 10


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """One threshold of the sweep."""

    threshold: float
    full_share: float
    quality: float


@dataclass(frozen=True, slots=True)
class FamilyMetrics:
    """Router quality on one benchmark family."""

    family: str
    n: int
    cheap_quality: float
    full_quality: float
    apgr: float
    cpt50: float
    cpt80: float
    curve: tuple[CurvePoint, ...]


def routellm_curve(
    scores: Sequence[float] | FloatArray,
    cheap_quality: Sequence[float] | FloatArray,
    full_quality: Sequence[float] | FloatArray,
    *,
    num_results: int = DEFAULT_NUM_RESULTS,
) -> list[CurvePoint]:
    """The (full share, quality) points of RouteLLM's threshold sweep, sorted by full share (then quality)."""
    s = np.asarray(scores, dtype=np.float64)
    cq = np.asarray(cheap_quality, dtype=np.float64)
    fq = np.asarray(full_quality, dtype=np.float64)
    if not (s.shape == cq.shape == fq.shape) or s.ndim != 1:
        raise ValueError("scores, cheap_quality and full_quality must be 1-D arrays of the same length")
    if s.size == 0:
        raise ValueError("no prompts")
    if num_results < 1:
        raise ValueError("num_results must be >= 1")
    # pd.qcut's bin edges are the linearly interpolated quantiles at 0, 1/q, ..., 1.
    thresholds = np.quantile(s, np.linspace(0.0, 1.0, num_results + 1))
    points: list[CurvePoint] = []
    last = len(thresholds) - 1
    for i, t in enumerate(thresholds):
        selected = s >= t if i != last else s > t
        quality = float(np.where(selected, fq, cq).mean())
        points.append(CurvePoint(threshold=float(t), full_share=float(selected.mean()), quality=quality))
    points.sort(key=lambda p: (p.full_share, p.quality))
    return points


def apgr(points: Sequence[CurvePoint], cheap_only: float, full_only: float) -> float:
    """Average performance gap recovered: normalised area under the quality curve (RouteLLM's ``apgr_metric``)."""
    if full_only == cheap_only:
        return math.nan
    x = np.array([p.full_share for p in points], dtype=np.float64)
    y = np.array([p.quality for p in points], dtype=np.float64)
    area = float(np.trapezoid(y, x))
    span = float(x[-1] - x[0])
    if span <= 0.0:
        return math.nan
    return (area - cheap_only * span) / ((full_only - cheap_only) * span)


def cpt(points: Sequence[CurvePoint], cheap_only: float, full_only: float, recovered: float) -> float:
    """Call-performance threshold: smallest full-tier share whose quality recovers ``recovered`` of the gap.

    Linear interpolation between the sweep's points, as ``np.interp`` does in RouteLLM; ``nan`` when the curve never
    gets there or there is no gap.
    """
    if full_only == cheap_only:
        return math.nan
    target = cheap_only + recovered * (full_only - cheap_only)
    prev: CurvePoint | None = None
    for p in points:
        if p.quality >= target:
            if prev is None or p.quality == prev.quality:
                return p.full_share
            frac = (target - prev.quality) / (p.quality - prev.quality)
            return prev.full_share + frac * (p.full_share - prev.full_share)
        prev = p
    return math.nan


def pgr(quality: float, cheap_only: float, full_only: float) -> float:
    """Performance gap recovered at one operating point."""
    if full_only == cheap_only:
        return math.nan
    return (quality - cheap_only) / (full_only - cheap_only)


def family_metrics(
    family: str,
    scores: Sequence[float] | FloatArray,
    cheap_quality: Sequence[float] | FloatArray,
    full_quality: Sequence[float] | FloatArray,
    *,
    num_results: int = DEFAULT_NUM_RESULTS,
) -> FamilyMetrics:
    """APGR, CPT(50 %), CPT(80 %) and the cheap-only / full-only quality of one family."""
    cq = np.asarray(cheap_quality, dtype=np.float64)
    fq = np.asarray(full_quality, dtype=np.float64)
    points = routellm_curve(scores, cq, fq, num_results=num_results)
    cheap_only = float(cq.mean())
    full_only = float(fq.mean())
    return FamilyMetrics(
        family=family,
        n=int(cq.size),
        cheap_quality=cheap_only,
        full_quality=full_only,
        apgr=apgr(points, cheap_only, full_only),
        cpt50=cpt(points, cheap_only, full_only, 0.5),
        cpt80=cpt(points, cheap_only, full_only, 0.8),
        curve=tuple(points),
    )
