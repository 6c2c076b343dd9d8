"""Money holes found by fuzzing and fault injection in the router pipeline, fixed and pinned here (over the
in-memory ports of tests/unit/test_router_pipeline.py, with a budget that replays by request id like the real one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from services.common import deadline
from services.common.attribution import Attribution
from services.common.errors import Unavailable
from services.common.pricing import PriceTable, TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.domain import CacheMode, JobSubmission, Reservation, Sampling
from services.router.pipeline import Pipeline, PipelineLimits, budget_request_id
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


@dataclass
class IdempotentLedger(Ledger):
    """Reserve is idempotent on request_id, as the budget service's is: a repeat replays the first reservation."""

    by_request: dict[str, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    keys: list[str] = field(default_factory=list)

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
        self.keys.append(request_id)
        assert 1 <= len(request_id) <= 128, "the budget refuses longer request ids"
        if request_id in self.by_request:  # replay: no new money is held
            rid = self.by_request[request_id]
            return Reservation(rid, False, 0, None, settled=rid in self.done)
        res = await super().reserve(
            request_id=request_id,
            attribution=attribution,
            estimated_cost_micros=estimated_cost_micros,
            estimated_tokens=estimated_tokens,
            model=model,
            tier=tier,
            ttl_s=ttl_s,
        )
        self.by_request[request_id] = res.reservation_id
        return res

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
        if reservation_id in self.done:  # replay: charged once
            return None
        self.done.add(reservation_id)
        return await super().commit(
            reservation_id=reservation_id,
            tenant=tenant,
            cost_micros=cost_micros,
            usage=usage,
            model=model,
            tier=tier,
            saved_micros=saved_micros,
        )


async def test_a_reused_request_id_is_a_new_inference_and_is_paid_again() -> None:
    """Fuzzing: two Generate calls with request_id "c" ran two inferences, the second was free (its Reserve
    replayed the first, already committed reservation) while its response reported a cost."""
    ledger = IdempotentLedger()
    p, _, _, workers = make(ledger=ledger)
    first = await p.generate(req("Name a colour.", rid="c", cache_mode=CacheMode.BYPASS))
    again = await p.generate(req("Name a prime.", rid="c", cache_mode=CacheMode.BYPASS))
    await p.drain()
    assert len(workers.calls) == 2 and first.cost_micros == again.cost_micros == FULL_COST
    assert ledger.committed == first.cost_micros + again.cost_micros  # the ledger is the sum of response costs
    assert ledger.reserved == {} and len(set(ledger.keys)) == 2


async def test_budget_keys_fit_the_budgets_limit_on_every_path() -> None:
    """A 128-character request id plus "/cheap" or "/esc" was 134 characters: the budget refused the downgrade."""
    ledger = IdempotentLedger(limit=100)  # full estimate over the limit: downgrade to cheap
    p, _, _, workers = make(ledger=ledger)
    rid = "r" * 128
    result = await p.generate(req(rid=rid))
    assert result.tier is Tier.CHEAP and result.request_id == rid
    assert all(len(k) <= 128 for k in ledger.keys) and ledger.keys[-1].endswith("/cheap")
    ledger2 = IdempotentLedger()
    p2, _, _, workers2 = make(decider=FixedDecider(Tier.CHEAP), ledger=ledger2)
    workers2.down.add(Tier.CHEAP)
    escalated = await p2.generate(req(rid=rid))
    assert escalated.escalated and all(len(k) <= 128 for k in ledger2.keys) and ledger2.keys[-1].endswith("/esc")


def test_budget_request_ids() -> None:
    assert budget_request_id("abc", "", "") == "abc"
    assert budget_request_id("abc", "", "/cheap") == "abc/cheap"
    assert budget_request_id("abc", "r1", "/esc") == "abc@r1/esc"
    long_key = budget_request_id("x" * 128, "r1", "/cheap")
    assert len(long_key) == 64 + 6 and long_key.endswith("/cheap")
    assert long_key != budget_request_id("x" * 128, "r2", "/cheap")  # runs stay distinct when hashed


@dataclass
class DedupJobs(Jobs):
    """Like a worker: SubmitJob is idempotent on request_id (per worker, that is per tier), and a replay answers the
    stored job's metadata."""

    by_request: dict[tuple[Tier, str], str] = field(default_factory=dict)

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
        job_id = self.by_request.get((tier, request_id))
        if job_id is not None:
            return JobSubmission(job_id, True, self.jobs[job_id][1])
        sub = await super().submit_job(
            tier=tier,
            request_id=request_id,
            messages=messages,
            sampling=sampling,
            attribution=attribution,
            metadata=metadata,
        )
        self.by_request[(tier, request_id)] = sub.job_id
        return sub

    def finish_all(self) -> None:
        for job_id in list(self.jobs):
            self.finish(job_id)


def make_async(ledger: IdempotentLedger, every_s: float = 0) -> tuple[Pipeline, DedupJobs]:
    jobs = DedupJobs()
    p = Pipeline(
        decider=FixedDecider(),
        cache=MemCache(),
        budget=ledger,
        infer=Workers(),
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        jobs=jobs,
        limits=PipelineLimits(async_settle_every_s=every_s),
    )
    return p, jobs


async def test_an_async_resubmission_is_the_same_job_and_is_paid_once() -> None:
    ledger = IdempotentLedger()
    p, jobs = make_async(ledger)
    first = await p.submit(req(rid="a1"))
    again = await p.submit(req(rid="a1"))  # a client retry: the worker returns the same job
    assert first.job_id == again.job_id and len(jobs.jobs) == 1
    jobs.finish_all()
    await p.status(first.job_id, ACME)
    await p.drain()
    assert ledger.committed == FULL_COST and ledger.reserved == {}


async def test_the_same_async_id_on_the_other_tier_is_a_new_job_with_its_own_reservation() -> None:
    """The worker of each tier deduplicates on its own: a second job there must not replay the first reservation."""
    ledger = IdempotentLedger()
    p, jobs = make_async(ledger)
    full = await p.submit(req(rid="a2"))
    cheap = await p.submit(req(rid="a2", requested_tier=Tier.CHEAP))
    assert full.job_id.startswith("full.") and cheap.job_id.startswith("cheap.") and len(jobs.jobs) == 2
    jobs.finish_all()
    for sub in (full, cheap):
        await p.status(sub.job_id, ACME)
    await p.drain()
    assert ledger.committed == FULL_COST + CHEAP_COST and ledger.reserved == {}


@dataclass
class FlakyLedger(IdempotentLedger):
    """The budget's store goes away for a while: the first ``commit_failures`` commits and ``release_failures``
    releases fail with UNAVAILABLE (and change nothing), later ones work."""

    commit_failures: int = 0
    release_failures: int = 0
    release_gate: asyncio.Event | None = None
    commit_gate: asyncio.Event | None = None

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
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if self.commit_failures:
            self.commit_failures -= 1
            raise Unavailable("budget store unavailable", reason="STORE_UNAVAILABLE")
        return await super().commit(
            reservation_id=reservation_id,
            tenant=tenant,
            cost_micros=cost_micros,
            usage=usage,
            model=model,
            tier=tier,
            saved_micros=saved_micros,
        )

    async def release(self, *, reservation_id: str, tenant: str) -> None:
        if self.release_gate is not None:
            await self.release_gate.wait()
        if self.release_failures:
            self.release_failures -= 1
            raise Unavailable("budget store unavailable", reason="STORE_UNAVAILABLE")
        await super().release(reservation_id=reservation_id, tenant=tenant)


async def test_a_commit_that_meets_a_budget_outage_is_settled_when_it_returns() -> None:
    """Fault injection (Redis killed under load): the inference ran, the commit failed, the caller got UNAVAILABLE,
    and the reservation stayed held until its TTL with the spend never billed."""
    ledger = FlakyLedger(commit_failures=2)
    p, *_ = make(ledger=ledger)
    result = await p.generate(req(cache_mode=CacheMode.BYPASS))
    assert result.cost_micros == FULL_COST and result.budget_remaining_micros is None  # answered
    assert ledger.committed == 0 and ledger.reserved  # not settled yet
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.committed == FULL_COST and ledger.reserved == {}  # billed once, nothing held


async def test_a_release_that_meets_a_budget_outage_is_retried() -> None:
    ledger = FlakyLedger(release_failures=1)
    # the only tier policy allows is down: nothing is generated, so the reservation is released
    decider = FixedDecider(Tier.FULL, min_tier=Tier.FULL)
    p, _, _, workers = make(decider=decider, ledger=ledger, workers=Workers(down={Tier.FULL}))
    with pytest.raises(Unavailable):
        await p.generate(req(cache_mode=CacheMode.BYPASS))
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.reserved == {} and ledger.committed == 0


async def test_a_settlement_that_never_succeeds_gives_up_after_the_retry_window() -> None:
    ledger = FlakyLedger(commit_failures=10**6)
    p = Pipeline(
        decider=FixedDecider(),
        cache=None,
        budget=ledger,
        infer=Workers(),
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        limits=PipelineLimits(settle_retry_s=0.6),
    )
    await p.generate(req())
    await asyncio.wait_for(p.drain(), 10)  # bounded: shutdown is not held forever
    assert ledger.committed == 0 and len(ledger.reserved) == 1  # left to the reservation's TTL (and logged)


async def test_a_shutdown_waits_for_the_settlements_of_cancelled_requests() -> None:
    """Router restart: the grace period ends, in-flight calls are cancelled and settle their reservations while
    the server stops; the channels closed under those settlements, leaving the money reserved until the TTL."""
    gate = asyncio.Event()
    ledger = FlakyLedger(commit_gate=gate)
    p, _, _, workers = make(ledger=ledger, workers=Workers(hang=True))
    call = asyncio.ensure_future(p.generate(req(cache_mode=CacheMode.BYPASS)))
    await asyncio.wait_for(workers.started.wait(), 5)
    call.cancel()  # the grace period is over
    await asyncio.sleep(0.05)  # the request is committing what it generated (slowly: the gate is shut)
    call.cancel()  # and the server stops waiting for it
    with pytest.raises(asyncio.CancelledError):
        await call
    drain = asyncio.ensure_future(p.drain())
    await asyncio.sleep(0.1)
    assert not drain.done() and ledger.reserved  # the commit is still in flight: drain waits for it
    gate.set()
    await asyncio.wait_for(drain, 5)
    assert ledger.reserved == {} and ledger.committed == workers.owed() > 0


async def test_a_shutdown_waits_for_cancelled_requests_that_have_not_started_settling() -> None:
    """The server may stop (and drain start) before a cancelled handler even reached its release."""
    ledger = FlakyLedger()
    p, _, _, workers = make(ledger=ledger, workers=Workers(hang=True))
    call = asyncio.ensure_future(p.generate(req(cache_mode=CacheMode.BYPASS)))
    await asyncio.wait_for(workers.started.wait(), 5)
    drain = asyncio.ensure_future(p.drain())
    await asyncio.sleep(0.1)
    assert not drain.done()  # a request still holds a reservation
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(drain, 5)
    assert ledger.reserved == {}


async def test_the_async_settler_outlives_a_budget_outage() -> None:
    ledger = FlakyLedger(commit_failures=3)
    p, jobs = make_async(ledger, every_s=0.01)
    p.start()
    sub = await p.submit(req(rid="a3"))
    jobs.finish_all()
    async with asyncio.timeout(20):  # the background settler retries every round until the commit lands
        while not jobs.settled:  # noqa: ASYNC110 - the fake job store has no event to wait on
            await asyncio.sleep(0.01)
    await asyncio.wait_for(p.drain(), 5)
    assert ledger.committed == FULL_COST and ledger.reserved == {}
    assert sub.job_id.startswith("full.")


@dataclass
class LostReplyLedger(IdempotentLedger):
    """The store writes the first ``lost`` reservations and the reply is lost (Redis killed between its write and its
    answer): the router sees UNAVAILABLE while the money is held."""

    lost: int = 0
    unreachable: int = 0  # then this many Reserves fail without writing anything (the store is still gone)

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
        if self.lost:
            self.lost -= 1
            await super().reserve(
                request_id=request_id,
                attribution=attribution,
                estimated_cost_micros=estimated_cost_micros,
                estimated_tokens=estimated_tokens,
                model=model,
                tier=tier,
                ttl_s=ttl_s,
            )
            raise Unavailable("budget store unavailable", reason="STORE_UNAVAILABLE")
        if self.unreachable:
            self.unreachable -= 1
            raise Unavailable("budget store unavailable", reason="STORE_UNAVAILABLE")
        return await super().reserve(
            request_id=request_id,
            attribution=attribution,
            estimated_cost_micros=estimated_cost_micros,
            estimated_tokens=estimated_tokens,
            model=model,
            tier=tier,
            ttl_s=ttl_s,
        )


async def test_a_reservation_whose_reply_was_lost_is_found_and_released() -> None:
    """Fault injection (Redis SIGKILLed under load, CI): a Reserve written to the store whose answer never came back
    left its money held until the TTL — the router had no id to release. The same idempotent Reserve, retried in the
    background once the budget answers, finds it and releases it."""
    ledger = LostReplyLedger(lost=1, unreachable=2)
    p, *_ = make(ledger=ledger)
    with pytest.raises(Unavailable):
        await p.generate(req(cache_mode=CacheMode.BYPASS))
    assert len(ledger.reserved) == 1  # held, and the caller was refused
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.reserved == {} and ledger.committed == 0
    assert len(set(ledger.keys)) == 1  # one budget key: the reconciliation replayed, it did not reserve anew


async def test_a_refused_reserve_is_reconciled_even_if_nothing_was_written() -> None:
    ledger = LostReplyLedger(unreachable=1)
    p, *_ = make(ledger=ledger)
    with pytest.raises(Unavailable):
        await p.generate(req(cache_mode=CacheMode.BYPASS))
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.reserved == {} and ledger.committed == 0  # reserved and released again: nothing held, nothing paid


async def test_background_settlement_is_not_bound_by_the_callers_deadline() -> None:
    """A commit deferred by an outage is retried after the caller's deadline has passed: the retry must get the
    client's own timeout, not the caller's spent one (which would fail every attempt until the retry window ends).
    Every attempt runs in the outbox, the first one too: a settlement is never bound by the caller's deadline."""
    seen: list[float | None] = []

    @dataclass
    class DeadlineSeeingLedger(FlakyLedger):
        async def commit(self, **kwargs: object) -> int | None:  # type: ignore[override]
            seen.append(deadline.timeout(30.0))
            return await super().commit(**kwargs)  # type: ignore[arg-type]

    ledger = DeadlineSeeingLedger(commit_failures=1)
    p, *_ = make(ledger=ledger)

    async def call() -> None:
        deadline.set_remaining(0.2)  # this request's caller gave it 200 ms
        await p.generate(req(cache_mode=CacheMode.BYPASS))

    await asyncio.create_task(call())
    await asyncio.sleep(0.3)  # the caller's deadline has passed
    await asyncio.wait_for(p.drain(), 10)
    assert ledger.committed == FULL_COST and ledger.reserved == {}
    assert len(seen) == 2 and seen == [30.0, 30.0]  # both attempts had the client's own timeout
