"""The router's ports over gRPC: cache, budget and infer clients built on the generated stubs.

Each adapter translates domain values to protos and failed calls back to domain errors
(:func:`services.common.remote.error_from_rpc`), and gives every call a deadline no later than the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common import deadline
from services.common.attribution import Attribution
from services.common.errors import CostmeshError, NotFound, Unavailable
from services.common.pricing import TokenUsage
from services.common.remote import error_from_rpc
from services.router.classifier.types import Message, Tier
from services.router.domain import (
    CachedAnswer,
    CacheLookup,
    FinishReason,
    InferChunk,
    JobState,
    JobStatus,
    JobSubmission,
    LookupOutcome,
    Reservation,
    Sampling,
)
from services.router.protoconv import (
    attribution_to_proto,
    finish_from_proto,
    finish_to_proto,
    messages_to_proto,
    sampling_to_proto,
    tier_from_proto,
    tier_to_proto,
    usage_from_proto,
    usage_to_proto,
)
from services.router.savings import SavingsRecord

_OUTCOMES = {
    cache_pb2.LOOKUP_OUTCOME_HIT: LookupOutcome.HIT,
    cache_pb2.LOOKUP_OUTCOME_MISS: LookupOutcome.MISS,
    cache_pb2.LOOKUP_OUTCOME_UNCACHEABLE: LookupOutcome.UNCACHEABLE,
    cache_pb2.LOOKUP_OUTCOME_WAIT_TIMEOUT: LookupOutcome.WAIT_TIMEOUT,
    cache_pb2.LOOKUP_OUTCOME_UNAVAILABLE: LookupOutcome.UNAVAILABLE,
}


class GrpcCache:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float, wait_ms: int) -> None:
        self._stub = cache_pb2_grpc.CacheServiceStub(channel)
        self._timeout_s = timeout_s
        self._wait_ms = wait_ms

    async def lookup(
        self, *, attribution: Attribution, model: str, messages: Sequence[Message], sampling: Sampling, peek: bool
    ) -> CacheLookup:
        request = cache_pb2.LookupRequest(
            attribution=attribution_to_proto(attribution),
            model=model,
            messages=messages_to_proto(messages),
            sampling=sampling_to_proto(sampling),
            wait_ms=self._wait_ms,
            peek=peek,
        )
        try:
            reply = await self._stub.Lookup(request, timeout=deadline.timeout(self._timeout_s + self._wait_ms / 1000))
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, peer="cache") from err
        outcome = _OUTCOMES.get(reply.outcome, LookupOutcome.UNAVAILABLE)
        answer = None
        if outcome is LookupOutcome.HIT:
            r = reply.response
            answer = CachedAnswer(
                text=r.text,
                usage=usage_from_proto(r.usage),
                cost_micros=r.cost_micros,
                model=r.model,
                tier=tier_from_proto(r.tier) or Tier.FULL,
                finish_reason=finish_from_proto(r.finish_reason),
            )
        return CacheLookup(
            outcome=outcome, key=reply.key, lease_id=reply.lease.lease_id, answer=answer, coalesced=reply.coalesced
        )

    async def fill(self, *, attribution: Attribution, key: str, lease_id: str, answer: CachedAnswer) -> None:
        response = cache_pb2.CachedResponse(
            text=answer.text,
            usage=usage_to_proto(answer.usage),
            cost_micros=answer.cost_micros,
            model=answer.model,
            tier=tier_to_proto(answer.tier),
            finish_reason=finish_to_proto(answer.finish_reason),
        )
        request = cache_pb2.FillRequest(
            attribution=attribution_to_proto(attribution), key=key, lease_id=lease_id, response=response
        )
        try:
            await self._stub.Fill(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, peer="cache") from err

    async def abandon(self, *, attribution: Attribution, key: str, lease_id: str) -> None:
        request = cache_pb2.FillRequest(
            attribution=attribution_to_proto(attribution), key=key, lease_id=lease_id, abandon=True
        )
        try:
            await self._stub.Fill(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, peer="cache") from err


#: Attempts of one Reserve that timed out (the call is idempotent, so a retry cannot reserve twice).
RESERVE_ATTEMPTS = 3


class GrpcBudget:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float, ttl_s: int) -> None:
        self._stub = budget_pb2_grpc.BudgetServiceStub(channel)
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s

    async def reserve(
        self,
        *,
        request_id: str,
        attribution: Attribution,
        estimated_cost_micros: int,
        estimated_tokens: int,
        model: str,
        tier: Tier,
        ttl_s: int = 0,
    ) -> Reservation:
        request = budget_pb2.ReserveRequest(
            request_id=request_id,
            attribution=attribution_to_proto(attribution),
            estimated_cost_micros=estimated_cost_micros,
            estimated_tokens=estimated_tokens,
            ttl_seconds=ttl_s or self._ttl_s,
            model=model,
            tier=tier_to_proto(tier),
        )
        for attempt in range(1, RESERVE_ATTEMPTS + 1):
            timeout = deadline.timeout(self._timeout_s)
            try:
                reply = await self._stub.Reserve(request, timeout=timeout)
                break
            except grpc.aio.AioRpcError as err:
                # Reserve is idempotent on request_id: after a timeout (a starved budget may still have reserved), a
                # retry returns that reservation instead of leaving it held until its TTL — while the caller has time.
                ours = err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout >= self._timeout_s
                if ours and attempt == RESERVE_ATTEMPTS:
                    # Our own deadline on the budget, not the caller's: the budget is unavailable (fail closed,
                    # retryable), and DEADLINE_EXCEEDED stays reserved for a caller whose own time ran out.
                    raise Unavailable(
                        f"budget: no answer in {RESERVE_ATTEMPTS} attempts of {self._timeout_s:g} s",
                        reason="BUDGET_TIMEOUT",
                        retry_after_s=1.0,
                    ) from err
                if not ours:
                    raise error_from_rpc(err, peer="budget") from err
        return Reservation(
            reservation_id=reply.reservation_id,
            soft_limit_exceeded=reply.soft_limit_exceeded,
            max_tokens_cap=reply.max_tokens_cap,
            remaining_micros=reply.remaining_micros if reply.HasField("remaining_micros") else None,
            expires_ms=reply.expires_unix_ms,
            settled=reply.replayed and reply.state == budget_pb2.RESERVATION_STATE_COMMITTED,
        )

    async def renew(self, *, reservation_id: str, tenant: str, ttl_s: int) -> int:
        request = budget_pb2.RenewReservationRequest(reservation_id=reservation_id, tenant=tenant, ttl_seconds=ttl_s)
        try:
            reply = await self._stub.RenewReservation(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._settle_error(err) from err
        return reply.expires_unix_ms

    def _settle_error(self, err: grpc.aio.AioRpcError) -> CostmeshError:
        """The domain error of a failed settlement call. These calls run on the client's own deadline, never the
        caller's: its running out is the budget being unavailable (retried by the outbox), not the caller's time."""
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable(
                f"budget: no answer in {self._timeout_s:g} s", reason="BUDGET_TIMEOUT", retry_after_s=1.0
            )
        return error_from_rpc(err, peer="budget")

    async def commit(
        self,
        *,
        reservation_id: str,
        tenant: str,
        cost_micros: int,
        usage: TokenUsage,
        model: str,
        tier: Tier,
        saved_micros: int,
    ) -> int | None:
        request = budget_pb2.CommitRequest(
            reservation_id=reservation_id,
            tenant=tenant,
            actual_cost_micros=cost_micros,
            usage=usage_to_proto(usage),
            model=model,
            tier=tier_to_proto(tier),
            saved_micros=saved_micros,
        )
        try:
            # Settlement outlives the caller's deadline: the money was spent either way.
            reply = await self._stub.Commit(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._settle_error(err) from err
        return reply.remaining_micros if reply.HasField("remaining_micros") else None

    async def release(self, *, reservation_id: str, tenant: str) -> None:
        request = budget_pb2.ReleaseRequest(reservation_id=reservation_id, tenant=tenant)
        try:
            await self._stub.Release(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._settle_error(err) from err

    async def record_savings(self, tenant: str, records: Sequence[SavingsRecord]) -> None:
        request = budget_pb2.RecordSavingsBatchRequest(
            tenant=tenant,
            records=[
                budget_pb2.RecordSavingsRequest(
                    request_id=r.request_id,
                    attribution=attribution_to_proto(r.attribution),
                    saved_micros=r.saved_micros,
                    reason=budget_pb2.SAVINGS_REASON_CACHE_HIT,
                    model=r.model,
                    tier=tier_to_proto(r.tier),
                    usage=usage_to_proto(r.usage),
                )
                for r in records
            ],
        )
        try:
            await self._stub.RecordSavingsBatch(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._settle_error(err) from err


class GrpcGeneration:
    """One generation on a worker, over the bidirectional ``Generate`` stream.

    A pump task reads the stream into a queue, so a consumer cancelled while it waits for the next chunk cancels
    nothing on the wire (grpc.aio cancels a call whose pending read is cancelled, and the worker's count of what it
    generated would be lost with it). :meth:`stop` writes the stop message and waits for the summary the worker then
    sends; :meth:`close` cancels the call outright.
    """

    def __init__(
        self,
        stub: infer_pb2_grpc.InferenceServiceAsyncStub,
        request: infer_pb2.GenerateRequest,
        *,
        timeout_s: float,
        peer: str,
    ) -> None:
        self._peer = peer
        self._call = stub.Generate(timeout=timeout_s)
        self._queue: asyncio.Queue[InferChunk | CostmeshError | None] = asyncio.Queue()
        self._final: InferChunk | None = None
        self._sent = asyncio.Event()
        self.output_tokens = 0
        self._pump = asyncio.ensure_future(self._run(request))

    async def _run(self, request: infer_pb2.GenerateRequest) -> None:
        try:
            await self._call.write(request)
            self._sent.set()
            while True:
                msg = await self._call.read()
                if not isinstance(msg, infer_pb2.GenerateResponse):  # EOF: ended without a summary
                    break
                self.output_tokens += msg.token_count
                if msg.HasField("summary"):
                    s = msg.summary
                    self._final = InferChunk(
                        text=msg.text,
                        usage=usage_from_proto(s.usage),
                        finish_reason=finish_from_proto(s.finish_reason),
                        model=s.model,
                        ttft_ms=s.time_to_first_token_ms,
                    )
                    self._queue.put_nowait(self._final)
                    break
                self._queue.put_nowait(InferChunk(text=msg.text))
            self._queue.put_nowait(None)
        except grpc.aio.AioRpcError as err:
            self._queue.put_nowait(error_from_rpc(err, peer=self._peer))
        except asyncio.CancelledError:
            self._queue.put_nowait(Unavailable(f"{self._peer}: generation cancelled", reason="GENERATION_CANCELLED"))
            raise
        finally:
            # Half-close on every path: with client interceptors, grpc.aio feeds the written messages to the call from
            # a queue consumed by a task of its own, which waits for ever unless the writing side is closed (it was
            # destroyed pending, with its request iterator, once the call was collected).
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                await self._call.done_writing()

    async def __aiter__(self) -> AsyncIterator[InferChunk]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, CostmeshError):
                raise item
            yield item

    async def stop(self, timeout_s: float) -> InferChunk | None:
        try:
            if not self._pump.done():
                # The stop rides the same HTTP/2 stream, so it reaches the very worker that is generating.
                await asyncio.wait_for(self._sent.wait(), timeout_s)
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    await self._call.write(infer_pb2.GenerateRequest(stop=True))
                await asyncio.wait({self._pump}, timeout=timeout_s)
        except TimeoutError:
            pass
        finally:
            self.close()
        return self._final

    def close(self) -> None:
        self._call.cancel()  # no-op once finished
        if not self._pump.done():
            self._pump.cancel()


class GrpcInfer:
    """One channel per tier (each may balance over many workers)."""

    def __init__(
        self,
        channels: dict[Tier, grpc.aio.Channel],
        *,
        timeout_s: float,
        job_timeout_s: float = 10.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        self._stubs = {tier: infer_pb2_grpc.InferenceServiceStub(ch) for tier, ch in channels.items()}
        self._timeout_s = timeout_s
        self._job_timeout_s = job_timeout_s
        self._stop_grace_s = stop_grace_s

    def _stub(self, tier: Tier) -> infer_pb2_grpc.InferenceServiceAsyncStub:
        stub = self._stubs.get(tier)
        if stub is None:
            raise Unavailable(f"no workers configured for tier {tier.label}", reason="TIER_NOT_CONFIGURED")
        return stub

    def generate(
        self, *, tier: Tier, request_id: str, messages: Sequence[Message], sampling: Sampling, attribution: Attribution
    ) -> GrpcGeneration:
        request = infer_pb2.GenerateRequest(
            request_id=request_id,
            tier=tier_to_proto(tier),
            messages=messages_to_proto(messages),
            sampling=sampling_to_proto(sampling),
            attribution=attribution_to_proto(attribution),
        )
        # The caller's deadline plus a grace: when the caller's time runs out, the router still stops the worker and
        # reads the summary of what it generated.
        timeout = deadline.timeout(self._timeout_s, grace_s=self._stop_grace_s)
        return GrpcGeneration(self._stub(tier), request, timeout_s=timeout, peer=f"infer-{tier.label}")

    async def submit_job(
        self,
        *,
        tier: Tier,
        request_id: str,
        messages: Sequence[Message],
        sampling: Sampling,
        attribution: Attribution,
        metadata: str,
    ) -> JobSubmission:
        stub = self._stub(tier)
        request = infer_pb2.SubmitJobRequest(
            request_id=request_id,
            messages=messages_to_proto(messages),
            sampling=sampling_to_proto(sampling),
            attribution=attribution_to_proto(attribution),
            metadata=metadata,
        )
        timeout = deadline.timeout(self._job_timeout_s)
        try:
            reply = await stub.SubmitJob(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise self._job_error(err, tier, timeout) from err
        return JobSubmission(job_id=reply.job_id, replayed=reply.replayed, metadata=reply.metadata)

    async def get_job(self, *, tier: Tier, job_id: str, tenant: str) -> JobStatus:
        return await self._get_job(tier, infer_pb2.GetJobRequest(job_id=job_id, tenant=tenant))

    async def find_job(self, *, tier: Tier, tenant: str, request_id: str) -> JobStatus | None:
        try:
            return await self._get_job(tier, infer_pb2.GetJobRequest(tenant=tenant, request_id=request_id))
        except NotFound:
            return None

    async def _get_job(self, tier: Tier, request: infer_pb2.GetJobRequest) -> JobStatus:
        stub = self._stub(tier)
        timeout = deadline.timeout(self._job_timeout_s)
        try:
            reply = await stub.GetJob(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise self._job_error(err, tier, timeout) from err
        return _job_status(reply.job)

    def _job_error(self, err: grpc.aio.AioRpcError, tier: Tier, timeout: float) -> CostmeshError:
        """The domain error of a failed job call. Our own deadline on the worker passing is the worker being
        unavailable (retryable); DEADLINE_EXCEEDED stays the answer for a caller whose own time ran out."""
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout >= self._job_timeout_s:
            return Unavailable(
                f"infer-{tier.label}: no answer in {self._job_timeout_s:g} s",
                reason="WORKER_TIMEOUT",
                retry_after_s=1.0,
            )
        return error_from_rpc(err, peer=f"infer-{tier.label}")

    async def list_unsettled(self, *, tier: Tier, page_token: str) -> tuple[list[JobStatus], str]:
        stub = self._stub(tier)
        request = infer_pb2.ListJobsRequest(unsettled_only=True, page_size=100, page_token=page_token)
        try:
            reply = await stub.ListJobs(request, timeout=self._job_timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._job_error(err, tier, self._job_timeout_s) from err
        return [_job_status(j) for j in reply.jobs], reply.next_page_token

    async def mark_settled(self, *, tier: Tier, job_id: str) -> None:
        stub = self._stub(tier)
        try:
            await stub.MarkJobSettled(infer_pb2.MarkJobSettledRequest(job_id=job_id), timeout=self._job_timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._job_error(err, tier, self._job_timeout_s) from err


_JOB_STATES = {s.value: s for s in JobState}


def _job_status(job: infer_pb2.Job) -> JobStatus:
    summary = job.summary if job.HasField("summary") else None
    return JobStatus(
        job_id=job.job_id,
        state=_JOB_STATES.get(job.state, JobState.QUEUED),
        text=job.text,
        usage=usage_from_proto(summary.usage) if summary is not None else None,
        finish_reason=finish_from_proto(summary.finish_reason) if summary is not None else FinishReason.UNSPECIFIED,
        model=summary.model if summary is not None else "",
        error=job.error,
        metadata=job.metadata,
        ttft_ms=summary.time_to_first_token_ms if summary is not None else 0.0,
        request_id=job.request_id,
        tenant=job.tenant,
        settled=job.settled,
    )
