"""Threshold calibration to a cheap-share target, and the uncertainty band that routes up."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.router.classifier.calibration import Calibration, fit_calibration, report
from services.router.classifier.types import Tier

UNIFORM = np.linspace(0.0, 1.0, 10_001)


def test_threshold_is_the_quantile_of_the_target_share() -> None:
    cal = fit_calibration(UNIFORM, cheap_share=0.8, band_share=0.05)
    assert cal.threshold_for() == pytest.approx(0.8)
    assert cal.threshold_for(0.5) == pytest.approx(0.5)
    assert cal.band_for() == pytest.approx(0.05)
    assert cal.band_for(0.02) == pytest.approx(0.02)  # the band cannot reach below a 0 share


def test_route_below_in_and_above_the_band() -> None:
    cal = fit_calibration(UNIFORM, cheap_share=0.8, band_share=0.05)
    low = cal.route(0.70)
    assert (low.tier, low.classifier_tier, low.uncertain) == (Tier.CHEAP, Tier.CHEAP, False)
    just_below = cal.route(0.78)
    assert (just_below.tier, just_below.classifier_tier, just_below.uncertain) == (Tier.FULL, Tier.CHEAP, True)
    just_above = cal.route(0.82)
    assert (just_above.tier, just_above.classifier_tier, just_above.uncertain) == (Tier.FULL, Tier.FULL, True)
    high = cal.route(0.95)
    assert (high.tier, high.uncertain) == (Tier.FULL, False)


def test_report_on_the_fitted_traffic() -> None:
    cal = fit_calibration(UNIFORM, cheap_share=0.8, band_share=0.05)
    rep = report(cal, UNIFORM)
    assert rep.classifier_cheap_share == pytest.approx(0.8, abs=1e-3)
    assert rep.effective_cheap_share == pytest.approx(0.75, abs=1e-3)
    assert rep.routed_up_share == pytest.approx(0.05, abs=1e-3)


def test_without_a_band_the_target_share_goes_cheap() -> None:
    scores = np.random.default_rng(3).beta(2, 5, 5000)
    cal = fit_calibration(scores, cheap_share=0.7, band_share=0.0)
    tiers = [cal.route(s).tier for s in scores]
    assert tiers.count(Tier.CHEAP) / len(tiers) == pytest.approx(0.7, abs=0.002)


def test_extreme_targets() -> None:
    cal = fit_calibration(UNIFORM)
    assert cal.route(1.0, cheap_share=1.0).tier is Tier.CHEAP
    assert cal.route(0.0, cheap_share=0.0).tier is Tier.FULL
    assert cal.threshold_for(1.0) == math.inf and cal.band_for(1.0) == 0.0


def test_invalid_targets_and_tables() -> None:
    cal = fit_calibration(UNIFORM)
    with pytest.raises(ValueError):
        cal.threshold_for(1.5)
    with pytest.raises(ValueError):
        Calibration(thresholds=(0.5, 0.4))
    with pytest.raises(ValueError):
        Calibration(thresholds=(0.1,))
    with pytest.raises(ValueError):
        fit_calibration([])
    with pytest.raises(ValueError):
        Calibration(thresholds=(0.1, 0.2), cheap_share=2.0)


def test_round_trip() -> None:
    cal = fit_calibration(np.random.default_rng(1).random(500), cheap_share=0.6, band_share=0.1)
    again = Calibration.from_dict(cal.to_dict())
    assert again.cheap_share == 0.6 and again.band_share == 0.1
    assert again.threshold_for(0.33) == pytest.approx(cal.threshold_for(0.33), abs=1e-7)
