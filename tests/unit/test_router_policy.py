"""Routing policy: cheap-share targets, the band, caller requests, budget downgrade and feature rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.attribution import Attribution
from services.router.classifier import features as feat
from services.router.classifier.calibration import fit_calibration
from services.router.classifier.model import ComplexityModel, LinearHead
from services.router.classifier.policy import (
    POLICY_BUDGET,
    POLICY_CALLER,
    POLICY_MAX,
    POLICY_MIN,
    POLICY_PIN,
    POLICY_UNCERTAIN,
    FeatureRule,
    Router,
    RoutingPolicy,
)
from services.router.classifier.types import Tier, user_messages

CHEAP, FULL = Tier.CHEAP, Tier.FULL
ANYONE = Attribution()


def constant_model(score: float) -> ComplexityModel:
    """A model that scores every prompt ``score``, calibrated on uniform scores (threshold = the target share)."""
    n = feat.N_DENSE
    head = LinearHead(mean=np.zeros(n), scale=np.ones(n), weights=np.zeros(n), bias=math.log(score / (1.0 - score)))
    cal = fit_calibration(np.linspace(0, 1, 10_001), cheap_share=0.8, band_share=0.05)
    return ComplexityModel(heads={"choice": head, "open": head}, calibration=cal)


def decide(score: float, policy: RoutingPolicy | None = None, att: Attribution = ANYONE, **kw: object):  # type: ignore[no-untyped-def]
    return Router(model=constant_model(score), policy=policy).decide(user_messages("hi"), 0, att, **kw)  # type: ignore[arg-type]


def test_classifier_alone() -> None:
    low, high = decide(0.3), decide(0.95)
    assert (low.tier, low.classifier_tier, low.policy, low.uncertain) == (CHEAP, CHEAP, "", False)
    assert (high.tier, high.classifier_tier, high.policy) == (FULL, FULL, "")
    assert low.threshold == pytest.approx(0.8) and low.score == pytest.approx(0.3)
    assert (low.min_tier, low.max_tier) == (CHEAP, FULL)


def test_uncertainty_band_routes_up() -> None:
    d = decide(0.78)
    assert (d.tier, d.classifier_tier, d.uncertain, d.policy) == (FULL, CHEAP, True, POLICY_UNCERTAIN)


def test_tenant_and_feature_cheap_share_targets() -> None:
    policy = RoutingPolicy(
        tenant_cheap_share={"acme": 0.95}, features={"bulk": FeatureRule(cheap_share=0.99)}, cheap_share=0.5
    )
    assert decide(0.85, policy, Attribution(tenant="acme")).tier is CHEAP
    assert decide(0.85, policy, Attribution(tenant="other")).tier is FULL
    assert decide(0.4, policy, Attribution(tenant="other")).tier is CHEAP
    d = decide(0.9, policy, Attribution(tenant="other", feature="bulk"))
    assert d.tier is CHEAP and d.cheap_share == 0.99 and d.threshold == pytest.approx(0.99)


def test_caller_requested_tier() -> None:
    assert (decide(0.1, requested_tier=FULL).tier, decide(0.1, requested_tier=FULL).policy) == (FULL, POLICY_CALLER)
    d = decide(0.99, requested_tier=CHEAP)
    assert (d.tier, d.classifier_tier, d.policy) == (CHEAP, FULL, POLICY_CALLER)
    ignored = decide(0.99, RoutingPolicy(honor_requested_tier=False), requested_tier=CHEAP)
    assert (ignored.tier, ignored.policy) == (FULL, "")


def test_budget_soft_limit_downgrades_full_to_cheap() -> None:
    d = decide(0.99, soft_limit_exceeded=True)
    assert (d.tier, d.classifier_tier, d.policy) == (CHEAP, FULL, POLICY_BUDGET)
    assert decide(0.1, soft_limit_exceeded=True).policy == ""  # already cheap: nothing to downgrade
    # An explicit request for full is honoured until the hard limit.
    assert decide(0.1, soft_limit_exceeded=True, requested_tier=FULL).tier is FULL
    assert decide(0.99, RoutingPolicy(budget_downgrade=False), soft_limit_exceeded=True).tier is FULL


def test_budget_downgrade_never_goes_below_a_pin_or_a_minimum() -> None:
    pinned = RoutingPolicy(features={"legal": FeatureRule(pin=FULL)})
    d = decide(0.99, pinned, Attribution(tenant="t", feature="legal"), soft_limit_exceeded=True)
    assert (d.tier, d.policy, d.min_tier, d.max_tier) == (FULL, POLICY_PIN, FULL, FULL)
    minimum = RoutingPolicy(features={"legal": FeatureRule(min_tier=FULL)})
    d = decide(0.99, minimum, Attribution(tenant="t", feature="legal"), soft_limit_exceeded=True)
    assert (d.tier, d.policy, d.min_tier) == (FULL, POLICY_MIN, FULL)


def test_feature_pin_min_and_max() -> None:
    policy = RoutingPolicy(
        features={
            "pinned-cheap": FeatureRule(pin=CHEAP),
            "at-least-full": FeatureRule(min_tier=FULL),
            "at-most-cheap": FeatureRule(max_tier=CHEAP),
        }
    )
    d = decide(0.99, policy, Attribution(feature="pinned-cheap"), requested_tier=FULL)
    assert (d.tier, d.classifier_tier, d.policy) == (CHEAP, FULL, POLICY_PIN)
    d = decide(0.1, policy, Attribution(feature="at-least-full"))
    assert (d.tier, d.policy) == (FULL, POLICY_MIN)
    assert decide(0.99, policy, Attribution(feature="at-least-full")).policy == ""  # already full: unchanged
    d = decide(0.99, policy, Attribution(feature="at-most-cheap"), requested_tier=FULL)
    assert (d.tier, d.policy, d.max_tier) == (CHEAP, POLICY_MAX, CHEAP)
    assert decide(0.99, policy, Attribution(feature="unknown")).tier is FULL


def test_tenant_scoped_rule_wins_over_the_plain_one() -> None:
    policy = RoutingPolicy(features={"chat": FeatureRule(pin=FULL), "acme/chat": FeatureRule(pin=CHEAP)})
    assert decide(0.5, policy, Attribution(tenant="acme", feature="chat")).tier is CHEAP
    assert decide(0.5, policy, Attribution(tenant="other", feature="chat")).tier is FULL


def test_invalid_rules() -> None:
    with pytest.raises(ValueError):
        FeatureRule(pin=FULL, min_tier=CHEAP)
    with pytest.raises(ValueError):
        FeatureRule(min_tier=FULL, max_tier=CHEAP)
    with pytest.raises(ValueError):
        FeatureRule(cheap_share=1.2)
    with pytest.raises(ValueError):
        RoutingPolicy(tenant_cheap_share={"t": -0.1})


def test_policy_band_and_share_override_the_artifact() -> None:
    router = Router(model=constant_model(0.78), policy=RoutingPolicy(cheap_share=0.9, band_share=0.0))
    d = router.decide(user_messages("hi"))
    assert (d.tier, d.uncertain, d.threshold) == (CHEAP, False, pytest.approx(0.9))


def test_committed_artifact_scores_and_explains() -> None:
    router = Router(model=ComplexityModel.load())
    easy = router.decide(user_messages("What is the capital of France?"))
    hard = router.decide(
        user_messages(
            "A train leaves at 3 pm at 60 mph; two hours later a second train leaves at 80 mph. Each stops for "
            "20 minutes every 100 miles, and then the first train slows by 25%. How many miles from the station "
            "does the second train catch up, and at what time? Explain each step and justify the answer."
        )
    )
    assert 0.0 <= easy.score < hard.score <= 1.0
    assert {"multi_step", "numbers"} & set(hard.reasons)
    assert set(hard.reasons) <= set(feat.REASONS.values())
