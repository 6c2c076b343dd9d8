"""The embedded budget store: one SQLite file, safe for several processes.

WAL journal, ``synchronous=NORMAL``, a busy timeout, and every operation that decides or moves money is one
``BEGIN IMMEDIATE`` transaction: the write lock is taken before anything is read, so two processes sharing the file
are serialised exactly like two scripts on one Redis. Each transaction first returns the money of expired
reservations, so an expired reservation never counts.

SQLite calls block, so they run on one dedicated thread per store (one connection, owned by that thread); the event
loop only awaits them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from services.budget.model import (
    COUNTER_CODES,
    SEP,
    Buckets,
    Policy,
    ReservationState,
    Scope,
    ScopeSnapshot,
    UsageCounters,
    UsageDims,
    UsageRecord,
    applicable_scopes,
)
from services.budget.policy import RATE_WINDOW_S, violations
from services.budget.store import (
    CommitCommand,
    CommitOutcome,
    LateReason,
    ReleaseOutcome,
    RenewCommand,
    RenewOutcome,
    ReserveCommand,
    ReserveOutcome,
    SavingsCommand,
    StoreUnavailable,
)
from services.budget.usage import seed_cells, seed_from
from services.budget.windows import HOUR_MS, MINUTE_MS
from services.common.attribution import Attribution

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    domain TEXT NOT NULL, scope TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (domain, scope)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scope_state (
    domain TEXT NOT NULL, scope TEXT NOT NULL,
    rc INTEGER NOT NULL DEFAULT 0, rt INTEGER NOT NULL DEFAULT 0,
    hb INTEGER NOT NULL DEFAULT -1, hc INTEGER NOT NULL DEFAULT 0, ht INTEGER NOT NULL DEFAULT 0,
    db INTEGER NOT NULL DEFAULT -1, dc INTEGER NOT NULL DEFAULT 0, dt INTEGER NOT NULL DEFAULT 0,
    mb INTEGER NOT NULL DEFAULT -1, mc INTEGER NOT NULL DEFAULT 0, mt INTEGER NOT NULL DEFAULT 0,
    lc INTEGER NOT NULL DEFAULT 0, lt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (domain, scope)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rate (
    domain TEXT NOT NULL, scope TEXT NOT NULL, sec INTEGER NOT NULL, n INTEGER NOT NULL, k INTEGER NOT NULL,
    PRIMARY KEY (domain, scope, sec)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservation (
    tenant TEXT NOT NULL, id TEXT NOT NULL, request_id TEXT NOT NULL, state TEXT NOT NULL,
    cost INTEGER NOT NULL, tokens INTEGER NOT NULL, expires_ms INTEGER NOT NULL, scopes TEXT NOT NULL,
    team TEXT NOT NULL, feature TEXT NOT NULL, end_user TEXT NOT NULL, model TEXT NOT NULL, tier INTEGER NOT NULL,
    actual INTEGER NOT NULL DEFAULT 0, over_est INTEGER NOT NULL DEFAULT 0, gc_ms INTEGER NOT NULL,
    late TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS reservation_active ON reservation (expires_ms) WHERE state = 'a';
CREATE INDEX IF NOT EXISTS reservation_gc ON reservation (gc_ms);
CREATE TABLE IF NOT EXISTS request (
    tenant TEXT NOT NULL, request_id TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (tenant, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS savings_key (
    tenant TEXT NOT NULL, request_id TEXT NOT NULL, gc_ms INTEGER NOT NULL, PRIMARY KEY (tenant, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, level TEXT NOT NULL, bucket INTEGER NOT NULL,
    team TEXT NOT NULL, feature TEXT NOT NULL, model TEXT NOT NULL, tier INTEGER NOT NULL, end_user TEXT NOT NULL,
    c INTEGER NOT NULL DEFAULT 0, i INTEGER NOT NULL DEFAULT 0, o INTEGER NOT NULL DEFAULT 0,
    k INTEGER NOT NULL DEFAULT 0, n INTEGER NOT NULL DEFAULT 0, s INTEGER NOT NULL DEFAULT 0,
    h INTEGER NOT NULL DEFAULT 0, x INTEGER NOT NULL DEFAULT 0, l INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, level, bucket, team, feature, model, tier, end_user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenant_meta (tenant TEXT PRIMARY KEY, first_ms INTEGER NOT NULL) WITHOUT ROWID;
"""

_STATE_COLS = "rc, rt, hb, hc, ht, db, dc, dt, mb, mc, mt, lc, lt"
_CHARGE_SQL = """
INSERT INTO scope_state (domain, scope, hb, hc, ht, db, dc, dt, mb, mc, mt, lc, lt)
VALUES (:dom, :sc, :h, :c, :t, :d, :c, :t, :m, :c, :t, :c, :t)
ON CONFLICT (domain, scope) DO UPDATE SET
    hc = CASE WHEN hb >= :h THEN hc + :c ELSE :c END, ht = CASE WHEN hb >= :h THEN ht + :t ELSE :t END,
    hb = MAX(hb, :h),
    dc = CASE WHEN db >= :d THEN dc + :c ELSE :c END, dt = CASE WHEN db >= :d THEN dt + :t ELSE :t END,
    db = MAX(db, :d),
    mc = CASE WHEN mb >= :m THEN mc + :c ELSE :c END, mt = CASE WHEN mb >= :m THEN mt + :t ELSE :t END,
    mb = MAX(mb, :m),
    lc = lc + :c, lt = lt + :t
"""
_USAGE_COLS = ", ".join(code for code, _ in COUNTER_CODES)
_USAGE_SQL = f"""
INSERT INTO usage (tenant, level, bucket, team, feature, model, tier, end_user, {_USAGE_COLS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, {", ".join("?" for _ in COUNTER_CODES)})
ON CONFLICT (tenant, level, bucket, team, feature, model, tier, end_user) DO UPDATE SET
    {", ".join(f"{code} = {code} + excluded.{code}" for code, _ in COUNTER_CODES)}
"""
#: Reservation states: a(ctive, i.e. held), c(ommitted), r(eleased), e(xpired). ``late`` of a committed one: ""
#: or the state it was in when the commit came (e or r). ``request`` maps a request id to its current
#: reservation (a request id whose reservation was released or expired is admitted afresh under a new id).
_REPLAYED_STATES = {"a": ReservationState.HELD, "c": ReservationState.COMMITTED}
_LATE: dict[str, LateReason] = {"e": "expired", "r": "released"}
_GC_EVERY_MS = 60_000
#: Primary result codes meaning "cannot serve now": BUSY, LOCKED, IOERR, FULL, CANTOPEN.
_UNAVAILABLE_CODES = frozenset({5, 6, 10, 13, 14})


def _encode_scopes(scopes: Sequence[Scope]) -> str:
    return "\x1e".join(f"{s.domain}{SEP}{s.key}" for s in scopes)


def _decode_scopes(text: str) -> list[tuple[str, str]]:
    if not text:
        return []
    return [tuple(part.split(SEP, 1)) for part in text.split("\x1e")]  # type: ignore[misc]


class SqliteBudgetStore:
    """:class:`services.budget.store.BudgetStore` on one SQLite file (WAL, ``BEGIN IMMEDIATE``)."""

    def __init__(
        self,
        *,
        path: Path,
        busy_timeout_ms: int = 5000,
        minute_retention_ms: int = 8 * 86_400_000,
        hour_retention_ms: int = 400 * 86_400_000,
    ) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._minute_retention_ms = minute_retention_ms
        self._hour_retention_ms = hour_retention_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budget-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._next_gc_ms = 0

    # -- plumbing ---------------------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        if self._path.parent and not self._path.parent.exists():
            self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout_ms / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); several processes may race here safely
        self._conn = conn
        self._tx(self._migrate)

    @staticmethod
    def _migrate(c: sqlite3.Connection) -> None:
        """Bring a file written by an earlier version up to this schema (inside BEGIN IMMEDIATE, so several
        processes opening one old file migrate it once)."""
        if "late" not in {row[1] for row in c.execute("PRAGMA table_info(reservation)")}:
            c.execute("ALTER TABLE reservation ADD COLUMN late TEXT NOT NULL DEFAULT ''")
        if "l" not in {row[1] for row in c.execute("PRAGMA table_info(usage)")}:
            c.execute("ALTER TABLE usage ADD COLUMN l INTEGER NOT NULL DEFAULT 0")
        # Request ids were unique per reservation; now the request table names each one's current reservation.
        if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'reservation_request'").fetchone():
            c.execute(
                "INSERT OR IGNORE INTO request (tenant, request_id, id) SELECT tenant, request_id, id FROM reservation"
            )
            c.execute("DROP INDEX reservation_request")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as err:
            if getattr(err, "sqlite_errorcode", 0) & 0xFF in _UNAVAILABLE_CODES:
                raise StoreUnavailable(f"sqlite: {err}") from err
            raise

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("sqlite store is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        def _ping() -> None:
            if self._conn is None:
                raise StoreUnavailable("sqlite store is not open")
            self._conn.execute("SELECT 1").fetchone()

        await self._call(_ping)

    # -- shared steps (inside a transaction) ------------------------------------------------------------------

    def _purge(self, c: sqlite3.Connection, now_ms: int) -> None:
        expired = c.execute(
            "SELECT tenant, id, cost, tokens, scopes FROM reservation WHERE state = 'a' AND expires_ms <= ?",
            (now_ms,),
        ).fetchall()
        for tenant, rid, cost, tokens, scopes in expired:
            self._unreserve(c, scopes, cost, tokens)
            c.execute("UPDATE reservation SET state = 'e' WHERE tenant = ? AND id = ?", (tenant, rid))
        if now_ms >= self._next_gc_ms:
            self._next_gc_ms = now_ms + _GC_EVERY_MS
            c.execute(
                "DELETE FROM request WHERE (tenant, id) IN (SELECT tenant, id FROM reservation WHERE gc_ms <= ?)",
                (now_ms,),
            )
            c.execute("DELETE FROM reservation WHERE gc_ms <= ?", (now_ms,))
            c.execute("DELETE FROM savings_key WHERE gc_ms <= ?", (now_ms,))
            c.execute("DELETE FROM rate WHERE sec <= ?", (now_ms // 1000 - RATE_WINDOW_S,))
            c.execute(
                "DELETE FROM usage WHERE level = 'm' AND bucket < ?",
                ((now_ms - self._minute_retention_ms) // MINUTE_MS,),
            )
            c.execute(
                "DELETE FROM usage WHERE level = 'h' AND bucket < ?", ((now_ms - self._hour_retention_ms) // HOUR_MS,)
            )

    @staticmethod
    def _unreserve(c: sqlite3.Connection, scopes: str, cost: int, tokens: int) -> None:
        for domain, key in _decode_scopes(scopes):
            c.execute(
                "UPDATE scope_state SET rc = rc - ?, rt = rt - ? WHERE domain = ? AND scope = ?",
                (cost, tokens, domain, key),
            )

    @staticmethod
    def _policies(c: sqlite3.Connection, scopes: Sequence[Scope]) -> list[Policy]:
        out: list[Policy] = []
        for scope in scopes:
            row = c.execute(
                "SELECT json FROM policy WHERE domain = ? AND scope = ?", (scope.domain, scope.key)
            ).fetchone()
            if row is not None:
                out.append(Policy.from_json(scope, row[0]))
        return out

    @staticmethod
    def _snap(c: sqlite3.Connection, policy: Policy, at: Buckets) -> ScopeSnapshot:
        scope = policy.scope
        row = c.execute(
            f"SELECT {_STATE_COLS} FROM scope_state WHERE domain = ? AND scope = ?", (scope.domain, scope.key)
        ).fetchone()
        if row is None:
            row = (0, 0, -1, 0, 0, -1, 0, 0, -1, 0, 0, 0, 0)
        rc, rt, hb, hc, ht, db, dc, dt, mb, mc, mt, lc, lt = row
        spent = (
            (hc, ht) if hb >= at.hour else (0, 0),
            (dc, dt) if db >= at.day else (0, 0),
            (mc, mt) if mb >= at.month else (0, 0),
            (lc, lt),
        )
        rate_n = rate_k = oldest = 0
        if policy.rate_capped:
            now_s = at.now_ms // 1000
            r = c.execute(
                "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(k), 0), COALESCE(MIN(sec), 0) FROM rate "
                "WHERE domain = ? AND scope = ? AND sec > ?",
                (scope.domain, scope.key, now_s - RATE_WINDOW_S),
            ).fetchone()
            rate_n, rate_k, oldest = int(r[0]), int(r[1]), int(r[2])
        return ScopeSnapshot(policy, rc, rt, spent, rate_n, rate_k, oldest)

    def _charge(self, c: sqlite3.Connection, policies: Sequence[Policy], cost: int, tokens: int, at: Buckets) -> None:
        for p in policies:
            c.execute(
                _CHARGE_SQL,
                {
                    "dom": p.scope.domain,
                    "sc": p.scope.key,
                    "h": at.hour,
                    "d": at.day,
                    "m": at.month,
                    "c": cost,
                    "t": tokens,
                },
            )

    @staticmethod
    def _add_usage(c: sqlite3.Connection, tenant: str, dims: UsageDims, counters: UsageCounters, at: Buckets) -> None:
        values = [getattr(counters, name) for _, name in COUNTER_CODES]
        now = at.now_ms
        for level, bucket in (("m", now // MINUTE_MS), ("h", at.hour), ("d", at.day), ("L", 0)):
            c.execute(
                _USAGE_SQL,
                (tenant, level, bucket, dims.team, dims.feature, dims.model, dims.tier, dims.end_user, *values),
            )
        c.execute("INSERT OR IGNORE INTO tenant_meta (tenant, first_ms) VALUES (?, ?)", (tenant, now))

    @staticmethod
    def _usage_rows(c: sqlite3.Connection, tenant: str | None, cells: Sequence[tuple[str, int]]) -> list[UsageRecord]:
        out: list[UsageRecord] = []
        where = "level = ? AND bucket = ?" + (" AND tenant = ?" if tenant is not None else "")
        for level, bucket in cells:
            args: tuple[Any, ...] = (level, bucket) if tenant is None else (level, bucket, tenant)
            for row in c.execute(
                f"SELECT tenant, team, feature, model, tier, end_user, {_USAGE_COLS} FROM usage WHERE {where}", args
            ):
                counters = UsageCounters(*row[6:])
                out.append(UsageRecord(row[0], UsageDims(row[1], row[2], row[3], int(row[4]), row[5]), counters))
        return out

    # -- policies ---------------------------------------------------------------------------------------------

    async def put_policy(self, policy: Policy, *, at: Buckets) -> bool:
        return await self._call(self._tx, lambda c: self._put_policy(c, policy, at))

    def _put_policy(self, c: sqlite3.Connection, policy: Policy, at: Buckets) -> bool:
        scope = policy.scope
        existed = c.execute("SELECT 1 FROM policy WHERE domain = ? AND scope = ?", (scope.domain, scope.key)).fetchone()
        c.execute(
            "INSERT INTO policy (domain, scope, json) VALUES (?, ?, ?) "
            "ON CONFLICT (domain, scope) DO UPDATE SET json = excluded.json",
            (scope.domain, scope.key, policy.to_json()),
        )
        if existed:
            return False
        tenant = None if scope.domain == "" else scope.domain
        per_window = {w: self._usage_rows(c, tenant, cells) for w, cells in seed_cells(at).items()}
        (hc, ht), (dc, dt), (mc, mt), (lc, lt) = seed_from(scope, per_window)
        c.execute(
            f"INSERT OR REPLACE INTO scope_state (domain, scope, {_STATE_COLS}) "
            "VALUES (?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (scope.domain, scope.key, at.hour, hc, ht, at.day, dc, dt, at.month, mc, mt, lc, lt),
        )
        return True

    async def get_policy(self, scope: Scope) -> Policy | None:
        def _get() -> Policy | None:
            assert self._conn is not None
            found = self._policies(self._conn, [scope])
            return found[0] if found else None

        return await self._call(_get)

    async def snapshot(self, scope: Scope, *, at: Buckets) -> ScopeSnapshot | None:
        def _snapshot(c: sqlite3.Connection) -> ScopeSnapshot | None:
            self._purge(c, at.now_ms)
            found = self._policies(c, [scope])
            return self._snap(c, found[0], at) if found else None

        return await self._call(self._tx, _snapshot)

    # -- reservations -----------------------------------------------------------------------------------------

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome:
        return await self._call(self._tx, lambda c: self._reserve(c, cmd))

    def _reserve(self, c: sqlite3.Connection, cmd: ReserveCommand) -> ReserveOutcome:
        at = cmd.at
        self._purge(c, at.now_ms)
        tenant = cmd.attribution.tenant
        policies = self._policies(c, applicable_scopes(cmd.attribution))
        snaps = [self._snap(c, p, at) for p in policies]
        existing = c.execute(
            "SELECT r.id, r.expires_ms, r.state FROM request q "
            "JOIN reservation r ON r.tenant = q.tenant AND r.id = q.id WHERE q.tenant = ? AND q.request_id = ?",
            (tenant, cmd.request_id),
        ).fetchone()
        if existing is not None and existing[2] in _REPLAYED_STATES:
            return ReserveOutcome("replayed", existing[0], existing[1], tuple(snaps), _REPLAYED_STATES[existing[2]])
        # New, or its reservation was released or expired (nothing is held for it): evaluated afresh.
        for s in snaps:
            if violations(s, est_cost=cmd.est_cost, est_tokens=cmd.est_tokens, now_ms=at.now_ms):
                return ReserveOutcome("rejected", "", 0, tuple(snaps))
        now_s = at.now_ms // 1000
        after: list[ScopeSnapshot] = []
        for s in snaps:
            scope = s.scope
            c.execute(
                "INSERT INTO scope_state (domain, scope, rc, rt) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (domain, scope) DO UPDATE SET rc = rc + excluded.rc, rt = rt + excluded.rt",
                (scope.domain, scope.key, cmd.est_cost, cmd.est_tokens),
            )
            rate_n, rate_k, oldest = s.rate_requests, s.rate_tokens, s.rate_oldest_s
            if s.policy.rate_capped:
                c.execute(
                    "INSERT INTO rate (domain, scope, sec, n, k) VALUES (?, ?, ?, 1, ?) "
                    "ON CONFLICT (domain, scope, sec) DO UPDATE SET n = n + 1, k = k + excluded.k",
                    (scope.domain, scope.key, now_s, cmd.est_tokens),
                )
                rate_n, rate_k, oldest = rate_n + 1, rate_k + cmd.est_tokens, oldest or now_s
            after.append(
                replace(
                    s,
                    reserved_micros=s.reserved_micros + cmd.est_cost,
                    reserved_tokens=s.reserved_tokens + cmd.est_tokens,
                    rate_requests=rate_n,
                    rate_tokens=rate_k,
                    rate_oldest_s=oldest,
                )
            )
        a = cmd.attribution
        c.execute(
            "INSERT INTO reservation (tenant, id, request_id, state, cost, tokens, expires_ms, scopes, team, feature, "
            "end_user, model, tier, gc_ms) VALUES (?, ?, ?, 'a', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                tenant,
                cmd.reservation_id,
                cmd.request_id,
                cmd.est_cost,
                cmd.est_tokens,
                cmd.expires_ms,
                _encode_scopes([p.scope for p in policies]),
                a.team,
                a.feature,
                a.end_user,
                cmd.model,
                cmd.tier,
                cmd.expires_ms + cmd.retention_ms,
            ),
        )
        c.execute(
            "INSERT INTO request (tenant, request_id, id) VALUES (?, ?, ?) "
            "ON CONFLICT (tenant, request_id) DO UPDATE SET id = excluded.id",
            (tenant, cmd.request_id, cmd.reservation_id),
        )
        return ReserveOutcome("admitted", cmd.reservation_id, cmd.expires_ms, tuple(after))

    async def commit(self, cmd: CommitCommand) -> CommitOutcome:
        return await self._call(self._tx, lambda c: self._commit(c, cmd))

    def _commit(self, c: sqlite3.Connection, cmd: CommitCommand) -> CommitOutcome:
        at = cmd.at
        self._purge(c, at.now_ms)
        row = c.execute(
            "SELECT state, cost, tokens, scopes, team, feature, end_user, model, tier, actual, over_est, late "
            "FROM reservation WHERE tenant = ? AND id = ?",
            (cmd.tenant, cmd.reservation_id),
        ).fetchone()
        if row is None:
            return CommitOutcome("not_found")
        state, cost, tokens, scopes, team, feature, end_user, model, tier, actual, over, was_late = row
        attribution = Attribution(cmd.tenant, team, feature, end_user)
        policies = self._policies(c, applicable_scopes(attribution))
        if state == "c":
            snaps = tuple(self._snap(c, p, at) for p in policies)
            return CommitOutcome("replayed", actual, bool(over), _LATE.get(was_late, ""), snaps)
        # Expired or released: nothing is held any more, but the work ran, so the spend is charged in full (late).
        late = _LATE.get(state, "")
        if state == "a":
            self._unreserve(c, scopes, cost, tokens)
        over_estimate = cmd.actual_cost > cost
        used_tokens = cmd.usage.input_tokens + cmd.usage.output_tokens
        self._charge(c, policies, cmd.actual_cost, used_tokens, at)
        dims = UsageDims(team, feature, cmd.model or model, cmd.tier or tier, end_user)
        counters = UsageCounters(
            cost_micros=cmd.actual_cost,
            input_tokens=cmd.usage.input_tokens,
            output_tokens=cmd.usage.output_tokens,
            cached_input_tokens=cmd.usage.cached_input_tokens,
            requests=1,
            saved_micros=cmd.saved_micros,
            over_estimate=int(over_estimate),
            late_commits=int(bool(late)),
        )
        self._add_usage(c, cmd.tenant, dims, counters, at)
        c.execute(
            "UPDATE reservation SET state = 'c', actual = ?, over_est = ?, late = ?, gc_ms = MAX(gc_ms, ?) "
            "WHERE tenant = ? AND id = ?",
            (
                cmd.actual_cost,
                int(over_estimate),
                state if late else "",
                at.now_ms + cmd.retention_ms,
                cmd.tenant,
                cmd.reservation_id,
            ),
        )
        snaps = tuple(self._snap(c, p, at) for p in policies)
        return CommitOutcome("committed", cmd.actual_cost, over_estimate, late, snaps)

    async def release(self, tenant: str, reservation_id: str, *, at: Buckets) -> ReleaseOutcome:
        def _release(c: sqlite3.Connection) -> ReleaseOutcome:
            self._purge(c, at.now_ms)
            row = c.execute(
                "SELECT state, cost, tokens, scopes FROM reservation WHERE tenant = ? AND id = ?",
                (tenant, reservation_id),
            ).fetchone()
            if row is None:
                return ReleaseOutcome("not_found")
            state, cost, tokens, scopes = row
            if state != "a":
                return ReleaseOutcome("replayed")
            self._unreserve(c, scopes, cost, tokens)
            c.execute("UPDATE reservation SET state = 'r' WHERE tenant = ? AND id = ?", (tenant, reservation_id))
            return ReleaseOutcome("released", cost)

        return await self._call(self._tx, _release)

    async def renew(self, cmd: RenewCommand) -> RenewOutcome:
        def _renew(c: sqlite3.Connection) -> RenewOutcome:
            self._purge(c, cmd.at.now_ms)
            row = c.execute(
                "SELECT state, expires_ms FROM reservation WHERE tenant = ? AND id = ?",
                (cmd.tenant, cmd.reservation_id),
            ).fetchone()
            if row is None:
                return RenewOutcome("not_found")
            state, expires_ms = row
            if state == "e":
                return RenewOutcome("expired")
            if state != "a":
                return RenewOutcome("settled")
            expires_ms = max(expires_ms, cmd.expires_ms)
            c.execute(
                "UPDATE reservation SET expires_ms = ?, gc_ms = ? WHERE tenant = ? AND id = ?",
                (expires_ms, expires_ms + cmd.retention_ms, cmd.tenant, cmd.reservation_id),
            )
            return RenewOutcome("renewed", expires_ms)

        return await self._call(self._tx, _renew)

    # -- savings and usage ------------------------------------------------------------------------------------

    async def record_savings(self, cmds: Sequence[SavingsCommand]) -> list[bool]:
        def _savings(c: sqlite3.Connection) -> list[bool]:
            replayed: list[bool] = []
            for cmd in cmds:
                cur = c.execute(
                    "INSERT OR IGNORE INTO savings_key (tenant, request_id, gc_ms) VALUES (?, ?, ?)",
                    (cmd.tenant, cmd.request_id, cmd.at.now_ms + cmd.retention_ms),
                )
                replayed.append(cur.rowcount == 0)
                if cur.rowcount:
                    counters = UsageCounters(saved_micros=cmd.saved_micros, cache_hits=int(cmd.cache_hit))
                    self._add_usage(c, cmd.tenant, cmd.dims, counters, cmd.at)
            return replayed

        return await self._call(self._tx, _savings)

    async def usage(self, tenant: str, cells: Sequence[tuple[str, int]]) -> list[UsageRecord]:
        def _usage() -> list[UsageRecord]:
            assert self._conn is not None
            return self._usage_rows(self._conn, tenant, cells)

        return await self._call(_usage)

    async def tenants(self) -> list[str]:
        def _tenants() -> list[str]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT tenant FROM tenant_meta UNION SELECT domain FROM policy WHERE domain != '' ORDER BY 1"
            ).fetchall()
            return [r[0] for r in rows]

        return await self._call(_tenants)

    async def first_activity_ms(self, tenant: str) -> int | None:
        def _first() -> int | None:
            assert self._conn is not None
            row = self._conn.execute("SELECT first_ms FROM tenant_meta WHERE tenant = ?", (tenant,)).fetchone()
            return None if row is None else int(row[0])

        return await self._call(_first)
