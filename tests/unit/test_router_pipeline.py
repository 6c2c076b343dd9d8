"""The router pipeline's money and lease invariants, over in-memory ports (a unit-test seam only: the real services
are exercised by tests/e2e)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from services.common.attribution import Attribution
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.pricing import PriceTable, TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.domain import (
    CachedAnswer,
    CacheLookup,
    CacheMode,
    Decision,
    FinishReason,
    GenerateInput,
    GenerateResult,
    InferChunk,
    JobState,
    JobStatus,
    JobSubmission,
    LookupOutcome,
    Reservation,
    Sampling,
    TextDelta,
)
from services.router.pipeline import Pipeline, PipelineLimits
from services.router.savings import SavingsRecord

ACME = Attribution(tenant="acme", team="t", feature="f")
MODELS = {Tier.CHEAP: "cheap-model", Tier.FULL: "full-model"}


@dataclass
class FixedDecider:
    tier: Tier = Tier.FULL
    min_tier: Tier = Tier.CHEAP
    max_tier: Tier = Tier.FULL

    def decide(
        self, *, messages: Sequence[Message], max_tokens: int, attribution: Attribution, requested_tier: Tier | None
    ) -> Decision:
        tier = requested_tier or self.tier
        return Decision(
            tier,
            0.9 if tier is Tier.FULL else 0.1,
            0.5,
            False,
            ("test",),
            tier,
            min_tier=self.min_tier,
            max_tier=self.max_tier,
        )


@dataclass
class MemCache:
    answers: dict[str, CachedAnswer] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)
    fills: int = 0
    abandons: int = 0
    down: bool = False

    async def lookup(
        self, *, attribution: Attribution, model: str, messages: Sequence[Message], sampling: Sampling, peek: bool
    ) -> CacheLookup:
        if self.down:
            raise Unavailable("cache down")
        key = f"{attribution.tenant}|{model}|{messages[-1].content.strip().lower()}"
        if key in self.answers:
            return CacheLookup(LookupOutcome.HIT, key=key, answer=self.answers[key])
        if peek:
            return CacheLookup(LookupOutcome.MISS, key=key)
        self.leases[key] = "lease-" + key
        return CacheLookup(LookupOutcome.MISS, key=key, lease_id=self.leases[key])

    async def fill(self, *, attribution: Attribution, key: str, lease_id: str, answer: CachedAnswer) -> None:
        assert self.leases.pop(key) == lease_id
        self.answers[key] = answer
        self.fills += 1

    async def abandon(self, *, attribution: Attribution, key: str, lease_id: str) -> None:
        assert self.leases.pop(key) == lease_id
        self.abandons += 1


@dataclass
class Ledger:
    limit: int = 10**12
    soft_at: int = 10**12
    reserved: dict[str, int] = field(default_factory=dict)
    committed: int = 0
    savings: int = 0
    cap: int = 0
    down: bool = False
    ttls: list[int] = field(default_factory=list)
    renewals: list[str] = field(default_factory=list)

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
        self.ttls.append(ttl_s)
        if self.down:
            raise Unavailable("budget down")
        held = self.committed + sum(self.reserved.values())
        if held + estimated_cost_micros > self.limit:
            raise ResourceExhausted("hard limit", reason="BUDGET_EXCEEDED")
        self.reserved[request_id] = estimated_cost_micros
        return Reservation(
            request_id, held + estimated_cost_micros > self.soft_at, self.cap, self.limit - held - estimated_cost_micros
        )

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
        self.reserved.pop(reservation_id)
        self.committed += cost_micros
        self.savings += saved_micros
        return self.limit - self.committed

    async def release(self, *, reservation_id: str, tenant: str) -> None:
        self.reserved.pop(reservation_id)

    async def renew(self, *, reservation_id: str, tenant: str, ttl_s: int) -> int:
        if reservation_id not in self.reserved:
            raise FailedPrecondition("not held", reason="RESERVATION_SETTLED")
        self.renewals.append(reservation_id)
        return 0

    async def record_savings(self, tenant: str, records: Sequence[SavingsRecord]) -> None:
        assert all(r.attribution.tenant == tenant for r in records)
        self.savings += sum(r.saved_micros for r in records)


#: What the fake worker's two chunks and its summary say.
USAGE = TokenUsage(100, 20, 40)
CHUNK_TOKENS = 10


@dataclass
class FakeGeneration:
    """A worker generation: "hello " (10 tokens), then "world" (10 more) with the summary. ``stop`` ends it and
    reports what was generated so far, as the real worker does (finish ABORT)."""

    workers: Workers
    tier: Tier
    output_tokens: int = 0
    final: InferChunk | None = None
    failed: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def _finish(self, usage: TokenUsage, reason: FinishReason) -> InferChunk:
        self.final = InferChunk("", usage=usage, finish_reason=reason, model=MODELS[self.tier], ttft_ms=5.0)
        self.workers.generated.append((self.tier, usage))
        return self.final

    async def __aiter__(self) -> AsyncIterator[InferChunk]:
        w = self.workers
        if self.tier in w.down:
            self.failed = True
            raise Unavailable(f"{self.tier.label} down")
        self.output_tokens += CHUNK_TOKENS
        yield InferChunk("hello ")
        w.started.set()
        if w.hang:
            await self.stopped.wait()
            return
        if w.fail_after_first:
            self.failed = True
            raise Unavailable("worker died")
        self.output_tokens += CHUNK_TOKENS
        done = self._finish(USAGE, w.finish)
        yield InferChunk("world", usage=done.usage, finish_reason=done.finish_reason, model=done.model, ttft_ms=5.0)

    async def stop(self, timeout_s: float) -> InferChunk | None:
        self.workers.stops += 1
        self.stopped.set()
        if self.final is None and not self.failed:
            return self._finish(TokenUsage(USAGE.input_tokens, self.output_tokens, 40), FinishReason.ABORT)
        return self.final if not self.failed else None


@dataclass
class Workers:
    down: set[Tier] = field(default_factory=set)
    finish: FinishReason = FinishReason.STOP
    fail_after_first: bool = False
    calls: list[tuple[Tier, int]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    hang: bool = False
    #: (tier, usage) of every generation the worker ran, as its own counters would say: the billing oracle.
    generated: list[tuple[Tier, TokenUsage]] = field(default_factory=list)
    stops: int = 0

    def generate(
        self, *, tier: Tier, request_id: str, messages: Sequence[Message], sampling: Sampling, attribution: Attribution
    ) -> FakeGeneration:
        self.calls.append((tier, sampling.max_tokens))
        return FakeGeneration(self, tier)

    def owed(self) -> int:
        """What the ledger must hold for everything generated: every token at its tier's price."""
        return sum(PriceTable().price_for(tier=t.label).cost_micros(u) for t, u in self.generated)


class Tokens:
    def count_prompt(self, tier: Tier, messages: Sequence[Message]) -> int:
        return 100


def make(
    decider: FixedDecider | None = None,
    cache: MemCache | None = None,
    ledger: Ledger | None = None,
    workers: Workers | None = None,
    limits: PipelineLimits | None = None,
) -> tuple[Pipeline, MemCache, Ledger, Workers]:
    cache = cache if cache is not None else MemCache()
    ledger = ledger or Ledger()
    workers = workers or Workers()
    p = Pipeline(
        decider=decider or FixedDecider(),
        cache=cache,
        budget=ledger,
        infer=workers,
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        limits=limits,
    )
    return p, cache, ledger, workers


def req(text: str = "What is 2+2?", rid: str = "r1", **kw: object) -> GenerateInput:
    return GenerateInput(
        request_id=rid,
        attribution=ACME,
        messages=(Message("user", text),),
        sampling=Sampling(max_tokens=50, temperature=0.0),
        **kw,
    )  # type: ignore[arg-type]


FULL_COST = PriceTable().price_for(tier="full").cost_micros(TokenUsage(100, 20, 40))
CHEAP_COST = PriceTable().price_for(tier="cheap").cost_micros(TokenUsage(100, 20, 40))
BASELINE = PriceTable().price_for(tier="full").cost_micros(TokenUsage(100, 20, 0))


async def test_miss_commits_actual_cost_with_cached_prompt_price_then_fills() -> None:
    p, cache, ledger, _ = make()
    result = await p.generate(req())
    await p.drain()
    assert result.text == "hello world" and result.tier is Tier.FULL and not result.cache_hit
    assert result.cost_micros == FULL_COST == ledger.committed
    assert result.saved_micros == BASELINE - FULL_COST and ledger.savings == BASELINE - FULL_COST
    assert ledger.reserved == {} and cache.fills == 1 and cache.leases == {}


async def test_normalized_repeat_hits_the_cache_costs_nothing_and_records_the_saving() -> None:
    p, _cache, ledger, workers = make()
    await p.generate(req("What is 2+2?", rid="a"))
    await p.drain()
    hit = await p.generate(req("  what is 2+2?  ", rid="b"))
    await p.drain()
    assert hit.cache_hit and hit.cost_micros == 0 and hit.text == "hello world"
    assert hit.saved_micros == BASELINE and len(workers.calls) == 1
    assert ledger.committed == FULL_COST and ledger.savings == (BASELINE - FULL_COST) + BASELINE


async def test_stream_yields_deltas_then_one_result() -> None:
    p, *_ = make()
    events = [e async for e in p.run(req())]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["hello ", "world"]
    assert isinstance(events[-1], GenerateResult) and sum(isinstance(e, GenerateResult) for e in events) == 1


async def test_hard_stop_on_full_downgrades_to_cheap_when_policy_allows() -> None:
    limit = 100  # cheap estimate 45 fits, full estimate 750 does not
    p, _, ledger, workers = make(ledger=Ledger(limit=limit))
    # full-tier estimate of 100 prompt + 50 output tokens is above the limit, the cheap one is not
    full_estimate = PriceTable().price_for(tier="full").estimate_micros(100, 50)
    assert full_estimate > limit
    result = await p.generate(req())
    assert result.tier is Tier.CHEAP and result.decision.policy == "budget_downgrade"
    assert workers.calls[0][0] is Tier.CHEAP and ledger.committed == CHEAP_COST and ledger.reserved == {}


async def test_hard_stop_without_a_cheaper_option_is_resource_exhausted_and_nothing_held() -> None:
    p, cache, ledger, workers = make(decider=FixedDecider(Tier.FULL, min_tier=Tier.FULL), ledger=Ledger(limit=10))
    with pytest.raises(ResourceExhausted):
        await p.generate(req())
    await p.drain()
    assert ledger.reserved == {} and ledger.committed == 0 and workers.calls == []
    assert cache.leases == {} and cache.abandons == 1


async def test_soft_threshold_downgrades_and_releases_the_full_reservation() -> None:
    p, _, ledger, _workers = make(ledger=Ledger(soft_at=0))
    result = await p.generate(req())
    assert result.tier is Tier.CHEAP and result.decision.policy == "budget_downgrade"
    assert ledger.reserved == {} and ledger.committed == CHEAP_COST


async def test_unavailable_tier_escalates_and_reprices() -> None:
    p, cache, ledger, _workers = make(decider=FixedDecider(Tier.CHEAP), workers=Workers(down={Tier.CHEAP}))
    result = await p.generate(req())
    await p.drain()
    assert result.escalated and result.tier is Tier.FULL and result.decision.policy == "escalated"
    assert ledger.committed == FULL_COST and ledger.reserved == {}
    assert cache.fills == 0 and cache.abandons == 1  # a full-tier answer is never stored under the cheap key


async def test_unavailable_tier_with_pinned_policy_is_unavailable_and_releases() -> None:
    p, cache, ledger, _ = make(
        decider=FixedDecider(Tier.CHEAP, max_tier=Tier.CHEAP), workers=Workers(down={Tier.CHEAP})
    )
    with pytest.raises(Unavailable):
        await p.generate(req())
    assert ledger.reserved == {} and ledger.committed == 0 and cache.leases == {}


async def test_worker_dying_mid_stream_bills_the_prompt_and_the_tokens_received() -> None:
    """The worker cannot report (it died): what the router received was generated, and is billed."""
    p, cache, ledger, _ = make(workers=Workers(fail_after_first=True))
    with pytest.raises(Unavailable):
        await p.generate(req())
    await p.drain()
    seen = PriceTable().price_for(tier="full").cost_micros(TokenUsage(100, CHUNK_TOKENS, 0))
    assert ledger.reserved == {} and ledger.committed == seen and cache.leases == {} and cache.abandons == 1


async def test_client_cancel_stops_the_worker_and_bills_what_it_generated() -> None:
    workers = Workers(hang=True)
    p, cache, ledger, _ = make(workers=workers)
    task = asyncio.ensure_future(p.generate(req()))
    await asyncio.wait_for(workers.started.wait(), 5)
    assert ledger.reserved  # money held while inference runs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.drain()
    assert workers.stops == 1 and workers.generated == [(Tier.FULL, TokenUsage(100, CHUNK_TOKENS, 40))]
    assert ledger.committed == workers.owed() > 0  # every generated token billed
    assert ledger.reserved == {} and cache.leases == {} and cache.abandons == 1


async def test_aborted_answer_is_charged_but_never_cached() -> None:
    p, cache, ledger, _ = make(workers=Workers(finish=FinishReason.ABORT))
    result = await p.generate(req())
    await p.drain()
    assert result.finish_reason is FinishReason.ABORT and ledger.committed == FULL_COST
    assert cache.fills == 0 and cache.abandons == 1 and cache.answers == {}


async def test_cache_down_serves_without_cache() -> None:
    p, _cache, ledger, _ = make(cache=MemCache(down=True))
    result = await p.generate(req())
    assert result.text == "hello world" and ledger.committed == FULL_COST and not result.cache_hit


async def test_budget_down_fails_closed_by_default() -> None:
    # the router releases the Reserve it could not confirm in the background, retrying while the budget is down
    p, cache, _ledger, workers = make(ledger=Ledger(down=True), limits=PipelineLimits(settle_retry_s=0.5))
    with pytest.raises(Unavailable):
        await p.generate(req())
    await p.drain()
    assert workers.calls == [] and cache.leases == {}


async def test_bypass_skips_the_cache_and_feature_cap_clamps_max_tokens() -> None:
    p, cache, _ledger, workers = make(ledger=Ledger(cap=10))
    await p.generate(req(cache_mode=CacheMode.BYPASS))
    assert cache.leases == {} and cache.fills == 0 and workers.calls[-1][1] == 10
    await p.generate(req(rid="r2", cache_mode=CacheMode.BYPASS))
    assert workers.calls[-1][1] == 10  # remembered cap


async def test_bad_input_is_rejected_with_every_field_and_nothing_reserved() -> None:
    p, cache, ledger, workers = make()
    bad = GenerateInput(
        request_id="x" * 200,
        attribution=Attribution(),
        messages=(Message("robot", ""),),
        sampling=Sampling(max_tokens=10**9, temperature=5.0, top_p=0.0),
    )
    with pytest.raises(InvalidArgument) as err:
        await p.generate(bad)
    fields = {v.field for v in err.value.violations}
    assert {
        "attribution.tenant",
        "request_id",
        "messages[0].role",
        "sampling.max_tokens",
        "sampling.temperature",
        "sampling.top_p",
        "messages",
    } <= fields
    assert ledger.reserved == {} and cache.leases == {} and workers.calls == []


@dataclass
class Jobs:
    jobs: dict[str, tuple[str, str, JobState]] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)

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
        job_id = f"j{len(self.jobs)}"
        self.jobs[job_id] = (attribution.tenant, metadata, JobState.QUEUED)
        self.request_ids[job_id] = request_id
        return JobSubmission(job_id, False, metadata)

    def _status(self, job_id: str, tier: Tier) -> JobStatus:
        owner, meta, state = self.jobs[job_id]
        settled = job_id in self.settled
        rid = self.request_ids.get(job_id, "")
        if state is JobState.SUCCEEDED:
            return JobStatus(
                job_id,
                state,
                "done",
                USAGE,
                FinishReason.STOP,
                MODELS[tier],
                metadata=meta,
                request_id=rid,
                tenant=owner,
                settled=settled,
            )
        return JobStatus(job_id, state, metadata=meta, request_id=rid, tenant=owner, settled=settled)

    async def get_job(self, *, tier: Tier, job_id: str, tenant: str) -> JobStatus:
        owner, _meta, _state = self.jobs[job_id]
        if owner != tenant:
            raise NotFound("no such job")
        return self._status(job_id, tier)

    async def find_job(self, *, tier: Tier, tenant: str, request_id: str) -> JobStatus | None:
        for job_id, rid in self.request_ids.items():
            if rid == request_id and self.jobs[job_id][0] == tenant:
                return self._status(job_id, tier)
        return None

    async def list_unsettled(self, *, tier: Tier, page_token: str) -> tuple[list[JobStatus], str]:
        label = f'"tier": "{tier.label}"'
        return [
            self._status(j, tier) for j, (_, meta, _) in self.jobs.items() if j not in self.settled and label in meta
        ], ""

    async def mark_settled(self, *, tier: Tier, job_id: str) -> None:
        assert self.jobs[job_id][2].terminal
        self.settled.add(job_id)

    def finish(self, job_id: str, state: JobState = JobState.SUCCEEDED) -> None:
        owner, meta, _ = self.jobs[job_id]
        self.jobs[job_id] = (owner, meta, state)


def make_async(ledger: Ledger | None = None, jobs: Jobs | None = None) -> tuple[Pipeline, MemCache, Ledger, Jobs]:
    jobs = jobs or Jobs()
    cache, ledger = MemCache(), ledger or Ledger()
    p = Pipeline(
        decider=FixedDecider(),
        cache=cache,
        budget=ledger,
        infer=Workers(),
        tokens=Tokens(),
        prices=PriceTable(),
        models=MODELS,
        jobs=jobs,
        limits=PipelineLimits(async_settle_every_s=0),
    )
    return p, cache, ledger, jobs


async def test_async_job_holds_its_reservation_until_done_then_commits_once() -> None:
    p, cache, ledger, jobs = make_async()
    sub = await p.submit(req())
    assert sub.state is JobState.QUEUED and sub.job_id.startswith("full.") and cache.leases == {}
    [key] = ledger.reserved
    assert key.startswith("r1@a") and ledger.ttls[-1] == PipelineLimits().async_reservation_ttl_s
    status = await p.status(sub.job_id, ACME)
    assert status.state is JobState.QUEUED and ledger.reserved
    jobs.finish("j0")
    status = await p.status(sub.job_id, ACME)
    assert status.result is not None and status.result.cost_micros == FULL_COST == ledger.committed
    assert jobs.settled == {"j0"}  # recorded in the job store: no router settles it again
    assert p.settler is not None and await p.settler.run_once() == 0
    await asyncio.wait_for(p.drain(), 5)
    assert ledger.reserved == {} and ledger.committed == FULL_COST


async def test_async_failed_job_releases_and_foreign_tenant_cannot_read() -> None:
    p, _, ledger, jobs = make_async()
    sub = await p.submit(req())
    with pytest.raises(NotFound):
        await p.status(sub.job_id, Attribution(tenant="other"))
    with pytest.raises(NotFound):
        await p.status("bogus", ACME)
    jobs.finish("j0", JobState.FAILED)
    status = await p.status(sub.job_id, ACME)
    assert status.state is JobState.FAILED and ledger.reserved == {} and ledger.committed == 0
    await asyncio.wait_for(p.drain(), 5)


async def test_async_cache_hit_answers_inline() -> None:
    p, cache, ledger, jobs = make_async()
    await p.generate(req(rid="warm"))
    await p.drain()
    sub = await p.submit(req(" what is 2+2? ", rid="again"))
    assert sub.state is JobState.SUCCEEDED and sub.result is not None and sub.result.cache_hit
    assert jobs.jobs == {}
    status = await p.status(sub.job_id, ACME)
    assert status.result == sub.result
    with pytest.raises(NotFound):
        await p.status(sub.job_id, Attribution(tenant="intruder"))
