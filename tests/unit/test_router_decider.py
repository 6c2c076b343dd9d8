"""Routing settings → policy → the pipeline's Decider."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.attribution import Attribution
from services.router.classifier.model import DEFAULT_ARTIFACT_DIR
from services.router.classifier.settings import FeatureRuleSettings, RoutingSettings
from services.router.classifier.types import Tier, user_messages
from services.router.config import RouterSettings
from services.router.decider import build_decider


def test_routing_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTMESH_ROUTER_ROUTING__CHEAP_SHARE", "0.7")
    monkeypatch.setenv("COSTMESH_ROUTER_ROUTING__TENANT_CHEAP_SHARE", '{"acme": 0.9}')
    monkeypatch.setenv(
        "COSTMESH_ROUTER_ROUTING__FEATURES", '{"legal": {"pin": "full"}, "acme/chat": {"max_tier": "cheap"}}'
    )
    routing = RouterSettings().routing
    policy = routing.to_policy()
    assert policy.cheap_share == 0.7 and policy.tenant_cheap_share == {"acme": 0.9}
    assert policy.features["legal"].pin is Tier.FULL
    assert policy.features["acme/chat"].max_tier is Tier.CHEAP


def test_invalid_rules_are_rejected_at_load() -> None:
    with pytest.raises(ValidationError):
        FeatureRuleSettings(pin="full", min_tier="cheap")
    with pytest.raises(ValidationError):
        FeatureRuleSettings(min_tier="full", max_tier="cheap")
    with pytest.raises(ValidationError):
        RoutingSettings(tenant_cheap_share={"t": 1.5})
    with pytest.raises(ValidationError):
        RoutingSettings(features={"x": {"pin": "medium"}})  # type: ignore[dict-item]


def test_decider_returns_the_pipeline_decision_with_policy_bounds() -> None:
    settings = RouterSettings(
        routing=RoutingSettings(
            classifier_dir=DEFAULT_ARTIFACT_DIR, features={"legal": FeatureRuleSettings(min_tier="full")}
        )
    )
    decider = build_decider(settings)
    d = decider.decide(
        messages=user_messages("What is 2 + 2?"),
        max_tokens=64,
        attribution=Attribution(tenant="t", feature="legal"),
        requested_tier=None,
    )
    assert (d.tier, d.min_tier, d.max_tier, d.policy) == (Tier.FULL, Tier.FULL, Tier.FULL, "feature_min_tier")
    assert d.classifier_tier is Tier.CHEAP and 0.0 <= d.score <= d.threshold
    free = decider.decide(
        messages=user_messages("What is 2 + 2?"),
        max_tokens=64,
        attribution=Attribution(tenant="t"),
        requested_tier=Tier.FULL,
    )
    assert (free.tier, free.policy, free.min_tier) == (Tier.FULL, "caller_requested", Tier.CHEAP)
