"""One contract for the durable job stores, run against SQLite (a real file) and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.infer.jobs.redis import RedisJobStore
from services.infer.jobs.sqlite import SqliteJobStore
from services.infer.jobs.store import BadPageToken, Job, JobSpec, JobState, JobStore, QueueFull, Settle

LEASE = 0.25


def open_store(
    kind: str, request: pytest.FixtureRequest, path: Path, lease_s: float, result_ttl_s: float = 3600
) -> JobStore:
    if kind == "sqlite":
        return SqliteJobStore(path, lease_s=lease_s, result_ttl_s=result_ttl_s)
    return RedisJobStore.from_url(
        request.getfixturevalue("redis_url"), queue="test", lease_s=lease_s, result_ttl_s=result_ttl_s
    )


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
    again = await store.submit(JobSpec(request_id="req-1", tenant="acme", payload="{}", metadata="other"), capacity=10)
    assert again.replayed and again.job.job_id == first.job.job_id
    assert again.job.metadata == "meta-1"  # the original submission's metadata, not the replay's
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


# --- lookup by request id, settlement, listing ---


async def finish(store: JobStore, *, fail: bool = False) -> Job:
    """Claim the oldest job and finish it."""
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None
    assert await (store.fail(claim, "boom") if fail else store.complete(claim, "result"))
    job = await store.get(claim.job_id)
    assert job is not None
    return job


async def test_a_job_is_found_by_tenant_and_request_id(store: JobStore) -> None:
    job_id = (await store.submit(spec(7), capacity=10)).job.job_id
    found = await store.get_by_request("acme", "req-7")
    assert found is not None and found.job_id == job_id and found.request_id == "req-7" and found.tenant == "acme"
    assert await store.get_by_request("globex", "req-7") is None
    assert await store.get_by_request("acme", "req-8") is None


async def test_only_a_finished_job_is_settled_once_and_durably(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, store: JobStore
) -> None:
    job_id = (await store.submit(spec(), capacity=10)).job.job_id
    assert await store.mark_settled("job_missing") is Settle.NOT_FOUND
    assert await store.mark_settled(job_id) is Settle.NOT_FINISHED  # queued
    claim = await store.claim("w1", max_attempts=3)
    assert claim is not None
    assert await store.mark_settled(job_id) is Settle.NOT_FINISHED  # running
    assert await store.complete(claim, "result")
    job = await store.get(job_id)
    assert job is not None and not job.settled
    assert await store.mark_settled(job_id) is Settle.SETTLED
    assert await store.mark_settled(job_id) is Settle.REPLAYED
    # A restarted worker (a new handle on the same file / Redis) sees the flag.
    reopened = open_store(kind, request, tmp_path / "jobs.sqlite3", LEASE)
    try:
        again = await reopened.get(job_id)
        assert again is not None and again.settled and again.result == "result"
        assert await reopened.mark_settled(job_id) is Settle.REPLAYED
        assert (await reopened.list_jobs(unsettled_only=True)).jobs == []
    finally:
        await reopened.close()


async def test_list_jobs_pages_oldest_first_with_filters(store: JobStore) -> None:
    ids = []
    for i in range(5):
        ids.append((await store.submit(spec(i), capacity=10)).job.job_id)
    succeeded = await finish(store)  # job 0
    failed = await finish(store, fail=True)  # job 1
    assert await store.mark_settled(succeeded.job_id) is Settle.SETTLED

    async def pages(**kw: object) -> list[list[str]]:
        out: list[list[str]] = []
        token = ""
        while True:
            page = await store.list_jobs(limit=2, page_token=token, **kw)  # type: ignore[arg-type]
            out.append([j.job_id for j in page.jobs])
            assert all(j.payload == "" for j in page.jobs)  # the prompt is not read for a listing
            if not page.next_page_token:
                return out
            token = page.next_page_token

    everything = await pages()
    assert [i for p in everything for i in p] == ids and everything[0] == ids[:2]
    assert [i for p in await pages(unsettled_only=True) for i in p] == ids[1:]
    finished = frozenset({JobState.SUCCEEDED, JobState.FAILED})
    assert [i for p in await pages(states=finished) for i in p] == ids[:2]
    assert [i for p in await pages(unsettled_only=True, states=finished) for i in p] == [failed.job_id]
    queued = await store.list_jobs(states=frozenset({JobState.QUEUED}), limit=10)
    assert [j.job_id for j in queued.jobs] == ids[2:] and queued.next_page_token == ""
    listed = (await store.list_jobs(limit=1)).jobs[0]
    assert (listed.state, listed.result, listed.settled, listed.metadata, listed.tenant, listed.request_id) == (
        JobState.SUCCEEDED,
        "result",
        True,
        "meta-0",
        "acme",
        "req-0",
    )
    with pytest.raises(BadPageToken):
        await store.list_jobs(page_token="not-a-token")


async def test_a_page_stops_at_its_byte_budget(store: JobStore) -> None:
    for i in range(3):
        await store.submit(spec(i), capacity=10)
    for _ in range(3):
        claim = await store.claim("w1", max_attempts=3)
        assert claim is not None and await store.complete(claim, "x" * 10_000)
    first = await store.list_jobs(limit=10, max_bytes=15_000)
    assert len(first.jobs) == 1 and first.next_page_token
    rest = await store.list_jobs(limit=10, max_bytes=15_000, page_token=first.next_page_token)
    assert len(rest.jobs) == 1
    single = await store.list_jobs(limit=10, max_bytes=1)  # at least one job, whatever its size
    assert len(single.jobs) == 1


async def test_finished_jobs_leave_the_listings_with_their_retention(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = open_store(kind, request, tmp_path / "ttl.sqlite3", LEASE, result_ttl_s=1)
    try:
        old = (await store.submit(spec(1), capacity=10)).job.job_id
        await finish(store)
        assert [j.job_id for j in (await store.list_jobs(unsettled_only=True)).jobs] == [old]
        await asyncio.sleep(1.6)
    finally:
        await store.close()
    store = open_store(kind, request, tmp_path / "ttl.sqlite3", LEASE, result_ttl_s=1)  # purges on its first submit
    try:
        new = (await store.submit(spec(2), capacity=10)).job.job_id
        assert await store.get(old) is None
        for unsettled_only in (True, False):
            assert [j.job_id for j in (await store.list_jobs(unsettled_only=unsettled_only)).jobs] == [new]
        if isinstance(store, RedisJobStore):  # the indexes themselves were trimmed, not only filtered
            assert await store._r.zcard(store._unsettled) == 1 and await store._r.zcard(store._all) == 1
    finally:
        await store.close()


async def test_sqlite_lists_unsettled_jobs_from_their_own_index(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "plan.sqlite3")
    try:
        plan = store._conn.execute(
            "EXPLAIN QUERY PLAN SELECT job_id FROM jobs WHERE seq > 0 AND settled = 0 ORDER BY seq LIMIT 10"
        ).fetchall()
        assert any("jobs_unsettled" in str(row) for row in plan), plan
    finally:
        await store.close()


async def test_an_older_sqlite_file_gains_the_settled_flag(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # the schema before settlement was recorded
        conn.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, tenant TEXT NOT NULL, "
            "state TEXT NOT NULL, payload TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '', attempts INTEGER NOT "
            "NULL DEFAULT 0, token TEXT, worker TEXT NOT NULL DEFAULT '', lease_until_ms INTEGER NOT NULL DEFAULT 0, "
            "created_ms INTEGER NOT NULL, finished_ms INTEGER NOT NULL DEFAULT 0, result TEXT NOT NULL DEFAULT '', "
            "error TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL, UNIQUE (tenant, request_id))"
        )
        conn.execute(
            "INSERT INTO jobs (job_id, request_id, tenant, state, payload, created_ms, finished_ms, result, seq) "
            "VALUES ('job_old', 'r', 'acme', 'SUCCEEDED', '{}', 1, 2, 'done', 1)"
        )
    store = SqliteJobStore(path)
    try:
        job = await store.get("job_old")
        assert job is not None and not job.settled
        assert await store.mark_settled("job_old") is Settle.SETTLED
    finally:
        await store.close()
