"""The job runner over a real SQLite file and the scripted engine: admission, leases, shutdown, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.common.attribution import Attribution
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.infer.domain import FinishReason, GenerationRequest, QueueClass, Sampling
from services.infer.jobs.runner import JobRunner, RunnerSettings, decode_result
from services.infer.jobs.sqlite import SqliteJobStore
from services.infer.jobs.store import JobState
from tests.unit.test_infer_service import ScriptedEngine, make_service


def job(rid: str, max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid, prompt="one two", sampling=Sampling(max_tokens=max_tokens), queue_class=QueueClass.ASYNC
    )


RUNNERS: list[JobRunner] = []


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
    s = SqliteJobStore(tmp_path / "jobs.sqlite3", lease_s=0.3)
    yield s
    while RUNNERS:  # stop every runner (also after a failed assertion) before the store closes
        await RUNNERS.pop().stop()
    await s.close()


def runner_for(engine: ScriptedEngine, store: SqliteJobStore, **kw: float) -> JobRunner:
    svc = make_service(engine, async_slots=int(kw.pop("async_slots", 3)))
    settings = RunnerSettings(
        worker_id="w1",
        poll_s=0.02,
        queue_capacity=int(kw.pop("capacity", 10)),
        max_wait_s=kw.pop("max_wait_s", 3600.0),
        max_run_s=kw.pop("max_run_s", 600.0),
    )
    runner = JobRunner(store=store, service=svc, settings=settings)
    RUNNERS.append(runner)
    return runner


async def until(cond: Callable[[], bool], timeout_s: float = 5) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def until_state(store: SqliteJobStore, job_id: str, state: JobState, timeout_s: float = 5) -> None:
    for _ in range(int(timeout_s / 0.01)):
        j = await store.get(job_id)
        if j is not None and j.state is state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} never became {state}: {await store.get(job_id)}")


async def test_jobs_run_to_completion_within_the_async_room(store: SqliteJobStore) -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    runner = runner_for(engine, store, async_slots=2)
    ids = [(await runner.submit(job(f"j{i}"))).job.job_id for i in range(5)]
    runner.start()
    await asyncio.sleep(0.2)
    adm = runner._service.admission
    assert adm.in_engine(QueueClass.ASYNC) == 2  # never beyond the async room, the rest stays queued
    assert await store.queued() == 3
    engine.gate.set()  # type: ignore[union-attr]
    for job_id in ids:
        await until_state(store, job_id, JobState.SUCCEEDED)
    done = await store.get(ids[0])
    assert done is not None
    text, summary = decode_result(done.result)
    assert text == "w0 w1 w2 " and summary.usage.output_tokens == 3
    assert all(r.stream is False for r in engine.requests)
    await runner.stop()
    assert adm.in_engine(QueueClass.ASYNC) == 0


async def test_a_full_queue_is_resource_exhausted(store: SqliteJobStore) -> None:
    runner = runner_for(ScriptedEngine(), store, capacity=2)
    await runner.submit(job("a"))
    await runner.submit(job("b"))
    with pytest.raises(ResourceExhausted) as err:
        await runner.submit(job("c"))
    assert err.value.retry_after_s is not None and err.value.retry_after_s >= 1
    assert (await runner.submit(job("a"))).replayed


async def test_shutdown_aborts_running_jobs_and_requeues_them(store: SqliteJobStore) -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    runner = runner_for(engine, store)
    job_id = (await runner.submit(job("long", max_tokens=10))).job.job_id
    runner.start()
    await until_state(store, job_id, JobState.RUNNING)
    await runner.stop()
    assert engine.aborted == ["long"]
    assert runner._service.admission.in_engine(QueueClass.ASYNC) == 0
    queued = await store.get(job_id)
    assert queued is not None and queued.state is JobState.QUEUED and queued.attempts == 1


async def test_a_dead_engine_releases_the_job_and_claims_no_more(store: SqliteJobStore) -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    runner = runner_for(engine, store)
    first = (await runner.submit(job("x", max_tokens=10))).job.job_id
    second = (await runner.submit(job("y", max_tokens=10))).job.job_id
    runner.start()
    await until_state(store, first, JobState.RUNNING)
    engine.dead = True
    engine.gate.set()  # type: ignore[union-attr]
    await until_state(store, first, JobState.QUEUED)
    await asyncio.sleep(0.2)
    for job_id in (first, second):  # nothing is claimed (and burnt through attempts) on a dead engine
        j = await store.get(job_id)
        assert j is not None and j.state is JobState.QUEUED and j.attempts <= 1
    await runner.stop()


async def test_a_lost_lease_stops_the_run_and_never_completes(store: SqliteJobStore) -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    runner = runner_for(engine, store, async_slots=1)  # busy with this job, it claims nothing else meanwhile
    job_id = (await runner.submit(job("slow", max_tokens=10))).job.job_id
    runner.start()
    await until_state(store, job_id, JobState.RUNNING)
    # Another worker takes the job over (as after a long pause of this one) ...
    other = SqliteJobStore(store._path, lease_s=0.3)
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        while (taken := await other.claim("w2", max_attempts=5)) is None:
            # keep this worker from renewing: make its lease look expired
            await asyncio.to_thread(_expire_leases, store._path)
            await asyncio.sleep(0.01)
    # ... so this worker's run is stopped and aborted in the engine, and its completion never lands.
    await until(lambda: runner._stats.jobs_fenced_total == 1)
    assert engine.aborted == ["slow"]
    assert await other.complete(taken, "from w2")
    j = await store.get(job_id)
    assert j is not None and (j.state, j.result, j.attempts) == (JobState.SUCCEEDED, "from w2", 2)
    await runner.stop()
    await other.close()


def _expire_leases(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE jobs SET lease_until_ms = 0 WHERE state = 'RUNNING'")


async def test_a_job_that_waited_too_long_fails_as_expired(store: SqliteJobStore) -> None:
    runner = runner_for(ScriptedEngine(), store, max_wait_s=0.05)
    job_id = (await runner.submit(job("old"))).job.job_id
    await asyncio.sleep(0.1)
    runner.start()
    await until_state(store, job_id, JobState.FAILED)
    j = await store.get(job_id)
    assert j is not None and "expired" in j.error
    await runner.stop()


async def test_a_reclaimed_job_past_its_max_wait_fails_instead_of_running(store: SqliteJobStore) -> None:
    engine = ScriptedEngine()
    runner = runner_for(engine, store, max_wait_s=0.3)
    job_id = (await runner.submit(job("orphan"))).job.job_id
    dead = await store.claim("w-dead", max_attempts=3)  # started in time by a worker that then died
    assert dead is not None and dead.job_id == job_id
    await asyncio.sleep(0.4)
    await asyncio.to_thread(_expire_leases, store._path)
    runner.start()
    await until_state(store, job_id, JobState.FAILED)
    j = await store.get(job_id)
    assert j is not None and "expired" in j.error and j.attempts == 2
    assert engine.requests == []  # it never ran again
    assert runner._stats.jobs_reclaimed_total == 1


async def test_a_run_past_its_limit_is_stopped_and_keeps_what_it_generated(store: SqliteJobStore) -> None:
    engine = ScriptedEngine(step_s=0.05)
    runner = runner_for(engine, store, max_run_s=0.2)
    job_id = (await runner.submit(job("long", max_tokens=16))).job.job_id
    runner.start()
    await until_state(store, job_id, JobState.SUCCEEDED)
    j = await store.get(job_id)
    assert j is not None
    text, summary = decode_result(j.result)
    assert summary.finish_reason is FinishReason.ABORT and 0 < summary.usage.output_tokens < 16
    assert runner._stats.output_tokens_total == summary.usage.output_tokens  # counted, and billable from the result
    assert text.count("w") == summary.usage.output_tokens


async def test_settlement_and_lookup_answer_with_domain_errors(store: SqliteJobStore) -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    runner = runner_for(engine, store)
    acme = GenerationRequest(
        request_id="mine", prompt="one two", sampling=Sampling(max_tokens=2), attribution=Attribution(tenant="acme")
    )
    job_id = (await runner.submit(acme)).job.job_id
    assert (await runner.find(job_id="", tenant="acme", request_id="mine")).job_id == job_id
    for kw in ({"job_id": job_id, "tenant": "globex"}, {"job_id": "", "tenant": "globex"}):
        with pytest.raises(NotFound):
            await runner.find(request_id="mine", **kw)
    with pytest.raises(FailedPrecondition):
        await runner.mark_settled(job_id, "acme")  # still queued
    runner.start()
    engine.gate.set()  # type: ignore[union-attr]
    await until_state(store, job_id, JobState.SUCCEEDED)
    with pytest.raises(NotFound):
        await runner.mark_settled(job_id, "globex")
    assert await runner.mark_settled(job_id, "acme") is False
    assert await runner.mark_settled(job_id, "") is True  # replayed (internal callers need no tenant)
    with pytest.raises(NotFound):
        await runner.mark_settled("job_missing", "")
    page = await runner.list_jobs(unsettled_only=True, states=frozenset(), limit=10, page_token="")
    assert page.jobs == []
    with pytest.raises(InvalidArgument):
        await runner.list_jobs(unsettled_only=False, states=frozenset(), limit=10, page_token="x")
