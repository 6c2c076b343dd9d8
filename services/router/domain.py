"""The router's domain values and the ports its pipeline talks to (no gRPC here).

``services/router/pipeline.py`` orchestrates over these ports, ``services/router/settlement.py`` owns the money of each
request, ``services/router/clients.py`` implements the ports over gRPC, and the front doors (``server.py``) translate
their wire format to :class:`GenerateInput` and from :class:`GenerateResult`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from services.common.attribution import Attribution
from services.common.pricing import TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.savings import SavingsRecord


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
    #: When the budget returns the money unless it is renewed or settled (Unix ms; 0 = unknown).
    expires_ms: int = 0
    #: True when the key replayed a reservation that was already committed: nothing is held under it.
    settled: bool = False


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

    async def renew(self, *, reservation_id: str, tenant: str, ttl_s: int) -> int:
        """Extends a held reservation; returns its new expiry (Unix ms). FailedPrecondition once it is not held."""
        ...

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


class Generation(Protocol):
    """One generation running on a worker: its chunks, and the means to stop it early and still learn its usage.

    Iterating yields the chunks as the worker produces them (the last carries the usage); it raises ``Unavailable``
    when the worker fails. Cancelling the iterating task does not touch the worker: a consumer that goes away calls
    :meth:`stop`, which asks the worker to stop and returns the final chunk with the usage of every token generated
    so far — what the request must be billed.
    """

    def __aiter__(self) -> AsyncIterator[InferChunk]: ...

    @property
    def output_tokens(self) -> int:
        """Output tokens received so far (a lower bound of what the worker generated)."""
        ...

    async def stop(self, timeout_s: float) -> InferChunk | None:
        """Stop now; the final chunk (with usage) of what was generated, or None when the worker could not say."""
        ...


class InferPort(Protocol):
    def generate(
        self, *, tier: Tier, request_id: str, messages: Sequence[Message], sampling: Sampling, attribution: Attribution
    ) -> Generation:
        """Start a generation (raises ``Unavailable`` when the tier cannot serve, now or on the first chunk)."""
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
    request_id: str = ""
    tenant: str = ""
    settled: bool = False


@dataclass(frozen=True, slots=True)
class JobSubmission:
    job_id: str
    #: The request id already had a job: this is that job, and ``metadata`` is the one it was submitted with.
    replayed: bool = False
    metadata: str = ""


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
    ) -> JobSubmission: ...

    async def get_job(self, *, tier: Tier, job_id: str, tenant: str) -> JobStatus: ...

    async def find_job(self, *, tier: Tier, tenant: str, request_id: str) -> JobStatus | None:
        """The job submitted with ``request_id`` by ``tenant``, or None when there is none."""
        ...

    async def list_unsettled(self, *, tier: Tier, page_token: str) -> tuple[list[JobStatus], str]:
        """Jobs whose settlement is not recorded yet, oldest first, a page at a time (next token "" at the end)."""
        ...

    async def mark_settled(self, *, tier: Tier, job_id: str) -> None: ...


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
