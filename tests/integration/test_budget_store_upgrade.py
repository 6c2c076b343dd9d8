"""Stores written by the version before late commits and fresh admissions of a request id keep working.

That version kept one reservation per request id (SQLite: a unique index), no ``late`` flag on reservations and 8
usage counters per cell (no ``late_commits``). The files and keys it wrote are made here by writing with this
version and then taking the new parts away again, which is what an old file looks like.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.budget.ledger import (
    BudgetLedger,
    CommitInput,
    LimitInput,
    PolicyInput,
    ReserveInput,
    ScopeInput,
    UsageQuery,
)
from services.budget.model import SEP, ReservationState, ScopeKind, Window
from services.budget.redis_store import RedisBudgetStore, tenant_prefix
from services.budget.sqlite_store import SqliteBudgetStore
from services.budget.usage import GroupBy
from services.common.attribution import Attribution

ACME = Attribution("acme", "search")
TENANT = ScopeInput(int(ScopeKind.TENANT), "acme")


async def prepare(ledger: BudgetLedger) -> tuple[str, str]:
    """A held reservation and a committed one, and usage recorded for the latter."""
    await ledger.set_budget(PolicyInput(TENANT, [LimitInput(int(Window.DAY), 10_000)]))
    held = await ledger.reserve(ReserveInput("held", ACME, 1_000, 10))
    done = await ledger.reserve(ReserveInput("done", ACME, 2_000, 10))
    await ledger.commit(CommitInput("acme", done.reservation_id, 1_500))
    return held.reservation_id, done.reservation_id


async def check(ledger: BudgetLedger, held: str, done: str) -> None:
    replay = await ledger.reserve(ReserveInput("held", ACME, 1_000, 10))
    assert replay.replayed and replay.reservation_id == held and replay.state is ReservationState.HELD
    again = await ledger.commit(CommitInput("acme", done, 9))
    assert (again.replayed, again.charged_micros, again.late) == (True, 1_500, "")
    await ledger.release("acme", held)
    fresh = await ledger.reserve(ReserveInput("held", ACME, 1_000, 10))  # released: admitted afresh
    assert not fresh.replayed and fresh.reservation_id != held
    late = await ledger.commit(CommitInput("acme", held, 700))
    assert (late.late, late.charged_micros) == ("released", 700)
    report = await ledger.get_usage(UsageQuery(tenant="acme", group_by=[int(GroupBy.TEAM)]))
    (row,) = report.rows
    assert (row.counters.cost_micros, row.counters.requests, row.counters.late_commits) == (2_200, 2, 1)


async def test_an_sqlite_file_of_the_previous_version_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite3"
    store = SqliteBudgetStore(path=path)
    await store.open()
    held, done = await prepare(BudgetLedger(store=store))
    await store.close()
    with sqlite3.connect(path) as conn:  # back to the previous schema
        conn.execute("ALTER TABLE reservation DROP COLUMN late")
        conn.execute("ALTER TABLE usage DROP COLUMN l")
        conn.execute("DROP TABLE request")
        conn.execute("CREATE UNIQUE INDEX reservation_request ON reservation (tenant, request_id)")
    # Two processes may open an old file at once: both migrate it, once.
    first, second = SqliteBudgetStore(path=path), SqliteBudgetStore(path=path)
    await first.open()
    await second.open()
    try:
        await check(BudgetLedger(store=second), held, done)
    finally:
        await first.close()
        await second.close()
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "reservation_request" not in names


@pytest.mark.redis
@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster-mode"])
async def test_redis_records_and_usage_cells_of_the_previous_version_are_read(redis_url: str, cluster: bool) -> None:
    store = RedisBudgetStore(client=Redis.from_url(redis_url), cluster=cluster)
    raw = Redis.from_url(redis_url)
    try:
        ledger = BudgetLedger(store=store)
        held, done = await prepare(ledger)
        p = tenant_prefix("acme")
        for rid in (held, done):  # records of 13 fields (no late flag)
            record = (await raw.hget(p + ":res", rid)).split(SEP.encode())
            assert len(record) == 14
            await raw.hset(p + ":res", rid, SEP.encode().join(record[:13]))
        for key in await raw.keys(p + ":u:*"):  # usage cells of 8 counters
            for dims, packed in (await raw.hgetall(key)).items():
                await raw.hset(key, dims, struct.pack("<8q", *struct.unpack("<9q", packed)[:8]))
        await check(ledger, held, done)
    finally:
        await store.close()
        await raw.aclose()
