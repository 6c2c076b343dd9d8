"""The cache's metrics and span attributes: lookups by outcome (hit ratio), coalesced waits, fills, callers waiting.

Built by the composition root from the process ``MeterProvider`` and handed to the servicer (``metrics=``), which
calls one method per RPC with domain values; each method also annotates the RPC's server span. Names and units are
documented in docs/telemetry.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics

from services.cache.singleflight import FillResult, LookupQuery, LookupResult, Outcome
from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.spans import annotate, attribution_attributes, with_baggage


class CacheMetrics:
    def __init__(self, meter: metrics.Meter | None = None, *, waiting: Callable[[], int] | None = None) -> None:
        meter = meter or metrics.NoOpMeter("costmesh.cache")
        self._lookups = meter.create_counter(
            "costmesh.cache.lookups",
            unit="{lookup}",
            description="Cache lookups by outcome (hit ratio = hit/(hit+miss))",
        )
        self._coalesced = meter.create_counter(
            "costmesh.cache.coalesced_waits",
            unit="{lookup}",
            description="Lookups answered by waiting on an identical in-flight miss instead of paying for inference",
        )
        self._fills = meter.create_counter(
            "costmesh.cache.fills", unit="{fill}", description="Fill and abandon calls by result"
        )
        if waiting is not None:

            def observe_waiting(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
                yield metrics.Observation(waiting())

            meter.create_observable_gauge(
                "costmesh.cache.waiting",
                callbacks=[observe_waiting],
                unit="{lookup}",
                description="Callers of this replica waiting on an in-flight fill right now",
            )

    def lookup(self, attribution: Attribution, query: LookupQuery, result: LookupResult) -> None:
        outcome = result.outcome.value.lower()
        labels = {"tenant": query.tenant, "feature": query.feature, "outcome": outcome}
        self._lookups.add(1, labels)
        if result.coalesced:
            self._coalesced.add(1, {"tenant": query.tenant, "feature": query.feature})
        annotate(
            {
                **attribution_attributes(with_baggage(attribution)),
                sc.GEN_AI_REQUEST_MODEL: query.model,
                sc.CACHE_OUTCOME: outcome,
                sc.CACHE_HIT: result.outcome is Outcome.HIT,
                sc.CACHE_COALESCED: result.coalesced,
            }
        )

    def fill(self, attribution: Attribution, *, abandon: bool, result: FillResult) -> None:
        if abandon:
            status = "abandoned"
        elif result.stored:
            status = "stored"
        else:
            status = result.reason.lower() or "refused"
        self._fills.add(1, {"tenant": attribution.tenant, "feature": attribution.feature, "result": status})
        annotate(attribution_attributes(with_baggage(attribution)))
