"""Proto ⇄ domain conversions shared by the router's servicer and its clients of the other services."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2
from services.common.attribution import Attribution
from services.common.pricing import TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.domain import CacheMode, Decision, FinishReason, GenerateResult, Sampling

_ROLE_TO_NAME = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
_NAME_TO_ROLE = {v: k for k, v in _ROLE_TO_NAME.items()}


def messages_from_proto(msgs: Iterable[common_pb2.ChatMessage]) -> tuple[Message, ...]:
    # An unknown role maps to "" so validation reports it with the message index.
    return tuple(Message(role=_ROLE_TO_NAME.get(m.role, ""), content=m.content) for m in msgs)


def messages_to_proto(msgs: Sequence[Message]) -> list[common_pb2.ChatMessage]:
    unspecified = common_pb2.ROLE_UNSPECIFIED
    return [common_pb2.ChatMessage(role=_NAME_TO_ROLE.get(m.role, unspecified), content=m.content) for m in msgs]


def sampling_from_proto(s: common_pb2.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=s.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
    )


def sampling_to_proto(s: Sampling) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(max_tokens=s.max_tokens, stop=list(s.stop))
    if s.temperature is not None:
        msg.temperature = s.temperature
    if s.top_p is not None:
        msg.top_p = s.top_p
    if s.seed is not None:
        msg.seed = s.seed
    return msg


def attribution_from_proto(a: common_pb2.Attribution) -> Attribution:
    return Attribution(tenant=a.tenant, team=a.team, feature=a.feature, end_user=a.end_user)


def attribution_to_proto(a: Attribution) -> common_pb2.Attribution:
    return common_pb2.Attribution(tenant=a.tenant, team=a.team, feature=a.feature, end_user=a.end_user)


def tier_from_proto(t: common_pb2.Tier.ValueType) -> Tier | None:
    return {common_pb2.TIER_CHEAP: Tier.CHEAP, common_pb2.TIER_FULL: Tier.FULL}.get(t)


def tier_to_proto(t: Tier) -> common_pb2.Tier.ValueType:
    return common_pb2.TIER_CHEAP if t is Tier.CHEAP else common_pb2.TIER_FULL


def usage_from_proto(u: common_pb2.Usage) -> TokenUsage:
    return TokenUsage(u.input_tokens, u.output_tokens, u.cached_input_tokens)


def usage_to_proto(u: TokenUsage) -> common_pb2.Usage:
    return common_pb2.Usage(
        input_tokens=u.input_tokens, output_tokens=u.output_tokens, cached_input_tokens=u.cached_input_tokens
    )


def finish_from_proto(f: common_pb2.FinishReason.ValueType) -> FinishReason:
    return FinishReason(f) if f in {r.value for r in FinishReason} else FinishReason.UNSPECIFIED


def finish_to_proto(f: FinishReason) -> common_pb2.FinishReason.ValueType:
    return common_pb2.FinishReason.ValueType(f.value)


def cache_mode_from_proto(m: router_pb2.CacheMode.ValueType) -> CacheMode:
    return {router_pb2.CACHE_MODE_BYPASS: CacheMode.BYPASS, router_pb2.CACHE_MODE_REFRESH: CacheMode.REFRESH}.get(
        m, CacheMode.DEFAULT
    )


def decision_to_proto(d: Decision) -> router_pb2.RouteDecision:
    return router_pb2.RouteDecision(
        tier=tier_to_proto(d.tier),
        score=d.score,
        threshold=d.threshold,
        uncertain=d.uncertain,
        reasons=list(d.reasons),
        classifier_tier=tier_to_proto(d.classifier_tier),
        policy=d.policy,
    )


def result_to_proto(r: GenerateResult) -> router_pb2.GenerateResult:
    msg = router_pb2.GenerateResult(
        request_id=r.request_id,
        text=r.text,
        usage=usage_to_proto(r.usage),
        cost_micros=r.cost_micros,
        tier=tier_to_proto(r.tier),
        model=r.model,
        route=decision_to_proto(r.decision),
        cache_hit=r.cache_hit,
        saved_micros=r.saved_micros,
        finish_reason=finish_to_proto(r.finish_reason),
        time_to_first_token_ms=r.ttft_ms,
        escalated=r.escalated,
    )
    if r.budget_remaining_micros is not None:
        msg.budget_remaining_micros = r.budget_remaining_micros
    return msg
