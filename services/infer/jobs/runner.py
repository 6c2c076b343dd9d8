"""The worker side of durable jobs: take a job only when the engine has async room, run it, store the result.

Loop: wait for an async slot (the admission controller's rule: room beyond the interactive reserve) → claim a job
from the store → run it through the same ``InferenceService.generate`` path as a streamed request, renewing the lease
meanwhile → ``complete`` with the claim's token. A completion refused by the store (another worker took the job over
after this one's lease ran out) is dropped: only one completion of a job ever counts.

On a dead engine the job is released for another worker at once; on shutdown running jobs are stopped in the engine
and released.

Time bounds (every claim, first or a takeover after a worker died): a job claimed more than ``max_wait_s`` after its
submission fails as expired instead of running, and a run is stopped ``max_run_s`` after it started — it then
succeeds with the text and usage generated so far (finish reason ABORT), so those tokens are billed. A job therefore
ends at most ``max_wait_s + max_run_s`` after its submission once a worker has claimed it (plus the lease, when its
worker dies at the very end).

Stopping a run (lease lost, shutdown, run limit) goes through the generation's stop signal, not a cancellation, so
the tokens it generated are counted in the worker's stats like any others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

import structlog

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from services.infer.domain import GenerationRequest, GenerationSummary, QueueClass
from services.infer.jobs.store import (
    BadPageToken,
    Claim,
    Job,
    JobPage,
    JobSpec,
    JobState,
    JobStore,
    QueueFull,
    Settle,
    SubmitResult,
    now_ms,
)
from services.infer.metrics import job_span
from services.infer.scheduler import Slot
from services.infer.service import InferenceService

log = structlog.get_logger("costmesh.infer.jobs")


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    worker_id: str
    max_attempts: int = 3
    poll_s: float = 0.5
    queue_capacity: int = 1000
    max_wait_s: float = 3600.0
    max_run_s: float = 600.0
    #: How long a stopped run may take to hand back its summary before it is cancelled outright.
    stop_grace_s: float = 5.0


def encode_result(text: str, summary: GenerationSummary) -> str:
    return json.dumps({"text": text, "summary": summary.to_dict()}, separators=(",", ":"))


def decode_result(raw: str) -> tuple[str, GenerationSummary]:
    data = json.loads(raw)
    return str(data["text"]), GenerationSummary.from_dict(data["summary"])


class JobRunner:
    def __init__(self, *, store: JobStore, service: InferenceService, settings: RunnerSettings) -> None:
        self._store = store
        self._service = service
        self._settings = settings
        self._stats = service.stats
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._jobs: dict[str, asyncio.Task[None]] = {}

    @property
    def store(self) -> JobStore:
        return self._store

    # --- submission side (SubmitJob / GetJob) ---

    async def submit(self, request: GenerationRequest, metadata: str = "") -> SubmitResult:
        """Validate the request fully (tokens included) and persist it; idempotent on (tenant, request_id)."""
        self._service.ensure_alive()
        await self._service.prepare(request)
        spec = JobSpec(
            request_id=request.request_id,
            tenant=request.attribution.tenant,
            payload=request.to_json(),
            metadata=metadata,
        )
        try:
            result = await self._store.submit(spec, capacity=self._settings.queue_capacity)
        except QueueFull as full:
            self._stats.classes[QueueClass.ASYNC].rejected_total += 1
            self._stats.jobs_queued = full.depth
            raise ResourceExhausted(
                f"async job queue is full ({full.depth} queued)",
                violations=[
                    QuotaViolation("queue:async", f"at most {self._settings.queue_capacity} jobs may be queued")
                ],
                retry_after_s=self._service.admission.retry_after_s(QueueClass.ASYNC, depth=full.depth),
                reason="QUEUE_FULL",
            ) from None
        if not result.replayed:
            self._stats.jobs_queued += 1
            self._wake.set()
        return result

    async def get(self, job_id: str) -> Job | None:
        return await self._store.get(job_id)

    async def find(self, *, job_id: str, tenant: str, request_id: str) -> Job:
        """A job by id (``tenant`` checked when given) or by (tenant, request_id); NOT_FOUND for another tenant's."""
        if job_id:
            job = await self._store.get(job_id)
            if job is None or (tenant and tenant != job.tenant):
                raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
            return job
        job = await self._store.get_by_request(tenant, request_id)
        if job is None:
            raise NotFound(f"no job for request_id {request_id!r}", reason="JOB_NOT_FOUND")
        return job

    async def mark_settled(self, job_id: str, tenant: str) -> bool:
        """Record that a finished job's reservation was settled; True when it already was (idempotent)."""
        job = await self._store.get(job_id)
        if job is None or (tenant and tenant != job.tenant):
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
        outcome = await self._store.mark_settled(job_id)
        if outcome is Settle.NOT_FOUND:  # expired in between
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
        if outcome is Settle.NOT_FINISHED:
            raise FailedPrecondition(
                f"job {job_id!r} is not finished; only a finished job can be settled", reason="JOB_NOT_FINISHED"
            )
        return outcome is Settle.REPLAYED

    async def list_jobs(
        self, *, unsettled_only: bool, states: frozenset[JobState], limit: int, page_token: str
    ) -> JobPage:
        try:
            return await self._store.list_jobs(
                unsettled_only=unsettled_only, states=states, limit=limit, page_token=page_token
            )
        except BadPageToken:
            raise InvalidArgument(
                "bad page_token",
                violations=[FieldViolation("page_token", "not a token from a previous ListJobs response")],
            ) from None

    # --- worker side ---

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="job-runner")

    async def _loop(self) -> None:
        s = self._settings
        while not self._stopping:
            slot: Slot | None = None
            if self._service.engine_dead:  # claim nothing this worker cannot run; others will take the jobs
                await asyncio.sleep(s.poll_s)
                continue
            try:
                # Wait (unbounded, first come first served) until the engine has async room, then look for a job.
                slot = await self._service.admission.acquire(QueueClass.ASYNC, bounded=False)
                claim = await self._store.claim(s.worker_id, max_attempts=s.max_attempts)
                self._stats.jobs_queued = await self._store.queued()
                if claim is not None:
                    self._launch(claim, slot)
                    slot = None
                    continue  # look for more work at once
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job_loop_failed")
            finally:
                if slot is not None:
                    slot.release()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=s.poll_s)

    def _launch(self, claim: Claim, slot: Slot) -> None:
        task = asyncio.create_task(self._execute_traced(claim, slot), name=f"job-{claim.job_id}")
        self._jobs[claim.job_id] = task
        self._stats.jobs_running = len(self._jobs)
        task.add_done_callback(lambda _t: self._forget(claim.job_id))

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._stats.jobs_running = len(self._jobs)
        self._wake.set()  # a slot was freed

    async def _keep_lease(self, claim: Claim, lost: asyncio.Event) -> None:
        interval = max(0.05, self._store.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            if not await self._store.renew(claim):
                lost.set()
                return

    async def _execute_traced(self, claim: Claim, slot: Slot) -> None:
        with job_span(claim.job):  # linked to the span of the SubmitJob call (services/infer/metrics.py)
            await self._execute(claim, slot)

    async def _execute(self, claim: Claim, slot: Slot) -> None:
        job = claim.job
        s = self._settings
        if claim.reclaimed:
            self._stats.jobs_reclaimed_total += 1
        log.info("job_started", job_id=job.job_id, attempt=job.attempts, reclaimed=claim.reclaimed)
        waited_s = (now_ms() - job.created_unix_ms) / 1000
        if waited_s > s.max_wait_s:  # every claim: a takeover long after the submission does not run either
            slot.release()
            await self._fail(
                claim,
                f"expired: not started within {s.max_wait_s:g}s of its submission "
                f"(claimed after {waited_s:.0f}s, attempt {job.attempts})",
            )
            return
        lost = asyncio.Event()
        stop = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(claim, lost))
        run: asyncio.Task[tuple[str, GenerationSummary]] | None = None
        try:
            request = GenerationRequest.from_json(job.payload)
            run = asyncio.create_task(self._service.complete(request, slot=slot, stop=stop))
            lost_wait = asyncio.create_task(lost.wait())
            try:
                done, _ = await asyncio.wait({run, lost_wait}, timeout=s.max_run_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost_wait.cancel()
            if run not in done:
                # Another worker owns the job now, or it ran past max_run_s: stop spending the engine on it.
                await self._stop_run(run, stop)
                if lost.is_set():
                    self._stats.jobs_fenced_total += 1
                    log.warning("job_lease_lost", job_id=job.job_id)
                    return
                log.warning("job_run_limit", job_id=job.job_id, max_run_s=s.max_run_s)
                if run.cancelled():
                    await self._fail(claim, f"ran past the run limit ({s.max_run_s:g}s) and did not stop")
                    return
            text, summary = run.result()  # stopped at the run limit: the text and usage so far, finish reason ABORT
        except asyncio.CancelledError:
            # Shutdown: stop the engine request (its tokens counted), then hand the job back for another worker.
            if run is not None:
                await asyncio.shield(self._stop_run(run, stop))
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release(claim))
            raise
        except Unavailable:
            log.warning("job_released_engine_unavailable", job_id=job.job_id)
            await self._store.release(claim)
            return
        except InvalidArgument as err:
            await self._fail(claim, f"invalid request: {err.message}")
            return
        except Exception:
            log.exception("job_failed", job_id=job.job_id)
            await self._fail(claim, "internal error while running the job")
            return
        finally:
            slot.release()
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if await self._store.complete(claim, encode_result(text, summary)):
            self._stats.jobs_succeeded_total += 1
            log.info(
                "job_succeeded", job_id=job.job_id, attempt=job.attempts, output_tokens=summary.usage.output_tokens
            )
        else:
            self._stats.jobs_fenced_total += 1
            log.warning("job_completion_fenced", job_id=job.job_id, attempt=job.attempts)

    async def _stop_run(self, run: asyncio.Task[tuple[str, GenerationSummary]], stop: asyncio.Event) -> None:
        """Stop a generation through its stop signal (it ends with its summary, its tokens counted); cancel it only
        when it does not end within ``stop_grace_s``."""
        stop.set()
        await asyncio.wait({run}, timeout=self._settings.stop_grace_s)  # whatever the run's outcome, never raises
        if not run.done():
            await _cancel(run)
        elif not run.cancelled():
            run.exception()  # retrieved: an error of a run given up on is not worth a warning

    async def _fail(self, claim: Claim, error: str) -> None:
        if await self._store.fail(claim, error):
            self._stats.jobs_failed_total += 1
            log.warning("job_failed", job_id=claim.job_id, error=error)

    async def stop(self) -> None:
        """Stop taking jobs; stop the running ones in the engine and hand them back to the queue."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = list(self._jobs.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _cancel(task: asyncio.Task[tuple[str, GenerationSummary]]) -> None:
    """Cancel a generation task and wait until it is gone (its engine request aborted, its slot freed)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.shield(task)
