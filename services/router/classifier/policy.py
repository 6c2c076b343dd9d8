"""Routing policy on top of the classifier: who gets which cheap-share target, what features may or must use, what a
caller may ask for, and what happens when the budget passes its soft threshold.

Order of a decision (each step that changes or fixes the tier names itself in ``RouteDecision.policy``):

1. classifier: score → tier by the calibrated threshold of the cheap-share target (the feature's, else the
   tenant's, else the default); a score within the uncertainty band of the threshold goes up (``uncertainty_band``);
2. caller: a requested tier replaces the classifier's (``caller_requested``) when the policy honours requests;
3. budget: when a scope of the request is past its soft threshold, full is downgraded to cheap
   (``budget_downgrade``) — unless the caller explicitly asked for full, which only a hard limit overrides;
4. feature rule, last so nothing can undo it: ``pin`` fixes the tier (``feature_pin``); otherwise the tier is raised
   to ``min_tier`` (``feature_min_tier``) or lowered to ``max_tier`` (``feature_max_tier``). So a budget downgrade
   never goes below a pinned or minimum tier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.common.attribution import Attribution
from services.router.classifier.model import ComplexityModel
from services.router.classifier.types import Message, Tier

POLICY_UNCERTAIN = "uncertainty_band"
POLICY_CALLER = "caller_requested"
POLICY_BUDGET = "budget_downgrade"
POLICY_PIN = "feature_pin"
POLICY_MIN = "feature_min_tier"
POLICY_MAX = "feature_max_tier"


def _check_share(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True, slots=True)
class FeatureRule:
    """What one product feature may use. ``pin`` excludes ``min_tier`` / ``max_tier``."""

    pin: Tier | None = None
    min_tier: Tier | None = None
    max_tier: Tier | None = None
    cheap_share: float | None = None  # the feature's own target (wins over the tenant's)

    def __post_init__(self) -> None:
        if self.pin is not None and (self.min_tier is not None or self.max_tier is not None):
            raise ValueError("a pinned feature takes no min_tier / max_tier")
        if self.min_tier is not None and self.max_tier is not None and self.min_tier > self.max_tier:
            raise ValueError("min_tier is above max_tier")
        _check_share("cheap_share", self.cheap_share)

    @property
    def lowest(self) -> Tier:
        return self.pin or self.min_tier or Tier.CHEAP

    @property
    def highest(self) -> Tier:
        return self.pin or self.max_tier or Tier.FULL


NO_RULE = FeatureRule()
NO_ATTRIBUTION = Attribution()


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """Policy configuration. Feature rules are keyed ``"<feature>"`` (any tenant) or ``"<tenant>/<feature>"``
    (that tenant only; wins over the plain key)."""

    cheap_share: float | None = None  # default target; None = the model's calibrated default
    band_share: float | None = None  # None = the model's calibrated band
    tenant_cheap_share: Mapping[str, float] = field(default_factory=dict)
    features: Mapping[str, FeatureRule] = field(default_factory=dict)
    honor_requested_tier: bool = True
    budget_downgrade: bool = True

    def __post_init__(self) -> None:
        _check_share("cheap_share", self.cheap_share)
        _check_share("band_share", self.band_share)
        for tenant, share in self.tenant_cheap_share.items():
            _check_share(f"tenant_cheap_share[{tenant}]", share)

    def rule_for(self, attribution: Attribution) -> FeatureRule:
        if not attribution.feature:
            return NO_RULE
        scoped = self.features.get(f"{attribution.tenant}/{attribution.feature}")
        if scoped is not None:
            return scoped
        return self.features.get(attribution.feature, NO_RULE)

    def cheap_share_for(self, attribution: Attribution, rule: FeatureRule) -> float | None:
        if rule.cheap_share is not None:
            return rule.cheap_share
        share = self.tenant_cheap_share.get(attribution.tenant)
        return share if share is not None else self.cheap_share


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The tier for a request and why (mirrors ``costmesh.router.v1.RouteDecision``)."""

    tier: Tier
    score: float
    threshold: float
    uncertain: bool
    reasons: tuple[str, ...]
    classifier_tier: Tier
    policy: str = ""
    min_tier: Tier = Tier.CHEAP  # bounds the feature rule allows (budget and escalation stay within them)
    max_tier: Tier = Tier.FULL
    cheap_share: float = 0.0  # the target the threshold was calibrated to
    token_estimate: int = 0


class Router:
    """Classifier + calibration + policy: ``decide`` is the one call the request path makes."""

    def __init__(self, *, model: ComplexityModel, policy: RoutingPolicy | None = None) -> None:
        self._policy = policy or RoutingPolicy()
        calibration = model.calibration
        if self._policy.band_share is not None or self._policy.cheap_share is not None:
            calibration = replace(
                calibration,
                cheap_share=calibration.cheap_share if self._policy.cheap_share is None else self._policy.cheap_share,
                band_share=calibration.band_share if self._policy.band_share is None else self._policy.band_share,
            )
            model = model.with_calibration(calibration)
        self._model = model

    @property
    def model(self) -> ComplexityModel:
        return self._model

    @property
    def policy(self) -> RoutingPolicy:
        return self._policy

    def decide(
        self,
        messages: Sequence[Message],
        max_tokens: int = 0,
        attribution: Attribution = NO_ATTRIBUTION,
        *,
        soft_limit_exceeded: bool = False,
        requested_tier: Tier | None = None,
    ) -> RouteDecision:
        rule = self._policy.rule_for(attribution)
        share = self._policy.cheap_share_for(attribution, rule)
        calibration = self._model.calibration
        target = calibration.cheap_share if share is None else share

        # 1. classifier (skipped when a pin decides anyway: the score is still reported)
        scored = self._model.score(messages, max_tokens)
        verdict = calibration.route(scored.score, target)
        tier = verdict.tier
        policy = POLICY_UNCERTAIN if verdict.tier != verdict.classifier_tier else ""

        # 2. caller
        if requested_tier is not None and self._policy.honor_requested_tier:
            tier = requested_tier
            policy = POLICY_CALLER

        # 3. budget past its soft threshold
        if (
            soft_limit_exceeded
            and self._policy.budget_downgrade
            and tier is Tier.FULL
            and not (requested_tier is Tier.FULL and self._policy.honor_requested_tier)
        ):
            tier = Tier.CHEAP
            policy = POLICY_BUDGET

        # 4. feature rule
        if rule.pin is not None:
            tier, policy = rule.pin, POLICY_PIN
        elif rule.min_tier is not None and tier < rule.min_tier:
            tier, policy = rule.min_tier, POLICY_MIN
        elif rule.max_tier is not None and tier > rule.max_tier:
            tier, policy = rule.max_tier, POLICY_MAX

        return RouteDecision(
            tier=tier,
            score=scored.score,
            threshold=verdict.threshold,
            uncertain=verdict.uncertain,
            reasons=scored.reasons,
            classifier_tier=verdict.classifier_tier,
            policy=policy,
            min_tier=rule.lowest,
            max_tier=rule.highest,
            cheap_share=target,
            token_estimate=scored.token_estimate,
        )
