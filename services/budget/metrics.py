"""The budget's metrics and span attributes: reservations and hard-stop rejections, committed spend and recorded
savings, late commits (overspend events), renewals (each counted once: replays of an idempotent call are not), and
the headroom of every limited scope.

Built by the composition root from the process ``MeterProvider`` and handed to the servicer (``metrics=``), which
calls one method per RPC with domain values; each method also annotates the RPC's server span. ``CommitRequest``
carries only the tenant: team and feature of a commit come from the W3C baggage the router sends (empty when the
caller sent none). Headroom gauges report the last values this replica saw (from Reserve and GetBudget) for
global, tenant, team and feature scopes. Names and units are documented in docs/telemetry.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from opentelemetry import metrics

from services.budget.ledger import CommitInput, CommitResult, Reservation, ReserveInput, SavingsInput
from services.budget.model import ScopeKind, Tier, Window
from services.budget.policy import Headroom
from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.errors import ResourceExhausted
from services.common.pricing import TokenUsage
from services.common.spans import annotate, attribution_attributes, with_baggage

#: Scopes whose headroom is exported (end-user scopes are left out: unbounded label cardinality).
_GAUGE_KINDS = frozenset({ScopeKind.GLOBAL, ScopeKind.TENANT, ScopeKind.TEAM, ScopeKind.FEATURE})

_HeadroomKey = tuple[str, str, str, str]  # tenant, scope_kind, scope_name, window


def tier_label(tier: int) -> str:
    try:
        return Tier(tier).name.lower()
    except ValueError:
        return "unspecified"


def _usage_attributes(usage: TokenUsage) -> dict[str, int]:
    return {
        sc.GEN_AI_USAGE_INPUT_TOKENS: usage.input_tokens,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: usage.output_tokens,
        sc.CACHED_INPUT_TOKENS: usage.cached_input_tokens,
    }


class BudgetMetrics:
    def __init__(self, meter: metrics.Meter | None = None, *, max_scopes: int = 10_000) -> None:
        meter = meter or metrics.NoOpMeter("costmesh.budget")
        self._max_scopes = max_scopes
        self._headroom: OrderedDict[_HeadroomKey, Headroom] = OrderedDict()
        self._reservations = meter.create_counter(
            "costmesh.budget.reservations", unit="{reservation}", description="Reserve calls by outcome"
        )
        self._rejections = meter.create_counter(
            "costmesh.budget.rejections",
            unit="{request}",
            description="Requests refused by a hard limit or a rate cap (RESOURCE_EXHAUSTED)",
        )
        self._committed = meter.create_counter(
            "costmesh.budget.committed.micros", unit="{microUSD}", description="Spend settled in the ledger, micro-USD"
        )
        self._saved = meter.create_counter(
            "costmesh.budget.saved.micros", unit="{microUSD}", description="Savings recorded in the ledger, micro-USD"
        )
        self._late = meter.create_counter(
            "costmesh.budget.late_commits",
            unit="{commit}",
            description="Commits of a reservation that had expired or been released (charged in full; overspend)",
        )
        self._late_micros = meter.create_counter(
            "costmesh.budget.late_committed.micros",
            unit="{microUSD}",
            description="Spend charged by late commits (nothing was held for it), micro-USD",
        )
        self._renewals = meter.create_counter(
            "costmesh.budget.renewals", unit="{renewal}", description="RenewReservation calls by outcome"
        )
        meter.create_observable_gauge(
            "costmesh.budget.remaining.micros",
            callbacks=[self._observe("remaining")],
            unit="{microUSD}",
            description="Cost limit minus spend and open reservations of a scope's window (last seen)",
        )
        meter.create_observable_gauge(
            "costmesh.budget.used.micros",
            callbacks=[self._observe("used")],
            unit="{microUSD}",
            description="Spend plus open reservations of a scope's window (last seen)",
        )
        meter.create_observable_gauge(
            "costmesh.budget.limit.micros",
            callbacks=[self._observe("limit")],
            unit="{microUSD}",
            description="Cost limit of a scope's window",
        )

    # -- headroom gauges --------------------------------------------------------------------------------------

    def _observe(self, what: str) -> metrics.CallbackT:
        def callback(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            for (tenant, kind, name, window), h in list(self._headroom.items()):
                if h.limit_micros is None:
                    continue
                value = {
                    "remaining": h.remaining_micros or 0,
                    "used": h.spent_micros + h.reserved_micros,
                    "limit": h.limit_micros,
                }[what]
                yield metrics.Observation(
                    value, {"tenant": tenant, "scope_kind": kind, "scope_name": name, "window": window}
                )

        return callback

    def headroom(self, rows: Sequence[Headroom]) -> None:
        """Remember the latest headroom of each cost-limited scope and window."""
        for h in rows:
            if h.scope.kind not in _GAUGE_KINDS or h.limit_micros is None:
                continue
            key = (h.scope.tenant, h.scope.kind.name.lower(), h.scope.name, Window(h.window).name.lower())
            self._headroom[key] = h
            self._headroom.move_to_end(key)
        while len(self._headroom) > self._max_scopes:
            self._headroom.popitem(last=False)

    # -- per RPC ----------------------------------------------------------------------------------------------

    def reserved(self, req: ReserveInput, r: Reservation) -> None:
        a = req.attribution
        outcome = "replayed" if r.replayed else "reserved"
        self._reservations.add(
            1,
            {
                "tenant": a.tenant,
                "team": a.team,
                "feature": a.feature,
                "tier": tier_label(req.tier),
                "outcome": outcome,
            },
        )
        self.headroom(r.headroom)
        annotate(
            {
                **self._request_attributes(req),
                sc.BUDGET_OUTCOME: outcome,
                sc.BUDGET_RESERVATION_ID: r.reservation_id,
                sc.BUDGET_REMAINING_MICROS: r.remaining_micros,
                sc.BUDGET_SOFT_EXCEEDED: r.soft_limit_exceeded,
            }
        )

    def rejected(self, req: ReserveInput, err: ResourceExhausted) -> None:
        a = req.attribution
        labels = {"tenant": a.tenant, "team": a.team, "feature": a.feature, "tier": tier_label(req.tier)}
        self._reservations.add(1, {**labels, "outcome": "rejected"})
        self._rejections.add(
            1,
            {
                **labels,
                "reason": err.reason,
                "window": err.metadata.get("window", ""),
                "limit": err.metadata.get("limit", ""),
            },
        )
        annotate({**self._request_attributes(req), sc.BUDGET_OUTCOME: "rejected", sc.BUDGET_REMAINING_MICROS: 0})

    def committed(self, req: CommitInput, r: CommitResult) -> None:
        who = with_baggage(Attribution(tenant=req.tenant))
        if not r.replayed:
            dims = {
                "tenant": req.tenant,
                "team": who.team,
                "feature": who.feature,
                "model": req.model,
                "tier": tier_label(req.tier),
            }
            self._committed.add(r.charged_micros, dims)
            if req.saved_micros > 0:
                self._saved.add(req.saved_micros, {**dims, "reason": "routing"})
            if r.late:
                late = {"tenant": req.tenant, "team": who.team, "feature": who.feature, "reason": r.late}
                self._late.add(1, late)
                self._late_micros.add(r.charged_micros, late)
        annotate(
            {
                **attribution_attributes(who),
                **_usage_attributes(req.usage),
                sc.GEN_AI_REQUEST_MODEL: req.model or None,
                sc.TIER: tier_label(req.tier),
                sc.COST_MICROS: r.charged_micros,
                sc.BUDGET_OUTCOME: "replayed" if r.replayed else "committed_late" if r.late else "committed",
                sc.BUDGET_RESERVATION_ID: req.reservation_id,
                sc.BUDGET_REMAINING_MICROS: r.remaining_micros,
            }
        )

    def released(self, tenant: str, reservation_id: str) -> None:
        annotate(
            {
                **attribution_attributes(with_baggage(Attribution(tenant=tenant))),
                sc.BUDGET_OUTCOME: "released",
                sc.BUDGET_RESERVATION_ID: reservation_id,
            }
        )

    def renewed(self, tenant: str, reservation_id: str, outcome: str) -> None:
        """``outcome``: renewed, settled, expired or not_found."""
        self._renewals.add(1, {"tenant": tenant, "outcome": outcome})
        annotate(
            {
                **attribution_attributes(with_baggage(Attribution(tenant=tenant))),
                sc.BUDGET_OUTCOME: outcome,
                sc.BUDGET_RESERVATION_ID: reservation_id,
            }
        )

    def savings(self, req: SavingsInput, *, replayed: bool) -> None:
        a = self._count_savings(req, replayed)
        annotate({**attribution_attributes(a), sc.CACHE_SAVED_MICROS: req.saved_micros})

    def savings_batch(self, tenant: str, records: Sequence[SavingsInput], replayed: Sequence[bool]) -> None:
        """Each record counted as by :meth:`savings`; the span annotated once, with the batch's totals."""
        for req, again in zip(records, replayed, strict=True):
            self._count_savings(req, again)
        annotate(
            {
                **attribution_attributes(Attribution(tenant=tenant)),
                sc.CACHE_SAVED_MICROS: sum(r.saved_micros for r in records),
                sc.SAVINGS_RECORDS: len(records),
            }
        )

    def _count_savings(self, req: SavingsInput, replayed: bool) -> Attribution:
        a = with_baggage(req.attribution)
        if not replayed and req.saved_micros > 0:
            self._saved.add(
                req.saved_micros,
                {
                    "tenant": a.tenant,
                    "team": a.team,
                    "feature": a.feature,
                    "model": req.model,
                    "tier": tier_label(req.tier),
                    "reason": "cache" if req.reason == 1 else "routing",
                },
            )
        return a

    @staticmethod
    def _request_attributes(req: ReserveInput) -> dict[str, str | int | None]:
        return {
            **attribution_attributes(with_baggage(req.attribution)),
            sc.GEN_AI_REQUEST_MODEL: req.model or None,
            sc.TIER: tier_label(req.tier),
            sc.BUDGET_ESTIMATED_MICROS: req.estimated_cost_micros,
            sc.REQUEST_ID: req.request_id,
        }
