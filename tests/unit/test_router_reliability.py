"""Money holes found by fuzzing and fault injection in the router pipeline, fixed and pinned here (over the
in-memory ports of tests/unit/test_router_pipeline.py, with a budget that replays by request id like the real one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.attribution import Attribution
from services.common.pricing import PriceTable, TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.pipeline import (
    CacheMode,
    JobState,
    Pipeline,
    PipelineLimits,
    Reservation,
    Sampling,
    budget_request_id,
)
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
            return Reservation(self.by_request[request_id], False, 0, None)
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
    assert budget_request_id("abc", "", "") == "abc"  # async: the bare id (the worker deduplicates jobs by it)
    assert budget_request_id("abc", "", "/cheap") == "abc/cheap"
    assert budget_request_id("abc", "r1", "/esc") == "abc@r1/esc"
    long_key = budget_request_id("x" * 128, "r1", "/cheap")
    assert len(long_key) == 64 + 6 and long_key.endswith("/cheap")
    assert long_key != budget_request_id("x" * 128, "r2", "/cheap")  # runs stay distinct when hashed


@dataclass
class DedupJobs(Jobs):
    """Like a worker: SubmitJob is idempotent on request_id (per worker, that is per tier)."""

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
    ) -> str:
        if (tier, request_id) not in self.by_request:
            self.by_request[(tier, request_id)] = await super().submit_job(
                tier=tier,
                request_id=request_id,
                messages=messages,
                sampling=sampling,
                attribution=attribution,
                metadata=metadata,
            )
        return self.by_request[(tier, request_id)]

    def finish_all(self) -> None:
        for job_id, (owner, meta, _) in list(self.jobs.items()):
            self.jobs[job_id] = (owner, meta, JobState.SUCCEEDED)


def make_async(ledger: IdempotentLedger) -> tuple[Pipeline, DedupJobs]:
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
        limits=PipelineLimits(async_poll_s=0.01, async_poll_max_s=0.01),
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
