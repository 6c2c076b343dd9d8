"""The pipeline's ``Decider`` over the trained classifier and the routing policy from settings."""

from __future__ import annotations

from collections.abc import Sequence

from services.cache.normalizer import Normalizer
from services.common.attribution import Attribution
from services.router.classifier.model import ComplexityModel
from services.router.classifier.policy import Router
from services.router.classifier.types import Message, Tier
from services.router.config import RouterSettings
from services.router.domain import Decision


class ClassifierDecider:
    """Classifies the text the cache keys on: volatile fields (timestamps, UUIDs, ids) scrubbed and whitespace
    collapsed, so requests that share a cache key also share a tier (and so a cache entry)."""

    def __init__(self, router: Router, normalizer: Normalizer | None = None) -> None:
        self._router = router
        self._normalizer = normalizer or Normalizer()

    def decide(
        self, *, messages: Sequence[Message], max_tokens: int, attribution: Attribution, requested_tier: Tier | None
    ) -> Decision:
        normalized = [Message(m.role, self._normalizer.normalize(m.content)) for m in messages]
        d = self._router.decide(normalized, max_tokens, attribution, requested_tier=requested_tier)
        return Decision(
            tier=d.tier,
            score=d.score,
            threshold=d.threshold,
            uncertain=d.uncertain,
            reasons=d.reasons,
            classifier_tier=d.classifier_tier,
            policy=d.policy,
            min_tier=d.min_tier,
            max_tier=d.max_tier,
        )


def build_decider(settings: RouterSettings) -> ClassifierDecider:
    model = ComplexityModel.load(settings.routing.classifier_dir)
    return ClassifierDecider(Router(model=model, policy=settings.routing.to_policy()))
