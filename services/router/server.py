"""The router servicer: proto ⇄ domain only. The orchestration lives in ``services/router/pipeline.py``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.common import deadline
from services.common.attribution import Attribution, from_metadata
from services.router.domain import GenerateInput, GenerateResult, JobState, TextDelta
from services.router.limits import TenantLimiter, admission
from services.router.pipeline import Pipeline, validate
from services.router.protoconv import (
    attribution_from_proto,
    cache_mode_from_proto,
    decision_to_proto,
    messages_from_proto,
    result_to_proto,
    sampling_from_proto,
    tier_from_proto,
)

Context = grpc.aio.ServicerContext[Any, Any]

_JOB_STATES: dict[JobState, common_pb2.JobState.ValueType] = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}


def _attribution(msg: common_pb2.Attribution, context: Context) -> Attribution:
    return attribution_from_proto(msg).merged_with(from_metadata(context.invocation_metadata()))


def _input(
    request: router_pb2.GenerateRequest | router_pb2.GenerateStreamRequest | router_pb2.SubmitAsyncRequest,
    context: Context,
) -> GenerateInput:
    deadline.set_remaining(context.time_remaining())
    return GenerateInput(
        request_id=request.request_id,
        attribution=_attribution(request.attribution, context),
        messages=messages_from_proto(request.messages),
        sampling=sampling_from_proto(request.sampling),
        requested_tier=tier_from_proto(request.tier),
        cache_mode=cache_mode_from_proto(request.cache_mode),
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, *, pipeline: Pipeline, limiter: TenantLimiter | None = None) -> None:
        self._pipeline = pipeline
        self._limiter = limiter

    def _admit(self, tenant: str) -> contextlib.AbstractContextManager[None]:
        return admission(self._limiter, tenant)

    async def Generate(self, request: router_pb2.GenerateRequest, context: Context) -> router_pb2.GenerateResponse:
        inp = _input(request, context)
        with self._admit(inp.attribution.tenant):
            result = await self._pipeline.generate(inp)
        return router_pb2.GenerateResponse(result=result_to_proto(result))

    async def GenerateStream(
        self, request: router_pb2.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        inp = _input(request, context)
        with self._admit(inp.attribution.tenant):
            # aclosing: a caller that goes away closes the pipeline's stream now (it stops the worker and bills what
            # was generated), not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self._pipeline.run(inp)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield router_pb2.GenerateStreamResponse(text=event.text)
                    elif isinstance(event, GenerateResult):
                        yield router_pb2.GenerateStreamResponse(result=result_to_proto(event))

    async def Classify(self, request: router_pb2.ClassifyRequest, context: Context) -> router_pb2.ClassifyResponse:
        inp = GenerateInput(
            request_id="classify",
            attribution=_attribution(request.attribution, context),
            messages=messages_from_proto(request.messages),
            sampling=sampling_from_proto(request.sampling),
        )
        with self._admit(inp.attribution.tenant):
            validate(inp, self._pipeline.limits)
            decision = self._pipeline.decide(inp)
        return router_pb2.ClassifyResponse(decision=decision_to_proto(decision))

    async def SubmitAsync(
        self, request: router_pb2.SubmitAsyncRequest, context: Context
    ) -> router_pb2.SubmitAsyncResponse:
        inp = _input(request, context)
        with self._admit(inp.attribution.tenant):
            sub = await self._pipeline.submit(inp)
        reply = router_pb2.SubmitAsyncResponse(
            job_id=sub.job_id, state=_JOB_STATES[sub.state], route=decision_to_proto(sub.decision)
        )
        if sub.result is not None:
            reply.result.CopyFrom(result_to_proto(sub.result))
        return reply

    async def GetAsyncResult(
        self, request: router_pb2.GetAsyncResultRequest, context: Context
    ) -> router_pb2.GetAsyncResultResponse:
        deadline.set_remaining(context.time_remaining())
        status = await self._pipeline.status(request.job_id, _attribution(request.attribution, context))
        reply = router_pb2.GetAsyncResultResponse(job_id=status.job_id, state=_JOB_STATES[status.state])
        if status.result is not None:
            reply.result.CopyFrom(result_to_proto(status.result))
        reply.error = status.error
        return reply
