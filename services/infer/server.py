"""``InferenceService`` servicer: proto ⇄ domain only. Errors are domain exceptions mapped by the shared interceptor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog

from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.attribution import Attribution, from_metadata
from services.common.errors import FieldViolation, InvalidArgument, Validator
from services.common.pricing import TokenUsage
from services.common.spans import current_traceparent
from services.infer.domain import (
    Finished,
    FinishReason,
    GenerationRequest,
    GenerationSummary,
    Message,
    QueueClass,
    Sampling,
)
from services.infer.jobs.runner import JobRunner, decode_result
from services.infer.jobs.store import Job, JobState
from services.infer.metrics import annotate_submission
from services.infer.service import InferenceService

log = structlog.get_logger("costmesh.infer")

MAX_METADATA_BYTES = 4096

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
_TIERS = {common_pb2.TIER_CHEAP: "cheap", common_pb2.TIER_FULL: "full"}
_TIER_TO_PROTO = {v: k for k, v in _TIERS.items()}
_FINISH = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_JOB_STATE = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}


_JOB_STATE_FROM_PROTO = {v: k for k, v in _JOB_STATE.items()}
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _messages(msgs: Any) -> tuple[Message, ...]:
    # An unspecified or unknown role maps to "" so validation names the message index.
    return tuple(Message(role=_ROLES.get(m.role, ""), content=m.content, name=m.name) for m in msgs)


def _sampling(s: common_pb2.SamplingParams, *, ignore_eos: bool = False) -> Sampling:
    return Sampling(
        max_tokens=s.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=ignore_eos,
    )


def _attribution(a: common_pb2.Attribution, context: Any) -> Attribution:
    own = Attribution(tenant=a.tenant, team=a.team, feature=a.feature, end_user=a.end_user)
    return own.merged_with(from_metadata(context.invocation_metadata()))


def _tier(value: int) -> str:
    if value == common_pb2.TIER_UNSPECIFIED:
        return ""
    name = _TIERS.get(common_pb2.Tier.ValueType(value))
    return name if name is not None else f"unknown({value})"


def summary_to_proto(s: GenerationSummary) -> infer_pb2.GenerationSummary:
    return infer_pb2.GenerationSummary(
        usage=usage_to_proto(s.usage),
        finish_reason=_FINISH[s.finish_reason],
        time_to_first_token_ms=s.time_to_first_token_ms,
        latency_ms=s.latency_ms,
        model=s.model,
        tier=_TIER_TO_PROTO.get(s.tier, common_pb2.TIER_UNSPECIFIED),
    )


def usage_to_proto(u: TokenUsage) -> common_pb2.Usage:
    return common_pb2.Usage(
        input_tokens=u.input_tokens, output_tokens=u.output_tokens, cached_input_tokens=u.cached_input_tokens
    )


async def _watch_for_stop(requests: AsyncIterator[infer_pb2.GenerateRequest], stop: asyncio.Event) -> None:
    """Set ``stop`` when a message with ``stop`` arrives. A half-close without one changes nothing; messages without
    ``stop`` are ignored; a request stream that breaks (a later message refused) stops the generation too."""
    try:
        async for message in requests:
            if message.stop:
                stop.set()
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # any broken request stream ends the generation (its tokens are still counted)
        log.info("generate_request_stream_broken", exc_info=True)
        stop.set()


class InferenceServicer(infer_pb2_grpc.InferenceServiceServicer):
    def __init__(self, *, service: InferenceService, jobs: JobRunner) -> None:
        self._service = service
        self._jobs = jobs

    async def Generate(
        self, request_iterator: AsyncIterator[infer_pb2.GenerateRequest], context: Any
    ) -> AsyncIterator[infer_pb2.GenerateResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.stop:
            raise InvalidArgument(
                "the first GenerateRequest must carry the request",
                violations=[
                    FieldViolation("stop", "only a later message may stop the generation")
                    if first is not None
                    else FieldViolation("request_id", "no request was sent", "EMPTY")
                ],
            )
        req = GenerationRequest(
            request_id=first.request_id,
            messages=_messages(first.messages),
            prompt=first.prompt,
            sampling=_sampling(first.sampling, ignore_eos=first.ignore_eos),
            queue_class=QueueClass.ASYNC
            if first.queue_class == common_pb2.QUEUE_CLASS_ASYNC
            else QueueClass.INTERACTIVE,
            attribution=_attribution(first.attribution, context),
            tier=_tier(first.tier),
        )
        # A later message with `stop` ends the generation with its summary; the domain does the stopping.
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_for_stop(requests, stop), name="generate-stop-watch")
        try:
            # A cancelled call or a passed deadline cancels this handler; closing the stream aborts the engine request.
            stream = self._service.generate(req, stop=stop)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    if isinstance(event, Finished):
                        yield infer_pb2.GenerateResponse(
                            text=event.text, token_count=event.token_count, summary=summary_to_proto(event.summary)
                        )
                    else:
                        yield infer_pb2.GenerateResponse(text=event.text, token_count=event.token_count)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def SubmitJob(self, request: infer_pb2.SubmitJobRequest, context: Any) -> infer_pb2.SubmitJobResponse:
        v = Validator()
        v.require(
            len(request.metadata.encode()) <= MAX_METADATA_BYTES, "metadata", f"at most {MAX_METADATA_BYTES} bytes"
        )
        v.raise_if_any("invalid SubmitJobRequest")
        req = GenerationRequest(
            request_id=request.request_id,
            messages=_messages(request.messages),
            prompt=request.prompt,
            sampling=_sampling(request.sampling),
            queue_class=QueueClass.ASYNC,
            attribution=_attribution(request.attribution, context),
            trace_context=current_traceparent(),
        )
        result = await self._jobs.submit(req, metadata=request.metadata)
        annotate_submission(req, result.job.job_id)
        return infer_pb2.SubmitJobResponse(
            job_id=result.job.job_id,
            state=_JOB_STATE[result.job.state],
            replayed=result.replayed,
            metadata=result.job.metadata,
        )

    async def GetJob(self, request: infer_pb2.GetJobRequest, context: Any) -> infer_pb2.GetJobResponse:
        v = Validator()
        if not request.job_id:
            v.require(bool(request.request_id), "job_id", "required (or request_id with tenant)")
            v.require(bool(request.tenant) or not request.request_id, "tenant", "required with request_id")
        v.raise_if_any("invalid GetJobRequest")
        job = await self._jobs.find(job_id=request.job_id, tenant=request.tenant, request_id=request.request_id)
        return infer_pb2.GetJobResponse(job=job_to_proto(job))

    async def ListJobs(self, request: infer_pb2.ListJobsRequest, context: Any) -> infer_pb2.ListJobsResponse:
        v = Validator()
        v.require(request.page_size <= MAX_PAGE_SIZE, "page_size", f"at most {MAX_PAGE_SIZE}")
        states: set[JobState] = set()
        for i, value in enumerate(request.states):
            state = _JOB_STATE_FROM_PROTO.get(value)
            if state is None:
                v.add(f"states[{i}]", "not a job state")
            else:
                states.add(state)
        v.raise_if_any("invalid ListJobsRequest")
        page = await self._jobs.list_jobs(
            unsettled_only=request.unsettled_only,
            states=frozenset(states),
            limit=request.page_size or DEFAULT_PAGE_SIZE,
            page_token=request.page_token,
        )
        return infer_pb2.ListJobsResponse(
            jobs=[job_to_proto(job) for job in page.jobs], next_page_token=page.next_page_token
        )

    async def MarkJobSettled(
        self, request: infer_pb2.MarkJobSettledRequest, context: Any
    ) -> infer_pb2.MarkJobSettledResponse:
        v = Validator()
        v.require(bool(request.job_id), "job_id", "required")
        v.raise_if_any("invalid MarkJobSettledRequest")
        replayed = await self._jobs.mark_settled(request.job_id, request.tenant)
        return infer_pb2.MarkJobSettledResponse(replayed=replayed)

    async def ListModels(self, request: infer_pb2.ListModelsRequest, context: Any) -> infer_pb2.ListModelsResponse:
        card = self._service.model_card()
        return infer_pb2.ListModelsResponse(
            models=[
                infer_pb2.ModelInfo(
                    name=card.name,
                    tier=_TIER_TO_PROTO.get(card.tier, common_pb2.TIER_UNSPECIFIED),
                    price=common_pb2.Price(
                        input_micros_per_mtok=card.input_micros_per_mtok,
                        output_micros_per_mtok=card.output_micros_per_mtok,
                        cached_input_micros_per_mtok=card.cached_input_micros_per_mtok,
                    ),
                    max_model_len=card.max_model_len,
                    max_num_seqs=card.max_num_seqs,
                    interactive_capacity=card.interactive_capacity,
                    async_queue_capacity=card.async_queue_capacity,
                    interactive_reserve=card.interactive_reserve,
                    prefix_caching=card.prefix_caching,
                )
            ]
        )


def job_to_proto(job: Job) -> infer_pb2.Job:
    reply = infer_pb2.Job(
        job_id=job.job_id,
        state=_JOB_STATE[job.state],
        error=job.error,
        attempts=job.attempts,
        created_unix_ms=job.created_unix_ms,
        finished_unix_ms=job.finished_unix_ms,
        metadata=job.metadata,
        request_id=job.request_id,
        tenant=job.tenant,
        settled=job.settled,
    )
    if job.state is JobState.SUCCEEDED and job.result:
        text, summary = decode_result(job.result)
        reply.text = text
        reply.summary.CopyFrom(summary_to_proto(summary))
    return reply
