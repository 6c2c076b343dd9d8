"""Redis job store for production: a stream per queue read through one consumer group by every worker of a tier.

Keys of one queue share the hash tag ``{<queue>}`` so every script touches one slot (works on Redis Cluster)::

    costmesh:infer:{cheap}:stream              XADD per submission (field job=<job_id>); group "workers"
    costmesh:infer:{cheap}:job:<job_id>        hash: state, payload, attempts, token, result, ...
    costmesh:infer:{cheap}:idem:<tenant>:<rid> job id for an idempotency key
    costmesh:infer:{cheap}:queued              number of QUEUED jobs (capacity check, queue depth)
    costmesh:infer:{cheap}:seq                 submission counter (the score of the two indexes below)
    costmesh:infer:{cheap}:jobs                sorted set of every kept job in submission order (ListJobs)
    costmesh:infer:{cheap}:unsettled           the same, only jobs whose settlement is not recorded (ListJobs)
    costmesh:infer:{cheap}:expiry              finished jobs by the time their hash expires (trims the two above)

New work is read with ``XREADGROUP ... >``; a job whose worker died stays in the group's pending entries list and,
once idle longer than the lease, is taken over with ``XAUTOCLAIM``. A running worker renews its lease by resetting
the entry's idle time (``XCLAIM ... JUSTID``). Every state change is one Lua script that checks the claim token first.

The two listing indexes are sorted sets scored by a submission counter (exact order). A finished job's hash
expires ``result_ttl_s`` after it finished; the same script that sets that expiry files the job in ``expiry``, and each
submission removes up to 16 expired jobs from the indexes, so they hold only kept jobs (a listing also drops any entry
whose hash is gone). ``mark_settled`` removes the job from ``unsettled`` in the same script that sets its flag.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

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

GROUP = "workers"

# KEYS: idem, job, stream, queued, jobs, unsettled, expiry, seq
# ARGV: job_id, capacity, request_id, tenant, payload, metadata, created_ms
_SUBMIT = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', ARGV[7], 'LIMIT', 0, 16)
for _, id in ipairs(gone) do
  redis.call('ZREM', KEYS[5], id)
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', KEYS[7], id)
end
local existing = redis.call('GET', KEYS[1])
if existing then return {'replay', existing} end
local depth = tonumber(redis.call('GET', KEYS[4]) or '0')
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[2], 'job_id', ARGV[1], 'request_id', ARGV[3], 'tenant', ARGV[4], 'state', 'QUEUED',
  'payload', ARGV[5], 'metadata', ARGV[6], 'attempts', 0, 'created_ms', ARGV[7], 'finished_ms', 0,
  'result', '', 'error', '', 'worker', '', 'token', '', 'settled', 0)
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[2], 'entry', entry)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[4])
local seq = redis.call('INCR', KEYS[8])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('ZADD', KEYS[6], seq, ARGV[1])
return {'new', ARGV[1]}
"""

# KEYS: job, stream, queued, idem, expiry   ARGV: group, entry, token, worker, max_attempts, now_ms, ttl_s, job_id
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  return {'gone'}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if state == 'QUEUED' then redis.call('DECR', KEYS[3]) end
if attempts >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'token', '', 'finished_ms', ARGV[6],
    'error', 'gave up after ' .. attempts .. ' attempts (workers died running it)')
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('EXPIRE', KEYS[4], ARGV[7])
  redis.call('ZADD', KEYS[5], tonumber(ARGV[6]) + 1000 * tonumber(ARGV[7]), ARGV[8])
  return {'failed'}
end
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'attempts', attempts + 1, 'token', ARGV[3], 'worker', ARGV[4],
  'entry', ARGV[2])
return {'ok', state}
"""

# KEYS: job, stream   ARGV: token, group, worker, entry
_RENEW = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return 0
end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
return 1
"""

# KEYS: job, stream, idem, expiry   ARGV: token, group, entry, new_state, field, value, now_ms, ttl_s, job_id
_FINISH = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'token', '', ARGV[5], ARGV[6], 'finished_ms', ARGV[7])
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[3], ARGV[8])
redis.call('ZADD', KEYS[4], tonumber(ARGV[7]) + 1000 * tonumber(ARGV[8]), ARGV[9])
return 1
"""

# KEYS: job, stream, queued   ARGV: token, group, entry, job_id
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return 0
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'token', '', 'entry', entry)
redis.call('INCR', KEYS[3])
return 1
"""

# KEYS: job, unsettled   ARGV: job_id
_SETTLE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'not_found' end
if state ~= 'SUCCEEDED' and state ~= 'FAILED' and state ~= 'CANCELLED' then return 'not_finished' end
if redis.call('HGET', KEYS[1], 'settled') == '1' then return 'replayed' end
redis.call('HSET', KEYS[1], 'settled', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
return 'settled'
"""

#: The hash fields a listing reads (not the payload: the prompt can be large and ListJobs does not return it).
_LIST_FIELDS = (
    "job_id",
    "request_id",
    "tenant",
    "state",
    "metadata",
    "attempts",
    "created_ms",
    "finished_ms",
    "result",
    "error",
    "worker",
    "settled",
)


def _job_from_hash(h: dict[str, str]) -> Job:
    return Job(
        job_id=h["job_id"],
        request_id=h.get("request_id", ""),
        tenant=h.get("tenant", ""),
        state=JobState(h["state"]),
        payload=h.get("payload", ""),
        metadata=h.get("metadata", ""),
        attempts=int(h.get("attempts") or 0),
        created_unix_ms=int(h.get("created_ms") or 0),
        finished_unix_ms=int(h.get("finished_ms") or 0),
        result=h.get("result", ""),
        error=h.get("error", ""),
        worker=h.get("worker", ""),
        settled=h.get("settled") == "1",
    )


def _parse_token(token: str) -> int:
    """A page token is the submission number of the last job the previous page covered."""
    if not token:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise BadPageToken("not a page token of this store")
    return int(token)


class RedisJobStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        queue: str,
        lease_s: float = 30.0,
        result_ttl_s: float = 7 * 24 * 3600,
        prefix: str = "costmesh:infer",
    ) -> None:
        self._lease_s = lease_s
        self._r = client
        self._base = f"{prefix}:{{{queue}}}"
        self._stream = f"{self._base}:stream"
        self._queued = f"{self._base}:queued"
        self._all = f"{self._base}:jobs"
        self._unsettled = f"{self._base}:unsettled"
        self._expiry = f"{self._base}:expiry"
        self._seq = f"{self._base}:seq"
        self._ttl_s = max(1, int(result_ttl_s))
        self._submit = client.register_script(_SUBMIT)
        self._start = client.register_script(_START)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._settle = client.register_script(_SETTLE)
        self._group_ready = False
        self._cursor = "0-0"

    @classmethod
    def from_url(
        cls, url: str, *, queue: str, lease_s: float = 30.0, result_ttl_s: float = 7 * 24 * 3600
    ) -> RedisJobStore:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        return cls(client, queue=queue, lease_s=lease_s, result_ttl_s=result_ttl_s)

    @property
    def lease_s(self) -> float:
        return self._lease_s

    def _job_key(self, job_id: str) -> str:
        return f"{self._base}:job:{job_id}"

    def _idem_key(self, tenant: str, request_id: str) -> str:
        return f"{self._base}:idem:{tenant}:{request_id}"

    async def _ensure_group(self, *, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            await self._r.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._group_ready = True

    # --- protocol ---

    async def submit(self, spec: JobSpec, *, capacity: int) -> SubmitResult:
        await self._ensure_group()
        job_id = new_job_id()
        created = now_ms()
        keys = [
            self._idem_key(spec.tenant, spec.request_id),
            self._job_key(job_id),
            self._stream,
            self._queued,
            self._all,
            self._unsettled,
            self._expiry,
            self._seq,
        ]
        args: list[str | int] = [job_id, capacity, spec.request_id, spec.tenant, spec.payload, spec.metadata, created]
        kind, value = await self._submit(keys=keys, args=args)
        if kind == "full":
            raise QueueFull(int(value))
        if kind == "replay":
            job = await self.get(str(value))
            if job is None:  # expired between the two calls: treat as gone, submit again
                await self._r.delete(keys[0])
                return await self.submit(spec, capacity=capacity)
            return SubmitResult(job, replayed=True)
        job = Job(job_id, spec.request_id, spec.tenant, JobState.QUEUED, spec.payload, spec.metadata, 0, created)
        return SubmitResult(job, replayed=False)

    async def get(self, job_id: str) -> Job | None:
        h: dict[str, str] = dict(await self._r.hgetall(self._job_key(job_id)))  # type: ignore[arg-type]
        return _job_from_hash(h) if h.get("job_id") else None

    async def get_by_request(self, tenant: str, request_id: str) -> Job | None:
        job_id = await self._r.get(self._idem_key(tenant, request_id))
        return await self.get(str(job_id)) if job_id else None

    async def mark_settled(self, job_id: str) -> Settle:
        res = await self._settle(keys=[self._job_key(job_id), self._unsettled], args=[job_id])
        return Settle(str(res))

    async def list_jobs(
        self,
        *,
        unsettled_only: bool = False,
        states: frozenset[JobState] = frozenset(),
        limit: int = 100,
        page_token: str = "",
        max_bytes: int = PAGE_MAX_BYTES,
    ) -> JobPage:
        index = self._unsettled if unsettled_only else self._all
        cursor = _parse_token(page_token)
        # Filters are applied to the index entries read, so one call reads at most this many (a page may come back
        # short, with a token to go on from).
        budget = max(4 * limit, 200)
        jobs: list[Job] = []
        size = 0
        while len(jobs) < limit and budget > 0:
            batch = await self._after(index, cursor, min(budget, max(limit - len(jobs), 16)))
            if not batch:
                return JobPage(jobs, "")
            budget -= len(batch)
            async with self._r.pipeline(transaction=False) as pipe:
                for job_id, _ in batch:
                    pipe.hmget(self._job_key(job_id), _LIST_FIELDS)
                rows: list[list[str | None]] = await pipe.execute()
            gone: list[str] = []
            full = False
            for (job_id, score), row in zip(batch, rows, strict=True):
                if row[0] is None:  # expired before the index was trimmed
                    gone.append(job_id)
                    cursor = score
                    continue
                job = _job_from_hash({k: v for k, v in zip(_LIST_FIELDS, row, strict=True) if v is not None})
                if (states and job.state not in states) or (unsettled_only and job.settled):
                    cursor = score
                    continue
                size += job_bytes(job)
                if jobs and size > max_bytes:
                    full = True
                    break
                jobs.append(job)
                cursor = score
                if len(jobs) == limit:
                    break
            if gone:
                await self._r.zrem(self._all, *gone)
                await self._r.zrem(self._unsettled, *gone)
            if full:  # by bytes: the next page starts at the job left out
                return JobPage(jobs, str(cursor))
        more = bool(await self._after(index, cursor, 1))
        return JobPage(jobs, str(cursor) if more else "")

    async def _after(self, index: str, cursor: int, count: int) -> list[tuple[str, int]]:
        """Up to ``count`` (job id, submission number) entries of ``index`` after ``cursor``, in submission order."""
        found: Any = await self._r.zrangebyscore(index, f"({cursor}", "+inf", start=0, num=count, withscores=True)
        return [(str(m), int(sc)) for m, sc in found]

    async def _next_entry(self, worker: str) -> tuple[str, str, bool] | None:
        """(entry id, job id, reclaimed) of an orphaned entry idle past the lease, else of a new entry."""
        # XAUTOCLAIM walks the pending list from a cursor, a few entries per call; keep the cursor between calls.
        result: Any = await self._r.xautoclaim(
            self._stream, GROUP, worker, min_idle_time=int(self._lease_s * 1000), start_id=self._cursor, count=1
        )
        self._cursor = str(result[0])
        for entry_id, fields in result[1]:
            if fields and fields.get("job"):
                return str(entry_id), str(fields["job"]), True
        read: Any = await self._r.xreadgroup(GROUP, worker, {self._stream: ">"}, count=1)
        for _stream, entries in read or ():
            for entry_id, fields in entries:
                if fields and fields.get("job"):
                    return str(entry_id), str(fields["job"]), False
                await self._r.xack(self._stream, GROUP, entry_id)
        return None

    async def claim(self, worker: str, *, max_attempts: int) -> Claim | None:
        await self._ensure_group()
        for _ in range(32):  # skip entries of finished, expired or poisoned jobs
            try:
                found = await self._next_entry(worker)
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                await self._ensure_group(force=True)
                continue
            if found is None:
                return None
            entry_id, job_id, _ = found
            token = new_token()
            job_key = self._job_key(job_id)
            job = await self.get(job_id)
            idem = self._idem_key(job.tenant, job.request_id) if job else f"{self._base}:idem:-"
            res: Any = await self._start(
                keys=[job_key, self._stream, self._queued, idem, self._expiry],
                args=[GROUP, entry_id, token, worker, max_attempts, now_ms(), self._ttl_s, job_id],
            )
            if res[0] != "ok":
                continue
            claimed = await self.get(job_id)
            if claimed is None:
                continue
            return Claim(claimed, token, worker, reclaimed=res[1] == "RUNNING", entry_id=entry_id)
        return None

    async def renew(self, claim: Claim) -> bool:
        res = await self._renew(
            keys=[self._job_key(claim.job_id), self._stream], args=[claim.token, GROUP, claim.worker, claim.entry_id]
        )
        return bool(int(res))

    async def _finish_as(self, claim: Claim, state: JobState, field: str, value: str) -> bool:
        job = claim.job
        res = await self._finish(
            keys=[self._job_key(claim.job_id), self._stream, self._idem_key(job.tenant, job.request_id), self._expiry],
            args=[claim.token, GROUP, claim.entry_id, state.value, field, value, now_ms(), self._ttl_s, claim.job_id],
        )
        return bool(int(res))

    async def complete(self, claim: Claim, result: str) -> bool:
        return await self._finish_as(claim, JobState.SUCCEEDED, "result", result)

    async def fail(self, claim: Claim, error: str) -> bool:
        return await self._finish_as(claim, JobState.FAILED, "error", error)

    async def release(self, claim: Claim) -> bool:
        res = await self._release(
            keys=[self._job_key(claim.job_id), self._stream, self._queued],
            args=[claim.token, GROUP, claim.entry_id, claim.job_id],
        )
        return bool(int(res))

    async def queued(self) -> int:
        return int(await self._r.get(self._queued) or 0)

    async def close(self) -> None:
        await self._r.aclose()
