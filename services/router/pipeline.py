"""The router's request pipeline: cache → classify + policy → reserve → infer → commit → fill.

Pure orchestration over the ports of :mod:`services.router.domain` (cache, budget, infer, jobs, token counter) and a
``Decider`` (the classifier + policy); nothing here imports gRPC. ``services/router/clients.py`` implements the
ports over gRPC, ``services/router/server.py`` translates protos. The money of each request — its reservation's
whole life — is owned by :mod:`services.router.settlement`.

Money invariants, held on every path:
* every token a worker generates is billed: a finished generation commits its usage; one whose caller went away
  (cancel, deadline, disconnect) or whose worker failed mid-stream is stopped and commits what it generated; only
  a request that generated nothing releases its reservation;
* a reservation is renewed while its generation runs, so it cannot expire under work that still spends;
* a fill lease is either filled or abandoned, so waiters never wait on a dead holder for longer than the lease;
* ``cost_micros`` of a result equals what was committed to the ledger for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace

from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.errors import (
    TRANSIENT,
    CostmeshError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Validator,
)
from services.common.pricing import PriceTable, TokenUsage
from services.router.classifier.types import Tier
from services.router.domain import (
    AsyncStatus,
    AsyncSubmission,
    BudgetPort,
    CachedAnswer,
    CacheLookup,
    CacheMode,
    CachePort,
    Decider,
    Decision,
    Event,
    FinishReason,
    GenerateInput,
    GenerateResult,
    Generation,
    InferChunk,
    InferPort,
    JobPort,
    JobState,
    JobStatus,
    LookupOutcome,
    Reservation,
    TextDelta,
    TokenCounter,
)
from services.router.savings import SavingsBatcher, SavingsRecord
from services.router.settlement import UNKNOWN_OUTCOME, AsyncSettler, Charge, JobMoney, Ledgerline, Outbox

if TYPE_CHECKING:
    from services.router.metrics import RouterMetrics

log = structlog.get_logger("costmesh.router")

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class PipelineLimits:
    max_messages: int = 256
    max_message_chars: int = 200_000
    max_total_chars: int = 1_000_000
    max_request_id_chars: int = 128
    default_max_tokens: int = 256
    max_tokens_limit: int = 32_768
    max_stop_sequences: int = 8
    fail_open_budget: bool = False
    cap_memory_s: float = 60.0
    #: Life of an interactive reservation; renewed every third of it while the generation runs.
    reservation_ttl_s: int = 120
    #: Life of an async job's reservation; the settler renews it while the job waits or runs.
    async_reservation_ttl_s: int = 900
    #: How often this router lists the job stores to settle finished jobs and renew waiting ones (0 = never).
    async_settle_every_s: float = 2.0
    #: After a SubmitJob with an unknown outcome, how long to wait before looking the job up (at least the call's
    #: own deadline, so a submission still in flight has landed or died by then).
    job_reconcile_delay_s: float = 12.0
    inline_results: int = 10_000
    #: How long a generation whose caller went away may take to stop and report what it generated.
    stop_timeout_s: float = 10.0
    #: How long a commit or release that met an unreachable budget is retried in the background (idempotent calls).
    settle_retry_s: float = 120.0
    #: How long drain() waits for requests still holding a reservation or lease to settle (shutdown), and then
    #: again for the background settlements.
    drain_wait_s: float = 10.0


@dataclass
class _CapMemory:
    """Per (tenant, feature) ``max_tokens`` caps learned from Reserve answers, so estimates use the clamped value."""

    ttl_s: float
    _caps: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)

    def get(self, tenant: str, feature: str) -> int:
        hit = self._caps.get((tenant, feature))
        if hit is None or hit[1] < time.monotonic():
            return 0
        return hit[0]

    def put(self, tenant: str, feature: str, cap: int) -> None:
        if len(self._caps) > 10_000:
            self._caps.clear()
        self._caps[(tenant, feature)] = (cap, time.monotonic() + self.ttl_s)


def _annotate_request(span: trace.Span, inp: GenerateInput, max_tokens: int) -> None:
    if not span.is_recording():
        return
    a = inp.attribution
    span.set_attributes(
        {
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
            sc.REQUEST_ID: inp.request_id,
            sc.TENANT: a.tenant,
            sc.TEAM: a.team,
            sc.FEATURE: a.feature,
            sc.QUEUE_CLASS: "interactive",
        }
    )


def _annotate_result(span: trace.Span, r: GenerateResult) -> None:
    if not span.is_recording():
        return
    attrs: dict[str, str | bool | int | float | list[str]] = {
        sc.GEN_AI_REQUEST_MODEL: r.model,
        sc.GEN_AI_RESPONSE_MODEL: r.model,
        sc.GEN_AI_USAGE_INPUT_TOKENS: r.usage.input_tokens,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: r.usage.output_tokens,
        sc.CACHED_INPUT_TOKENS: r.usage.cached_input_tokens,
        sc.GEN_AI_RESPONSE_FINISH_REASONS: [r.finish_reason.name.lower()],
        sc.COST_MICROS: r.cost_micros,
        sc.BASELINE_MICROS: r.baseline_micros,
        sc.TIER: r.tier.label,
        sc.ROUTE_SCORE: r.decision.score,
        sc.ROUTE_POLICY: r.decision.policy,
        sc.CACHE_HIT: r.cache_hit,
        sc.CACHE_COALESCED: r.coalesced,
        sc.CACHE_SAVED_MICROS: r.saved_micros if r.cache_hit else 0,
        sc.ESCALATED: r.escalated,
    }
    if r.budget_remaining_micros is not None:
        attrs[sc.BUDGET_REMAINING_MICROS] = r.budget_remaining_micros
    span.set_attributes(attrs)


def budget_request_id(request_id: str, run: str, suffix: str) -> str:
    """The budget's idempotency key for one reservation of a request, within the budget's 128 characters.

    Every run passes its own ``run`` id — an interactive run, or one async submission attempt: each is a new
    reservation, so a client reusing a request_id never replays (and gets for free) an earlier run's reservation,
    while retries of the Reserve call within the run keep the key and the budget deduplicates them. (An async
    resubmission that finds its job already queued releases its own reservation: the job holds one.)
    """
    base = f"{request_id}@{run}" if run else request_id
    if len(base) + len(suffix) > 128:
        base = hashlib.sha256(base.encode("utf-8")).hexdigest()
    return base + suffix


def validate(inp: GenerateInput, limits: PipelineLimits) -> None:
    """Every bad field at once, as INVALID_ARGUMENT with BadRequest."""
    v = Validator()
    a = inp.attribution
    v.require(bool(a.tenant), "attribution.tenant", "required (request field or x-costmesh-tenant metadata)")
    for name, value, cap in (("tenant", a.tenant, 64), ("team", a.team, 64), ("feature", a.feature, 64)):
        v.require(len(value) <= cap, f"attribution.{name}", f"at most {cap} characters")
    v.require(len(a.end_user) <= 128, "attribution.end_user", "at most 128 characters")
    v.require(len(inp.request_id) <= limits.max_request_id_chars, "request_id", "at most 128 characters")
    v.require(bool(inp.messages), "messages", "at least one message is required")
    v.require(len(inp.messages) <= limits.max_messages, "messages", f"at most {limits.max_messages} messages")
    total = 0
    for i, m in enumerate(inp.messages[: limits.max_messages]):
        v.require(m.role in ROLES, f"messages[{i}].role", "must be system, user, assistant or tool")
        v.require(len(m.content) <= limits.max_message_chars, f"messages[{i}].content", "too long")
        total += len(m.content)
    v.require(total <= limits.max_total_chars, "messages", f"at most {limits.max_total_chars} characters in all")
    if inp.messages:
        v.require(any(m.content.strip() for m in inp.messages), "messages", "all messages are empty")
    s = inp.sampling
    v.require(0 <= s.max_tokens <= limits.max_tokens_limit, "sampling.max_tokens", f"0..{limits.max_tokens_limit}")
    if s.temperature is not None:
        v.require(0.0 <= s.temperature <= 2.0, "sampling.temperature", "must be in [0, 2]")
    if s.top_p is not None:
        v.require(0.0 < s.top_p <= 1.0, "sampling.top_p", "must be in (0, 1]")
    v.require(len(s.stop) <= limits.max_stop_sequences, "sampling.stop", "at most 8 stop sequences")
    v.require(all(0 < len(x) <= 64 for x in s.stop), "sampling.stop", "each stop sequence 1..64 characters")
    v.raise_if_any("invalid request")


class _Request:
    """What one request holds: the money of its :class:`Ledgerline` and its cache fill lease."""

    def __init__(self, line: Ledgerline, cache: CachePort | None, attribution: Attribution, outbox: Outbox) -> None:
        self.line = line
        self._cache = cache
        self._attribution = attribution
        self._outbox = outbox
        self.lease: tuple[str, str] | None = None

    @property
    def open(self) -> bool:
        """Still holding money or a lease."""
        return self.line.open or self.lease is not None

    async def abandon(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None and self._cache is not None:
            try:
                await self._cache.abandon(attribution=self._attribution, key=lease[0], lease_id=lease[1])
            except CostmeshError as err:  # the lease expires by itself
                log.warning("abandon_failed", key=lease[0], error=err.message)

    async def settle_failure(self) -> None:
        """Nothing was generated: release the reservation and abandon the lease, even if the caller is gone."""
        await self._outbox.shielded(asyncio.gather(self.line.release(), self.abandon()))


class Pipeline:
    """One request through the mesh. Construct once per router process."""

    def __init__(
        self,
        *,
        decider: Decider,
        cache: CachePort | None,
        budget: BudgetPort,
        infer: InferPort,
        tokens: TokenCounter,
        prices: PriceTable,
        models: dict[Tier, str],
        limits: PipelineLimits | None = None,
        jobs: JobPort | None = None,
        metrics: RouterMetrics | None = None,
        savings: SavingsBatcher | None = None,
    ) -> None:
        self._decider = decider
        self._cache = cache
        self._budget = budget
        self._infer = infer
        self._tokens = tokens
        self._prices = prices
        self._models = models
        self.limits = limits or PipelineLimits()
        self._caps = _CapMemory(self.limits.cap_memory_s)
        self._outbox = Outbox(retry_s=self.limits.settle_retry_s)
        self._requests: weakref.WeakSet[_Request] = weakref.WeakSet()
        self._jobs = jobs
        self._inline: dict[str, tuple[str, GenerateResult]] = {}
        self._metrics = metrics
        self._savings = savings or SavingsBatcher(budget)
        self.settler = (
            AsyncSettler(
                jobs=jobs,
                budget=budget,
                tiers=list(models),
                settle=self._settle_job,
                every_s=self.limits.async_settle_every_s,
                ttl_s=self.limits.async_reservation_ttl_s,
            )
            if jobs is not None
            else None
        )
        self._settler_task: asyncio.Task[None] | None = None

    # -- helpers ---------------------------------------------------------------------------------------------

    def cost(self, tier: Tier, usage: TokenUsage) -> int:
        return self._prices.price_for(tier=tier.label, model=self._models[tier]).cost_micros(usage)

    def baseline(self, usage: TokenUsage) -> int:
        """What the same usage costs on the full tier with no prefix or response cache."""
        full = self._prices.price_for(tier=Tier.FULL.label, model=self._models[Tier.FULL])
        return full.cost_micros(TokenUsage(usage.input_tokens, usage.output_tokens, 0))

    def charge(self, tier: Tier, usage: TokenUsage, model: str = "") -> Charge:
        cost = self.cost(tier, usage)
        return Charge(cost, usage, model or self._models[tier], tier, max(0, self.baseline(usage) - cost))

    def _request(self, inp: GenerateInput, cache: CachePort | None, ttl_s: int) -> _Request:
        line = Ledgerline(
            budget=self._budget,
            outbox=self._outbox,
            tenant=inp.attribution.tenant,
            ttl_s=ttl_s,
            renew_every_s=ttl_s / 3,
            stop_timeout_s=self.limits.stop_timeout_s,
        )
        req = _Request(line, cache, inp.attribution, self._outbox)
        self._requests.add(req)
        return req

    def start(self) -> None:
        """Start the background settlement of async jobs (every router takes part; see AsyncSettler)."""
        if self.settler is not None and self._settler_task is None and self.limits.async_settle_every_s > 0:
            self._settler_task = asyncio.ensure_future(self.settler.run())

    async def drain(self) -> None:
        """Graceful shutdown: wait for in-flight requests to settle, then for the background settlements, then send
        the queued savings records — each wait bounded by ``drain_wait_s``.

        At shutdown the server cancels the calls still running once its grace period is over, but may stop before
        their handlers ran far enough to hand over what they hold; so first wait until no request holds a
        reservation or lease unsettled. The async settler stops: any router settles the jobs it leaves.
        """
        until = time.monotonic() + self.limits.drain_wait_s
        # A poll, at shutdown only: requests change state by plain assignment, without signalling.
        while any(r.open for r in self._requests) and time.monotonic() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if self._settler_task is not None:
            self._settler_task.cancel()
            await asyncio.gather(self._settler_task, return_exceptions=True)
            self._settler_task = None
        await self._outbox.drain(self.limits.drain_wait_s)
        await self._savings.drain(self.limits.drain_wait_s)

    def decide(self, inp: GenerateInput) -> Decision:
        max_tokens = self._max_tokens(inp)
        return self._decider.decide(
            messages=inp.messages, max_tokens=max_tokens, attribution=inp.attribution, requested_tier=inp.requested_tier
        )

    def _max_tokens(self, inp: GenerateInput) -> int:
        requested = inp.sampling.max_tokens or self.limits.default_max_tokens
        cap = self._caps.get(inp.attribution.tenant, inp.attribution.feature)
        return min(requested, cap) if cap else requested

    # -- the pipeline ----------------------------------------------------------------------------------------

    async def run(self, inp: GenerateInput) -> AsyncGenerator[Event, None]:
        """Yields text deltas as they are produced, then exactly one ``GenerateResult``."""
        validate(inp, self.limits)
        if not inp.request_id:
            inp = replace(inp, request_id=uuid.uuid4().hex)
        span = trace.get_current_span()
        _annotate_request(span, inp, self._max_tokens(inp))
        decision = self.decide(inp)
        span.set_attributes({sc.ROUTE_SCORE: decision.score, sc.ROUTE_UNCERTAIN: decision.uncertain})
        req = self._request(inp, self._cache, self.limits.reservation_ttl_s)
        lookup = await self._lookup(inp, decision.tier)
        if lookup.outcome is LookupOutcome.HIT and lookup.answer is not None:
            result = self._hit(inp, decision, lookup)
            _annotate_result(span, result)
            self._observe(inp, result)
            yield TextDelta(result.text)
            yield result
            return
        if lookup.outcome is LookupOutcome.MISS:
            req.lease = (lookup.key, lookup.lease_id)
        answered = False
        try:
            # aclosing: a consumer that stops early (the caller went away) closes the miss now, so it stops the worker
            # and bills what was generated before anything here settles the rest.
            async with contextlib.aclosing(self._miss(inp, decision, req)) as events:
                async for event in events:
                    if isinstance(event, GenerateResult):
                        _annotate_result(span, event)
                        self._observe(inp, event)
                        answered = True
                    yield event
        except BaseException as err:
            if not answered:
                self._observe(inp, error=err)
            await req.settle_failure()
            raise

    def _observe(
        self, inp: GenerateInput, result: GenerateResult | None = None, error: BaseException | None = None
    ) -> None:
        """The request's result or failure is known: count it (services/router/metrics.py)."""
        if self._metrics is not None:
            self._metrics.observe(inp, result, error)

    async def _lookup(self, inp: GenerateInput, tier: Tier, *, peek: bool = False) -> CacheLookup:
        if self._cache is None or inp.cache_mode is CacheMode.BYPASS:
            return CacheLookup(LookupOutcome.UNCACHEABLE)
        try:
            lookup = await self._cache.lookup(
                attribution=inp.attribution,
                model=self._models[tier],
                messages=inp.messages,
                sampling=replace(inp.sampling, max_tokens=self._max_tokens(inp)),
                peek=peek,
            )
        except CostmeshError as err:  # cache down: serve without it
            log.warning("cache_unavailable", error=err.message, reason=err.reason)
            return CacheLookup(LookupOutcome.UNAVAILABLE)
        if inp.cache_mode is CacheMode.REFRESH and lookup.outcome is LookupOutcome.HIT:
            # A refresh never serves the stored answer; without a lease it runs uncached.
            return CacheLookup(LookupOutcome.UNCACHEABLE, key=lookup.key)
        return lookup

    def _hit(self, inp: GenerateInput, decision: Decision, lookup: CacheLookup) -> GenerateResult:
        answer = lookup.answer
        assert answer is not None
        saved = self.baseline(answer.usage)
        self._savings.add(
            SavingsRecord(
                request_id=inp.request_id,
                attribution=inp.attribution,
                saved_micros=saved,
                model=answer.model,
                tier=answer.tier,
                usage=answer.usage,
                span=trace.get_current_span().get_span_context(),
            )
        )
        return GenerateResult(
            request_id=inp.request_id,
            text=answer.text,
            usage=answer.usage,
            cost_micros=0,
            tier=answer.tier,
            model=answer.model,
            decision=decision,
            cache_hit=True,
            saved_micros=saved,
            budget_remaining_micros=None,
            finish_reason=answer.finish_reason,
            ttft_ms=0.0,
            escalated=False,
            coalesced=lookup.coalesced,
            baseline_micros=saved,
        )

    async def _reserve(self, inp: GenerateInput, tier: Tier, line: Ledgerline, key: str, ttl_s: int) -> int:
        """Hold the estimate of ``inp`` on ``tier`` in ``line``; returns the prompt's token count."""
        max_tokens = self._max_tokens(inp)
        prompt_tokens = self._tokens.count_prompt(tier, inp.messages)
        price = self._prices.price_for(tier=tier.label, model=self._models[tier])
        reserve = partial(
            self._budget.reserve,
            request_id=key,
            attribution=inp.attribution,
            estimated_cost_micros=price.estimate_micros(prompt_tokens, max_tokens),
            estimated_tokens=prompt_tokens + max_tokens,
            model=self._models[tier],
            tier=tier,
            ttl_s=ttl_s,
        )
        await line.reserve(key, reserve)
        return prompt_tokens

    async def _reserve_with_downgrade(
        self, inp: GenerateInput, decision: Decision, line: Ledgerline, run: str, ttl_s: int
    ) -> tuple[Tier, str, int]:
        """Reserve on the decided tier; downgrade to cheap on a soft threshold or a full-tier hard stop.

        Returns the tier, the policy that chose it, and the prompt's token count on that tier.
        """
        tier = decision.tier
        can_downgrade = tier is Tier.FULL and decision.min_tier is Tier.CHEAP and inp.requested_tier is not Tier.FULL
        key = partial(budget_request_id, inp.request_id, run)
        try:
            prompt_tokens = await self._reserve(inp, tier, line, key(""), ttl_s)
        except ResourceExhausted:
            if not can_downgrade:
                raise
            prompt_tokens = await self._reserve(inp, Tier.CHEAP, line, key("/cheap"), ttl_s)
            return Tier.CHEAP, "budget_downgrade", prompt_tokens
        except Unavailable:
            if not self.limits.fail_open_budget:
                raise
            log.warning("budget_fail_open", request_id=inp.request_id)
            return tier, decision.policy, self._tokens.count_prompt(tier, inp.messages)
        res = line.reservation
        assert res is not None
        if res.max_tokens_cap:
            self._caps.put(inp.attribution.tenant, inp.attribution.feature, res.max_tokens_cap)
        if res.soft_limit_exceeded and can_downgrade:
            # the cheap reservation replaces the full one, which the ledgerline releases (retried through outages)
            prompt_tokens = await self._reserve(inp, Tier.CHEAP, line, key("/cheap"), ttl_s)
            return Tier.CHEAP, "budget_downgrade", prompt_tokens
        return tier, decision.policy, prompt_tokens

    def _generate(self, tier: Tier, inp: GenerateInput, sampling: Any) -> Generation:
        return self._infer.generate(
            tier=tier, request_id=inp.request_id, messages=inp.messages, sampling=sampling, attribution=inp.attribution
        )

    async def _miss(self, inp: GenerateInput, decision: Decision, req: _Request) -> AsyncGenerator[Event, None]:
        run = uuid.uuid4().hex[:12]  # this run's reservations: a reused request_id is a new inference, paid again
        line = req.line
        ttl_s = self.limits.reservation_ttl_s
        tier, policy, prompt_tokens = await self._reserve_with_downgrade(inp, decision, line, run, ttl_s)
        remaining = line.reservation.remaining_micros if line.reservation else None
        escalated = False
        sampling = replace(inp.sampling, max_tokens=self._max_tokens(inp))
        if line.reservation is not None and line.reservation.max_tokens_cap:
            sampling = replace(sampling, max_tokens=min(sampling.max_tokens, line.reservation.max_tokens_cap))
        t0 = time.perf_counter()
        text: list[str] = []
        last: InferChunk | None = None
        # The generation whose tokens this request owes for: set as soon as one is started (a caller cancelled while
        # the worker prefilled still pays for what the worker says it did), cleared once its usage is committed.
        live: Generation | None = None
        try:
            async with line.renewing():
                live = self._generate(tier, inp, sampling)
                stream = aiter(live)
                try:
                    first = await anext(stream)
                except (Unavailable, StopAsyncIteration) as err:
                    # Nothing was generated on this tier: release it and escalate, if policy allows the other one.
                    live = None
                    other = Tier.CHEAP if tier is Tier.FULL else Tier.FULL
                    if not (decision.min_tier <= other <= decision.max_tier):
                        raise Unavailable(f"tier {tier.label} is unavailable and policy forbids {other.label}") from err
                    log.warning("tier_unavailable_escalating", tier=tier.label, to=other.label)
                    await line.release()
                    tier, policy, escalated = other, "escalated", True
                    try:
                        prompt_tokens = await self._reserve(
                            inp, tier, line, budget_request_id(inp.request_id, run, "/esc"), ttl_s
                        )
                    except Unavailable:
                        if not self.limits.fail_open_budget:
                            raise
                    live = self._generate(tier, inp, sampling)
                    stream = aiter(live)
                    first = await anext(stream)
                ttft_ms = (time.perf_counter() - t0) * 1000
                trace.get_current_span().add_event(sc.EVENT_FIRST_TOKEN, {sc.TTFT_MS: ttft_ms})
                chunk: InferChunk | None = first
                while chunk is not None:
                    if chunk.text:
                        text.append(chunk.text)
                        yield TextDelta(chunk.text)
                    if chunk.usage is not None:
                        last = chunk
                    chunk = await anext(stream, None)
                if last is None or last.usage is None:
                    raise Unavailable("worker stream ended without usage", reason="INCOMPLETE_STREAM")
                live = None  # complete: billed below, by its usage
                charge = self.charge(tier, last.usage, last.model)
                if line.open:
                    remaining = await line.commit(charge)
        except BaseException:
            if live is not None:
                # The caller went away (cancel, deadline, disconnect) or the worker failed mid-stream: stop it, and
                # bill what it generated.
                line.finish_abandoned(live, partial(self.charge, tier), prompt_tokens=prompt_tokens)
            raise
        assert last is not None
        usage = charge.usage
        answer = CachedAnswer(
            text="".join(text),
            usage=usage,
            cost_micros=charge.cost_micros,
            model=charge.model,
            tier=tier,
            finish_reason=last.finish_reason,
        )
        lease, req.lease = req.lease, None
        if lease is not None and self._cache is not None:
            if tier is decision.tier and last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                # complete answers only; the cache's own policy decides whether LENGTH ones are stored
                self._outbox.background(
                    "cache_fill",
                    self._cache.fill(attribution=inp.attribution, key=lease[0], lease_id=lease[1], answer=answer),
                )
            else:  # another tier's answer, or an aborted one, is never stored under this key
                self._outbox.background(
                    "cache_abandon",
                    self._cache.abandon(attribution=inp.attribution, key=lease[0], lease_id=lease[1]),
                )
        final_decision = (
            decision
            if (tier is decision.tier and not policy)
            else replace(decision, tier=tier, policy=policy or decision.policy)
        )
        yield GenerateResult(
            request_id=inp.request_id,
            text=answer.text,
            usage=usage,
            cost_micros=charge.cost_micros,
            tier=tier,
            model=answer.model,
            decision=final_decision,
            cache_hit=False,
            saved_micros=charge.saved_micros,
            budget_remaining_micros=remaining,
            finish_reason=last.finish_reason,
            ttft_ms=last.ttft_ms or ttft_ms,
            escalated=escalated,
            baseline_micros=self.baseline(usage),
        )

    async def generate(self, inp: GenerateInput) -> GenerateResult:
        """The unary form: run the pipeline to its result."""
        result: GenerateResult | None = None
        async with contextlib.aclosing(self.run(inp)) as events:
            async for event in events:
                if isinstance(event, GenerateResult):
                    result = event
        if result is None:  # pragma: no cover - run() always ends with a result or raises
            raise InvalidArgument("no result")
        return result

    # -- async requests --------------------------------------------------------------------------------------

    async def submit(self, inp: GenerateInput) -> AsyncSubmission:
        """Admit through cache and budget, then enqueue a durable job on the chosen tier.

        A cache hit answers at once (state SUCCEEDED, result inline). Otherwise the reservation goes with the job:
        its id is in the job's metadata, and whichever router sees the job finished settles it
        (:class:`~services.router.settlement.AsyncSettler`, or a ``status`` call). Each submission attempt reserves
        under its own key; a resubmission that finds the request's job already there releases its own reservation
        (the job holds one). A SubmitJob whose outcome is unknown keeps the money held until a lookup of the job
        shows whether the job got it.
        """
        if self._jobs is None:
            raise Unavailable("async jobs are not configured", reason="ASYNC_NOT_CONFIGURED")
        validate(inp, self.limits)
        if not inp.request_id:
            inp = replace(inp, request_id=uuid.uuid4().hex)
        decision = self.decide(inp)
        lookup = await self._lookup(inp, decision.tier, peek=True)
        if lookup.outcome is LookupOutcome.HIT and lookup.answer is not None:
            result = self._hit(inp, decision, lookup)
            job_id = f"hit.{inp.request_id}"
            if len(self._inline) >= self.limits.inline_results:
                self._inline.pop(next(iter(self._inline)))
            self._inline[job_id] = (inp.attribution.tenant, result)
            return AsyncSubmission(job_id, JobState.SUCCEEDED, decision, result)
        req = self._request(inp, None, self.limits.async_reservation_ttl_s)
        attempt = "a" + uuid.uuid4().hex[:12]
        try:
            tier, policy, _ = await self._reserve_with_downgrade(
                inp, decision, req.line, attempt, self.limits.async_reservation_ttl_s
            )
        except BaseException:
            await req.settle_failure()
            raise
        res = req.line.reservation
        money = JobMoney(res.reservation_id, res.expires_ms) if res is not None else JobMoney("")
        meta = json.dumps(
            {
                "reservation_id": money.reservation_id,
                "expires_ms": money.expires_ms,
                "tier": tier.label,
                "request_id": inp.request_id,
                "decision_tier": decision.tier.label,
                "policy": policy,
                "score": decision.score,
            }
        )
        tenant = inp.attribution.tenant
        try:
            sub = await self._jobs.submit_job(
                tier=tier,
                request_id=inp.request_id,
                messages=inp.messages,
                sampling=replace(inp.sampling, max_tokens=self._max_tokens(inp)),
                attribution=inp.attribution,
                metadata=meta,
            )
        except UNKNOWN_OUTCOME:
            held = req.line.handover()
            if held is not None:
                self._reconcile_submission(tier, tenant, inp.request_id, held)
            raise
        except BaseException:
            await req.settle_failure()
            raise
        stored = JobMoney.of(sub.metadata) if sub.replayed else money
        if stored.reservation_id != money.reservation_id:
            await req.line.release()  # the request's job was already there, with a reservation of its own
        else:
            req.line.handover()
        if self.settler is not None:
            self.settler.track(tier, sub.job_id, tenant, stored)
        job_id = f"{tier.label}.{sub.job_id}"
        final = decision if tier is decision.tier else replace(decision, tier=tier, policy=policy)
        return AsyncSubmission(job_id, JobState.QUEUED, final)

    def _reconcile_submission(self, tier: Tier, tenant: str, request_id: str, held: Reservation) -> None:
        """A SubmitJob with an unknown outcome: once it has surely landed or died, look the job up; release the
        reservation unless the job holds it."""
        jobs = self._jobs
        assert jobs is not None

        async def reconcile() -> None:
            job = await jobs.find_job(tier=tier, tenant=tenant, request_id=request_id)
            if job is not None and JobMoney.of(job.metadata).reservation_id == held.reservation_id:
                if self.settler is not None:
                    self.settler.track(tier, job.job_id, tenant, JobMoney.of(job.metadata))
                return
            await self._budget.release(reservation_id=held.reservation_id, tenant=tenant)

        self._outbox.spawn(
            "submit_reconcile", held.reservation_id, reconcile, delay_s=self.limits.job_reconcile_delay_s
        )

    async def _settle_job(self, tier: Tier, job: JobStatus, tenant: str = "") -> int | None:
        """Settle a finished job's reservation (commit its usage, or release it) and record that in the job store.

        Idempotent (Commit and Release replay), so several routers may settle the same job. Returns the smallest
        remaining budget after a commit, when known.
        """
        tenant = tenant or job.tenant
        money = JobMoney.of(job.metadata)
        if self.settler is not None:
            self.settler.forget(tenant, money)
        remaining: int | None = None
        if money.reservation_id:
            if job.state is JobState.SUCCEEDED and job.usage is not None:
                c = self.charge(tier, job.usage, job.model)
                remaining = await self._budget.commit(
                    reservation_id=money.reservation_id,
                    tenant=tenant,
                    cost_micros=c.cost_micros,
                    usage=c.usage,
                    model=c.model,
                    tier=tier,
                    saved_micros=c.saved_micros,
                )
            elif not job.settled:
                await self._budget.release(reservation_id=money.reservation_id, tenant=tenant)
        if not job.settled and self._jobs is not None:
            await self._jobs.mark_settled(tier=tier, job_id=job.job_id)
        return remaining

    async def status(self, job_id: str, attribution: Attribution) -> AsyncStatus:
        """The job's state; a finished job is settled (committed or released) before its result is returned."""
        if not attribution.tenant:
            raise InvalidArgument(
                "tenant is required",
                violations=[FieldViolation("attribution.tenant", "required (request field or x-costmesh-tenant)")],
            )
        if job_id in self._inline:
            tenant, result = self._inline[job_id]
            if tenant != attribution.tenant:
                raise NotFound(f"no async request {job_id!r}")
            return AsyncStatus(job_id, JobState.SUCCEEDED, result)
        tier_label, _, inner = job_id.partition(".")
        tier = {t.label: t for t in Tier}.get(tier_label)
        if tier is None or not inner or self._jobs is None:
            raise NotFound(f"no async request {job_id!r}")
        job = await self._jobs.get_job(tier=tier, job_id=inner, tenant=attribution.tenant)
        if not job.state.terminal:
            return AsyncStatus(job_id, job.state)
        remaining: int | None = None
        try:
            remaining = await self._settle_job(tier, job, attribution.tenant)
        except TRANSIENT as err:  # the job's record stays unsettled: the async settler commits it later
            log.warning("async_settle_deferred", job_id=job_id, error=err.message)
        except CostmeshError as err:  # the job ran: its result is the caller's whatever the ledger said
            log.error("async_settle_failed", job_id=job_id, error=err.message, reason=err.reason)
        if job.state is not JobState.SUCCEEDED or job.usage is None:
            return AsyncStatus(job_id, job.state, error=job.error or job.state.name)
        meta = _metadata(job.metadata)
        decision = Decision(
            tier=tier,
            score=float(meta.get("score", 0.0)),
            threshold=0.0,
            uncertain=False,
            reasons=(),
            classifier_tier={t.label: t for t in Tier}.get(str(meta.get("decision_tier")), tier),
            policy=str(meta.get("policy", "")),
        )
        c = self.charge(tier, job.usage, job.model)
        result = GenerateResult(
            request_id=str(meta.get("request_id", "")),
            text=job.text,
            usage=job.usage,
            cost_micros=c.cost_micros,
            tier=tier,
            model=c.model,
            decision=decision,
            cache_hit=False,
            saved_micros=c.saved_micros,
            budget_remaining_micros=remaining,
            finish_reason=job.finish_reason,
            ttft_ms=job.ttft_ms,
            escalated=False,
            baseline_micros=self.baseline(job.usage),
        )
        return AsyncStatus(job_id, job.state, result)


def _metadata(raw: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
