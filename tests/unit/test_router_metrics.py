"""RouteLLM metrics on small cases computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from services.router.classifier.metrics import CurvePoint, apgr, cpt, family_metrics, pgr, routellm_curve


def test_curve_follows_routellm_thresholds_by_hand() -> None:
    # Quantiles of [0.1, 0.2, 0.3, 0.9] at 0, 1/2, 1 are 0.1, 0.25, 0.9: all full, the top half full, none.
    points = routellm_curve([0.9, 0.1, 0.2, 0.3], [0, 1, 1, 1], [1, 1, 1, 1], num_results=2)
    assert [(p.full_share, p.quality) for p in points] == [(0.0, 0.75), (0.5, 1.0), (1.0, 1.0)]
    assert [p.threshold for p in points] == pytest.approx([0.9, 0.25, 0.1])


def test_apgr_and_cpt_of_a_good_router_by_hand() -> None:
    m = family_metrics("x", [0.9, 0.1, 0.2, 0.3], [0, 1, 1, 1], [1, 1, 1, 1], num_results=2)
    # Area: 0.5 * (0.75 + 1) / 2 + 0.5 * 1 = 0.9375; APGR = (0.9375 - 0.75) / (1 - 0.75) = 0.75.
    assert m.apgr == pytest.approx(0.75)
    # 50 %: quality 0.875, halfway from (0, 0.75) to (0.5, 1.0) -> 0.25. 80 %: 0.95 -> 0.4.
    assert m.cpt50 == pytest.approx(0.25)
    assert m.cpt80 == pytest.approx(0.4)
    assert (m.cheap_quality, m.full_quality, m.n) == (0.75, 1.0, 4)


def test_apgr_and_cpt_of_a_mediocre_router_by_hand() -> None:
    # Thresholds 0.1, 0.5, 0.9: curve (0, 0.5), (0.5, 0.75), (1, 1.0) -> a straight line: APGR 0.5.
    m = family_metrics("x", [0.9, 0.8, 0.2, 0.1], [0, 1, 1, 0], [1, 1, 1, 1], num_results=2)
    assert m.apgr == pytest.approx(0.5)
    assert m.cpt50 == pytest.approx(0.5)
    assert m.cpt80 == pytest.approx(0.8)  # 0.9 = 0.75 + 0.6 * 0.25 -> 0.5 + 0.6 * 0.5


def test_judged_scores_use_the_score_gap() -> None:
    # mt_bench style: 1-10 judge scores. Routing the 2-vs-10 prompt up first recovers the whole gap at once.
    m = family_metrics("mt_bench", [0.9, 0.1], [2.0, 9.0], [10.0, 9.0], num_results=2)
    assert (m.cheap_quality, m.full_quality) == (5.5, 9.5)
    # Quantiles 0.1, 0.5, 0.9: (0, 5.5), (0.5, 9.5), (1, 9.5); area 0.5 * 7.5 + 0.5 * 9.5 = 8.5.
    assert m.apgr == pytest.approx((8.5 - 5.5) / 4.0)
    assert m.cpt50 == pytest.approx(0.25)


def test_cpt_is_the_first_crossing_when_the_curve_dips() -> None:
    pts = [CurvePoint(1, 0.0, 0.5), CurvePoint(0.6, 0.2, 0.9), CurvePoint(0.4, 0.5, 0.6), CurvePoint(0, 1.0, 1.0)]
    assert cpt(pts, 0.5, 1.0, 0.5) == pytest.approx(0.2 * (0.25 / 0.4))
    assert cpt(pts, 0.5, 1.0, 0.9) == pytest.approx(0.5 + 0.5 * (0.35 / 0.4))


def test_cpt_matches_numpy_interp_on_a_monotone_curve() -> None:
    rng = np.random.default_rng(7)
    cheap = rng.random(2000) < 0.6
    full = cheap | (rng.random(2000) < 0.5)
    need = (~cheap & full).astype(float)
    scores = need * 0.5 + rng.random(2000)  # informative but noisy
    m = family_metrics("x", scores, cheap, full)
    xs = [p.full_share for p in m.curve]
    ys = [p.quality for p in m.curve]
    assert all(b >= a for a, b in itertools.pairwise(ys))
    target = m.cheap_quality + 0.5 * (m.full_quality - m.cheap_quality)
    assert m.cpt50 == pytest.approx(float(np.interp(target, ys, xs)))
    assert 0.5 < m.apgr < 1.0


def test_random_scores_recover_about_half_the_gap() -> None:
    rng = np.random.default_rng(0)
    cheap = rng.random(20000) < 0.6
    full = cheap | (rng.random(20000) < 0.5)
    m = family_metrics("x", rng.random(20000), cheap, full)
    assert m.apgr == pytest.approx(0.5, abs=0.02)
    assert m.cpt50 == pytest.approx(0.5, abs=0.05)


def test_constant_scores_sweep_from_all_full_to_none() -> None:
    points = routellm_curve([0.3] * 4, [0, 1, 0, 1], [1, 1, 1, 1])
    assert points[0].full_share == 0.0 and points[-1].full_share == 1.0


def test_no_gap_gives_nan() -> None:
    m = family_metrics("x", [0.1, 0.9], [1, 1], [1, 1])
    assert math.isnan(m.apgr) and math.isnan(m.cpt50)
    assert math.isnan(pgr(0.5, 0.5, 0.5))
    assert pgr(0.75, 0.5, 1.0) == 0.5


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        routellm_curve([0.1, 0.2], [1], [1, 1])
    with pytest.raises(ValueError):
        routellm_curve([], [], [])
    with pytest.raises(ValueError):
        routellm_curve([0.1], [1], [1], num_results=0)
    assert math.isnan(apgr([CurvePoint(0.5, 0.5, 1.0)], 0.0, 1.0))
