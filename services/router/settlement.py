"""The money of a request, in one place: reserve, renew, commit (full or partial), release, retry, reconcile.

Three pieces, one owner each:

* :class:`Outbox` — the router's one background owner of budget calls that must happen whether or not the caller
  is still there. Every entry is an idempotent call (Commit, Release, the Reserve of a reconcile); it runs detached
  from the caller's deadline and cancellation, is retried through outages (``TRANSIENT``) with backoff for
  ``retry_s``, and :meth:`Outbox.drain` waits for what is pending at shutdown, for a bounded time.
* :class:`Ledgerline` — one per request: the only code that reserves, renews, commits or releases for it. While
  the caller waits, its calls are awaited (shielded: a cancelled caller leaves them running in the outbox); when the
  caller is gone — cancelled, past its deadline, disconnected — :meth:`Ledgerline.finish_abandoned` stops the
  generation, learns from the worker every token it produced, and commits that: a stream cancelled after k chunks
  pays for k chunks' tokens, never nothing. The reservation is renewed while the generation runs, so it cannot
  expire under work that is still running.
* :class:`AsyncSettler` — async jobs are settled from the workers' durable job stores (the job record carries its
  reservation id and, once finished, its usage) by whichever router sees them first: every router lists unsettled
  jobs, commits or releases each finished one, marks it settled, and renews the reservations of jobs still queued
  or running. The submitting router is not special; a router restart loses nothing.

Why here and not in the pipeline: the leaks this closes lived in the seams between five places that each had their
own retry and shutdown rules (see docs/architecture.md, "A reservation's life").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import structlog

from services.common import deadline
from services.common.errors import TRANSIENT, Aborted, CostmeshError
from services.common.pricing import TokenUsage
from services.router.classifier.types import Tier
from services.router.domain import BudgetPort, Generation, JobPort, JobStatus, Reservation

log = structlog.get_logger("costmesh.router.settlement")

T = TypeVar("T")


class _Deferred:
    """The answer of a settlement whose first attempt met an outage: it goes on in the background."""

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED: Final = _Deferred()

#: A call that ended in one of these may or may not have taken effect (the reply was lost, or never awaited).
UNKNOWN_OUTCOME: tuple[type[BaseException], ...] = (*TRANSIENT, asyncio.CancelledError)


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception retrieved (its error was logged where it happened)."""
    if not fut.cancelled():
        fut.exception()


class Outbox:
    """Background owner of every budget call that must complete after (or without) its caller."""

    def __init__(self, *, retry_s: float = 120.0, backoff_s: float = 0.25, max_backoff_s: float = 5.0) -> None:
        self._retry_s = retry_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._tasks: set[asyncio.Future[Any]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def spawn(
        self, what: str, ref: str, call: Callable[[], Awaitable[object]], *, delay_s: float = 0.0
    ) -> asyncio.Future[object]:
        """Run the idempotent ``call`` in the background until it succeeds.

        Detached from the caller's deadline and cancellation; retried through outages with backoff for ``retry_s``;
        ``ref`` names what it settles in the logs. The returned future answers the *first* attempt: its value,
        :data:`DEFERRED` when that attempt met an outage (the retries go on), or its error.
        """
        first: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        first.add_done_callback(_consume)
        self._track(asyncio.ensure_future(self._run(what, ref, call, delay_s, first)))
        return first

    async def settle(self, what: str, ref: str, call: Callable[[], Awaitable[object]]) -> object:
        """:meth:`spawn` and wait for the first attempt's answer; a caller cancelled meanwhile leaves it running."""
        return await asyncio.shield(self.spawn(what, ref, call))

    async def shielded(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` to its end even if the caller is cancelled meanwhile (tracked for :meth:`drain`)."""
        task: asyncio.Future[T] = asyncio.ensure_future(coro)
        task.add_done_callback(_consume)
        self._track(task)
        return await asyncio.shield(task)

    def background(self, what: str, coro: Awaitable[object]) -> None:
        """A one-shot background step (a cache fill, the settlement of an abandoned generation): detached from the
        caller's deadline, tracked for :meth:`drain`, its domain errors logged."""

        async def run() -> None:
            deadline.set_remaining(None)
            try:
                await coro
            except CostmeshError as err:
                log.warning("background_failed", what=what, error=err.message, reason=err.reason)

        self._track(asyncio.ensure_future(run()))

    async def _run(
        self,
        what: str,
        ref: str,
        call: Callable[[], Awaitable[object]],
        delay_s: float,
        first: asyncio.Future[object],
    ) -> None:
        # A task runs in a copy of the request's context: its calls are not bound by the caller's deadline, which may
        # pass before the settlement is done; the clients' own timeouts apply.
        deadline.set_remaining(None)
        give_up_at = time.monotonic() + self._retry_s
        delay = self._backoff_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        while True:
            try:
                value = await call()
            except TRANSIENT as err:
                if not first.done():
                    log.warning("settle_deferred", what=what, ref=ref, error=err.message)
                    first.set_result(DEFERRED)
                if time.monotonic() + delay > give_up_at:
                    log.error("settle_gave_up", what=what, ref=ref, error=err.message)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
                continue
            except CostmeshError as err:
                if first.done():
                    log.error("settle_failed", what=what, ref=ref, error=err.message, reason=err.reason)
                else:
                    first.set_exception(err)
                return
            except asyncio.CancelledError:  # drain() ran out of time
                if not first.done():
                    first.cancel()
                raise
            if first.done():
                log.info("settled_late", what=what, ref=ref)
            else:
                first.set_result(value)
            return

    async def drain(self, timeout_s: float) -> int:
        """Wait for everything pending, at most ``timeout_s``; what is still pending then is cancelled and counted
        (a reservation left this way returns to its budget when its TTL passes)."""
        until = time.monotonic() + timeout_s
        while self._tasks:
            left = until - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(list(self._tasks), timeout=left)
        stuck = list(self._tasks)
        for task in stuck:
            task.cancel()
        if stuck:
            log.error("settlements_abandoned_at_shutdown", count=len(stuck))
            await asyncio.gather(*stuck, return_exceptions=True)
        return len(stuck)


@dataclass(frozen=True, slots=True)
class Charge:
    """What one generation is billed: the cost of its usage on the model that served it."""

    cost_micros: int
    usage: TokenUsage
    model: str
    tier: Tier
    saved_micros: int


#: Prices a usage: (usage, model that served it or "") → the charge.
Pricer = Callable[[TokenUsage, str], Charge]


class Ledgerline:
    """The money of one request. Holds at most one reservation at a time; every exit settles it exactly once."""

    def __init__(
        self,
        *,
        budget: BudgetPort,
        outbox: Outbox,
        tenant: str,
        ttl_s: int,
        renew_every_s: float,
        stop_timeout_s: float = 10.0,
        reconcile_delay_s: float = 0.25,
    ) -> None:
        self._budget = budget
        self._outbox = outbox
        self._tenant = tenant
        self._ttl_s = ttl_s
        self._renew_every_s = renew_every_s
        self._stop_timeout_s = stop_timeout_s
        self._reconcile_delay_s = reconcile_delay_s
        self.reservation: Reservation | None = None

    @property
    def open(self) -> bool:
        return self.reservation is not None

    async def reserve(self, key: str, reserve: Callable[[], Awaitable[Reservation]]) -> Reservation:
        """Hold a new reservation under the idempotency ``key``, in place of the current one (released after).

        If the outcome is unknown — the budget timed out, or the caller was cancelled while the call was in flight —
        the store may have written the reservation and lost the reply: the outbox repeats the same idempotent Reserve
        once the budget answers and releases what it finds, so no money stays held until the TTL.
        """
        try:
            res = await reserve()
        except UNKNOWN_OUTCOME:
            tenant = self._tenant

            async def reconcile() -> None:
                try:
                    held = await reserve()
                except TRANSIENT:
                    raise
                except CostmeshError:  # refused now (e.g. a hard limit): nothing is held under this key
                    return
                if not held.settled:
                    await self._budget.release(reservation_id=held.reservation_id, tenant=tenant)

            self._outbox.spawn("reserve_reconcile", key, reconcile, delay_s=self._reconcile_delay_s)
            raise
        if res.settled:
            # The key names a reservation already committed: nothing is held, so running the work would be unfunded.
            raise Aborted(f"reservation key {key!r} was already settled", reason="RESERVATION_SETTLED")
        old, self.reservation = self.reservation, res
        if old is not None:
            await self._release(old)
        return res

    async def release(self) -> None:
        """Return the reservation unused (nothing was generated)."""
        res, self.reservation = self.reservation, None
        if res is not None:
            await self._release(res)

    async def _release(self, res: Reservation) -> None:
        call = partial(self._budget.release, reservation_id=res.reservation_id, tenant=self._tenant)
        try:
            await self._outbox.settle("release", res.reservation_id, call)
        except CostmeshError as err:  # e.g. unknown id: nothing to return; the TTL covers anything else
            log.warning("release_failed", reservation_id=res.reservation_id, error=err.message)

    async def commit(self, charge: Charge) -> int | None:
        """Settle with what the generation cost; returns the smallest remaining budget (None: unknown or unlimited).

        A budget outage defers it: the caller gets its answer and the outbox commits once the budget is back.
        """
        res, self.reservation = self.reservation, None
        if res is None:
            return None
        value = await self._outbox.settle("commit", res.reservation_id, self._commit_call(res, charge))
        return value if isinstance(value, int) else None

    def _commit_call(self, res: Reservation, c: Charge) -> Callable[[], Awaitable[int | None]]:
        return partial(
            self._budget.commit,
            reservation_id=res.reservation_id,
            tenant=self._tenant,
            cost_micros=c.cost_micros,
            usage=c.usage,
            model=c.model,
            tier=c.tier,
            saved_micros=c.saved_micros,
        )

    def handover(self) -> Reservation | None:
        """The reservation now belongs to a durable job (settled by :class:`AsyncSettler`); this request lets go."""
        res, self.reservation = self.reservation, None
        return res

    def finish_abandoned(self, gen: Generation, price: Pricer, *, prompt_tokens: int) -> None:
        """The request ended before its generation did — the caller cancelled, its deadline passed, it disconnected,
        or the worker failed mid-stream. In the background: stop the generation, take the worker's count of what it
        generated (or, when the worker cannot say, the prompt plus the tokens received), and commit that; release
        only when nothing was generated. The reservation covers it: it was priced for the whole ``max_tokens``."""
        res, self.reservation = self.reservation, None

        async def finish() -> None:
            last = await gen.stop(self._stop_timeout_s)
            model = ""
            if last is not None and last.usage is not None:
                usage, model = last.usage, last.model
            elif gen.output_tokens:
                usage = TokenUsage(prompt_tokens, gen.output_tokens, 0)
            else:
                usage = TokenUsage(0, 0, 0)
            if res is None:  # served without a reservation (fail-open budget): nothing to settle
                return
            if usage.input_tokens == 0 and usage.output_tokens == 0:
                await self._release(res)
                return
            charge = price(usage, model)
            log.info(
                "generation_abandoned_billed",
                reservation_id=res.reservation_id,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_micros=charge.cost_micros,
                from_worker=last is not None,
            )
            with contextlib.suppress(CostmeshError):  # logged by the outbox
                await self._outbox.settle("commit", res.reservation_id, self._commit_call(res, charge))

        self._outbox.background("abandoned_generation", finish())

    @contextlib.asynccontextmanager
    async def renewing(self) -> AsyncIterator[None]:
        """Renew the reservation every ``renew_every_s`` while the block runs (a generation), so a slow worker cannot
        outlive it: an expired reservation's money is back in the pool while its work still spends."""
        task = asyncio.ensure_future(self._renew_loop()) if self._renew_every_s > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    async def _renew_loop(self) -> None:
        deadline.set_remaining(None)
        while True:
            await asyncio.sleep(self._renew_every_s)
            res = self.reservation
            if res is None:
                return
            try:
                await self._budget.renew(reservation_id=res.reservation_id, tenant=self._tenant, ttl_s=self._ttl_s)
            except TRANSIENT as err:  # try again next round; the TTL leaves room for a few misses
                log.warning("renew_failed", reservation_id=res.reservation_id, error=err.message)
            except CostmeshError as err:
                # It expired (the budget was unreachable too long): the commit will be charged late and counted.
                log.error("reservation_lost", reservation_id=res.reservation_id, error=err.message, reason=err.reason)
                return


# ---- async jobs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobMoney:
    """The money fields a router writes into a job's metadata when it submits it."""

    reservation_id: str
    expires_ms: int = 0

    @staticmethod
    def of(metadata: str) -> JobMoney:
        try:
            meta = json.loads(metadata or "{}")
        except ValueError:
            return JobMoney("")
        if not isinstance(meta, dict):
            return JobMoney("")
        return JobMoney(str(meta.get("reservation_id", "")), int(meta.get("expires_ms", 0) or 0))


#: Settles one finished job (commit or release its reservation, then mark it settled).
JobSettle = Callable[[Tier, JobStatus], Awaitable[object]]


@dataclass(slots=True)
class _Outstanding:
    tier: Tier
    job_id: str
    expires_ms: int


class AsyncSettler:
    """Every router's share of settling async jobs: list unsettled jobs in each tier's job store, settle the finished
    ones, renew the reservations of the rest before they expire."""

    def __init__(
        self,
        *,
        jobs: JobPort,
        budget: BudgetPort,
        tiers: Sequence[Tier],
        settle: JobSettle,
        every_s: float,
        ttl_s: int,
        max_pages: int = 10,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._jobs = jobs
        self._budget = budget
        self._tiers = tuple(tiers)
        self._settle = settle
        self._every_s = every_s
        self._ttl_s = ttl_s
        self._max_pages = max_pages
        self._clock_ms = clock_ms
        #: reservation id → the job holding it (submitted here, or seen in a listing) while it is not finished.
        self._outstanding: dict[tuple[str, str], _Outstanding] = {}

    def track(self, tier: Tier, job_id: str, tenant: str, money: JobMoney) -> None:
        """A job now holds this reservation: renew it until the job is settled."""
        if money.reservation_id:
            self._outstanding[(tenant, money.reservation_id)] = _Outstanding(tier, job_id, money.expires_ms)

    def forget(self, tenant: str, money: JobMoney) -> None:
        """The job was settled (here or by a ``status`` call): nothing more to renew."""
        self._outstanding.pop((tenant, money.reservation_id), None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.run_once()
            except CostmeshError as err:  # a worker or the budget is down: next round
                log.warning("async_settle_round_failed", error=err.message, reason=err.reason)

    async def run_once(self) -> int:
        """One round: renew what is due, then settle every finished job listed. Returns the jobs settled."""
        await self._renew_due()
        settled = 0
        for tier in self._tiers:
            token = ""
            for _ in range(self._max_pages):
                try:
                    page, token = await self._jobs.list_unsettled(tier=tier, page_token=token)
                except TRANSIENT as err:
                    log.warning("async_settle_list_failed", tier=tier.label, error=err.message)
                    break
                for job in page:
                    settled += await self._visit(tier, job)
                if not token:
                    break
        return settled

    async def _visit(self, tier: Tier, job: JobStatus) -> int:
        money = JobMoney.of(job.metadata)
        key = (job.tenant, money.reservation_id)
        if not job.state.terminal:
            if money.reservation_id and key not in self._outstanding:
                self._outstanding[key] = _Outstanding(tier, job.job_id, money.expires_ms)
            return 0
        self._outstanding.pop(key, None)
        try:
            await self._settle(tier, job)
        except TRANSIENT as err:
            log.warning("async_settle_failed", job_id=job.job_id, error=err.message)
            return 0
        except CostmeshError as err:
            log.error("async_settle_failed", job_id=job.job_id, error=err.message, reason=err.reason)
            return 0
        return 1

    async def _renew_due(self) -> None:
        now = self._clock_ms()
        margin_ms = self._ttl_s * 1000 // 3
        for (tenant, rid), held in list(self._outstanding.items()):
            if held.expires_ms and held.expires_ms - now > margin_ms:
                continue
            try:
                held.expires_ms = await self._budget.renew(reservation_id=rid, tenant=tenant, ttl_s=self._ttl_s)
            except TRANSIENT as err:
                log.warning("renew_failed", reservation_id=rid, error=err.message)
            except CostmeshError as err:  # settled by another router, or expired: nothing more to renew
                log.info("renew_stopped", reservation_id=rid, reason=err.reason)
                self._outstanding.pop((tenant, rid), None)
