"""Routing-policy settings (the ``routing`` section of the router's settings) and their domain policy.

YAML (``router:`` section of the file named by ``COSTMESH_CONFIG``)::

    routing:
      cheap_share: 0.8               # default target share of requests on the cheap tier
      band_share: 0.05               # traffic just below the threshold that is routed up as uncertain
      tenant_cheap_share: {acme: 0.9}
      features:
        legal-review: {pin: full}
        acme/chat: {min_tier: cheap, max_tier: cheap}
        summaries: {cheap_share: 0.95}

or env: ``COSTMESH_ROUTER_ROUTING__CHEAP_SHARE=0.7``,
``COSTMESH_ROUTER_ROUTING__FEATURES='{"legal-review": {"pin": "full"}}'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.router.classifier.policy import FeatureRule, RoutingPolicy
from services.router.classifier.types import Tier

TierName = Literal["cheap", "full"]


def _tier(name: TierName | None) -> Tier | None:
    return None if name is None else Tier.parse(name)


class FeatureRuleSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pin: TierName | None = Field(default=None, description="Always this tier.")
    min_tier: TierName | None = Field(default=None, description="Never below this tier (budget downgrades included).")
    max_tier: TierName | None = Field(default=None, description="Never above this tier.")
    cheap_share: float | None = Field(default=None, ge=0, le=1, description="This feature's cheap-share target.")

    @model_validator(mode="after")
    def _consistent(self) -> FeatureRuleSettings:
        self.to_rule()  # raises ValueError on pin + bounds or min above max
        return self

    def to_rule(self) -> FeatureRule:
        return FeatureRule(
            pin=_tier(self.pin),
            min_tier=_tier(self.min_tier),
            max_tier=_tier(self.max_tier),
            cheap_share=self.cheap_share,
        )


class RoutingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    classifier_dir: Path | None = Field(
        default=None, description="Classifier artifact directory; unset = the committed one."
    )
    cheap_share: float | None = Field(
        default=None, ge=0, le=1, description="Default cheap-share target; unset = the artifact's calibration (0.8)."
    )
    band_share: float | None = Field(
        default=None, ge=0, le=1, description="Share of traffic in the uncertainty band; unset = the artifact's (0.05)."
    )
    tenant_cheap_share: dict[str, float] = Field(default_factory=dict, description="Cheap-share target per tenant.")
    features: dict[str, FeatureRuleSettings] = Field(
        default_factory=dict, description="Rules per feature ('feature' or 'tenant/feature')."
    )
    honor_requested_tier: bool = Field(
        default=True, description="A tier the caller asks for replaces the classifier's."
    )

    @model_validator(mode="after")
    def _shares(self) -> RoutingSettings:
        for tenant, share in self.tenant_cheap_share.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"tenant_cheap_share[{tenant}] must be in [0, 1]")
        return self

    def to_policy(self) -> RoutingPolicy:
        return RoutingPolicy(
            cheap_share=self.cheap_share,
            band_share=self.band_share,
            tenant_cheap_share=dict(self.tenant_cheap_share),
            features={k: v.to_rule() for k, v in self.features.items()},
            honor_requested_tier=self.honor_requested_tier,
        )
