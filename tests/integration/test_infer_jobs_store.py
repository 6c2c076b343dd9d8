"""One contract for the durable job stores, run against SQLite (a real file) and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.infer.jobs.redis import RedisJobStore
from services.infer.jobs.sqlite import SqliteJobStore
from services.infer.jobs.store import JobSpec, JobState, JobStore, QueueFull

LEASE = 0.25


def open_store(kind: str, request: pytest.FixtureRequest, path: Path, lease_s: float) -> JobStore:
    if kind == "sqlite":
        return SqliteJobStore(path, lease_s=lease_s)
    return RedisJobStore.from_url(request.getfixturevalue("redis_url"), queue="test", lease_s=lease_s)


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = open_store(kind, request, tmp_path / "jobs.sqlite3", LEASE)
    yield s
    await s.close()


@pytest.fixture
async def second(kind: str, request: pytest.FixtureRequest, tmp_path: Path, store: JobStore) -> AsyncIterator[JobStore]:
    """Another handle on the same queue, as a second worker process would have."""
    s = open_store(kind, request, tmp_path / "jobs.sqlite3", LEASE)
    yield s
    await s.close()


def spec(i: int = 1, tenant: str = "acme") -> JobSpec:
    return JobSpec(request_id=f"req-{i}", tenant=tenant, payload=f'{{"n": {i}}}', metadata=f"meta-{i}")


async def test_submit_persists_a_queued_job(store: JobStore) -> None:
    res = await store.submit(spec(), capacity=10)
    assert not res.replayed and res.job.state is JobState.QUEUED
    job = await store.get(res.job.job_id)
    assert job is not None
    assert (job.state, job.payload, job.metadata, job.tenant, job.attempts) == (
        JobState.QUEUED,
        '{"n": 1}',
        "meta-1",
        "acme",
        0,
    )
    assert job.created_unix_ms > 0 and job.finished_unix_ms == 0
    assert await store.queued() == 1
    assert await store.get("job_missing") is None


async def test_submit_is_idempotent_per_tenant_and_request_id(store: JobStore) -> None:
    first = await store.submit(spec(), capacity=10)
    again = await store.submit(spec(), capacity=10)
    assert again.replayed and again.job.job_id == first.job.job_id
    other_tenant = await store.submit(spec(tenant="globex"), capacity=10)
    assert not other_tenant.replayed and other_tenant.job.job_id != first.job.job_id
    assert await store.queued() == 2


async def test_a_full_queue_refuses_new_jobs_but_not_replays(store: JobStore) -> None:
    await store.submit(spec(1), capacity=2)
    await store.submit(spec(2), capacity=2)
    with pytest.raises(QueueFull) as err:
        await store.submit(spec(3), capacity=2)
    assert err.value.depth == 2
    assert (await store.submit(spec(1), capacity=2)).replayed
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None
    await store.submit(spec(3), capacity=2)  # a claimed job no longer counts as queued


async def test_claims_run_oldest_first_and_never_hand_out_a_job_twice(store: JobStore, second: JobStore) -> None:
    ids = [(await store.submit(spec(i), capacity=10)).job.job_id for i in range(4)]
    claims = await asyncio.gather(*(s.claim(f"w{i}", max_attempts=3) for i, s in enumerate([store, second] * 2)))
    got = [c.job_id for c in claims if c is not None]
    assert sorted(got) == sorted(ids)
    assert await store.claim("w9", max_attempts=3) is None
    assert await store.queued() == 0
    first = await store.claim("w9", max_attempts=3)
    assert first is None
    for c in claims:
        assert c is not None and c.job.state is JobState.RUNNING and c.job.attempts == 1 and not c.reclaimed


async def test_complete_stores_the_result_once(store: JobStore) -> None:
    job_id = (await store.submit(spec(), capacity=10)).job.job_id
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None and claim.job_id == job_id
    running = await store.get(job_id)
    assert running is not None and running.state is JobState.RUNNING and running.worker == "w1"
    assert await store.complete(claim, "the result")
    assert not await store.complete(claim, "again")  # a second completion is refused
    assert not await store.fail(claim, "late failure")
    done = await store.get(job_id)
    assert done is not None
    assert (done.state, done.result, done.attempts) == (JobState.SUCCEEDED, "the result", 1)
    assert done.finished_unix_ms >= done.created_unix_ms
    assert await store.claim("w2", max_attempts=3) is None


async def test_fail_is_terminal(store: JobStore) -> None:
    job_id = (await store.submit(spec(), capacity=10)).job.job_id
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None
    assert await store.fail(claim, "bad prompt")
    job = await store.get(job_id)
    assert job is not None and (job.state, job.error) == (JobState.FAILED, "bad prompt")
    assert await store.claim("w2", max_attempts=3) is None


async def test_a_dead_workers_job_is_reclaimed_and_its_late_completion_fenced(
    store: JobStore, second: JobStore
) -> None:
    job_id = (await store.submit(spec(), capacity=10)).job.job_id
    dead = await store.claim("w-dead", max_attempts=3)
    assert dead is not None
    # While the lease runs, nobody else gets it.
    assert await second.claim("w-live", max_attempts=3) is None
    await asyncio.sleep(LEASE * 1.6)
    live = await second.claim("w-live", max_attempts=3)
    assert live is not None and live.job_id == job_id
    assert live.reclaimed and live.job.attempts == 2 and live.token != dead.token
    # The first worker was only slow, not dead: its writes are fenced off.
    assert not await store.renew(dead)
    assert not await store.complete(dead, "stale")
    assert not await store.release(dead)
    assert await second.complete(live, "fresh")
    job = await store.get(job_id)
    assert job is not None and (job.state, job.result, job.attempts) == (JobState.SUCCEEDED, "fresh", 2)


async def test_renewing_keeps_the_job(store: JobStore, second: JobStore) -> None:
    await store.submit(spec(), capacity=10)
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None
    for _ in range(4):
        await asyncio.sleep(LEASE / 2)
        assert await store.renew(claim)
        assert await second.claim("w2", max_attempts=3) is None
    assert await store.complete(claim, "ok")


async def test_release_requeues_at_once(store: JobStore, second: JobStore) -> None:
    job_id = (await store.submit(spec(), capacity=10)).job.job_id
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None
    assert await store.release(claim)
    assert await store.queued() == 1
    job = await store.get(job_id)
    assert job is not None and job.state is JobState.QUEUED
    again = await second.claim("w2", max_attempts=3)
    assert again is not None and again.job_id == job_id and again.job.attempts == 2
    assert not await store.complete(claim, "stale")
    assert await second.complete(again, "ok")


async def test_a_job_that_keeps_killing_workers_fails(store: JobStore) -> None:
    job_id = (await store.submit(spec(), capacity=10)).job.job_id
    for attempt in (1, 2):
        claim = await store.claim(f"w{attempt}", max_attempts=2)
        assert claim is not None and claim.job.attempts == attempt
        await asyncio.sleep(LEASE * 1.6)
    assert await store.claim("w3", max_attempts=2) is None
    job = await store.get(job_id)
    assert job is not None and job.state is JobState.FAILED and "2 attempts" in job.error
