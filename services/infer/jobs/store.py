"""Durable async jobs: the store protocol both implementations (SQLite, Redis Streams) satisfy.

Life of a job: ``submit`` persists it QUEUED (idempotent on (tenant, request_id); refused when ``capacity`` jobs
already wait). A worker ``claim``s it — the job turns RUNNING, its ``attempts`` go up by one and the claim carries a
fresh **token**. While running, the worker ``renew``s its lease; a worker that dies stops renewing, and once the lease
has run out another worker's ``claim`` takes the job over with a new token (Redis: ``XAUTOCLAIM`` of the idle
pending entry; SQLite: an expired ``lease_until``). ``complete`` / ``fail`` / ``release`` only act while the caller's
token is still the job's token, so a worker that lost its lease can never finish a job a second time: exactly one
completion wins (fencing). A job claimed ``max_attempts`` times without finishing fails instead of running again.

Settlement: every job is *unsettled* from its submission until ``mark_settled`` records (durably, once it finished)
that whoever reserved money for it has committed or released that reservation. ``list_jobs(unsettled_only=True)``
reads an index of the unsettled jobs only — not the whole history — so a router can find, oldest first, the finished
jobs still to bill and the running ones whose reservation to renew. Finished jobs, settled or not, are kept for the
store's result TTL.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class QueueFull(Exception):
    """``capacity`` jobs are already queued."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"{depth} jobs queued")
        self.depth = depth


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a submission persists. ``payload`` is opaque to the store (the serialized generation request)."""

    request_id: str
    tenant: str
    payload: str
    metadata: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    request_id: str
    tenant: str
    state: JobState
    payload: str
    metadata: str
    attempts: int
    created_unix_ms: int
    finished_unix_ms: int = 0
    result: str = ""  # opaque (the serialized text + summary) when SUCCEEDED
    error: str = ""  # when FAILED
    worker: str = ""  # last worker that claimed it
    settled: bool = False  # mark_settled recorded its settlement


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's hold on a running job; ``token`` fences every later write."""

    job: Job
    token: str
    worker: str
    reclaimed: bool  # another worker had claimed it before (it died or lost its lease)
    entry_id: str = ""  # Redis stream entry id ("" for SQLite)

    @property
    def job_id(self) -> str:
        return self.job.job_id


@dataclass(frozen=True, slots=True)
class SubmitResult:
    job: Job
    replayed: bool


class Settle(StrEnum):
    """What ``mark_settled`` did."""

    SETTLED = "settled"  # recorded now
    REPLAYED = "replayed"  # it was already settled
    NOT_FINISHED = "not_finished"  # QUEUED or RUNNING: nothing to settle yet
    NOT_FOUND = "not_found"


class BadPageToken(ValueError):
    """A ``page_token`` this store did not issue."""


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of ``list_jobs``: the jobs (oldest first; ``payload`` left empty) and where the next page starts
    ("" = no more)."""

    jobs: list[Job]
    next_page_token: str


#: A page stops growing once its jobs' results, errors and metadata pass this many bytes (under gRPC's 4 MiB).
PAGE_MAX_BYTES = 2 * 1024 * 1024


class JobStore(Protocol):
    async def submit(self, spec: JobSpec, *, capacity: int) -> SubmitResult:
        """Persist a QUEUED job, or return the existing one for the same (tenant, request_id).

        Raises ``QueueFull`` when ``capacity`` jobs are already QUEUED (a replay is never refused).
        """
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def get_by_request(self, tenant: str, request_id: str) -> Job | None:
        """The job submitted with this (tenant, request_id), while it is kept."""
        ...

    async def mark_settled(self, job_id: str) -> Settle:
        """Record, durably, that a finished job's reservation was settled (idempotent: REPLAYED the second time)."""
        ...

    async def list_jobs(
        self,
        *,
        unsettled_only: bool = False,
        states: frozenset[JobState] = frozenset(),
        limit: int = 100,
        page_token: str = "",
        max_bytes: int = PAGE_MAX_BYTES,
    ) -> JobPage:
        """Jobs oldest first (by submission), only unsettled ones when asked, only in ``states`` when not empty.

        At most ``limit`` per page, fewer when their results pass ``max_bytes`` (at least one). A page may also come
        back short — even empty — with a next token, when the store bounded the work of one call; an empty
        ``next_page_token`` means there are no more. Raises ``BadPageToken`` for a token it did not issue.
        """
        ...

    @property
    def lease_s(self) -> float:
        """The queue's lease: a RUNNING job not renewed for this long is taken over by the next claim.

        It is a property of the queue (every worker of a queue must use the same), given to the store at construction:
        Redis measures it as the idle time of the pending stream entry, SQLite as a ``lease_until`` timestamp.
        """
        ...

    async def claim(self, worker: str, *, max_attempts: int) -> Claim | None:
        """The oldest QUEUED job, or a RUNNING one whose lease ran out; None when there is none.

        A job already claimed ``max_attempts`` times is marked FAILED instead (and the next one is looked for).
        """
        ...

    async def renew(self, claim: Claim) -> bool:
        """Extend the lease; False when the claim was lost (the job is no longer this claim's)."""
        ...

    async def complete(self, claim: Claim, result: str) -> bool:
        """SUCCEEDED with ``result``; False (and no change) when the claim was lost."""
        ...

    async def fail(self, claim: Claim, error: str) -> bool:
        """FAILED with ``error``; False when the claim was lost."""
        ...

    async def release(self, claim: Claim) -> bool:
        """Back to QUEUED at once for another worker (graceful shutdown, dead engine); False when lost."""
        ...

    async def queued(self) -> int:
        """How many jobs wait (QUEUED)."""
        ...

    async def close(self) -> None: ...


def job_bytes(job: Job) -> int:
    """Roughly what a job weighs in a ListJobs page."""
    return len(job.result) + len(job.error) + len(job.metadata) + 256


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def new_token() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)
