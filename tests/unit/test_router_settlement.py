"""The money-tight paths of a request's reservation (services/router/settlement.py), over the in-memory ports of
tests/unit/test_router_pipeline.py: every generated token billed whatever the caller does, reservations renewed
while work runs, async jobs settled by whichever router sees them. The same paths run on real processes in
tests/e2e/test_money_tight.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from services.common.attribution import Attribution
from services.common.errors import Aborted, Unavailable
from services.common.pricing import PriceTable, TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.domain import CacheMode, FinishReason, InferChunk, JobSubmission, Reservation, Sampling
from services.router.pipeline import Pipeline, PipelineLimits
from services.router.settlement import AsyncSettler, JobMoney
from tests.unit.test_router_pipeline import (
    ACME,
    CHEAP_COST,
    FULL_COST,
    MODELS,
    FixedDecider,
    Jobs,
    Ledger,
    MemCache,
    Tokens,
    Workers,
    make,
    req,
)
from tests.unit.test_router_reliability import DedupJobs, FlakyLedger, IdempotentLedger

PROMPT = 100


@dataclass
class Paced:
    """A worker generation of ``chunks`` one-token chunks, each released by the test (``step``), so a test can
    stop consuming after exactly k of them. ``stop`` reports what was generated, as the real worker does."""

    workers: PacedWorkers
    tier: Tier
    output_tokens: int = 0
    final: InferChunk | None = None

    async def __aiter__(self) -> AsyncIterator[InferChunk]:
        w = self.workers
        for i in range(w.chunks):
            await w.gate.acquire()
            self.output_tokens += 1
            if i == w.chunks - 1:
                self.final = self._finish(FinishReason.LENGTH)
                yield InferChunk(f"t{i} ", usage=self.final.usage, finish_reason=FinishReason.LENGTH, model="m")
                return
            yield InferChunk(f"t{i} ")

    def _finish(self, reason: FinishReason) -> InferChunk:
        usage = TokenUsage(PROMPT, self.output_tokens, 0)
        self.workers.generated.append((self.tier, usage))
        return InferChunk("", usage=usage, finish_reason=reason, model=MODELS[self.tier])

    async def stop(self, timeout_s: float) -> InferChunk | None:
        if self.final is None:
            self.final = self._finish(FinishReason.ABORT)
        return self.final


@dataclass
class PacedWorkers:
    chunks: int = 8
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    generated: list[tuple[Tier, TokenUsage]] = field(default_factory=list)

    def generate(
        self, *, tier: Tier, request_id: str, messages: Sequence[Message], sampling: Sampling, attribution: Attribution
    ) -> Paced:
        return Paced(self, tier)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def owed(self) -> int:
        return sum(PriceTable().price_for(tier=t.label).cost_micros(u) for t, u in self.generated)


def paced(ledger: Ledger | None = None, limits: PipelineLimits | None = None) -> tuple[Pipeline, Ledger, PacedWorkers]:
    ledger = ledger or Ledger()
    workers = PacedWorkers()
    p = Pipeline(
        decider=FixedDecider(),
        cache=MemCache(),
        budget=ledger,
        infer=workers,
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        limits=limits,
    )
    return p, ledger, workers


@pytest.mark.parametrize("k", [1, 3, 7])
async def test_a_stream_closed_after_k_chunks_pays_for_what_was_generated(k: int) -> None:
    """The measured hole: a client cancelling every stream after 40 chunks was never billed. Closing the stream (what
    the router's servicer does when its caller goes away) stops the worker and commits its count."""
    p, ledger, workers = paced()
    workers.step(k)
    got = 0
    async with contextlib.aclosing(p.run(req(cache_mode=CacheMode.BYPASS))) as events:
        async for _ in events:
            got += 1
            if got == k:
                break
    await p.drain()
    assert workers.generated == [(Tier.FULL, TokenUsage(PROMPT, k, 0))]
    assert ledger.committed == workers.owed() > 0 and ledger.reserved == {}


async def test_a_cancelled_caller_pays_for_the_tokens_the_worker_produced_after_its_last_chunk() -> None:
    p, ledger, workers = paced()
    task = asyncio.ensure_future(p.generate(req(cache_mode=CacheMode.BYPASS)))
    workers.step(2)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.drain()
    [(_, usage)] = workers.generated
    assert usage.output_tokens == 2 and ledger.committed == workers.owed() and ledger.reserved == {}


async def test_a_caller_cancelled_before_the_first_token_pays_for_the_prompt_the_worker_read() -> None:
    p, ledger, workers = paced()
    task = asyncio.ensure_future(p.generate(req(cache_mode=CacheMode.BYPASS)))
    await asyncio.sleep(0.05)  # reserved and waiting for the first chunk
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.drain()
    assert workers.generated == [(Tier.FULL, TokenUsage(PROMPT, 0, 0))]
    assert ledger.committed == workers.owed() > 0 and ledger.reserved == {}


async def test_a_generation_that_outlives_the_reservation_ttl_keeps_it_renewed() -> None:
    """A slow worker ran past the reservation's life: its money went back to the pool while it still spent."""
    p, ledger, workers = paced(limits=PipelineLimits(reservation_ttl_s=1))  # renewed every third of a second
    task = asyncio.ensure_future(p.generate(req(cache_mode=CacheMode.BYPASS)))
    for _ in range(workers.chunks):
        await asyncio.sleep(0.2)
        workers.step()
    result = await asyncio.wait_for(task, 10)
    await p.drain()
    assert len(ledger.renewals) >= 2 and set(ledger.renewals) == {ledger.renewals[0]}
    assert result.cost_micros == ledger.committed == workers.owed() and ledger.reserved == {}


async def test_the_soft_limit_downgrade_releases_the_first_reservation_through_an_outage() -> None:
    ledger = FlakyLedger(soft_at=0, release_failures=1)
    p, *_ = make(ledger=ledger)
    result = await p.generate(req(cache_mode=CacheMode.BYPASS))
    assert result.tier is Tier.CHEAP
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.reserved == {} and ledger.committed == CHEAP_COST


async def test_a_cancelled_reserve_is_reconciled() -> None:
    """A caller cancelled while its Reserve was in flight: the store may have written it; it must not stay held."""
    entered = asyncio.Event()

    @dataclass
    class SlowLedger(IdempotentLedger):
        slow: bool = True

        async def reserve(self, **kw: object) -> Reservation:  # type: ignore[override]
            res = await super().reserve(**kw)  # type: ignore[arg-type]
            entered.set()
            if self.slow:
                await asyncio.sleep(3600)  # the reply never comes back in time
            return res

    ledger = SlowLedger()
    p, *_ = make(ledger=ledger)
    task = asyncio.ensure_future(p.generate(req(cache_mode=CacheMode.BYPASS)))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.reserved  # written by the store
    ledger.slow = False  # the budget answers again
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.reserved == {} and ledger.committed == 0


async def test_a_key_that_replays_a_committed_reservation_is_refused_and_runs_nothing() -> None:
    @dataclass
    class Settled(Ledger):
        async def reserve(self, **kw: object) -> Reservation:  # type: ignore[override]
            return Reservation("old", False, 0, None, settled=True)

    p, _, ledger, workers = make(ledger=Settled())
    with pytest.raises(Aborted):
        await p.generate(req(cache_mode=CacheMode.BYPASS))
    assert workers.calls == [] and ledger.committed == 0


# ---- async jobs ------------------------------------------------------------------------------------------------


@dataclass
class LostSubmitJobs(DedupJobs):
    """SubmitJob fails with UNAVAILABLE ``lost`` times: after persisting the job (``land``) or without (the worker
    never got it)."""

    lost: int = 1
    land: bool = True

    async def submit_job(self, **kw: object) -> JobSubmission:  # type: ignore[override]
        if self.lost:
            self.lost -= 1
            if self.land:
                await super().submit_job(**kw)  # type: ignore[arg-type]
            raise Unavailable("infer-full: connection reset")
        return await super().submit_job(**kw)  # type: ignore[arg-type]


def make_jobs(ledger: Ledger, jobs: Jobs) -> Pipeline:
    return Pipeline(
        decider=FixedDecider(),
        cache=MemCache(),
        budget=ledger,
        infer=Workers(),
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        jobs=jobs,
        limits=PipelineLimits(async_settle_every_s=0, job_reconcile_delay_s=0.01),
    )


async def settle_all(p: Pipeline) -> None:
    assert p.settler is not None
    await p.settler.run_once()


async def test_a_job_whose_submit_reply_was_lost_keeps_its_money_and_is_billed() -> None:
    ledger, jobs = IdempotentLedger(), LostSubmitJobs(land=True)
    p = make_jobs(ledger, jobs)
    with pytest.raises(Unavailable):
        await p.submit(req(rid="lost"))
    await asyncio.sleep(0.1)  # the reconcile looked the job up: it holds the reservation, which stays held
    assert len(jobs.jobs) == 1 and len(ledger.reserved) == 1
    jobs.finish_all()
    await settle_all(p)
    await p.drain()
    assert ledger.committed == FULL_COST and ledger.reserved == {} and jobs.settled == {"j0"}


async def test_a_submit_that_never_reached_the_worker_is_released() -> None:
    ledger, jobs = IdempotentLedger(), LostSubmitJobs(land=False)
    p = make_jobs(ledger, jobs)
    with pytest.raises(Unavailable):
        await p.submit(req(rid="gone"))
    await asyncio.wait_for(p.drain(), 10)
    assert jobs.jobs == {} and ledger.reserved == {} and ledger.committed == 0


async def test_a_client_retry_after_a_lost_submit_reply_runs_one_job_and_pays_once() -> None:
    """The issue's case: SubmitAsync retried after a transient error ran a job with no money held, whose Commit then
    failed FAILED_PRECONDITION for ever."""
    ledger, jobs = IdempotentLedger(), LostSubmitJobs(land=True)
    p = make_jobs(ledger, jobs)
    with pytest.raises(Unavailable):
        await p.submit(req(rid="retry"))
    again = await p.submit(req(rid="retry"))  # the worker answers the job the first attempt created
    await asyncio.sleep(0.1)
    assert len(jobs.jobs) == 1 and len(ledger.reserved) == 1  # the retry's own reservation was returned
    jobs.finish_all()
    status = await p.status(again.job_id, ACME)
    assert status.result is not None and status.result.cost_micros == FULL_COST
    await p.drain()
    assert ledger.committed == FULL_COST and ledger.reserved == {}


async def test_a_restarted_router_settles_jobs_it_never_submitted() -> None:
    """A job nobody polls, submitted by a router that is gone: any router bills it from the job store."""
    ledger, jobs = IdempotentLedger(), DedupJobs()
    first = make_jobs(ledger, jobs)
    await first.submit(req(rid="orphan"))
    await first.drain()  # the first router stops; the job is still queued
    jobs.finish_all()
    second = make_jobs(ledger, jobs)
    await settle_all(second)
    assert ledger.committed == FULL_COST and ledger.reserved == {} and jobs.settled == {"j0"}
    await settle_all(second)
    assert ledger.committed == FULL_COST  # settled once


async def test_the_settler_renews_the_reservations_of_waiting_jobs_and_stops_at_the_end() -> None:
    now = [1_000_000]

    @dataclass
    class Clocked(IdempotentLedger):
        async def renew(self, *, reservation_id: str, tenant: str, ttl_s: int) -> int:
            await super().renew(reservation_id=reservation_id, tenant=tenant, ttl_s=ttl_s)
            return now[0] + ttl_s * 1000

    ledger, jobs = Clocked(), DedupJobs()
    p = make_jobs(ledger, jobs)
    await p.submit(req(rid="waits"))
    [(_, meta, _)] = jobs.jobs.values()
    rid = JobMoney.of(meta).reservation_id
    settler = AsyncSettler(
        jobs=jobs,
        budget=ledger,
        tiers=list(MODELS),
        settle=p._settle_job,
        every_s=0,
        ttl_s=900,
        clock_ms=lambda: now[0],
    )
    settler.track(Tier.FULL, "j0", "acme", JobMoney(rid, now[0] + 900_000))
    await settler.run_once()
    assert ledger.renewals == []  # not due yet
    now[0] += 700_000  # less than a third of its life left
    await settler.run_once()
    assert ledger.renewals == [rid]
    jobs.finish_all()
    await settler.run_once()
    now[0] += 10**9
    await settler.run_once()
    assert ledger.renewals == [rid] and ledger.committed == FULL_COST and ledger.reserved == {}


async def test_shutdown_does_not_wait_for_outstanding_jobs() -> None:
    ledger, jobs = IdempotentLedger(), DedupJobs()
    p = Pipeline(
        decider=FixedDecider(),
        cache=MemCache(),
        budget=ledger,
        infer=Workers(),
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        jobs=jobs,
        limits=PipelineLimits(async_settle_every_s=0.01),
    )
    p.start()
    await p.submit(req(rid="long"))
    await asyncio.wait_for(p.drain(), 2)  # the job never finishes; its reservation stays with it
    assert len(ledger.reserved) == 1


async def test_a_finished_job_is_billed_even_when_its_commit_meets_an_outage_at_poll_time() -> None:
    ledger, jobs = FlakyLedger(commit_failures=1), DedupJobs()
    p = make_jobs(ledger, jobs)
    sub = await p.submit(req(rid="poll"))
    jobs.finish_all()
    status = await p.status(sub.job_id, ACME)  # the caller gets its result; billing is deferred
    assert status.result is not None and status.result.budget_remaining_micros is None and not jobs.settled
    await settle_all(p)
    assert ledger.committed == FULL_COST and ledger.reserved == {} and jobs.settled == {"j0"}
