"""The Redis budget store: one Lua script per operation (EVALSHA, reloaded on NOSCRIPT by redis-py's Script).

Key layout and record formats: :mod:`services.budget.redis_scripts`. Every key of a tenant carries the hash tag
``{t:<tenant>}``, so all of a tenant's scopes (tenant, team, feature, end user), reservations and usage live in one
slot and one script settles them atomically on Redis Cluster. The global scope lives in its own slot (``{g}``):

* standalone Redis (``cluster=False``, the default): the global keys are passed to the same script, so global and
  tenant limits are checked and reserved in one atomic step;
* Redis Cluster (``cluster=True``): a Reserve first reserves on the global slot (one script), then on the tenant
  slot (one script); if the tenant step answers that it did not admit, the global reservation is undone. The
  global limit is never overspent (money is held globally *before* the tenant admits), at the price of a short
  over-reservation while a rejected request is being undone. An unknown tenant outcome (a lost reply: the script
  may have run) never undoes the global hold: the tenant step is asked again (idempotent, and it recognises its
  own reservation id), and if it never answers the hold stays until its TTL. Commit and Release settle the tenant
  first, then the global slot; both steps are idempotent, so a retried Commit finishes a settlement a crash
  interrupted. RenewReservation extends the global hold first, then the tenant's, so the global hold never
  expires before the tenant's. Rationale in services/budget/README.md.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, ConnectionError, NoScriptError, RedisClusterException, TimeoutError

from services.budget import redis_scripts
from services.budget.model import (
    SEP,
    Buckets,
    Policy,
    ReservationState,
    Scope,
    ScopeSnapshot,
    UsageCounters,
    UsageDims,
    UsageRecord,
)
from services.budget.store import (
    CommitCommand,
    CommitOutcome,
    CommitStatus,
    LateReason,
    ReleaseOutcome,
    RenewCommand,
    RenewOutcome,
    RenewStatus,
    ReserveCommand,
    ReserveOutcome,
    ReserveStatus,
    SavingsCommand,
    StoreUnavailable,
)
from services.budget.usage import seed_cells, seed_from
from services.budget.windows import MINUTE_MS

log = structlog.get_logger("costmesh.budget")

T = TypeVar("T")
G = "{g}"
GC_EVERY = 64
_BLOCK = struct.Struct("<13q")
_USAGE = struct.Struct("<9q")
_USAGE_V1 = struct.Struct("<8q")  # cells written before late commits were counted
_RESERVE_STATUS: dict[int, ReserveStatus] = {1: "admitted", 0: "rejected", 2: "replayed"}
_COMMIT_STATUS: dict[int, CommitStatus] = {1: "committed", 2: "replayed", -1: "not_found"}
_RENEW_STATUS: dict[int, RenewStatus] = {1: "renewed", -1: "not_found", -2: "settled", -3: "expired"}
_STATE = {
    "a": ReservationState.HELD,
    "c": ReservationState.COMMITTED,
    "r": ReservationState.RELEASED,
    "e": ReservationState.EXPIRED,
}
_LATE: dict[str, LateReason] = {"e": "expired", "r": "released"}


def tenant_prefix(tenant: str) -> str:
    return "{t:" + tenant + "}"


def _prefix(scope: Scope) -> str:
    return G if scope.domain == "" else tenant_prefix(scope.domain)


def _pack(*numbers: int) -> bytes:
    """The numbers of a script call as one argument: little-endian int64s (``struct.unpack('<i8...')`` in Lua)."""
    return struct.pack(f"<{len(numbers)}q", *numbers)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _counters(packed: bytes) -> UsageCounters:
    if len(packed) == _USAGE_V1.size:
        return UsageCounters(*_USAGE_V1.unpack(packed))
    return UsageCounters(*_USAGE.unpack(packed))


def _snaps(tenant: str, reply: Sequence[Any], start: int) -> list[ScopeSnapshot]:
    """Scope blocks of a script reply: 13 int64 (rc rt hc ht dc dt mc mt lc lt rn rk ro), then
    ``<scope>\\x1f<policy json>``."""
    out: list[ScopeSnapshot] = []
    for item in reply[start:]:
        rc, rt, hc, ht, dc, dt, mc, mt, lc, lt, rn, rk, ro = _BLOCK.unpack_from(item)
        sk, pj = item[_BLOCK.size :].decode().split(SEP, 1)
        policy = Policy.from_json(Scope.from_key(tenant, sk), pj)
        out.append(ScopeSnapshot(policy, rc, rt, ((hc, ht), (dc, dt), (mc, mt), (lc, lt)), rn, rk, ro))
    return out


class RedisBudgetStore:
    """:class:`services.budget.store.BudgetStore` on Redis (standalone or Cluster)."""

    def __init__(
        self,
        *,
        client: Redis | RedisCluster,
        cluster: bool = False,
        retention_ms: int = 86_400_000,
        minute_retention_ms: int = 8 * 86_400_000,
        hour_retention_ms: int = 400 * 86_400_000,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisBudgetStore needs a client with decode_responses=False (counters are binary)")
        self._r = client
        self._cluster = cluster
        self._retention_ms = retention_ms
        self._minute_ttl = minute_retention_ms
        self._hour_ttl = hour_retention_ms
        self._reserve = client.register_script(redis_scripts.RESERVE)
        self._commit = client.register_script(redis_scripts.COMMIT)
        self._release = client.register_script(redis_scripts.RELEASE)
        self._renew = client.register_script(redis_scripts.RENEW)
        self._global_renew = client.register_script(redis_scripts.GLOBAL_RENEW)
        self._global_settle = client.register_script(redis_scripts.GLOBAL_SETTLE)
        self._global_release = client.register_script(redis_scripts.GLOBAL_RELEASE)
        self._snapshot = client.register_script(redis_scripts.SNAPSHOT)
        self._put_policy = client.register_script(redis_scripts.PUT_POLICY)
        self._savings = client.register_script(redis_scripts.SAVINGS)
        self._known_tenants: set[str] = set()
        self._calls = 0
        # redis-py's cluster client initialises itself lazily, and concurrent first calls race inside that
        # initialisation; initialise it once, under a lock, before the first call.
        self._cluster_ready = not isinstance(client, RedisCluster)
        self._init_lock = asyncio.Lock()

    async def _init_cluster(self) -> None:
        async with self._init_lock:
            if not self._cluster_ready:
                assert isinstance(self._r, RedisCluster)
                try:
                    await self._r.initialize()
                except RedisClusterException as err:  # "cannot be connected": no node reachable
                    raise StoreUnavailable(f"redis cluster: {err}") from err
                self._cluster_ready = True

    async def _io(self, awaitable: Awaitable[T]) -> T:
        try:
            if not self._cluster_ready:
                await self._init_cluster()
            return await awaitable
        except (ConnectionError, TimeoutError, ClusterDownError, OSError) as err:
            raise StoreUnavailable(f"redis: {err}") from err
        finally:
            if inspect.iscoroutine(awaitable) and inspect.getcoroutinestate(awaitable) == inspect.CORO_CREATED:
                awaitable.close()  # never started (initialisation failed): no "never awaited" warning

    async def _register_tenant(self, tenant: str) -> None:
        if tenant and tenant not in self._known_tenants:
            await self._io(self._r.sadd(G + ":tenants", tenant))
            self._known_tenants.add(tenant)

    def _gc_now(self) -> int:
        """1 on every GC_EVERY-th call: dropping old records is bounded work done now and then, not every call."""
        self._calls += 1
        return int(self._calls % GC_EVERY == 0)

    async def ping(self) -> None:
        await self._io(self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()

    # -- policies ---------------------------------------------------------------------------------------------

    async def put_policy(self, policy: Policy, *, at: Buckets) -> bool:
        scope = policy.scope
        p = _prefix(scope)
        await self._register_tenant(scope.domain)
        existed = await self._io(self._r.hexists(p + ":st", scope.key + SEP + "p"))
        seed: tuple[tuple[int, int], ...] = ((0, 0),) * 4
        if not existed:
            # Not atomic with the script below: a commit landing in between is not seeded (documented).
            tenants = [scope.domain] if scope.domain else await self.tenants()
            per_window = {}
            for window, cells in seed_cells(at).items():
                records: list[UsageRecord] = []
                for tenant in tenants:
                    records += await self.usage(tenant, cells)
                per_window[window] = records
            seed = seed_from(scope, per_window)
        (hc, ht), (dc, dt), (mc, mt), (lc, lt) = seed
        result = await self._io(
            self._put_policy(
                keys=[p + ":st"],
                args=[scope.key, policy.to_json(), at.hour, hc, ht, at.day, dc, dt, at.month, mc, mt, lc, lt],
            )
        )
        return int(result) == 0

    async def get_policy(self, scope: Scope) -> Policy | None:
        text = await self._io(self._r.hget(_prefix(scope) + ":st", scope.key + SEP + "p"))
        return None if text is None else Policy.from_json(scope, _text(text))

    async def snapshot(self, scope: Scope, *, at: Buckets) -> ScopeSnapshot | None:
        p = _prefix(scope)
        keep = int(scope.domain != "" or self._cluster)
        nums = _pack(at.now_ms, at.hour, at.day, at.month, keep, self._retention_ms)
        reply = await self._io(self._snapshot(keys=self._domain_keys(p), args=[nums, scope.key]))
        snaps = _snaps(scope.tenant, reply, 0)
        return snaps[0] if snaps else None

    # -- reservations -----------------------------------------------------------------------------------------

    @staticmethod
    def _domain_keys(p: str) -> list[str]:
        return [p + ":st", p + ":exp", p + ":res", p + ":gc"]

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome:
        a = cmd.attribution
        tenant = a.tenant
        p = tenant_prefix(tenant)
        at = cmd.at

        def args(mode: int) -> list[Any]:
            nums = _pack(
                at.now_ms, cmd.expires_ms, cmd.est_cost, cmd.est_tokens, cmd.tier, at.hour, at.day, at.month,
                cmd.retention_ms, mode,
            )  # fmt: skip
            return [nums, cmd.reservation_id, cmd.request_id, tenant, a.team, a.feature, a.end_user, cmd.model, gc_now]

        gc_now = self._gc_now()
        tkeys = [p + ":req", *self._domain_keys(p)]
        if not self._cluster:
            reply = await self._io(self._reserve(keys=[*tkeys, *self._domain_keys(G)], args=args(0)))
            return self._reserve_outcome(cmd, reply, [])
        # Cluster: global slot first (holds the money), then the tenant slot; undo the global hold only when the
        # tenant step answered that it did not admit.
        gid = tenant + SEP + cmd.reservation_id
        g_reply = await self._io(self._reserve(keys=self._domain_keys(G), args=args(2)))
        g_snaps = _snaps("", g_reply, 4)
        if g_reply[0] == 0:
            # The global limit refuses new money, but a request id whose reservation is held or committed replays
            # (no new money): only the tenant slot knows which (mode 3 answers a replay and holds nothing else).
            reply = await self._io(self._reserve(keys=tkeys, args=args(3)))
            return self._reserve_outcome(cmd, reply, g_snaps)
        held = bool(g_snaps)
        try:
            reply = await self._io(self._reserve(keys=tkeys, args=args(1)))
        except StoreUnavailable as err:
            # The reply may be lost after the script ran (it may have admitted): undoing the global hold now could
            # leave a tenant reservation without it. Ask again — the step is idempotent and answers a re-run of this
            # call with its own reservation id — and if no answer comes, keep the hold: it expires with its TTL
            # (money held too long, never too little).
            log.warning("budget_tenant_step_unanswered", tenant=tenant, request_id=cmd.request_id, error=str(err))
            reply = await self._io(self._reserve(keys=tkeys, args=args(1)))
        outcome = self._reserve_outcome(cmd, reply, g_snaps)
        if outcome.status != "admitted" and held and await self._undo_global(gid, at):
            g_snaps = [self._unhold(s, cmd) for s in g_snaps]
            outcome = replace(outcome, scopes=tuple(_snaps(tenant, reply, 4) + g_snaps))
        return outcome

    @staticmethod
    def _reserve_outcome(cmd: ReserveCommand, reply: Sequence[Any], extra: list[ScopeSnapshot]) -> ReserveOutcome:
        status = _RESERVE_STATUS[reply[0]]
        rid = _text(reply[1])
        state = _STATE.get(_text(reply[3]), ReservationState.HELD)
        if status == "replayed" and rid == cmd.reservation_id:
            # This very call ran before (a lost reply, re-sent): its admission is this call's.
            if state is not ReservationState.HELD:  # it expired in between: its money (global hold too) is back
                raise StoreUnavailable("the reservation expired before the store answered")
            status = "admitted"
        snaps = _snaps(cmd.attribution.tenant, reply, 4) + extra
        return ReserveOutcome(status, rid, int(reply[2]), tuple(snaps), state)

    @staticmethod
    def _unhold(snap: ScopeSnapshot, cmd: ReserveCommand) -> ScopeSnapshot:
        return replace(
            snap,
            reserved_micros=snap.reserved_micros - cmd.est_cost,
            reserved_tokens=snap.reserved_tokens - cmd.est_tokens,
        )

    async def _undo_global(self, gid: str, at: Buckets) -> bool:
        """Return a global hold whose tenant step did not admit; False when the store did not answer (the hold
        then stays until its TTL: a transient over-reservation, never an overspend)."""
        nums = _pack(at.now_ms, 1, self._retention_ms)
        try:
            await self._io(self._global_release(keys=self._domain_keys(G), args=[nums, gid]))
        except StoreUnavailable as err:
            log.warning("budget_global_undo_failed", gid=gid, error=str(err))
            return False
        return True

    def _usage_keys(self, p: str, at: Buckets) -> list[str]:
        return [p + f":u:m:{at.now_ms // MINUTE_MS}", p + f":u:h:{at.hour}", p + f":u:d:{at.day}", p + ":u:L"]

    async def commit(self, cmd: CommitCommand) -> CommitOutcome:
        tenant = cmd.tenant
        p = tenant_prefix(tenant)
        at = cmd.at
        await self._register_tenant(tenant)
        u = cmd.usage
        keys = [*self._domain_keys(p), *self._usage_keys(p, at), p + ":meta"]
        ret = self._retention_ms
        with_global = int(not self._cluster)
        nums = _pack(
            at.now_ms, cmd.actual_cost, u.input_tokens, u.output_tokens, u.cached_input_tokens, cmd.tier,
            cmd.saved_micros, at.hour, at.day, at.month, self._minute_ttl, self._hour_ttl, ret, with_global,
        )  # fmt: skip
        if with_global:
            keys += self._domain_keys(G)
        reply = await self._io(self._commit(keys=keys, args=[nums, cmd.reservation_id, tenant, cmd.model]))
        status = _COMMIT_STATUS[reply[0]]
        if status == "not_found":
            return CommitOutcome(status)
        snaps = _snaps(tenant, reply, 5)
        if self._cluster:
            g_nums = _pack(at.now_ms, reply[1], reply[4], at.hour, at.day, at.month, ret)
            gid = tenant + SEP + cmd.reservation_id
            g_reply = await self._io(self._global_settle(keys=self._domain_keys(G), args=[g_nums, gid]))
            snaps += _snaps("", g_reply, 0)
        return CommitOutcome(status, int(reply[1]), bool(reply[2]), _LATE.get(_text(reply[3]), ""), tuple(snaps))

    async def release(self, tenant: str, reservation_id: str, *, at: Buckets) -> ReleaseOutcome:
        keys = self._domain_keys(tenant_prefix(tenant))
        gkeys = self._domain_keys(G)
        ret = self._retention_ms
        if not self._cluster:
            nums = _pack(at.now_ms, ret, 1)
            reply = await self._io(self._release(keys=[*keys, *gkeys], args=[nums, reservation_id, tenant]))
        else:
            nums = _pack(at.now_ms, ret, 0)
            reply = await self._io(self._release(keys=keys, args=[nums, reservation_id, tenant]))
            if reply[2] == b"r":
                g_nums = _pack(at.now_ms, 0, ret)
                gid = tenant + SEP + reservation_id
                await self._io(self._global_release(keys=gkeys, args=[g_nums, gid]))
        if reply[0] == -1:
            return ReleaseOutcome("not_found")
        if reply[0] == 2:
            return ReleaseOutcome("replayed")
        return ReleaseOutcome("released", int(reply[1]))

    async def renew(self, cmd: RenewCommand) -> RenewOutcome:
        tenant = cmd.tenant
        keys = self._domain_keys(tenant_prefix(tenant))
        gkeys = self._domain_keys(G)
        now, ret = cmd.at.now_ms, self._retention_ms
        if not self._cluster:
            nums = _pack(now, cmd.expires_ms, ret, 1)
            reply = await self._io(self._renew(keys=[*keys, *gkeys], args=[nums, cmd.reservation_id, tenant]))
        else:
            # Global first: if the tenant step then fails, the global hold outlives the tenant's (held too long,
            # never too little). Both steps only ever extend, so a retried renew is harmless.
            g_nums = _pack(now, cmd.expires_ms, ret)
            await self._io(self._global_renew(keys=gkeys, args=[g_nums, tenant + SEP + cmd.reservation_id]))
            nums = _pack(now, cmd.expires_ms, ret, 0)
            reply = await self._io(self._renew(keys=keys, args=[nums, cmd.reservation_id, tenant]))
        return RenewOutcome(_RENEW_STATUS[reply[0]], int(reply[1]))

    # -- savings and usage ------------------------------------------------------------------------------------

    async def record_savings(self, cmds: Sequence[SavingsCommand]) -> list[bool]:
        """Each distinct tenant registered once, then one non-transactional pipeline of SAVINGS calls (one round trip
        on standalone Redis; one per node on a cluster, the nodes in parallel). Idempotent per command, so no
        MULTI is needed.

        EVALSHA is queued as a raw command: a pipeline given a ``Script`` asks SCRIPT EXISTS first (an extra round
        trip), and redis-py's cluster pipeline refuses ``.evalsha`` for no stated reason (redis/redis-py#2914,
        lifted upstream in #4206) while routing a raw EVALSHA by its keys like any keyed command. A command answered
        NOSCRIPT (a restart or SCRIPT FLUSH) did not run, so it is retried alone through the ``Script``, which
        reloads it (on every primary of a cluster)."""
        for tenant in dict.fromkeys(cmd.tenant for cmd in cmds):
            await self._register_tenant(tenant)
        calls = [self._savings_call(cmd) for cmd in cmds]
        pipe = self._r.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self._savings.sha, len(keys), *keys, *args)
        replies = await self._io(pipe.execute(raise_on_error=False))
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                keys, args = calls[i]
                replies[i] = await self._io(self._savings(keys=keys, args=args))
            elif isinstance(reply, Exception):
                raise reply
        return [int(reply) == 1 for reply in replies]

    def _savings_call(self, cmd: SavingsCommand) -> tuple[list[str], list[Any]]:
        p = tenant_prefix(cmd.tenant)
        at = cmd.at
        keys = [p + ":sav", p + ":savgc", *self._usage_keys(p, at), p + ":meta"]
        args = [
            at.now_ms,
            cmd.request_id,
            cmd.dims.encode(),
            cmd.saved_micros,
            int(cmd.cache_hit),
            at.now_ms + cmd.retention_ms,
            self._minute_ttl,
            self._hour_ttl,
            self._gc_now(),
        ]
        return keys, args

    async def usage(self, tenant: str, cells: Sequence[tuple[str, int]]) -> list[UsageRecord]:
        p = tenant_prefix(tenant)
        keys = [p + ":u:L" if level == "L" else f"{p}:u:{level}:{bucket}" for level, bucket in cells]
        out: list[UsageRecord] = []
        for start in range(0, len(keys), 256):
            pipe = self._r.pipeline(transaction=False)
            for key in keys[start : start + 256]:
                pipe.hgetall(key)
            results = await self._io(pipe.execute())
            for fields in results:
                for dims, packed in fields.items():
                    counters = _counters(packed)
                    out.append(UsageRecord(tenant, UsageDims.decode(dims.decode()), counters))
        return out

    async def tenants(self) -> list[str]:
        members = await self._io(self._r.smembers(G + ":tenants"))
        return sorted(_text(m) for m in members)

    async def first_activity_ms(self, tenant: str) -> int | None:
        value = await self._io(self._r.hget(tenant_prefix(tenant) + ":meta", "first"))
        return None if value is None else int(value)
