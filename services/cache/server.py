"""The cache servicer: proto ⇄ domain only. Validation errors are raised as domain errors; the shared
``ErrorInterceptor`` turns them into rich statuses."""

from __future__ import annotations

import math
import time
from typing import Any

import grpc

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.cache.keys import Message, Role, Sampling, is_key
from services.cache.metrics import CacheMetrics
from services.cache.namespaces import TENANT_ID
from services.cache.policy import FinishReason
from services.cache.singleflight import Counters, LookupQuery, Outcome, ResponseCache
from services.common.attribution import Attribution, from_metadata
from services.common.errors import InvalidArgument, Validator

_ROLES = {
    common_pb2.ROLE_SYSTEM: Role.SYSTEM,
    common_pb2.ROLE_USER: Role.USER,
    common_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    common_pb2.ROLE_TOOL: Role.TOOL,
}
_FINISH = {
    common_pb2.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
    common_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_OUTCOMES = {
    Outcome.HIT: cache_pb2.LOOKUP_OUTCOME_HIT,
    Outcome.MISS: cache_pb2.LOOKUP_OUTCOME_MISS,
    Outcome.UNCACHEABLE: cache_pb2.LOOKUP_OUTCOME_UNCACHEABLE,
    Outcome.WAIT_TIMEOUT: cache_pb2.LOOKUP_OUTCOME_WAIT_TIMEOUT,
    Outcome.UNAVAILABLE: cache_pb2.LOOKUP_OUTCOME_UNAVAILABLE,
}
MAX_MODEL_LEN = 128
MAX_FEATURE_LEN = 64
MAX_NAME_LEN = 64
MAX_STOP = 8
MAX_STOP_LEN = 64

Context = grpc.aio.ServicerContext[Any, Any]


def _attribution(message: common_pb2.Attribution, context: Context) -> Attribution:
    own = Attribution(tenant=message.tenant, team=message.team, feature=message.feature, end_user=message.end_user)
    return own.merged_with(from_metadata(tuple(context.invocation_metadata() or ())))


def _check_attribution(v: Validator, attribution: Attribution, path: str = "attribution") -> None:
    v.require(bool(attribution.tenant), f"{path}.tenant", "required", "REQUIRED")
    if attribution.tenant:
        v.require(bool(TENANT_ID.match(attribution.tenant)), f"{path}.tenant", "1-64 characters of [A-Za-z0-9._-]")
    v.require(len(attribution.feature) <= MAX_FEATURE_LEN, f"{path}.feature", "at most 64 characters")


def lookup_query(request: cache_pb2.LookupRequest, attribution: Attribution) -> LookupQuery:
    """Validate a LookupRequest and translate it to the domain (raises InvalidArgument listing every bad field).

    On the hit path of every lookup: fields are read once and violation texts built only when a check fails."""
    v = Validator()
    _check_attribution(v, attribution)
    model = request.model.strip()
    if not model:
        v.add("model", "required: the model or tier that would serve the request")
    elif len(model) > MAX_MODEL_LEN:
        v.add("model", "at most 128 characters")
    messages: list[Message] = []
    for i, m in enumerate(request.messages):
        role = _ROLES.get(m.role)
        content = m.content
        name = m.name
        if role is None:
            v.add(f"messages[{i}].role", "must be SYSTEM, USER, ASSISTANT or TOOL")
            continue
        if role is Role.USER and not content.strip():
            v.add(f"messages[{i}].content", "a user message needs content")
        if len(name) > MAX_NAME_LEN:
            v.add(f"messages[{i}].name", "at most 64 characters")
        messages.append(Message(role, content, name))
    if not request.messages:
        v.add("messages", "at least one message is required", "EMPTY_MESSAGES")
    s = request.sampling
    temperature = s.temperature if s.HasField("temperature") else None
    top_p = s.top_p if s.HasField("top_p") else None
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        v.add("sampling.temperature", "must be in [0, 2]")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        v.add("sampling.top_p", "must be in (0, 1]")
    stop = tuple(s.stop)
    if len(stop) > MAX_STOP:
        v.add("sampling.stop", "at most 8 stop sequences")
    if any(len(x) > MAX_STOP_LEN for x in stop):
        v.add("sampling.stop", "each at most 64 characters")
    if v.violations:
        raise InvalidArgument("invalid LookupRequest", violations=v.violations)
    return LookupQuery(
        tenant=attribution.tenant,
        feature=attribution.feature,
        model=model,
        messages=tuple(messages),
        sampling=Sampling(
            max_tokens=s.max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=s.seed if s.HasField("seed") else None,
        ),
        wait_ms=request.wait_ms,
        peek=request.peek,
    )


def _stats_proto(counters: Counters) -> cache_pb2.CacheStats:
    return cache_pb2.CacheStats(
        hits=counters.hits,
        misses=counters.misses,
        coalesced_waits=counters.coalesced_waits,
        uncacheable=counters.uncacheable,
        fills=counters.fills,
        evictions=counters.evictions,
        saved_micros=counters.saved_micros,
        store_errors=counters.store_errors,
    )


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Thin translation layer over :class:`ResponseCache`."""

    def __init__(self, *, cache: ResponseCache, metrics: CacheMetrics | None = None) -> None:
        self._cache = cache
        self._metrics = metrics or CacheMetrics()

    async def Lookup(self, request: cache_pb2.LookupRequest, context: Context) -> cache_pb2.LookupResponse:
        attribution = _attribution(request.attribution, context)
        query = lookup_query(request, attribution)
        result = await self._cache.lookup(query)
        self._metrics.lookup(attribution, query, result)
        response = cache_pb2.LookupResponse(
            outcome=_OUTCOMES[result.outcome], key=result.key, coalesced=result.coalesced
        )
        if result.entry is not None:
            response.response.MergeFromString(result.entry.payload)
        if result.lease is not None:
            response.lease.lease_id = result.lease.lease_id
            response.lease.key = result.lease.key
            response.lease.expires_unix_ms = result.lease.expires_unix_ms
        return response

    async def Fill(self, request: cache_pb2.FillRequest, context: Context) -> cache_pb2.FillResponse:
        attribution = _attribution(request.attribution, context)
        v = Validator()
        _check_attribution(v, attribution)
        v.require(is_key(request.key), "key", "must be the 64-hex-digit key of the lease", "BAD_KEY")
        v.require(bool(request.lease_id), "lease_id", "required: the lease id from Lookup", "REQUIRED")
        if not request.abandon:
            v.require(request.HasField("response"), "response", "required unless abandon is set", "REQUIRED")
            v.require(request.response.cost_micros >= 0, "response.cost_micros", "must not be negative")
        v.raise_if_any("invalid FillRequest")
        if request.abandon:
            result = await self._cache.abandon(
                tenant=attribution.tenant, feature=attribution.feature, key=request.key, lease_id=request.lease_id
            )
        else:
            response = request.response
            if response.created_unix_ms == 0:
                response = cache_pb2.CachedResponse()
                response.CopyFrom(request.response)
                response.created_unix_ms = _now_ms()
            result = await self._cache.fill(
                tenant=attribution.tenant,
                feature=attribution.feature,
                key=request.key,
                lease_id=request.lease_id,
                payload=response.SerializeToString(deterministic=True),
                cost_micros=response.cost_micros,
                finish_reason=_FINISH.get(response.finish_reason, FinishReason.UNSPECIFIED),
            )
        self._metrics.fill(attribution, abandon=request.abandon, result=result)
        return cache_pb2.FillResponse(stored=result.stored, reason=result.reason)

    async def Invalidate(self, request: cache_pb2.InvalidateRequest, context: Context) -> cache_pb2.InvalidateResponse:
        v = Validator()
        v.require(bool(request.tenant), "tenant", "required: invalidation is always within one namespace", "REQUIRED")
        if request.tenant:
            v.require(bool(TENANT_ID.match(request.tenant)), "tenant", "1-64 characters of [A-Za-z0-9._-]")
        v.require(len(request.feature) <= MAX_FEATURE_LEN, "feature", "at most 64 characters")
        if request.key:
            v.require(is_key(request.key), "key", "must be a 64-hex-digit cache key", "BAD_KEY")
        v.raise_if_any("invalid InvalidateRequest")
        removed = await self._cache.invalidate(tenant=request.tenant, feature=request.feature, key=request.key)
        return cache_pb2.InvalidateResponse(removed=removed)

    async def GetStats(self, request: cache_pb2.GetStatsRequest, context: Context) -> cache_pb2.GetStatsResponse:
        if request.tenant:
            v = Validator()
            v.require(bool(TENANT_ID.match(request.tenant)), "tenant", "1-64 characters of [A-Za-z0-9._-]")
            v.raise_if_any("invalid GetStatsRequest")
        report = await self._cache.stats(request.tenant)
        response = cache_pb2.GetStatsResponse(
            total=_stats_proto(report.total), entries=report.entries, bytes=report.bytes
        )
        for (tenant, feature), counters in sorted(report.groups.items()):
            response.groups.add(tenant=tenant, feature=feature, stats=_stats_proto(counters))
        return response


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
