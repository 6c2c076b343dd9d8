"""The worker side of durable jobs: take a job only when the engine has async room, run it, store the result.

Loop: wait for an async slot (the admission controller's rule: room beyond the interactive reserve) → claim a job
from the store → run it through the same ``InferenceService.generate`` path as a streamed request, renewing the lease
meanwhile → ``complete`` with the claim's token. A completion refused by the store (another worker took the job over
after this one's lease ran out) is dropped: only one completion of a job ever counts.

On a dead engine the job is released for another worker at once; on shutdown running jobs are aborted in the engine
and released. A job that waited longer than ``max_wait_s`` before anyone started it fails as expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

import structlog

from services.common.errors import InvalidArgument, QuotaViolation, ResourceExhausted, Unavailable
from services.infer.domain import GenerationRequest, GenerationSummary, QueueClass
from services.infer.jobs.store import Claim, Job, JobSpec, JobStore, QueueFull, SubmitResult, now_ms
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
        if claim.reclaimed:
            self._stats.jobs_reclaimed_total += 1
        log.info("job_started", job_id=job.job_id, attempt=job.attempts, reclaimed=claim.reclaimed)
        waited_s = (now_ms() - job.created_unix_ms) / 1000
        if job.attempts == 1 and waited_s > self._settings.max_wait_s:
            slot.release()
            await self._fail(
                claim, f"expired: waited {waited_s:.0f}s in the queue (limit {self._settings.max_wait_s:g}s)"
            )
            return
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(claim, lost))
        run: asyncio.Task[tuple[str, GenerationSummary]] | None = None
        try:
            request = GenerationRequest.from_json(job.payload)
            run = asyncio.create_task(self._service.complete(request, slot=slot))
            lost_wait = asyncio.create_task(lost.wait())
            try:
                done, _ = await asyncio.wait({run, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost_wait.cancel()
            if run not in done:  # another worker owns the job now: stop spending the engine on it
                await _cancel(run)
                self._stats.jobs_fenced_total += 1
                log.warning("job_lease_lost", job_id=job.job_id)
                return
            text, summary = run.result()
        except asyncio.CancelledError:
            # Shutdown: abort the engine request, then hand the job back for another worker.
            if run is not None:
                await _cancel(run)
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

    async def _fail(self, claim: Claim, error: str) -> None:
        if await self._store.fail(claim, error):
            self._stats.jobs_failed_total += 1
            log.warning("job_failed", job_id=claim.job_id, error=error)

    async def stop(self) -> None:
        """Stop taking jobs; abort the running ones in the engine and hand them back to the queue."""
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
