"""SQLite job store: the embedded default. One file, shared by every worker process on the machine (WAL mode).

Claims are ``BEGIN IMMEDIATE`` transactions, so two workers never take the same job; a lease is a ``lease_until``
timestamp that the running worker pushes forward and that, once past, lets another worker take the job over.
All calls run in a worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from services.infer.jobs.store import (
    PAGE_MAX_BYTES,
    BadPageToken,
    Claim,
    Job,
    JobPage,
    JobSpec,
    JobState,
    QueueFull,
    Settle,
    SubmitResult,
    job_bytes,
    new_job_id,
    new_token,
    now_ms,
)

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    worker TEXT NOT NULL DEFAULT '',
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    seq INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, request_id)
);
"""

# After the migration below (an older file has no `settled` column yet). jobs_seq: submission order (ListJobs, and
# MAX(seq) at submit); jobs_unsettled: the partial index ListJobs(unsettled_only) walks, small however long the history.
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_ms) WHERE finished_ms > 0;
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_unsettled ON jobs (seq) WHERE settled = 0;
"""

_COLUMNS = (
    "job_id, request_id, tenant, state, payload, metadata, attempts, created_ms, finished_ms, result, error, worker, "
    "settled"
)
#: What ListJobs reads: no payload (the prompt), plus the order column.
_LIST_COLUMNS = _COLUMNS.replace("payload", "'' AS payload") + ", seq"


def _row_to_job(row: tuple[Any, ...]) -> Job:
    return Job(
        job_id=row[0],
        request_id=row[1],
        tenant=row[2],
        state=JobState(row[3]),
        payload=row[4],
        metadata=row[5],
        attempts=int(row[6]),
        created_unix_ms=int(row[7]),
        finished_unix_ms=int(row[8]),
        result=row[9],
        error=row[10],
        worker=row[11],
        settled=bool(row[12]),
    )


def _parse_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise BadPageToken("not a page token of this store")
    return int(token)


class SqliteJobStore:
    def __init__(
        self,
        path: Path | str,
        *,
        lease_s: float = 30.0,
        result_ttl_s: float = 7 * 24 * 3600,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._path = Path(path)
        if str(path) != ":memory:":
            self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self._path), timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "settled" not in columns:  # a file from before settlement was recorded: every job starts unsettled
            self._conn.execute("ALTER TABLE jobs ADD COLUMN settled INTEGER NOT NULL DEFAULT 0")
        self._conn.executescript(_INDEXES)
        self._lock = threading.Lock()
        self._ttl_ms = int(result_ttl_s * 1000)
        self._now = clock_ms
        self._submits = 0
        self._lease_s = lease_s

    @property
    def lease_s(self) -> float:
        return self._lease_s

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            with self._lock:
                return fn(self._conn)

        return await asyncio.to_thread(call)

    @staticmethod
    def _tx(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]) -> _T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return out

    # --- protocol ---

    async def submit(self, spec: JobSpec, *, capacity: int) -> SubmitResult:
        now = self._now()
        job_id = new_job_id()
        self._submits += 1
        purge = self._submits % 100 == 1

        def body(conn: sqlite3.Connection) -> SubmitResult:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE tenant = ? AND request_id = ?", (spec.tenant, spec.request_id)
            ).fetchone()
            if row is not None:
                return SubmitResult(_row_to_job(row), replayed=True)
            (depth,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED'").fetchone()
            if depth >= capacity:
                raise QueueFull(int(depth))
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            conn.execute(
                "INSERT INTO jobs (job_id, request_id, tenant, state, payload, metadata, created_ms, seq) "
                "VALUES (?, ?, ?, 'QUEUED', ?, ?, ?, ?)",
                (job_id, spec.request_id, spec.tenant, spec.payload, spec.metadata, now, seq),
            )
            if purge:
                conn.execute("DELETE FROM jobs WHERE finished_ms > 0 AND finished_ms < ?", (now - self._ttl_ms,))
            job = Job(job_id, spec.request_id, spec.tenant, JobState.QUEUED, spec.payload, spec.metadata, 0, now)
            return SubmitResult(job, replayed=False)

        return await self._run(lambda conn: self._tx(conn, body))

    async def get(self, job_id: str) -> Job | None:
        def body(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._run(body)

    async def get_by_request(self, tenant: str, request_id: str) -> Job | None:
        def body(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE tenant = ? AND request_id = ?", (tenant, request_id)
            ).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._run(body)

    async def mark_settled(self, job_id: str) -> Settle:
        def body(conn: sqlite3.Connection) -> Settle:
            row = conn.execute("SELECT state, settled FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return Settle.NOT_FOUND
            if not JobState(row[0]).finished:
                return Settle.NOT_FINISHED
            if row[1]:
                return Settle.REPLAYED
            conn.execute("UPDATE jobs SET settled = 1 WHERE job_id = ?", (job_id,))
            return Settle.SETTLED

        return await self._run(lambda conn: self._tx(conn, body))

    async def list_jobs(
        self,
        *,
        unsettled_only: bool = False,
        states: frozenset[JobState] = frozenset(),
        limit: int = 100,
        page_token: str = "",
        max_bytes: int = PAGE_MAX_BYTES,
    ) -> JobPage:
        after = _parse_token(page_token)
        where = ["seq > ?"]
        args: list[Any] = [after]
        if unsettled_only:
            where.append("settled = 0")  # the partial index jobs_unsettled
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += sorted(s.value for s in states)
        sql = f"SELECT {_LIST_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        args.append(limit + 1)

        def body(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return list(conn.execute(sql, args).fetchall())

        rows = await self._run(body)
        jobs: list[Job] = []
        size = 0
        last_seq = after
        for row in rows[:limit]:
            job = _row_to_job(row)
            size += job_bytes(job)
            if jobs and size > max_bytes:
                break
            jobs.append(job)
            last_seq = int(row[13])
        more = len(jobs) < len(rows)
        return JobPage(jobs, str(last_seq) if more else "")

    async def claim(self, worker: str, *, max_attempts: int) -> Claim | None:
        lease_s = self._lease_s

        def body(conn: sqlite3.Connection) -> Claim | None:
            while True:
                now = self._now()
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE state = 'QUEUED' "
                    "OR (state = 'RUNNING' AND lease_until_ms < ?) ORDER BY seq LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                job = _row_to_job(row)
                if job.attempts >= max_attempts:
                    conn.execute(
                        "UPDATE jobs SET state = 'FAILED', token = NULL, finished_ms = ?, error = ? WHERE job_id = ?",
                        (now, f"gave up after {job.attempts} attempts (workers died running it)", job.job_id),
                    )
                    continue
                token = new_token()
                conn.execute(
                    "UPDATE jobs SET state = 'RUNNING', attempts = attempts + 1, token = ?, worker = ?, "
                    "lease_until_ms = ? WHERE job_id = ?",
                    (token, worker, now + int(lease_s * 1000), job.job_id),
                )
                claimed = Job(
                    job.job_id,
                    job.request_id,
                    job.tenant,
                    JobState.RUNNING,
                    job.payload,
                    job.metadata,
                    job.attempts + 1,
                    job.created_unix_ms,
                    worker=worker,
                )
                return Claim(claimed, token, worker, reclaimed=job.state is JobState.RUNNING)

        def claim_if_any(conn: sqlite3.Connection) -> Claim | None:
            # Idle workers poll: look without the write lock first, so polling never blocks submitters.
            ready = conn.execute(
                "SELECT 1 FROM jobs WHERE state = 'QUEUED' OR (state = 'RUNNING' AND lease_until_ms < ?) LIMIT 1",
                (self._now(),),
            ).fetchone()
            return self._tx(conn, body) if ready is not None else None

        return await self._run(claim_if_any)

    async def _fenced_update(self, claim: Claim, sql: str, args: tuple[Any, ...]) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"{sql} WHERE job_id = ? AND token = ? AND state = 'RUNNING'", (*args, claim.job_id, claim.token)
            )
            return cur.rowcount == 1

        return await self._run(lambda conn: self._tx(conn, body))

    async def renew(self, claim: Claim) -> bool:
        lease_s = self._lease_s
        return await self._fenced_update(
            claim, "UPDATE jobs SET lease_until_ms = ?", (self._now() + int(lease_s * 1000),)
        )

    async def complete(self, claim: Claim, result: str) -> bool:
        return await self._fenced_update(
            claim,
            "UPDATE jobs SET state = 'SUCCEEDED', token = NULL, result = ?, finished_ms = ?",
            (result, self._now()),
        )

    async def fail(self, claim: Claim, error: str) -> bool:
        return await self._fenced_update(
            claim, "UPDATE jobs SET state = 'FAILED', token = NULL, error = ?, finished_ms = ?", (error, self._now())
        )

    async def release(self, claim: Claim) -> bool:
        return await self._fenced_update(
            claim, "UPDATE jobs SET state = 'QUEUED', token = NULL, lease_until_ms = ?", (0,)
        )

    async def queued(self) -> int:
        def body(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED'").fetchone()
            return int(n)

        return await self._run(body)

    async def close(self) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.close()

        await self._run(body)
