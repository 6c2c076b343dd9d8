"""The router's metrics: requests, spend, tokens and savings by tenant/team/feature/model/tier, and route decisions.

Built by the composition root from the process ``MeterProvider`` and handed to the pipeline (``metrics=``), which
calls :meth:`RouterMetrics.observe` once per interactive request, when its result or its failure is known. Cost
here is what the ledger was charged for the request (0 on a cache hit); savings follow the ledger's definition:
baseline (full-tier list price, no cache) minus cost, split into ``reason="cache"`` (hits) and ``reason="routing"``
(a cheaper tier or prefix-cache discounts). Names and units are documented in docs/telemetry.md.
"""

from __future__ import annotations

import asyncio

from opentelemetry import metrics

from services.common.errors import CostmeshError
from services.router.domain import GenerateInput, GenerateResult

#: Bucket bounds of ``costmesh.route.score`` (the classifier's probability that the full tier is needed).
SCORE_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def outcome_of(error: BaseException | None) -> str:
    """``ok``, or the lower-case gRPC status name the client receives for ``error``."""
    if error is None:
        return "ok"
    if isinstance(error, CostmeshError):
        return error.code.name.lower()
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return "internal"


class RouterMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self._requests = meter.create_counter(
            "costmesh.requests", unit="{request}", description="Interactive requests answered or refused by the router"
        )
        self._cost = meter.create_counter(
            "costmesh.cost.micros", unit="{microUSD}", description="Cost charged to the ledger, micro-USD"
        )
        self._baseline = meter.create_counter(
            "costmesh.cost.baseline_micros",
            unit="{microUSD}",
            description="What the same usage costs at full-tier list price without any cache, micro-USD",
        )
        self._savings = meter.create_counter(
            "costmesh.savings.micros", unit="{microUSD}", description="Baseline minus cost, micro-USD, by reason"
        )
        self._tokens = meter.create_counter(
            "costmesh.tokens", unit="{token}", description="Tokens of answered requests (cache hits: the stored usage)"
        )
        self._decisions = meter.create_counter(
            "costmesh.route.decisions", unit="{request}", description="Tier decisions of answered requests"
        )
        self._score = meter.create_histogram(
            "costmesh.route.score",
            unit="1",
            description="Classifier score (probability the full tier is needed) of answered requests",
            explicit_bucket_boundaries_advisory=list(SCORE_BUCKETS),
        )

    def observe(
        self, inp: GenerateInput, result: GenerateResult | None = None, error: BaseException | None = None
    ) -> None:
        """Count one request: its result, or the error it ended with."""
        a = inp.attribution
        who = {"tenant": a.tenant, "team": a.team, "feature": a.feature}
        if result is None:
            self._requests.add(1, {**who, "model": "", "tier": "", "cache_hit": "false", "outcome": outcome_of(error)})
            return
        dims = {**who, "model": result.model, "tier": result.tier.label}
        hit = "true" if result.cache_hit else "false"
        self._requests.add(1, {**dims, "cache_hit": hit, "outcome": "ok"})
        self._cost.add(result.cost_micros, dims)
        self._baseline.add(result.baseline_micros, dims)
        if result.saved_micros > 0:
            self._savings.add(result.saved_micros, {**dims, "reason": "cache" if result.cache_hit else "routing"})
        u = result.usage
        tokens = (("input", u.input_tokens), ("output", u.output_tokens), ("cached_input", u.cached_input_tokens))
        for kind, n in tokens:
            if n:
                self._tokens.add(n, {**dims, "type": kind, "cache_hit": hit})
        d = result.decision
        self._decisions.add(
            1,
            {
                "feature": a.feature,
                "tier": result.tier.label,
                "classifier_tier": d.classifier_tier.label,
                "policy": d.policy or "none",
                "uncertain": "true" if d.uncertain else "false",
                "cache_hit": hit,
            },
        )
        self._score.record(d.score, {"feature": a.feature, "tier": result.tier.label})
