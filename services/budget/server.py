"""The gRPC servicer of the budget service: proto ⇄ domain only; the behaviour lives in :mod:`ledger`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.budget.ledger import (
    BudgetLedger,
    CommitInput,
    LimitInput,
    PolicyInput,
    ReserveInput,
    SavingsInput,
    ScopeInput,
    UsageQuery,
)
from services.budget.metrics import BudgetMetrics
from services.budget.model import PPM, Policy, Scope
from services.budget.policy import Headroom
from services.budget.usage import UsageRow
from services.common.attribution import Attribution, from_metadata
from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from services.common.pricing import TokenUsage

Context = grpc.aio.ServicerContext[Any, Any]


def _attribution(msg: common_pb2.Attribution, context: Context, fallback: Attribution | None = None) -> Attribution:
    """``msg`` with its empty fields taken from ``fallback`` (default: the call's attribution metadata)."""
    own = Attribution(tenant=msg.tenant, team=msg.team, feature=msg.feature, end_user=msg.end_user)
    return own.merged_with(fallback or from_metadata(context.invocation_metadata()))


def _tenant(value: str, context: Context) -> str:
    return value or from_metadata(context.invocation_metadata()).tenant


def _usage(msg: common_pb2.Usage) -> TokenUsage:
    return TokenUsage(msg.input_tokens, msg.output_tokens, msg.cached_input_tokens)


def _savings(msg: budget_pb2.RecordSavingsRequest, attribution: Attribution) -> SavingsInput:
    return SavingsInput(
        request_id=msg.request_id,
        attribution=attribution,
        saved_micros=msg.saved_micros,
        reason=int(msg.reason),
        model=msg.model,
        tier=int(msg.tier),
    )


def scope_to_proto(scope: Scope) -> budget_pb2.Scope:
    return budget_pb2.Scope(kind=budget_pb2.ScopeKind.ValueType(scope.kind), tenant=scope.tenant, name=scope.name)


def headroom_to_proto(h: Headroom) -> budget_pb2.ScopeHeadroom:
    msg = budget_pb2.ScopeHeadroom(
        scope=scope_to_proto(h.scope),
        window=budget_pb2.Window.ValueType(h.window),
        spent_micros=h.spent_micros,
        reserved_micros=h.reserved_micros,
        used_tokens=h.used_tokens,
        soft_exceeded=h.soft_exceeded,
        resets_unix_ms=h.resets_unix_ms,
    )
    if h.limit_micros is not None:
        msg.limit_micros = h.limit_micros
    if h.remaining_micros is not None:
        msg.remaining_micros = h.remaining_micros
    if h.limit_tokens is not None:
        msg.limit_tokens = h.limit_tokens
    return msg


def policy_to_proto(p: Policy) -> budget_pb2.BudgetPolicy:
    msg = budget_pb2.BudgetPolicy(
        scope=scope_to_proto(p.scope),
        soft_threshold=p.soft_threshold_ppm / PPM,
        requests_per_minute=p.requests_per_minute,
        tokens_per_minute=p.tokens_per_minute,
        max_tokens_per_request=p.max_tokens_per_request,
    )
    for lim in p.limits:
        item = msg.limits.add(window=budget_pb2.Window.ValueType(lim.window))
        if lim.cost_micros is not None:
            item.cost_micros = lim.cost_micros
        if lim.tokens is not None:
            item.tokens = lim.tokens
    return msg


def policy_from_proto(msg: budget_pb2.BudgetPolicy) -> PolicyInput:
    return PolicyInput(
        scope=ScopeInput(int(msg.scope.kind), msg.scope.tenant, msg.scope.name),
        limits=[
            LimitInput(
                int(x.window),
                x.cost_micros if x.HasField("cost_micros") else None,
                x.tokens if x.HasField("tokens") else None,
            )
            for x in msg.limits
        ],
        soft_threshold=msg.soft_threshold if msg.HasField("soft_threshold") else None,
        requests_per_minute=msg.requests_per_minute,
        tokens_per_minute=msg.tokens_per_minute,
        max_tokens_per_request=msg.max_tokens_per_request,
    )


def _row_to_proto(row: UsageRow) -> budget_pb2.UsageRow:
    c = row.counters
    return budget_pb2.UsageRow(
        tenant=row.tenant,
        team=row.team,
        feature=row.feature,
        model=row.model,
        tier=common_pb2.Tier.ValueType(row.tier),
        end_user=row.end_user,
        cost_micros=c.cost_micros,
        usage=common_pb2.Usage(
            input_tokens=c.input_tokens, output_tokens=c.output_tokens, cached_input_tokens=c.cached_input_tokens
        ),
        requests=c.requests,
        saved_micros=c.saved_micros,
        cache_hits=c.cache_hits,
        over_estimate_commits=c.over_estimate,
        late_commits=c.late_commits,
    )


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    """costmesh.budget.v1.BudgetService over a :class:`BudgetLedger`."""

    def __init__(self, *, ledger: BudgetLedger, metrics: BudgetMetrics | None = None) -> None:
        self._ledger = ledger
        self._metrics = metrics or BudgetMetrics()

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: Context) -> budget_pb2.ReserveResponse:
        inp = ReserveInput(
            request_id=request.request_id,
            attribution=_attribution(request.attribution, context),
            estimated_cost_micros=request.estimated_cost_micros,
            estimated_tokens=request.estimated_tokens,
            ttl_seconds=request.ttl_seconds,
            model=request.model,
            tier=int(request.tier),
        )
        try:
            r = await self._ledger.reserve(inp)
        except ResourceExhausted as err:
            self._metrics.rejected(inp, err)
            raise
        self._metrics.reserved(inp, r)
        msg = budget_pb2.ReserveResponse(
            reservation_id=r.reservation_id,
            expires_unix_ms=r.expires_unix_ms,
            headroom=[headroom_to_proto(h) for h in r.headroom],
            soft_limit_exceeded=r.soft_limit_exceeded,
            replayed=r.replayed,
            max_tokens_cap=r.max_tokens_cap,
            state=budget_pb2.ReservationState.ValueType(r.state),
        )
        if r.remaining_micros is not None:
            msg.remaining_micros = r.remaining_micros
        return msg

    async def Commit(self, request: budget_pb2.CommitRequest, context: Context) -> budget_pb2.CommitResponse:
        inp = CommitInput(
            tenant=_tenant(request.tenant, context),
            reservation_id=request.reservation_id,
            actual_cost_micros=request.actual_cost_micros,
            usage=_usage(request.usage),
            model=request.model,
            tier=int(request.tier),
            saved_micros=request.saved_micros,
        )
        r = await self._ledger.commit(inp)
        self._metrics.committed(inp, r)
        msg = budget_pb2.CommitResponse(
            charged_micros=r.charged_micros, over_estimate=r.over_estimate, replayed=r.replayed, late=bool(r.late)
        )
        if r.remaining_micros is not None:
            msg.remaining_micros = r.remaining_micros
        return msg

    async def Release(self, request: budget_pb2.ReleaseRequest, context: Context) -> budget_pb2.ReleaseResponse:
        tenant = _tenant(request.tenant, context)
        r = await self._ledger.release(tenant, request.reservation_id)
        self._metrics.released(tenant, request.reservation_id)
        return budget_pb2.ReleaseResponse(released_micros=r.released_micros, replayed=r.replayed)

    async def RenewReservation(
        self, request: budget_pb2.RenewReservationRequest, context: Context
    ) -> budget_pb2.RenewReservationResponse:
        tenant = _tenant(request.tenant, context)
        try:
            r = await self._ledger.renew(tenant, request.reservation_id, request.ttl_seconds)
        except NotFound:
            self._metrics.renewed(tenant, request.reservation_id, "not_found")
            raise
        except FailedPrecondition as err:
            outcome = "expired" if err.reason == "RESERVATION_EXPIRED" else "settled"
            self._metrics.renewed(tenant, request.reservation_id, outcome)
            raise
        self._metrics.renewed(tenant, request.reservation_id, "renewed")
        return budget_pb2.RenewReservationResponse(expires_unix_ms=r.expires_unix_ms)

    async def RecordSavings(
        self, request: budget_pb2.RecordSavingsRequest, context: Context
    ) -> budget_pb2.RecordSavingsResponse:
        inp = _savings(request, _attribution(request.attribution, context))
        (replayed,) = await self._ledger.record_savings([inp])
        self._metrics.savings(inp, replayed=replayed)
        return budget_pb2.RecordSavingsResponse(replayed=replayed)

    async def RecordSavingsBatch(
        self, request: budget_pb2.RecordSavingsBatchRequest, context: Context
    ) -> budget_pb2.RecordSavingsBatchResponse:
        tenant = _tenant(request.tenant, context)
        # A record's empty tenant is the batch's; its other empty fields come from the call's metadata, as above.
        fallback = replace(from_metadata(context.invocation_metadata()), tenant=tenant)
        records = [_savings(r, _attribution(r.attribution, context, fallback)) for r in request.records]
        replayed = await self._ledger.record_savings(records, tenant=tenant)
        self._metrics.savings_batch(tenant, records, replayed)
        return budget_pb2.RecordSavingsBatchResponse(replayed=replayed)

    async def SetBudget(self, request: budget_pb2.SetBudgetRequest, context: Context) -> budget_pb2.SetBudgetResponse:
        policy = await self._ledger.set_budget(policy_from_proto(request.policy))
        return budget_pb2.SetBudgetResponse(policy=policy_to_proto(policy))

    async def GetBudget(self, request: budget_pb2.GetBudgetRequest, context: Context) -> budget_pb2.GetBudgetResponse:
        s = request.scope
        view = await self._ledger.get_budget(ScopeInput(int(s.kind), s.tenant, s.name))
        self._metrics.headroom(view.headroom)
        msg = budget_pb2.GetBudgetResponse(headroom=[headroom_to_proto(h) for h in view.headroom])
        if view.policy is not None:
            msg.policy.CopyFrom(policy_to_proto(view.policy))
        return msg

    async def GetUsage(self, request: budget_pb2.GetUsageRequest, context: Context) -> budget_pb2.GetUsageResponse:
        report = await self._ledger.get_usage(
            UsageQuery(
                tenant=request.tenant,
                start_unix_ms=request.start_unix_ms,
                end_unix_ms=request.end_unix_ms,
                window=int(request.window),
                group_by=[int(g) for g in request.group_by],
            )
        )
        return budget_pb2.GetUsageResponse(
            rows=[_row_to_proto(r) for r in report.rows], total=_row_to_proto(report.total)
        )
