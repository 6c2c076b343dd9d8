"""The router's request pipeline: cache → classify + policy → reserve → infer → commit → fill.

Pure orchestration over four ports (``CachePort``, ``BudgetPort``, ``InferPort``, ``TokenCounter``) and a
``Decider`` (the classifier + policy); nothing here imports gRPC. ``services/router/clients.py`` implements the
ports over gRPC, ``services/router/server.py`` translates protos.

Money invariants, held on every path:
* a reservation is either committed with the actual cost or released — on success, failure, escalation,
  cancellation and deadline alike (release/abandon run shielded from cancellation);
* a fill lease is either filled or abandoned, so waiters never wait on a dead holder for longer than the lease;
* ``cost_micros`` of a result equals what was committed to the ledger for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from opentelemetry import trace

from services.common import deadline
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
from services.router.classifier.types import Message, Tier
from services.router.savings import SavingsBatcher, SavingsRecord

if TYPE_CHECKING:
    from services.router.metrics import RouterMetrics

log = structlog.get_logger("costmesh.router")

ROLES = frozenset({"system", "user", "assistant", "tool"})


class CacheMode(Enum):
    DEFAULT = 0
    BYPASS = 1
    REFRESH = 2


class FinishReason(Enum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str
    attribution: Attribution
    messages: tuple[Message, ...]
    sampling: Sampling = Sampling()
    requested_tier: Tier | None = None
    cache_mode: CacheMode = CacheMode.DEFAULT


@dataclass(frozen=True, slots=True)
class Decision:
    """What the classifier + policy chose, and the bounds policy allows when budget or availability intervene."""

    tier: Tier
    score: float
    threshold: float
    uncertain: bool
    reasons: tuple[str, ...]
    classifier_tier: Tier
    policy: str = ""
    min_tier: Tier = Tier.CHEAP
    max_tier: Tier = Tier.FULL


class Decider(Protocol):
    def decide(
        self, *, messages: Sequence[Message], max_tokens: int, attribution: Attribution, requested_tier: Tier | None
    ) -> Decision: ...


# ---- ports -----------------------------------------------------------------------------------------------------


class LookupOutcome(Enum):
    HIT = 1
    MISS = 2
    UNCACHEABLE = 3
    WAIT_TIMEOUT = 4
    UNAVAILABLE = 5


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    usage: TokenUsage
    cost_micros: int
    model: str
    tier: Tier
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class CacheLookup:
    outcome: LookupOutcome
    key: str = ""
    lease_id: str = ""
    answer: CachedAnswer | None = None
    coalesced: bool = False


class CachePort(Protocol):
    async def lookup(
        self, *, attribution: Attribution, model: str, messages: Sequence[Message], sampling: Sampling, peek: bool
    ) -> CacheLookup: ...

    async def fill(self, *, attribution: Attribution, key: str, lease_id: str, answer: CachedAnswer) -> None: ...

    async def abandon(self, *, attribution: Attribution, key: str, lease_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    soft_limit_exceeded: bool
    max_tokens_cap: int
    remaining_micros: int | None


class BudgetPort(Protocol):
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
    ) -> Reservation: ...

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
        """Returns the smallest remaining budget after the commit (None when no cost limit applies)."""
        ...

    async def release(self, *, reservation_id: str, tenant: str) -> None: ...

    async def record_savings(self, tenant: str, records: Sequence[SavingsRecord]) -> None:
        """Record cache hits' savings, all of ``tenant``, in one call (:mod:`services.router.savings` batches them)."""
        ...


@dataclass(frozen=True, slots=True)
class InferChunk:
    text: str
    # Set on the last chunk only.
    usage: TokenUsage | None = None
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    model: str = ""
    ttft_ms: float = 0.0


class InferPort(Protocol):
    def generate(
        self, *, tier: Tier, request_id: str, messages: Sequence[Message], sampling: Sampling, attribution: Attribution
    ) -> AsyncIterator[InferChunk]:
        """Streams chunks; raises ``Unavailable`` when the tier cannot serve (before or during the stream)."""
        ...


class JobState(Enum):
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: str
    state: JobState
    text: str = ""
    usage: TokenUsage | None = None
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    model: str = ""
    error: str = ""
    metadata: str = ""
    ttft_ms: float = 0.0


class JobPort(Protocol):
    async def submit_job(
        self,
        *,
        tier: Tier,
        request_id: str,
        messages: Sequence[Message],
        sampling: Sampling,
        attribution: Attribution,
        metadata: str,
    ) -> str: ...

    async def get_job(self, *, tier: Tier, job_id: str, tenant: str) -> JobStatus: ...


class TokenCounter(Protocol):
    def count_prompt(self, tier: Tier, messages: Sequence[Message]) -> int: ...


# ---- results ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenerateResult:
    request_id: str
    text: str
    usage: TokenUsage
    cost_micros: int
    tier: Tier
    model: str
    decision: Decision
    cache_hit: bool
    saved_micros: int
    budget_remaining_micros: int | None
    finish_reason: FinishReason
    ttft_ms: float
    escalated: bool
    coalesced: bool = False
    baseline_micros: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


Event = TextDelta | GenerateResult


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AsyncSubmission:
    job_id: str
    state: JobState
    decision: Decision
    result: GenerateResult | None = None


@dataclass(frozen=True, slots=True)
class AsyncStatus:
    job_id: str
    state: JobState
    result: GenerateResult | None = None
    error: str = ""


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
    async_reservation_ttl_s: int = 3600
    async_poll_s: float = 0.5
    async_poll_max_s: float = 10.0
    inline_results: int = 10_000
    #: How long a commit or release that met an unreachable budget is retried in the background (idempotent calls).
    settle_retry_s: float = 120.0
    #: How long drain() waits for requests still holding a reservation or lease to settle (shutdown).
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

    An interactive run passes its own ``run`` id: every run is a new inference that must be paid, so a client reusing
    a request_id must not replay (and get for free) an earlier run's reservation; retries of the Reserve call within
    the run keep the key, so the budget still deduplicates them. An async submission passes the tier it reserves for:
    the worker of that tier deduplicates jobs by request_id, so a resubmission is the same job and settles the same
    reservation, while the same id sent to the other tier's worker is a new job with a reservation of its own.
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


Retry = Callable[[str, Callable[[], Awaitable[object]], str], None]


class _Settlement:
    """Tracks the open reservation and lease of one request so every exit path settles them exactly once.

    ``track`` registers the shielded settlement with the pipeline, so a graceful shutdown waits for it before the
    channels close; ``retry`` hands a release that met an unreachable budget to a background retry.
    """

    def __init__(
        self,
        budget: BudgetPort,
        cache: CachePort | None,
        attribution: Attribution,
        *,
        track: Callable[[asyncio.Future[Any]], None] | None = None,
        retry: Retry | None = None,
    ) -> None:
        self._budget = budget
        self._cache = cache
        self._attribution = attribution
        self._track = track
        self._retry = retry
        self.reservation: Reservation | None = None
        self.lease: tuple[str, str] | None = None

    @property
    def open(self) -> bool:
        """Still holding money or a lease (its settlement, once started, is tracked instead)."""
        return self.reservation is not None or self.lease is not None

    async def release(self) -> None:
        res, self.reservation = self.reservation, None
        if res is not None:
            tenant = self._attribution.tenant
            try:
                await self._budget.release(reservation_id=res.reservation_id, tenant=tenant)
            except TRANSIENT as err:
                if self._retry is None:  # the TTL returns it
                    log.warning("release_failed", reservation_id=res.reservation_id, error=err.message)
                    return
                log.warning("release_deferred", reservation_id=res.reservation_id, error=err.message)
                rid = res.reservation_id
                self._retry("release", lambda: self._budget.release(reservation_id=rid, tenant=tenant), rid)
            except CostmeshError as err:  # the TTL returns it
                log.warning("release_failed", reservation_id=res.reservation_id, error=err.message)

    async def abandon(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None and self._cache is not None:
            try:
                await self._cache.abandon(attribution=self._attribution, key=lease[0], lease_id=lease[1])
            except CostmeshError as err:  # the lease expires by itself
                log.warning("abandon_failed", key=lease[0], error=err.message)

    async def settle_failure(self) -> None:
        settling: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(self.release(), self.abandon()))
        if self._track is not None:
            self._track(settling)
        await asyncio.shield(settling)


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
        self._background: set[asyncio.Future[Any]] = set()
        self._settlements: weakref.WeakSet[_Settlement] = weakref.WeakSet()
        self._jobs = jobs
        self._inline: dict[str, tuple[str, GenerateResult]] = {}
        self._metrics = metrics
        self._savings = savings or SavingsBatcher(budget)

    # -- helpers ---------------------------------------------------------------------------------------------

    def cost(self, tier: Tier, usage: TokenUsage) -> int:
        return self._prices.price_for(tier=tier.label, model=self._models[tier]).cost_micros(usage)

    def baseline(self, usage: TokenUsage) -> int:
        """What the same usage costs on the full tier with no prefix or response cache."""
        full = self._prices.price_for(tier=Tier.FULL.label, model=self._models[Tier.FULL])
        return full.cost_micros(TokenUsage(usage.input_tokens, usage.output_tokens, 0))

    def _background_task(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            # This task runs in a copy of the request's context: background work (settlements, fills, savings) is
            # not bound by the caller's deadline, which may pass before it is done; the clients' own defaults apply.
            deadline.set_remaining(None)
            try:
                await coro
            except CostmeshError as err:
                log.warning("background_failed", error=err.message, reason=err.reason)

        task = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _track(self, fut: asyncio.Future[Any]) -> None:
        """Keep ``fut`` (a shielded settlement) in the set :meth:`drain` waits for."""
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    def _retry_later(self, what: str, call: Callable[[], Awaitable[object]], ref: str) -> None:
        """Retry ``call`` in the background; ``ref`` names what it settles in the logs: the reservation id of a
        commit or release, the request id of a reconciled Reserve (whose reservation id was never received)."""
        self._background_task(self._settle_later(what, call, ref))

    async def _settle_later(self, what: str, call: Callable[[], Awaitable[object]], ref: str) -> None:
        """Retry an idempotent commit or release until the budget answers (bounded by ``settle_retry_s``)."""
        give_up_at = time.monotonic() + self.limits.settle_retry_s
        delay = 0.25
        while True:
            await asyncio.sleep(delay)
            try:
                await call()
            except TRANSIENT as err:
                if time.monotonic() + delay > give_up_at:
                    log.error("settle_gave_up", what=what, ref=ref, error=err.message)
                    return
                delay = min(delay * 2, 5.0)
                continue
            log.info("settled_late", what=what, ref=ref)
            return

    def _settlement(self, attribution: Attribution, cache: CachePort | None) -> _Settlement:
        settle = _Settlement(self._budget, cache, attribution, track=self._track, retry=self._retry_later)
        self._settlements.add(settle)
        return settle

    async def drain(self) -> None:
        """Wait for in-flight settlements, background fills and savings records (graceful shutdown).

        At shutdown the server cancels the calls still running once its grace period is over, but may stop before
        their handlers ran far enough to release what they hold; so first wait (``drain_wait_s`` at most) until no
        request holds a reservation or lease unsettled, then for every settlement and background task, then send
        the queued savings records (``drain_wait_s`` at most when the budget does not answer).
        """
        until = time.monotonic() + self.limits.drain_wait_s
        # A poll, at shutdown only: settlements change state by plain assignment, without signalling.
        while any(s.open for s in self._settlements) and time.monotonic() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
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

    async def run(self, inp: GenerateInput) -> AsyncIterator[Event]:
        """Yields text deltas as they are produced, then exactly one ``GenerateResult``."""
        validate(inp, self.limits)
        if not inp.request_id:
            inp = replace(inp, request_id=uuid.uuid4().hex)
        span = trace.get_current_span()
        _annotate_request(span, inp, self._max_tokens(inp))
        decision = self.decide(inp)
        span.set_attributes({sc.ROUTE_SCORE: decision.score, sc.ROUTE_UNCERTAIN: decision.uncertain})
        settle = self._settlement(inp.attribution, self._cache)
        lookup = await self._lookup(inp, decision.tier)
        if lookup.outcome is LookupOutcome.HIT and lookup.answer is not None:
            result = self._hit(inp, decision, lookup)
            _annotate_result(span, result)
            self._observe(inp, result)
            yield TextDelta(result.text)
            yield result
            return
        if lookup.outcome is LookupOutcome.MISS:
            settle.lease = (lookup.key, lookup.lease_id)
        answered = False
        try:
            async for event in self._miss(inp, decision, settle):
                if isinstance(event, GenerateResult):
                    _annotate_result(span, event)
                    self._observe(inp, event)
                    answered = True
                yield event
        except BaseException as err:
            if not answered:
                self._observe(inp, error=err)
            await settle.settle_failure()
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

    async def _reserve(self, inp: GenerateInput, tier: Tier, suffix: str, ttl_s: int = 0, run: str = "") -> Reservation:
        max_tokens = self._max_tokens(inp)
        prompt_tokens = self._tokens.count_prompt(tier, inp.messages)
        price = self._prices.price_for(tier=tier.label, model=self._models[tier])
        reserve = partial(
            self._budget.reserve,
            # interactive: this run's key; async (no run): keyed by the tier whose worker deduplicates the job
            request_id=budget_request_id(inp.request_id, run, suffix)
            if run
            else budget_request_id(inp.request_id, tier.label, ""),
            attribution=inp.attribution,
            estimated_cost_micros=price.estimate_micros(prompt_tokens, max_tokens),
            estimated_tokens=prompt_tokens + max_tokens,
            model=self._models[tier],
            tier=tier,
            ttl_s=ttl_s,
        )
        try:
            return await reserve()
        except TRANSIENT:
            # The outcome is unknown: the store may have written the reservation and lost the reply (Redis killed
            # between its write and its answer). The caller gets the error; in the background, once the budget
            # answers, the same (idempotent) Reserve finds that reservation — or makes one — and releases it, so no
            # money stays held until the TTL.
            tenant = inp.attribution.tenant

            async def reconcile() -> None:
                try:
                    held = await reserve()
                except TRANSIENT:
                    raise
                except CostmeshError:  # refused now (e.g. a hard limit): nothing is held under this key
                    return
                await self._budget.release(reservation_id=held.reservation_id, tenant=tenant)

            self._retry_later("reserve_reconcile", reconcile, inp.request_id)
            raise

    async def _reserve_with_downgrade(
        self, inp: GenerateInput, decision: Decision, settle: _Settlement, ttl_s: int = 0, run: str = ""
    ) -> tuple[Tier, str]:
        """Reserve on the decided tier; downgrade to cheap on a soft threshold or a full-tier hard stop."""
        tier = decision.tier
        can_downgrade = tier is Tier.FULL and decision.min_tier is Tier.CHEAP and inp.requested_tier is not Tier.FULL
        try:
            settle.reservation = await self._reserve(inp, tier, "", ttl_s, run)
        except ResourceExhausted:
            if not can_downgrade:
                raise
            settle.reservation = await self._reserve(inp, Tier.CHEAP, "/cheap", ttl_s, run)
            return Tier.CHEAP, "budget_downgrade"
        except Unavailable:
            if not self.limits.fail_open_budget:
                raise
            log.warning("budget_fail_open", request_id=inp.request_id)
            return tier, decision.policy
        if settle.reservation.max_tokens_cap:
            self._caps.put(inp.attribution.tenant, inp.attribution.feature, settle.reservation.max_tokens_cap)
        if settle.reservation.soft_limit_exceeded and can_downgrade:
            first = settle.reservation
            settle.reservation = await self._reserve(inp, Tier.CHEAP, "/cheap", ttl_s, run)
            await self._budget.release(reservation_id=first.reservation_id, tenant=inp.attribution.tenant)
            return Tier.CHEAP, "budget_downgrade"
        return tier, decision.policy

    async def _miss(self, inp: GenerateInput, decision: Decision, settle: _Settlement) -> AsyncIterator[Event]:
        run = uuid.uuid4().hex[:12]  # this run's reservations: a reused request_id is a new inference, paid again
        tier, policy = await self._reserve_with_downgrade(inp, decision, settle, run=run)
        remaining = settle.reservation.remaining_micros if settle.reservation else None
        escalated = False
        sampling = replace(inp.sampling, max_tokens=self._max_tokens(inp))
        if settle.reservation is not None and settle.reservation.max_tokens_cap:
            sampling = replace(sampling, max_tokens=min(sampling.max_tokens, settle.reservation.max_tokens_cap))
        t0 = time.perf_counter()
        ttft_ms = 0.0
        text: list[str] = []
        last: InferChunk | None = None
        try:
            stream = self._infer.generate(
                tier=tier,
                request_id=inp.request_id,
                messages=inp.messages,
                sampling=sampling,
                attribution=inp.attribution,
            )
            first = await anext(stream)
        except (Unavailable, StopAsyncIteration) as err:
            other = Tier.CHEAP if tier is Tier.FULL else Tier.FULL
            if not (decision.min_tier <= other <= decision.max_tier):
                raise Unavailable(f"tier {tier.label} is unavailable and policy forbids {other.label}") from err
            log.warning("tier_unavailable_escalating", tier=tier.label, to=other.label)
            await settle.release()
            tier, policy, escalated = other, "escalated", True
            try:
                settle.reservation = await self._reserve(inp, tier, "/esc", run=run)
            except Unavailable:
                if not self.limits.fail_open_budget:
                    raise
            stream = self._infer.generate(
                tier=tier,
                request_id=inp.request_id,
                messages=inp.messages,
                sampling=sampling,
                attribution=inp.attribution,
            )
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
        usage = last.usage
        cost = self.cost(tier, usage)
        baseline = self.baseline(usage)
        res, settle.reservation = settle.reservation, None
        if res is not None:
            rid, tenant, model = res.reservation_id, inp.attribution.tenant, last.model or self._models[tier]

            def commit() -> Awaitable[int | None]:
                return self._budget.commit(
                    reservation_id=rid,
                    tenant=tenant,
                    cost_micros=cost,
                    usage=usage,
                    model=model,
                    tier=tier,
                    saved_micros=max(0, baseline - cost),
                )

            committing: asyncio.Future[int | None] = asyncio.ensure_future(commit())
            self._track(committing)  # a shutdown waits for it
            try:
                remaining = await asyncio.shield(committing)
            except TRANSIENT as err:
                # The inference ran, so the money was spent: the caller gets its answer and the (idempotent) commit
                # is retried until the budget is back, instead of leaving the spend unbilled and the estimate held.
                log.warning("commit_deferred", reservation_id=rid, error=err.message)
                self._retry_later("commit", commit, rid)
                remaining = None
        answer = CachedAnswer(
            text="".join(text),
            usage=usage,
            cost_micros=cost,
            model=last.model or self._models[tier],
            tier=tier,
            finish_reason=last.finish_reason,
        )
        lease, settle.lease = settle.lease, None
        if lease is not None and self._cache is not None:
            if tier is decision.tier and last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                # complete answers only; the cache's own policy decides whether LENGTH ones are stored
                self._background_task(
                    self._cache.fill(attribution=inp.attribution, key=lease[0], lease_id=lease[1], answer=answer)
                )
            else:  # another tier's answer, or an aborted one, is never stored under this key
                self._background_task(self._cache.abandon(attribution=inp.attribution, key=lease[0], lease_id=lease[1]))
        final_decision = (
            decision
            if (tier is decision.tier and not policy)
            else replace(decision, tier=tier, policy=policy or decision.policy)
        )
        yield GenerateResult(
            request_id=inp.request_id,
            text=answer.text,
            usage=usage,
            cost_micros=cost,
            tier=tier,
            model=answer.model,
            decision=final_decision,
            cache_hit=False,
            saved_micros=max(0, baseline - cost),
            budget_remaining_micros=remaining,
            finish_reason=last.finish_reason,
            ttft_ms=last.ttft_ms or ttft_ms,
            escalated=escalated,
            baseline_micros=baseline,
        )

    async def generate(self, inp: GenerateInput) -> GenerateResult:
        """The unary form: run the pipeline to its result."""
        result: GenerateResult | None = None
        async for event in self.run(inp):
            if isinstance(event, GenerateResult):
                result = event
        if result is None:  # pragma: no cover - run() always ends with a result or raises
            raise InvalidArgument("no result")
        return result

    # -- async requests --------------------------------------------------------------------------------------

    async def submit(self, inp: GenerateInput) -> AsyncSubmission:
        """Admit through cache and budget, then enqueue a durable job on the chosen tier.

        A cache hit answers at once (state SUCCEEDED, result inline). Otherwise the reservation is held (with the
        long async TTL) until the job ends; a background task settles it, and so does every ``status`` call that
        sees the job finished (Commit and Release are idempotent, so both may).
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
        settle = self._settlement(inp.attribution, None)
        try:
            tier, policy = await self._reserve_with_downgrade(
                inp, decision, settle, self.limits.async_reservation_ttl_s
            )
            reservation = settle.reservation
            meta = json.dumps(
                {
                    "reservation_id": reservation.reservation_id if reservation else "",
                    "tier": tier.label,
                    "request_id": inp.request_id,
                    "decision_tier": decision.tier.label,
                    "policy": policy,
                    "score": decision.score,
                }
            )
            job = await self._jobs.submit_job(
                tier=tier,
                request_id=inp.request_id,
                messages=inp.messages,
                sampling=replace(inp.sampling, max_tokens=self._max_tokens(inp)),
                attribution=inp.attribution,
                metadata=meta,
            )
        except BaseException:
            await settle.settle_failure()
            raise
        settle.reservation = None  # handed over to the job: settled when it ends (status / _settle_when_done)
        job_id = f"{tier.label}.{job}"
        final = decision if tier is decision.tier else replace(decision, tier=tier, policy=policy)
        self._background_task(self._settle_when_done(job_id, inp.attribution, final))
        return AsyncSubmission(job_id, JobState.QUEUED, final)

    async def _settle_when_done(self, job_id: str, attribution: Attribution, decision: Decision) -> None:
        delay = self.limits.async_poll_s
        while True:
            try:
                status = await self.status(job_id, attribution, decision)
            except TRANSIENT as err:  # the worker or the budget is down: keep settling once it is back
                log.warning("async_settle_retrying", job_id=job_id, error=err.message)
            else:
                if status.state.terminal:
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.limits.async_poll_max_s)

    async def status(self, job_id: str, attribution: Attribution, decision: Decision | None = None) -> AsyncStatus:
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
        meta = json.loads(job.metadata or "{}")
        reservation_id = str(meta.get("reservation_id", ""))
        if job.state is not JobState.SUCCEEDED or job.usage is None:
            if reservation_id:
                await self._budget.release(reservation_id=reservation_id, tenant=attribution.tenant)
            return AsyncStatus(job_id, job.state, error=job.error or job.state.name)
        cost = self.cost(tier, job.usage)
        baseline = self.baseline(job.usage)
        remaining = None
        if reservation_id:
            remaining = await self._budget.commit(
                reservation_id=reservation_id,
                tenant=attribution.tenant,
                cost_micros=cost,
                usage=job.usage,
                model=job.model or self._models[tier],
                tier=tier,
                saved_micros=max(0, baseline - cost),
            )
        if decision is None:
            decision = Decision(
                tier=tier,
                score=float(meta.get("score", 0.0)),
                threshold=0.0,
                uncertain=False,
                reasons=(),
                classifier_tier={t.label: t for t in Tier}.get(str(meta.get("decision_tier")), tier),
                policy=str(meta.get("policy", "")),
            )
        result = GenerateResult(
            request_id=str(meta.get("request_id", "")),
            text=job.text,
            usage=job.usage,
            cost_micros=cost,
            tier=tier,
            model=job.model or self._models[tier],
            decision=decision,
            cache_hit=False,
            saved_micros=max(0, baseline - cost),
            budget_remaining_micros=remaining,
            finish_reason=job.finish_reason,
            ttft_ms=job.ttft_ms,
            escalated=False,
            baseline_micros=baseline,
        )
        return AsyncStatus(job_id, job.state, result)
