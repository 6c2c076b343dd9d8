"""Admission to the engine: interactive at once, async only beyond the interactive reserve, bounded waiting lines."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import ResourceExhausted
from services.infer.domain import QueueClass
from services.infer.scheduler import Admission, AdmissionLimits

INTER, A = QueueClass.INTERACTIVE, QueueClass.ASYNC


def limits(**kw: float) -> AdmissionLimits:
    base: dict[str, float] = {
        "max_num_seqs": 8,
        "interactive_slots": 8,
        "interactive_max_waiting": 2,
        "interactive_max_wait_s": 5.0,
        "async_slots": 6,  # reserve of 2
        "async_concurrency": 6,
        "async_max_waiting": 3,
        "async_max_wait_s": 5.0,
    }
    base.update(kw)
    return AdmissionLimits(**base)  # type: ignore[arg-type]


async def test_async_runs_only_below_the_interactive_reserve() -> None:
    adm = Admission(limits())
    slots = [await adm.acquire(A) for _ in range(6)]
    assert adm.in_engine(A) == 6
    assert not adm.has_room(A)
    # The reserve is still there for interactive work, immediately.
    inter = [await adm.acquire(INTER) for _ in range(2)]
    assert all(s.waited_s == 0 for s in inter)
    # A seventh async request waits...
    waiter = asyncio.create_task(adm.acquire(A))
    await asyncio.sleep(0)
    assert not waiter.done() and adm.waiting(A) == 1
    # ...and freeing an interactive slot does not let it in (8 in engine - 1 = 7 > async_slots 6).
    inter[0].release()
    await asyncio.sleep(0)
    assert not waiter.done()
    slots[0].release()  # now 6 in engine → still not below 6
    await asyncio.sleep(0)
    assert not waiter.done()
    inter[1].release()  # 5 in engine → room
    got = await asyncio.wait_for(waiter, 1)
    assert got.queue_class is A and adm.in_engine(A) == 6 and adm.waiting(A) == 0


async def test_interactive_load_shrinks_async_room() -> None:
    adm = Admission(limits())
    inter = [await adm.acquire(INTER) for _ in range(5)]
    a = await adm.acquire(A)
    assert not adm.has_room(A)  # 5 interactive + 1 async = async_slots
    a.release()
    for s in inter:
        s.release()
    assert adm.has_room(A)


async def test_async_concurrency_cap_below_slots() -> None:
    adm = Admission(limits(async_concurrency=2))
    await adm.acquire(A)
    await adm.acquire(A)
    assert not adm.has_room(A)
    assert adm.has_room(INTER)


async def test_full_async_line_is_resource_exhausted_with_retry_hint() -> None:
    adm = Admission(limits(async_slots=1, async_concurrency=1, async_max_waiting=2))
    await adm.acquire(A)
    waiters = [asyncio.create_task(adm.acquire(A)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as err:
        await adm.acquire(A)
    assert err.value.reason == "QUEUE_FULL"
    assert err.value.retry_after_s is not None and err.value.retry_after_s >= 1.0
    assert err.value.violations[0].subject == "queue:async"
    assert adm.stats.classes[A].rejected_total == 1
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert adm.waiting(A) == 0


async def test_wait_that_runs_out_is_resource_exhausted() -> None:
    adm = Admission(limits(interactive_slots=1, interactive_max_wait_s=0.05))
    await adm.acquire(INTER)
    with pytest.raises(ResourceExhausted) as err:
        await adm.acquire(INTER)
    assert err.value.reason == "QUEUE_TIMEOUT"
    assert adm.waiting(INTER) == 0 and adm.in_engine(INTER) == 1


async def test_waiters_are_served_in_arrival_order_and_interactive_first() -> None:
    adm = Admission(limits(async_slots=1, async_concurrency=1, interactive_slots=1, async_max_waiting=5))
    a0 = await adm.acquire(A)
    i0 = await adm.acquire(INTER)
    order: list[str] = []

    async def take(cls: QueueClass, name: str) -> None:
        slot = await adm.acquire(cls)
        order.append(name)
        await asyncio.sleep(0)
        slot.release()

    tasks = [asyncio.create_task(take(A, f"a{i}")) for i in range(3)]
    tasks.append(asyncio.create_task(take(INTER, "i1")))
    await asyncio.sleep(0)
    i0.release()
    a0.release()
    await asyncio.gather(*tasks)
    assert order[0] == "i1"
    assert order[1:] == ["a0", "a1", "a2"]
    assert adm.in_engine(A) == adm.in_engine(INTER) == 0


async def test_cancelled_waiter_leaves_no_trace() -> None:
    adm = Admission(limits(async_slots=1, async_concurrency=1))
    held = await adm.acquire(A)
    waiter = asyncio.create_task(adm.acquire(A))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.waiting(A) == 0
    held.release()
    assert adm.in_engine(A) == 0  # the cancelled waiter did not keep a slot


async def test_unbounded_waits_do_not_count_as_queued() -> None:
    adm = Admission(limits(async_slots=1, async_concurrency=1, async_max_waiting=0))
    held = await adm.acquire(A)
    runner_wait = asyncio.create_task(adm.acquire(A, bounded=False))
    await asyncio.sleep(0)
    assert adm.waiting(A) == 0
    held.release()
    slot = await asyncio.wait_for(runner_wait, 1)
    slot.release()
    slot.release()  # idempotent
    assert adm.in_engine(A) == 0


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        limits(async_slots=9)
    with pytest.raises(ValueError):
        limits(async_concurrency=7)
