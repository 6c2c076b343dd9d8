"""The Redis store: entries, leases and counters shared by every cache replica.

Keys (every key of a namespace shares the hash tag ``{<namespace>}``, so each script touches one Redis Cluster
slot):

* ``<prefix>:{<ns>}:e:<key>`` — hash ``p`` payload, ``f`` feature, ``c`` cost micros, ``t`` filling tenant,
  ``b`` payload bytes; expires with the entry's TTL (``PEXPIRE``).
* ``<prefix>:{<ns>}:l:<key>`` — the fill lease: the holder's lease id, ``SET NX PX lease_ttl``.
* ``<prefix>:{<ns>}:s`` — counters, hash fields ``<counter>|<tenant>|<feature>``.

Probe, fill and abandon are Lua scripts, one round trip each. Waking: a fill or abandon ``PUBLISH``-es
``"<ns> <key>"`` on ``<prefix>:wake``; each replica holds one subscription and wakes its local waiters, which then
re-probe. While that subscription is down (or with ``wake="poll"``) waiters poll with exponential backoff
instead. Expired leases need no message: a waiter never waits past the holder's lease.

Every Redis failure becomes :class:`StoreUnavailable` (the service fails open); the client is built with short
timeouts and one immediate retry (a pooled connection that died with a Redis restart is replaced at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Collection
from contextlib import AbstractContextManager
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.cache.store import (
    COUNTERS,
    Entry,
    Probe,
    ProbeState,
    StoreStats,
    StoreUnavailable,
    Waiter,
    WaiterRegistry,
)

log = structlog.get_logger("costmesh.cache.redis")

T = TypeVar("T")

_PROBE = """
local v = redis.call('HMGET', KEYS[1], 'p', 'f', 'c', 't')
local group = '|' .. ARGV[1] .. '|' .. ARGV[2]
if v[1] then
  redis.call('HINCRBY', KEYS[3], 'hits' .. group, 1)
  redis.call('HINCRBY', KEYS[3], 'saved_micros' .. group, v[3])
  if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[3], 'coalesced_waits' .. group, 1) end
  return {1, v[1], v[2], v[3], v[4]}
end
if ARGV[3] == '' then return {0} end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
  redis.call('HINCRBY', KEYS[3], 'misses' .. group, 1)
  return {2, tonumber(ARGV[4])}
end
return {3, redis.call('PTTL', KEYS[2])}
"""

_FILL = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'p', ARGV[2], 'f', ARGV[3], 'c', ARGV[4], 't', ARGV[5], 'b', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('HINCRBY', KEYS[3], 'fills|' .. ARGV[5] .. '|' .. ARGV[3], 1)
redis.call('PUBLISH', ARGV[8], ARGV[9])
return 1
"""

_ABANDON = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

_SCAN_BATCH = 500


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore:
    """Cache store on Redis, shared by every replica. Built by the composition root from a client or a URL."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "costmesh:cache",
        wake: Literal["pubsub", "poll"] = "pubsub",
        poll_initial_ms: float = 2.0,
        poll_max_ms: float = 100.0,
        pubsub_safety_poll_ms: float = 1000.0,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._channel = f"{prefix}:wake"
        self._wake_mode = wake
        self._poll_initial_s = poll_initial_ms / 1000
        self._poll_max_s = poll_max_ms / 1000
        self._safety_s = pubsub_safety_poll_ms / 1000
        self._waiters = WaiterRegistry()
        self._probe = client.register_script(_PROBE)
        self._fill = client.register_script(_FILL)
        self._abandon = client.register_script(_ABANDON)
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closing = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_ms: int = 250,
        max_connections: int = 64,
        **kwargs: Any,
    ) -> RedisStore:
        # A blocking pool: past max_connections a call waits (up to the timeout) for a free connection instead of
        # failing, so a burst above the pool size queues rather than failing open.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_ms / 1000,
            socket_timeout=timeout_ms / 1000,
            socket_connect_timeout=timeout_ms / 1000,
            retry=Retry(NoBackoff(), 1),
        )
        return cls(aioredis.Redis.from_pool(pool), **kwargs)

    # -- keys -------------------------------------------------------------------------------------------------

    def _entry_key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}:{{{namespace}}}:e:{key}"

    def _lease_key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}:{{{namespace}}}:l:{key}"

    def _stats_key(self, namespace: str) -> str:
        return f"{self._prefix}:{{{namespace}}}:s"

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._wake_mode == "pubsub" and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="cache-redis-wake")

    async def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the wake subscription is live (tests and readiness)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._subscribed.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        self._waiters.wake_all()
        await self._redis.aclose()

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def _call(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    # -- waking -------------------------------------------------------------------------------------------------

    def _poll_cap(self, polls: int) -> float | None:
        if self._wake_mode == "pubsub" and self._subscribed.is_set():
            return self._safety_s
        return float(min(self._poll_max_s, self._poll_initial_s * (2 ** min(polls, 30))))

    def waiting(self) -> int:
        return self._waiters.waiting()

    def watch(self, namespace: str, key: str) -> AbstractContextManager[Waiter]:
        return self._waiters.watch(namespace, key, self._poll_cap)

    async def _listen(self) -> None:
        backoff = 0.05
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                # Fills published while we were not subscribed are lost: wake everyone to re-probe.
                self._waiters.wake_all()
                if backoff > 0.05:
                    log.info("cache_wake_subscription_restored")
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        namespace, _, key = bytes(message["data"]).decode().partition(" ")
                        self._waiters.wake(namespace, key)
            except (RedisError, OSError) as exc:
                if self._subscribed.is_set():
                    log.warning("cache_wake_subscription_lost", error=type(exc).__name__)
                self._subscribed.clear()
            finally:
                self._subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    # -- operations ---------------------------------------------------------------------------------------------

    async def probe(
        self,
        namespace: str,
        key: str,
        *,
        tenant: str,
        feature: str,
        lease_id: str | None,
        lease_ttl_ms: int,
        coalesced: bool,
    ) -> Probe:
        keys = [self._entry_key(namespace, key), self._lease_key(namespace, key), self._stats_key(namespace)]
        args: list[bytes | str | int] = [tenant, feature, lease_id or "", lease_ttl_ms, "1" if coalesced else "0"]
        result = await self._call(self._probe(keys=keys, args=args))
        state = int(result[0])
        if state == 1:
            payload, entry_feature, cost, entry_tenant = result[1:5]
            entry = Entry(bytes(payload), entry_feature.decode(), int(cost), entry_tenant.decode())
            return Probe(ProbeState.HIT, entry)
        if state == 0:
            return Probe(ProbeState.ABSENT)
        if state == 2:
            return Probe(ProbeState.LEASED, lease_ttl_ms=int(result[1]), lease_id=lease_id)
        return Probe(ProbeState.HELD, lease_ttl_ms=max(1, int(result[1])))

    async def fill(self, namespace: str, key: str, *, lease_id: str, entry: Entry, ttl_ms: int) -> bool:
        keys = [self._entry_key(namespace, key), self._lease_key(namespace, key), self._stats_key(namespace)]
        args: list[bytes | str | int] = [
            lease_id,
            entry.payload,
            entry.feature,
            entry.cost_micros,
            entry.tenant,
            entry.size,
            max(1, ttl_ms),
            self._channel,
            f"{namespace} {key}",
        ]
        return bool(await self._call(self._fill(keys=keys, args=args)))

    async def abandon(self, namespace: str, key: str, *, lease_id: str) -> bool:
        keys = [self._lease_key(namespace, key)]
        args = [lease_id, self._channel, f"{namespace} {key}"]
        return bool(await self._call(self._abandon(keys=keys, args=args)))

    async def _scan(self, pattern: str) -> list[bytes]:
        async def run() -> list[bytes]:
            return [k async for k in self._redis.scan_iter(match=pattern, count=_SCAN_BATCH)]

        return await self._call(run())

    async def invalidate(self, namespace: str, *, feature: str | None = None, key: str | None = None) -> int:
        if key is not None:
            names: list[bytes | str] = [self._entry_key(namespace, key)]
        else:
            pattern = f"{_glob_escape(self._prefix)}:{{{_glob_escape(namespace)}}}:e:*"
            names = list(await self._scan(pattern))
        removed = 0
        for start in range(0, len(names), _SCAN_BATCH):
            batch = names[start : start + _SCAN_BATCH]
            if feature is not None:
                features = await self._call(self._pipeline_hget(batch, "f"))
                batch = [n for n, f in zip(batch, features, strict=True) if f is not None and f.decode() == feature]
            if batch:
                removed += int(await self._call(self._redis.delete(*batch)))
        return removed

    async def _pipeline_hget(self, names: list[bytes | str], field: str) -> list[bytes | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(name, field)
            return list(await pipe.execute())

    async def stats(self, namespaces: Collection[str] | None, tenant: str | None) -> StoreStats:
        prefix = _glob_escape(self._prefix)
        if namespaces is None:
            stats_keys: list[bytes | str] = list(await self._scan(f"{prefix}:{{*}}:s"))
            entry_patterns = [f"{prefix}:{{*}}:e:*"]
        else:
            stats_keys = [self._stats_key(ns) for ns in namespaces]
            entry_patterns = [f"{prefix}:{{{_glob_escape(ns)}}}:e:*" for ns in namespaces]
        report = StoreStats()
        for stats_key in stats_keys:
            fields = await self._call(self._redis.hgetall(stats_key))
            for raw_field, raw_value in fields.items():
                counter, _, rest = _text(raw_field).partition("|")
                group_tenant, _, feature = rest.partition("|")
                if counter not in COUNTERS or (tenant is not None and group_tenant != tenant):
                    continue
                group = report.groups.setdefault((group_tenant, feature), dict.fromkeys(COUNTERS, 0))
                group[counter] += int(raw_value)
        for pattern in entry_patterns:
            names: list[bytes | str] = list(await self._scan(pattern))
            for start in range(0, len(names), _SCAN_BATCH):
                sizes = await self._call(self._pipeline_hget(names[start : start + _SCAN_BATCH], "b"))
                for size in sizes:
                    if size is not None:
                        report.entries += 1
                        report.bytes += int(size)
        info: dict[str, Any] = await self._call(self._redis.info("stats"))
        report.evictions = int(info.get("evicted_keys", 0))
        return report
