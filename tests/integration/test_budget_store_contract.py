"""One contract for both budget stores (SQLite and a real redis-server), driven through the ledger.

Every test runs against: the SQLite file store; Redis with the global scope in the same script (standalone);
Redis in cluster mode (global scope settled in its own slot, two steps) on a standalone server; and the same on a
real three-master Redis Cluster, whose client refuses any script whose keys span two slots. A fake clock makes
TTL expiry and window rollover exact without sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from services.budget import redis_scripts
from services.budget.ledger import (
    BudgetLedger,
    CommitInput,
    LedgerSettings,
    LimitInput,
    PolicyInput,
    ReserveInput,
    SavingsInput,
    ScopeInput,
    UsageQuery,
)
from services.budget.model import ReservationState, ScopeKind, UsageDims, Window
from services.budget.redis_store import RedisBudgetStore
from services.budget.sqlite_store import SqliteBudgetStore
from services.budget.store import BudgetStore, SavingsCommand
from services.budget.usage import GroupBy
from services.budget.windows import buckets
from services.common.attribution import Attribution
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.pricing import TokenUsage
from tests.support.redis_cluster import RedisClusterServers, cluster_fixture


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


class Clock:
    def __init__(self, start_ms: int) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, delta_ms: int) -> None:
        self.now += delta_ms


@dataclass
class Env:
    ledger: BudgetLedger
    clock: Clock
    store: BudgetStore
    kind: str
    open_store: Callable[[], Awaitable[BudgetStore]]
    """Another client of the same backing store (a second connection / connection pool)."""
    url: str = ""
    """The Redis server (a node of the cluster) behind a Redis store."""


T0 = ms("2026-03-30T22:30:00")
ACME = Attribution("acme", "search", "summaries", "user-1")
TENANT = ScopeInput(int(ScopeKind.TENANT), "acme")
TEAM = ScopeInput(int(ScopeKind.TEAM), "acme", "search")
FEATURE = ScopeInput(int(ScopeKind.FEATURE), "acme", "summaries")
GLOBAL = ScopeInput(int(ScopeKind.GLOBAL))


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    yield from cluster_fixture()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster-mode", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    clock = Clock(T0)
    stores: list[BudgetStore] = []

    async def new_store() -> BudgetStore:
        s: BudgetStore
        if request.param == "sqlite":
            sq = SqliteBudgetStore(path=tmp_path / "budget.sqlite3")
            await sq.open()
            s = sq
        elif request.param == "redis-cluster":
            cluster_client = RedisCluster.from_url(url)
            if not stores:
                await cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
            s = RedisBudgetStore(client=cluster_client, cluster=True)
        else:
            s = RedisBudgetStore(client=Redis.from_url(url), cluster=request.param == "redis-cluster-mode")
        stores.append(s)
        return s

    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        url = request.getfixturevalue("redis_url") if request.param != "sqlite" else ""
    store = await new_store()
    ledger = BudgetLedger(store=store, settings=LedgerSettings(default_ttl_s=300, max_ttl_s=3600), clock=clock)
    yield Env(ledger, clock, store, request.param, new_store, url)
    for s in stores:
        await s.close()


async def set_policy(
    env: Env,
    scope: ScopeInput,
    *limits: tuple[Window, int | None, int | None],
    soft: float | None = None,
    rpm: int = 0,
    tpm: int = 0,
    max_tokens: int = 0,
) -> None:
    await env.ledger.set_budget(
        PolicyInput(
            scope,
            [LimitInput(int(w), c, t) for w, c, t in limits],
            soft_threshold=soft,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            max_tokens_per_request=max_tokens,
        )
    )


def reserve_input(request_id: str, cost: int, tokens: int = 10, *, a: Attribution = ACME, ttl: int = 0) -> ReserveInput:
    return ReserveInput(request_id, a, cost, tokens, ttl_seconds=ttl, model="gpt-x", tier=2)


async def reserved_and_spent(env: Env, scope: ScopeInput, window: Window) -> tuple[int, int]:
    view = await env.ledger.get_budget(scope)
    (row,) = [h for h in view.headroom if h.window is window]
    return row.reserved_micros, row.spent_micros


# -- policies -------------------------------------------------------------------------------------------------


async def test_policy_round_trip_and_no_policy(env: Env) -> None:
    assert (await env.ledger.get_budget(TEAM)).policy is None
    await set_policy(env, TEAM, (Window.DAY, 5_000, None), (Window.MONTH, None, 1_000_000), soft=0.5, rpm=7)
    view = await env.ledger.get_budget(TEAM)
    assert view.policy is not None
    assert [(x.window, x.cost_micros, x.tokens) for x in view.policy.limits] == [
        (Window.DAY, 5_000, None),
        (Window.MONTH, None, 1_000_000),
    ]
    assert view.policy.soft_threshold_ppm == 500_000
    assert view.policy.requests_per_minute == 7
    assert [h.window for h in view.headroom] == [Window.DAY, Window.MONTH]
    # Replacing keeps one policy per scope.
    await set_policy(env, TEAM, (Window.DAY, 9_000, None))
    view = await env.ledger.get_budget(TEAM)
    assert view.policy is not None and [x.cost_micros for x in view.policy.limits] == [9_000]


# -- reserve --------------------------------------------------------------------------------------------------


async def test_hard_limit_admits_exactly_up_to_the_limit(env: Env) -> None:
    await set_policy(env, TENANT, (Window.MONTH, 10_000, None))
    for i in range(4):
        r = await env.ledger.reserve(reserve_input(f"r{i}", 2_500))
        assert r.remaining_micros == 10_000 - 2_500 * (i + 1)
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("r4", 1))
    err = exc.value
    assert err.reason == "BUDGET_EXCEEDED"
    assert [v.subject for v in err.violations] == ["tenant:acme/month/cost_micros"]
    assert "reserved 10000" in err.violations[0].description
    assert err.metadata["scope"] == "tenant:acme" and err.metadata["window"] == "month"
    # RetryInfo: the month resets on 2026-04-01T00:00Z.
    assert err.retry_after_s == (ms("2026-04-01T00:00:00") - T0) / 1000
    assert await reserved_and_spent(env, TENANT, Window.MONTH) == (10_000, 0)


async def test_reserve_is_all_or_nothing_across_scopes(env: Env) -> None:
    await set_policy(env, GLOBAL, (Window.MONTH, 1_000_000, None))  # room: its hold must be undone on rejection
    await set_policy(env, TENANT, (Window.MONTH, 100_000, None))
    await set_policy(env, TEAM, (Window.DAY, 5_000, None))
    await set_policy(env, FEATURE, (Window.DAY, None, 1_000))
    await env.ledger.reserve(reserve_input("ok", 4_000, 500))
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("too-much", 2_000, 600))
    subjects = sorted(v.subject for v in exc.value.violations)
    assert subjects == ["tenant:acme/feature:summaries/day/tokens", "tenant:acme/team:search/day/cost_micros"]
    # Nothing of the rejected request was reserved anywhere, not even on the scopes that had room.
    assert await reserved_and_spent(env, GLOBAL, Window.MONTH) == (4_000, 0)
    assert await reserved_and_spent(env, TENANT, Window.MONTH) == (4_000, 0)
    assert await reserved_and_spent(env, TEAM, Window.DAY) == (4_000, 0)
    feature = await env.ledger.get_budget(FEATURE)
    assert feature.headroom[0].used_tokens == 500
    # A request of another team of the same tenant is not held by this team's limit.
    other = Attribution("acme", "ads")
    await env.ledger.reserve(reserve_input("other-team", 2_000, a=other))
    assert await reserved_and_spent(env, TENANT, Window.MONTH) == (6_000, 0)
    # A retry of an admitted request holds nothing more anywhere (cluster mode: its fresh global hold is undone).
    assert (await env.ledger.reserve(reserve_input("ok", 4_000, 500))).replayed
    assert await reserved_and_spent(env, GLOBAL, Window.MONTH) == (6_000, 0)


async def test_reserve_is_idempotent_on_request_id(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    first = await env.ledger.reserve(reserve_input("req-1", 3_000))
    again = await env.ledger.reserve(reserve_input("req-1", 3_000))
    assert not first.replayed and again.replayed
    assert first.state is again.state is ReservationState.HELD
    assert again.reservation_id == first.reservation_id
    assert again.expires_unix_ms == first.expires_unix_ms
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (3_000, 0)
    # The same request id of another tenant is another request.
    other = await env.ledger.reserve(reserve_input("req-1", 3_000, a=Attribution("globex")))
    assert other.reservation_id != first.reservation_id and not other.replayed
    # A replay after a commit still answers with the original reservation (COMMITTED) and moves no money.
    await env.ledger.commit(CommitInput("acme", first.reservation_id, 2_000))
    replay = await env.ledger.reserve(reserve_input("req-1", 3_000))
    assert replay.replayed and replay.reservation_id == first.reservation_id
    assert replay.state is ReservationState.COMMITTED
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 2_000)


async def test_a_released_or_expired_request_id_is_admitted_afresh(env: Env) -> None:
    await set_policy(env, GLOBAL, (Window.DAY, 100_000, None))
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    first = await env.ledger.reserve(reserve_input("req-1", 4_000))
    await env.ledger.release("acme", first.reservation_id)
    # Nothing is held for req-1 any more: a retry is a new admission under a new reservation id.
    second = await env.ledger.reserve(reserve_input("req-1", 4_000, ttl=30))
    assert not second.replayed and second.state is ReservationState.HELD
    assert second.reservation_id != first.reservation_id
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (4_000, 0)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (4_000, 0)
    again = await env.ledger.reserve(reserve_input("req-1", 4_000))  # now it replays the new one
    assert again.replayed and again.reservation_id == second.reservation_id
    env.clock.advance(30_000)  # the second expires
    third = await env.ledger.reserve(reserve_input("req-1", 4_000))
    assert not third.replayed and third.reservation_id not in (first.reservation_id, second.reservation_id)
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (4_000, 0)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (4_000, 0)
    # Each reservation keeps its own record: the released first one still commits (late), the third one too.
    assert (await env.ledger.commit(CommitInput("acme", first.reservation_id, 1_000))).late == "released"
    assert not (await env.ledger.commit(CommitInput("acme", third.reservation_id, 3_000))).late
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 4_000)
    assert (await env.ledger.reserve(reserve_input("req-1", 4_000))).state is ReservationState.COMMITTED
    # Evaluated afresh means the limits decide again: a request id whose reservation expired is refused when the
    # money is no longer there, and the refusal leaves no trace.
    other = await env.ledger.reserve(reserve_input("req-2", 5_000, ttl=10))
    env.clock.advance(10_000)
    await env.ledger.reserve(reserve_input("filler", 3_000))
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("req-2", 5_000))
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (3_000, 4_000)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (3_000, 4_000)
    late = await env.ledger.commit(CommitInput("acme", other.reservation_id, 100))
    assert late.late == "expired"


async def test_soft_threshold_headroom_and_max_tokens_cap(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None), soft=0.5, max_tokens=4_096)
    await set_policy(env, FEATURE, (Window.MONTH, None, 100_000), max_tokens=512)
    r = await env.ledger.reserve(reserve_input("a", 4_000, 100))
    assert not r.soft_limit_exceeded
    assert r.max_tokens_cap == 512
    r = await env.ledger.reserve(reserve_input("b", 1_000, 100))
    assert r.soft_limit_exceeded  # 5,000 of 10,000 reached the 50% threshold
    tenant_row = next(h for h in r.headroom if h.scope.kind is ScopeKind.TENANT)
    assert tenant_row.soft_exceeded and tenant_row.remaining_micros == 5_000
    assert tenant_row.resets_unix_ms == ms("2026-03-31T00:00:00")
    feature_row = next(h for h in r.headroom if h.scope.kind is ScopeKind.FEATURE)
    assert feature_row.limit_micros is None and feature_row.used_tokens == 200 and not feature_row.soft_exceeded


async def test_global_scope_limits_every_tenant(env: Env) -> None:
    await set_policy(env, GLOBAL, (Window.DAY, 5_000, None))
    await env.ledger.reserve(reserve_input("a", 3_000, a=Attribution("acme")))
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("b", 3_000, a=Attribution("globex")))
    assert [v.subject for v in exc.value.violations] == ["global/day/cost_micros"]
    b = await env.ledger.reserve(reserve_input("b2", 2_000, a=Attribution("globex")))
    await env.ledger.commit(CommitInput("globex", b.reservation_id, 1_500))
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (3_000, 1_500)
    r = await env.ledger.reserve(reserve_input("c", 500, a=Attribution("initech")))
    assert r.remaining_micros == 0


# -- commit / release -----------------------------------------------------------------------------------------


async def test_commit_settles_and_is_idempotent(env: Env) -> None:
    await set_policy(env, TEAM, (Window.DAY, 10_000, None))
    r = await env.ledger.reserve(reserve_input("c1", 3_000))
    result = await env.ledger.commit(CommitInput("acme", r.reservation_id, 2_500, TokenUsage(100, 50, 20), "m", 1))
    assert (result.charged_micros, result.over_estimate, result.replayed) == (2_500, False, False)
    assert result.remaining_micros == 7_500
    assert await reserved_and_spent(env, TEAM, Window.DAY) == (0, 2_500)
    # A retry (even with other numbers) replays the original settlement and charges nothing more.
    again = await env.ledger.commit(CommitInput("acme", r.reservation_id, 9_999, TokenUsage(1, 1, 0)))
    assert (again.charged_micros, again.replayed) == (2_500, True)
    assert await reserved_and_spent(env, TEAM, Window.DAY) == (0, 2_500)
    usage = await env.ledger.get_usage(UsageQuery(tenant="acme"))
    assert usage.total.counters.requests == 1 and usage.total.counters.cost_micros == 2_500
    assert usage.total.counters.input_tokens == 100 and usage.total.counters.cached_input_tokens == 20


async def test_commit_above_estimate_is_recorded_in_full_and_flagged(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 5_000, None))
    r = await env.ledger.reserve(reserve_input("big", 4_000))
    result = await env.ledger.commit(CommitInput("acme", r.reservation_id, 6_000))
    assert result.over_estimate and result.charged_micros == 6_000
    assert result.remaining_micros == -1_000
    view = await env.ledger.get_budget(TENANT)
    assert view.headroom[0].spent_micros == 6_000 and view.headroom[0].remaining_micros == -1_000
    usage = await env.ledger.get_usage(UsageQuery(tenant="acme"))
    assert usage.total.counters.over_estimate == 1
    # Past the limit now, so even a 1 micro-USD request is stopped.
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("next", 1))


async def test_release_returns_money_and_is_idempotent(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 5_000, None))
    r = await env.ledger.reserve(reserve_input("r", 5_000))
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("blocked", 1))
    released = await env.ledger.release("acme", r.reservation_id)
    assert (released.released_micros, released.replayed) == (5_000, False)
    again = await env.ledger.release("acme", r.reservation_id)
    assert (again.released_micros, again.replayed) == (0, True)
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 0)
    await env.ledger.reserve(reserve_input("now-fits", 5_000))
    # A committed reservation releases as a no-op (a released one still commits: late, below).
    c = await env.ledger.reserve(reserve_input("c", 0))
    await env.ledger.commit(CommitInput("acme", c.reservation_id, 0))
    assert (await env.ledger.release("acme", c.reservation_id)).replayed


async def test_expired_reservations_return_money_without_a_sweeper(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    await set_policy(env, GLOBAL, (Window.DAY, 10_000, None))
    held = await env.ledger.reserve(reserve_input("crashed-caller", 10_000, ttl=30))
    assert held.expires_unix_ms == T0 + 30_000
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("blocked", 1, a=Attribution("globex")))
    env.clock.advance(29_999)
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("still-blocked", 1))
    env.clock.advance(1)  # expiry is exclusive: at expires_unix_ms the money is back
    # Reads see it too, and the first write of any tenant returns the global part.
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 0)
    await env.ledger.reserve(reserve_input("fits-again", 10_000, a=Attribution("globex")))
    # Releasing an expired reservation is a no-op; a late commit still records the money that was spent.
    assert (await env.ledger.release("acme", held.reservation_id)).replayed
    late = await env.ledger.commit(CommitInput("acme", held.reservation_id, 700))
    assert late.charged_micros == 700 and not late.replayed and late.late == "expired"
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 700)


async def test_late_commits_are_charged_in_full_flagged_and_counted(env: Env) -> None:
    """The work of an expired or released reservation ran: its commit is recorded in full even past a limit
    (nothing was held for it), flagged late, and counted; replays answer the same."""
    await set_policy(env, GLOBAL, (Window.DAY, 10_000, None))
    await set_policy(env, TENANT, (Window.DAY, 5_000, None))
    expired = await env.ledger.reserve(reserve_input("slow", 3_000, ttl=10))
    env.clock.advance(10_000)
    released = await env.ledger.reserve(reserve_input("cancelled", 2_000))
    await env.ledger.release("acme", released.reservation_id)
    # The money of both is back; another request takes the whole tenant limit.
    full = await env.ledger.reserve(reserve_input("full", 5_000))
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (5_000, 0)
    a = await env.ledger.commit(CommitInput("acme", expired.reservation_id, 3_500, TokenUsage(10, 20, 0)))
    assert (a.charged_micros, a.over_estimate, a.replayed, a.late) == (3_500, True, False, "expired")
    b = await env.ledger.commit(CommitInput("acme", released.reservation_id, 1_000))
    assert (b.charged_micros, b.over_estimate, b.replayed, b.late) == (1_000, False, False, "released")
    assert b.remaining_micros == 5_000 - 5_000 - 4_500  # past the limit: recorded in full, not refused
    # Charged to spent, not to reserved, on every scope (the global one too).
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (5_000, 4_500)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (5_000, 4_500)
    # Replays answer the first commit, late included, and charge nothing more.
    again = await env.ledger.commit(CommitInput("acme", expired.reservation_id, 9_999))
    assert (again.charged_micros, again.replayed, again.late) == (3_500, True, "expired")
    assert (await env.ledger.commit(CommitInput("acme", released.reservation_id, 1))).late == "released"
    await env.ledger.commit(CommitInput("acme", full.reservation_id, 5_000))
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 9_500)
    usage = (await env.ledger.get_usage(UsageQuery(tenant="acme"))).total.counters
    assert (usage.requests, usage.cost_micros, usage.late_commits, usage.over_estimate) == (3, 9_500, 2, 1)
    # A late commit is settled like any other: releasing or renewing it now changes nothing.
    assert (await env.ledger.release("acme", expired.reservation_id)).replayed
    with pytest.raises(FailedPrecondition) as exc:
        await env.ledger.renew("acme", released.reservation_id)
    assert exc.value.reason == "RESERVATION_SETTLED"


async def test_renew_extends_a_held_reservation_on_every_scope(env: Env) -> None:
    await set_policy(env, GLOBAL, (Window.DAY, 10_000, None))
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    r = await env.ledger.reserve(reserve_input("long", 6_000, ttl=60))
    assert r.expires_unix_ms == T0 + 60_000
    env.clock.advance(50_000)
    renewed = await env.ledger.renew("acme", r.reservation_id, 120)
    assert renewed.expires_unix_ms == T0 + 50_000 + 120_000
    # Never shortens it; 0 means the default TTL (300 s); more than max_ttl_s (3600) is capped.
    assert (await env.ledger.renew("acme", r.reservation_id, 1)).expires_unix_ms == renewed.expires_unix_ms
    assert (await env.ledger.renew("acme", r.reservation_id)).expires_unix_ms == env.clock() + 300_000
    assert (await env.ledger.renew("acme", r.reservation_id, 86_400)).expires_unix_ms == env.clock() + 3_600_000
    # Past its first TTL the money is still held, on the tenant and the global scope (which, in cluster mode,
    # lives in another slot and holds under its own expiry).
    env.clock.advance(3_000_000)
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (6_000, 0)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (6_000, 0)
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("blocked", 5_000, a=Attribution("globex")))
    # A replay of the request answers the new expiry.
    assert (await env.ledger.reserve(reserve_input("long", 6_000))).expires_unix_ms == env.clock() + 600_000
    # It expires at the renewed time, on every scope.
    env.clock.advance(600_000)
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 0)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (0, 0)
    with pytest.raises(FailedPrecondition) as exc:
        await env.ledger.renew("acme", r.reservation_id)
    assert exc.value.reason == "RESERVATION_EXPIRED"
    # Expired money is not held again: a commit of it is late.
    assert (await env.ledger.commit(CommitInput("acme", r.reservation_id, 10))).late == "expired"


async def test_renew_of_a_settled_unknown_or_foreign_reservation(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    committed = await env.ledger.reserve(reserve_input("c", 1_000))
    await env.ledger.commit(CommitInput("acme", committed.reservation_id, 1_000))
    released = await env.ledger.reserve(reserve_input("r", 1_000))
    await env.ledger.release("acme", released.reservation_id)
    for rid in (committed.reservation_id, released.reservation_id):
        with pytest.raises(FailedPrecondition) as exc:
            await env.ledger.renew("acme", rid, 60)
        assert exc.value.reason == "RESERVATION_SETTLED"
    held = await env.ledger.reserve(reserve_input("h", 1_000, ttl=30))
    with pytest.raises(NotFound):
        await env.ledger.renew("globex", held.reservation_id, 600)
    with pytest.raises(NotFound):
        await env.ledger.renew("acme", "res_000000000000000000000000", 600)
    with pytest.raises(InvalidArgument) as bad:
        await env.ledger.renew("", "", -1)
    assert {v.field for v in bad.value.violations} == {"tenant", "reservation_id", "ttl_seconds"}
    # Nothing of that moved the held one: it expires at its own TTL.
    env.clock.advance(30_000)
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 1_000)


async def test_foreign_and_unknown_reservation_ids_are_not_found(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    r = await env.ledger.reserve(reserve_input("mine", 4_000))
    with pytest.raises(NotFound):
        await env.ledger.commit(CommitInput("globex", r.reservation_id, 4_000))
    with pytest.raises(NotFound):
        await env.ledger.release("globex", r.reservation_id)
    with pytest.raises(NotFound):
        await env.ledger.commit(CommitInput("acme", "res_000000000000000000000000", 1))
    with pytest.raises(NotFound):
        await env.ledger.release("acme", "no-such-reservation")
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (4_000, 0)
    usage = await env.ledger.get_usage(UsageQuery())
    assert usage.rows == []


# -- windows and rate caps ------------------------------------------------------------------------------------


async def test_window_rollover(env: Env) -> None:
    env.clock.now = ms("2026-03-30T23:59:00")
    await set_policy(env, TENANT, (Window.HOUR, 1_000, None), (Window.DAY, 1_500, None), (Window.MONTH, 1_800, None))
    r = await env.ledger.reserve(reserve_input("h1", 1_000))
    await env.ledger.commit(CommitInput("acme", r.reservation_id, 1_000))
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("h2", 100))
    assert [v.subject for v in exc.value.violations] == ["tenant:acme/hour/cost_micros"]
    assert exc.value.retry_after_s == 60.0
    env.clock.advance(60_000)  # 2026-03-31T00:00: new hour and new day, same month
    r = await env.ledger.reserve(reserve_input("d1", 100))
    await env.ledger.commit(CommitInput("acme", r.reservation_id, 100))
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("d2", 800))  # hour 900/1000 and day 900/1500 fit; month 1900/1800 not
    assert [v.subject for v in exc.value.violations] == ["tenant:acme/month/cost_micros"]
    view = await env.ledger.get_budget(TENANT)
    assert [(h.window, h.spent_micros) for h in view.headroom] == [
        (Window.HOUR, 100),
        (Window.DAY, 100),
        (Window.MONTH, 1_100),
    ]
    env.clock.now = ms("2026-04-01T00:00:00")
    await env.ledger.reserve(reserve_input("m1", 1_000))
    view = await env.ledger.get_budget(TENANT)
    assert [(h.spent_micros, h.reserved_micros) for h in view.headroom] == [(0, 1_000)] * 3


async def test_reservation_held_across_a_rollover_counts_in_the_new_window(env: Env) -> None:
    env.clock.now = ms("2026-03-30T23:59:30")
    await set_policy(env, TENANT, (Window.HOUR, 1_000, None))
    r = await env.ledger.reserve(reserve_input("long", 900, ttl=600))
    env.clock.advance(60_000)
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("second", 200))
    await env.ledger.commit(CommitInput("acme", r.reservation_id, 800))
    assert await reserved_and_spent(env, TENANT, Window.HOUR) == (0, 800)


async def test_rate_caps_stop_a_runaway_loop(env: Env) -> None:
    await set_policy(env, FEATURE, rpm=3, tpm=1_000)
    for i in range(3):
        await env.ledger.reserve(reserve_input(f"loop-{i}", 0, 100))
        env.clock.advance(1_000)
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("loop-3", 0, 100))
    err = exc.value
    assert err.reason == "RATE_LIMITED"
    assert [v.subject for v in err.violations] == ["tenant:acme/feature:summaries/minute/requests_per_minute"]
    # The oldest of the three leaves the rolling minute 57 s from now.
    assert err.retry_after_s == 57.0
    # A replay of an admitted request is not another request.
    assert (await env.ledger.reserve(reserve_input("loop-0", 0, 100))).replayed
    env.clock.advance(57_000)
    await env.ledger.reserve(reserve_input("loop-4", 0, 100))
    # Tokens per minute: loop-1, loop-2 and loop-4 (300 tokens) are in the rolling minute; 900 more do not fit.
    with pytest.raises(ResourceExhausted) as exc:
        await env.ledger.reserve(reserve_input("huge", 0, 900))
    assert [v.subject for v in exc.value.violations][-1].endswith("tokens_per_minute")


# -- usage and savings ----------------------------------------------------------------------------------------


async def test_usage_grouping_savings_and_ranges(env: Env) -> None:
    led = env.ledger
    calls = [
        (Attribution("acme", "search", "summaries", "u1"), 3_000, "big-model", 2),
        (Attribution("acme", "search", "chat", "u2"), 1_000, "small-model", 1),
        (Attribution("acme", "ads", "chat", "u1"), 500, "small-model", 1),
        (Attribution("globex", "", "chat", ""), 200, "small-model", 1),
    ]
    for i, (a, cost, model, tier) in enumerate(calls):
        r = await led.reserve(ReserveInput(f"u{i}", a, cost, 100, model=model, tier=tier))
        await led.commit(CommitInput(a.tenant, r.reservation_id, cost, TokenUsage(60, 40, 0), model, tier, 10))
    assert await led.record_savings([SavingsInput("hit-1", ACME, 2_000, 1, "big-model", 2)]) == [False]
    assert await led.record_savings([SavingsInput("hit-1", ACME, 2_000, 1, "big-model", 2)]) == [True]  # replay
    by_team = await led.get_usage(UsageQuery(tenant="acme", group_by=[int(GroupBy.TEAM)]))
    assert [(r.team, r.counters.cost_micros, r.counters.requests) for r in by_team.rows] == [
        ("search", 4_000, 2),
        ("ads", 500, 1),
    ]
    search = by_team.rows[0].counters
    assert search.saved_micros == 2_020 and search.cache_hits == 1
    assert by_team.total.counters.cost_micros == 4_500
    everyone = await led.get_usage(UsageQuery(group_by=[int(GroupBy.TENANT), int(GroupBy.TIER)]))
    assert [(r.tenant, r.tier, r.counters.cost_micros) for r in everyone.rows] == [
        ("acme", 2, 3_000),
        ("acme", 1, 1_500),
        ("globex", 1, 200),
    ]
    assert everyone.total.counters.requests == 4 and everyone.total.counters.input_tokens == 240
    by_user = await led.get_usage(UsageQuery(tenant="acme", group_by=[int(GroupBy.END_USER), int(GroupBy.MODEL)]))
    assert [(r.end_user, r.model, r.counters.cost_micros) for r in by_user.rows] == [
        ("u1", "big-model", 3_000),
        ("u2", "small-model", 1_000),
        ("u1", "small-model", 500),
        ("user-1", "big-model", 0),  # the cache hit: no spend, only savings
    ]
    assert by_user.rows[-1].counters.saved_micros == 2_000
    # Ranges: an hour later, the current hour is empty, the day is not; an explicit range picks the first hour.
    env.clock.advance(3_600_000)
    r = await led.reserve(ReserveInput("later", ACME, 50, 10))
    await led.commit(CommitInput("acme", r.reservation_id, 50))
    hour = await led.get_usage(UsageQuery(tenant="acme", window=int(Window.HOUR)))
    assert hour.total.counters.cost_micros == 50
    day = await led.get_usage(UsageQuery(tenant="acme", window=int(Window.DAY)))
    assert day.total.counters.cost_micros == 4_550
    first = await led.get_usage(UsageQuery(tenant="acme", start_unix_ms=T0, end_unix_ms=T0 + 60_000))
    assert first.total.counters.cost_micros == 4_500
    empty = await led.get_usage(UsageQuery(tenant="acme", start_unix_ms=T0 - 86_400_000, end_unix_ms=T0 - 1))
    assert empty.rows == [] and empty.total.counters.cost_micros == 0
    # Fuzzing (100 examples a call) found a range ending in the far future tiling millennia into cells until the
    # budget was killed for memory: nothing is recorded after now or before a tenant's first activity.
    since_t0 = await led.get_usage(UsageQuery(tenant="acme", start_unix_ms=T0 - 60_000, end_unix_ms=2**62))
    assert since_t0.total.counters.cost_micros == 4_550
    since_1970 = await led.get_usage(UsageQuery(start_unix_ms=1, end_unix_ms=T0 + 30 * 86_400_000))
    assert since_1970.total.counters.cost_micros == 4_750  # acme and globex
    future = await led.get_usage(UsageQuery(tenant="acme", start_unix_ms=2**61, end_unix_ms=2**62))
    assert future.rows == [] and future.total.counters.cost_micros == 0


def savings_command(env: Env, tenant: str, request_id: str, saved: int, *, team: str = "search") -> SavingsCommand:
    return SavingsCommand(
        tenant, request_id, UsageDims(team, "chat", "m", 2), saved, True, buckets(env.clock()), 86_400_000
    )


async def savings_by_tenant(env: Env, window: Window = Window.LIFETIME) -> dict[str, tuple[int, int]]:
    report = await env.ledger.get_usage(UsageQuery(window=int(window), group_by=[int(GroupBy.TENANT)]))
    return {r.tenant: (r.counters.saved_micros, r.counters.cache_hits) for r in report.rows}


async def test_a_savings_batch_replays_per_record_and_adds_the_rest(env: Env) -> None:
    assert await env.store.record_savings([savings_command(env, "acme", "hit-0", 700)]) == [False]
    env.clock.advance(90_000)  # the batch lands in another minute cell than the first record
    batch = [
        savings_command(env, "acme", "hit-1", 1_000),
        savings_command(env, "acme", "hit-0", 5_000),  # recorded before: a replay, whatever its numbers
        savings_command(env, "globex", "hit-1", 40),  # the same id in another tenant is another record
        savings_command(env, "acme", "hit-2", 250, team="ads"),
        savings_command(env, "acme", "hit-2", 9_999),  # twice in one batch: the second replays the first
    ]
    assert await env.store.record_savings(batch) == [False, True, False, False, True]
    expected = {"acme": (700 + 1_000 + 250, 3), "globex": (40, 1)}
    assert await savings_by_tenant(env) == expected
    assert await savings_by_tenant(env, Window.DAY) == expected  # minute, hour and day cells agree
    by_team = await env.ledger.get_usage(UsageQuery(tenant="acme", group_by=[int(GroupBy.TEAM)]))
    assert {r.team: r.counters.saved_micros for r in by_team.rows} == {"search": 1_700, "ads": 250}
    # The whole batch again: every record replays and nothing moves.
    assert await env.store.record_savings(batch) == [True] * len(batch)
    assert await savings_by_tenant(env) == expected
    assert await env.store.tenants() == ["acme", "globex"]


async def test_a_request_id_repeated_in_a_savings_batch_counts_once(env: Env) -> None:
    records = [
        SavingsInput("hit-1", Attribution("acme", "search"), 1_000, 1),
        SavingsInput("hit-2", Attribution("acme", "search"), 300, 1),
        SavingsInput("hit-1", Attribution("acme", "ads"), 7_000, 2),  # a replay of the first, whatever its numbers
        SavingsInput("hit-2", Attribution("acme", "search"), 300, 1),
    ]
    replayed = await env.ledger.record_savings(records, tenant="acme")
    assert replayed == [False, False, True, True]
    assert await savings_by_tenant(env) == {"acme": (1_300, 2)}
    assert await env.ledger.record_savings(records, tenant="acme") == [True] * 4


async def test_a_savings_batch_survives_a_script_flush(env: Env) -> None:
    if env.kind == "sqlite":
        pytest.skip("Redis only")
    assert await env.store.record_savings([savings_command(env, "acme", "before", 1)]) == [False]
    raw: Redis | RedisCluster = (
        RedisCluster.from_url(env.url) if env.kind == "redis-cluster" else Redis.from_url(env.url)
    )
    try:
        await raw.script_flush()  # on a cluster: every primary
        assert not any(await raw.script_exists(hashlib.sha1(redis_scripts.SAVINGS.encode()).hexdigest()))
    finally:
        await raw.aclose()
    batch = [savings_command(env, t, f"after-{t}", 10) for t in ("acme", "globex", "initech")]
    assert await env.store.record_savings([*batch, savings_command(env, "acme", "before", 1)]) == [
        False,
        False,
        False,
        True,
    ]
    assert await savings_by_tenant(env) == {"acme": (11, 2), "globex": (10, 1), "initech": (10, 1)}


async def test_a_new_policy_starts_from_what_the_window_already_spent(env: Env) -> None:
    for i, cost in enumerate((1_000, 2_000)):
        r = await env.ledger.reserve(reserve_input(f"before-{i}", cost))
        await env.ledger.commit(CommitInput("acme", r.reservation_id, cost, TokenUsage(10, 5, 0)))
    other = await env.ledger.reserve(reserve_input("other-team", 500, a=Attribution("acme", "ads")))
    await env.ledger.commit(CommitInput("acme", other.reservation_id, 500))
    await set_policy(env, TEAM, (Window.DAY, 5_000, None), (Window.MONTH, None, 1_000))
    view = await env.ledger.get_budget(TEAM)
    assert [(h.spent_micros, h.used_tokens) for h in view.headroom] == [(3_000, 30), (3_000, 30)]
    await set_policy(env, GLOBAL, (Window.LIFETIME, 10_000, None))
    assert await reserved_and_spent(env, GLOBAL, Window.LIFETIME) == (0, 3_500)
    with pytest.raises(ResourceExhausted):
        await env.ledger.reserve(reserve_input("over", 2_001))


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (ReserveInput("", ACME, 1, 1), "request_id"),
        (ReserveInput("x" * 129, ACME, 1, 1), "request_id"),
        (ReserveInput("r", Attribution(""), 1, 1), "attribution.tenant"),
        (ReserveInput("r", Attribution("ac me"), 1, 1), "attribution.tenant"),
        (ReserveInput("r", Attribution("acme", "t" * 65), 1, 1), "attribution.team"),
        (ReserveInput("r", Attribution("acme", end_user="u\x00"), 1, 1), "attribution.end_user"),
        (ReserveInput("r", ACME, -1, 1), "estimated_cost_micros"),
        (ReserveInput("r", ACME, 10**13, 1), "estimated_cost_micros"),
        (ReserveInput("r", ACME, 1, 2**63), "estimated_tokens"),
        (ReserveInput("r", ACME, 1, 1, ttl_seconds=86_400), "ttl_seconds"),
        (ReserveInput("r", ACME, 1, 1, tier=7), "tier"),
    ],
)
async def test_bad_reserve_input_is_rejected_and_changes_nothing(env: Env, bad: ReserveInput, field: str) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    with pytest.raises(InvalidArgument) as exc:
        await env.ledger.reserve(bad)
    assert field in [v.field for v in exc.value.violations]
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (0, 0)
    # Not even the request id was taken: a good request with it is admitted fresh.
    r = await env.ledger.reserve(reserve_input("r", 1))
    assert not r.replayed


async def test_bad_commit_release_and_policy_input(env: Env) -> None:
    await set_policy(env, TENANT, (Window.DAY, 10_000, None))
    r = await env.ledger.reserve(reserve_input("r", 1_000))
    bad_commits = [
        (CommitInput("acme", r.reservation_id, -5), "actual_cost_micros"),
        (CommitInput("", r.reservation_id, 5), "tenant"),
        (CommitInput("acme", "", 5), "reservation_id"),
        (CommitInput("acme", "r" * 65, 5), "reservation_id"),
        (CommitInput("acme", r.reservation_id, 5, TokenUsage(1, 0, 2)), "usage.cached_input_tokens"),
        (CommitInput("acme", r.reservation_id, 5, saved_micros=-1), "saved_micros"),
    ]
    for bad, field in bad_commits:
        with pytest.raises(InvalidArgument) as exc:
            await env.ledger.commit(bad)
        assert field in [v.field for v in exc.value.violations]
    with pytest.raises(InvalidArgument):
        await env.ledger.release("", r.reservation_id)
    with pytest.raises(InvalidArgument):
        await env.ledger.record_savings([SavingsInput("s", ACME, -1, 1)])
    with pytest.raises(InvalidArgument) as exc:
        await env.ledger.set_budget(
            PolicyInput(
                ScopeInput(int(ScopeKind.TEAM), "acme", ""),
                [LimitInput(int(Window.DAY), -1, None), LimitInput(0, 1, None), LimitInput(int(Window.DAY), 1)],
                soft_threshold=1.5,
            )
        )
    fields = {v.field for v in exc.value.violations}
    assert fields == {
        "policy.scope.name",
        "policy.limits[0].cost_micros",
        "policy.limits[1].window",
        "policy.limits[2].window",
        "policy.soft_threshold",
    }
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (1_000, 0)
    assert (await env.ledger.get_budget(TEAM)).policy is None
    assert (await env.ledger.get_usage(UsageQuery())).rows == []


# -- two ledgers (two processes' worth of clients) on one store ------------------------------------------------


async def test_two_clients_on_one_store_never_overspend(env: Env) -> None:
    k, cost = 7, 1_000
    await set_policy(env, TENANT, (Window.DAY, k * cost, None))
    await set_policy(env, GLOBAL, (Window.DAY, 100 * cost, None))
    second = BudgetLedger(store=await env.open_store(), clock=env.clock)
    ledgers = [env.ledger, second]

    async def one(i: int) -> bool:
        try:
            await ledgers[i % 2].reserve(reserve_input(f"c{i}", cost))
        except ResourceExhausted:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(32)))
    assert sum(results) == k
    assert await reserved_and_spent(env, TENANT, Window.DAY) == (k * cost, 0)
    assert await reserved_and_spent(env, GLOBAL, Window.DAY) == (k * cost, 0)
