"""A stateful property test of the budget store contract, through the ledger, on every store.

Hypothesis drives random sequences of Reserve, Commit (at, below and above the estimate, and of reservations no
longer held), Release, RenewReservation and clock advances (expiry), with request ids and reservation ids drawn
again and again so that repeats of earlier calls are common, against SQLite, Redis (standalone), Redis in cluster
mode on a standalone server, and a real three-master Redis Cluster. A model predicts every answer exactly, and
after every step the store must agree with it:

* per scope, reserved = the estimates of the held, unexpired reservations on it; spent = the charges on it;
  spent + reserved <= the hard limit unless a commit above its estimate or a late commit charged that scope;
* usage totals (cost, requests, over-estimate and late commits) are what was charged;
* a replay answers what the first call answered (Reserve: the same reservation, its state and expiry; Commit: the
  same charge, over-estimate and late flags), and moves no money;
* a reservation is in exactly one state: a committed one releases as a no-op, a released or expired one commits
  late (charged in full), renews only while held.

Sized for CI (COSTMESH_STATEFUL_EXAMPLES examples of up to COSTMESH_STATEFUL_STEPS steps per store; raise them for
a longer hunt, e.g. COSTMESH_STATEFUL_EXAMPLES=500).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from services.budget.ledger import (
    BudgetLedger,
    CommitInput,
    LedgerSettings,
    LimitInput,
    PolicyInput,
    ReserveInput,
    ScopeInput,
    UsageQuery,
)
from services.budget.model import ReservationState, ScopeKind, Window
from services.budget.redis_store import RedisBudgetStore
from services.budget.sqlite_store import SqliteBudgetStore
from services.budget.store import BudgetStore
from services.common.attribution import Attribution
from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from services.common.pricing import TokenUsage
from tests.support.redis_cluster import RedisClusterServers, cluster_fixture
from tests.support.redis_server import RedisServer

T = TypeVar("T")

EXAMPLES = int(os.environ.get("COSTMESH_STATEFUL_EXAMPLES", "12"))
STEPS = int(os.environ.get("COSTMESH_STATEFUL_STEPS", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

T0 = 1_774_909_800_000  # 2026-03-30T22:30Z
DEFAULT_TTL_S, MAX_TTL_S = 60, 600
#: Scopes with a (lifetime cost) limit, small enough that rejections and overspends happen.
LIMITS = {"global": 30_000, "acme": 15_000, "acme/search": 8_000, "globex": 10_000}
POLICY_SCOPES = {
    "global": ScopeInput(int(ScopeKind.GLOBAL)),
    "acme": ScopeInput(int(ScopeKind.TENANT), "acme"),
    "acme/search": ScopeInput(int(ScopeKind.TEAM), "acme", "search"),
    "globex": ScopeInput(int(ScopeKind.TENANT), "globex"),
}
#: Who reserves, and the limited scopes each one's requests apply to.
CALLERS = {
    Attribution("acme", "search"): ("global", "acme", "acme/search"),
    Attribution("acme", "ads"): ("global", "acme"),
    Attribution("globex"): ("global", "globex"),
}
HELD, COMMITTED, RELEASED, EXPIRED = "held", "committed", "released", "expired"


@dataclass
class Res:
    """The model of one reservation."""

    rid: str
    tenant: str
    scopes: tuple[str, ...]
    est: int
    expires: int
    state: str = HELD
    charged: int = 0
    over: bool = False
    late: str = ""


@dataclass(frozen=True)
class Backend:
    kind: str
    url: str
    root: Path

    async def open(self, n: int) -> BudgetStore:
        if self.kind == "sqlite":
            store = SqliteBudgetStore(path=self.root / f"budget-{n}.sqlite3")
            await store.open()
            return store
        if self.kind == "redis-cluster":
            cluster = RedisCluster.from_url(self.url)
            await cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
            return RedisBudgetStore(client=cluster, cluster=True)
        client = Redis.from_url(self.url)
        await client.flushdb()
        return RedisBudgetStore(client=client, cluster=self.kind == "redis-cluster-mode")


def machine_for(backend: Backend) -> type[RuleBasedStateMachine]:
    examples = itertools.count()

    class BudgetMachine(RuleBasedStateMachine):
        reservations = Bundle("reservations")

        def __init__(self) -> None:
            super().__init__()
            self.runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)  # not the session's loop
            self.now = T0
            self.store = self.run(backend.open(next(examples)))
            self.ledger = BudgetLedger(
                store=self.store,
                settings=LedgerSettings(default_ttl_s=DEFAULT_TTL_S, max_ttl_s=MAX_TTL_S),
                clock=lambda: self.now,
            )
            self.res: dict[str, Res] = {}
            self.current: dict[tuple[str, str], str] = {}  # (tenant, request id) -> its current reservation
            self.spent = dict.fromkeys(LIMITS, 0)
            self.may_pass = dict.fromkeys(LIMITS, False)  # an over-estimate or late commit charged the scope
            self.commits = self.over_commits = self.late_commits = 0

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.runner.run(coro)

        def teardown(self) -> None:
            try:
                self.run(self.store.close())
            finally:
                self.runner.close()

        # -- the model ----------------------------------------------------------------------------------------

        def reserved(self, scope: str) -> int:
            return sum(r.est for r in self.res.values() if r.state == HELD and scope in r.scopes)

        def remaining(self, scopes: tuple[str, ...]) -> int:
            return min(LIMITS[s] - self.spent[s] - self.reserved(s) for s in scopes)

        def charge(self, r: Res, actual: int) -> None:
            for s in r.scopes:
                self.spent[s] += actual
                if r.late or r.over:
                    self.may_pass[s] = True
            self.commits += 1
            self.over_commits += r.over
            self.late_commits += bool(r.late)

        # -- rules --------------------------------------------------------------------------------------------

        @initialize(target=reservations, ttls=st.lists(st.sampled_from([1, 30, 60]), min_size=3, max_size=3))
        def policies_and_first_reservations(self, ttls: list[int]) -> Any:
            """Every example starts with the policies and three held reservations (one per caller)."""
            for name, scope in POLICY_SCOPES.items():
                self.run(self.ledger.set_budget(PolicyInput(scope, [LimitInput(int(Window.LIFETIME), LIMITS[name])])))
            rids = [self.reserve(who, i, 2_000, ttl) for i, (who, ttl) in enumerate(zip(CALLERS, ttls, strict=True))]
            assert all(isinstance(rid, str) for rid in rids)  # each admitted
            return multiple(*rids)

        @rule(
            target=reservations,
            caller=st.sampled_from(list(CALLERS)),
            request=st.integers(0, 4),
            est=st.one_of(st.sampled_from([0, 1, 4_000, 7_999, 8_000]), st.integers(0, 9_000)),
            ttl=st.sampled_from([0, 1, 30, 120]),
        )
        def reserve(self, caller: Attribution, request: int, est: int, ttl: int) -> Any:
            request_id = f"q{request}"
            scopes = CALLERS[caller]
            prev = self.res.get(self.current.get((caller.tenant, request_id), ""))
            try:
                r = self.run(self.ledger.reserve(ReserveInput(request_id, caller, est, 10, ttl_seconds=ttl)))
            except ResourceExhausted:
                assert prev is None or prev.state in (RELEASED, EXPIRED), "a held or committed request id replays"
                assert any(self.spent[s] + self.reserved(s) + est > LIMITS[s] for s in scopes), "wrongly refused"
                return multiple()
            if prev is not None and prev.state in (HELD, COMMITTED):  # a replay of what the first call answered
                assert r.replayed and r.reservation_id == prev.rid and r.expires_unix_ms == prev.expires
                held = prev.state == HELD
                assert r.state is (ReservationState.HELD if held else ReservationState.COMMITTED)
                assert r.remaining_micros == self.remaining(scopes)
                return multiple()
            # New, or its reservation was released or expired: a fresh admission under a new id.
            assert all(self.spent[s] + self.reserved(s) + est <= LIMITS[s] for s in scopes), "admitted past a limit"
            assert not r.replayed and r.state is ReservationState.HELD and r.reservation_id not in self.res
            assert r.expires_unix_ms == self.now + (ttl or DEFAULT_TTL_S) * 1000
            self.res[r.reservation_id] = Res(r.reservation_id, caller.tenant, scopes, est, r.expires_unix_ms)
            self.current[(caller.tenant, request_id)] = r.reservation_id
            assert r.remaining_micros == self.remaining(scopes)
            return r.reservation_id

        @rule(
            rid=reservations,
            kind=st.sampled_from(["full", "below", "above", "zero"]),
            extra=st.integers(1, 3_000),
            foreign=st.booleans(),
        )
        def commit(self, rid: str, kind: str, extra: int, foreign: bool) -> None:
            r = self.res[rid]
            actual = {"full": r.est, "below": r.est // 2, "above": r.est + extra, "zero": 0}[kind]
            tenant = "initech" if foreign and extra % 5 == 0 else r.tenant
            try:
                c = self.run(self.ledger.commit(CommitInput(tenant, rid, actual, TokenUsage(5, 5, 0))))
            except NotFound:
                assert tenant != r.tenant
                return
            assert tenant == r.tenant
            if r.state == COMMITTED:  # a replay answers the first commit, whatever the numbers now
                assert (c.replayed, c.charged_micros, c.over_estimate, c.late) == (True, r.charged, r.over, r.late)
            else:
                r.late = "" if r.state == HELD else r.state  # "expired" or "released": charged in full all the same
                r.state, r.charged, r.over = COMMITTED, actual, actual > r.est
                self.charge(r, actual)
                assert (c.replayed, c.charged_micros, c.over_estimate, c.late) == (False, actual, r.over, r.late)
            assert c.remaining_micros == self.remaining(r.scopes)

        @rule(rid=reservations)
        def release(self, rid: str) -> None:
            r = self.res[rid]
            out = self.run(self.ledger.release(r.tenant, rid))
            if r.state == HELD:
                assert (out.replayed, out.released_micros) == (False, r.est)
                r.state = RELEASED
            else:  # committed, released or expired: a no-op
                assert (out.replayed, out.released_micros) == (True, 0)

        @rule(rid=reservations, ttl=st.sampled_from([0, 1, 30, 300, 5_000]))
        def renew(self, rid: str, ttl: int) -> None:
            r = self.res[rid]
            try:
                out = self.run(self.ledger.renew(r.tenant, rid, ttl))
            except FailedPrecondition as err:
                expected = "RESERVATION_EXPIRED" if r.state == EXPIRED else "RESERVATION_SETTLED"
                assert r.state != HELD and err.reason == expected, (r, err.reason)
                return
            assert r.state == HELD
            r.expires = max(r.expires, self.now + min(ttl or DEFAULT_TTL_S, MAX_TTL_S) * 1000)
            assert out.expires_unix_ms == r.expires

        @rule(op=st.sampled_from(["commit", "release", "renew"]))
        def unknown_id(self, op: str) -> None:
            calls: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
                "commit": lambda: self.ledger.commit(CommitInput("acme", "res_" + "0" * 24, 1)),
                "release": lambda: self.ledger.release("acme", "res_" + "0" * 24),
                "renew": lambda: self.ledger.renew("acme", "res_" + "0" * 24),
            }
            with pytest.raises(NotFound):
                self.run(calls[op]())

        @rule(ms=st.sampled_from([1, 29_999, 30_000, 60_000, 250_000]))
        def advance(self, ms: int) -> None:
            self.now += ms
            for r in self.res.values():
                if r.state == HELD and r.expires <= self.now:  # expiry is exclusive: at expires the money is back
                    r.state = EXPIRED

        # -- invariants ---------------------------------------------------------------------------------------

        @invariant()
        def scopes_agree_with_the_model(self) -> None:
            for name, scope in POLICY_SCOPES.items():
                (row,) = self.run(self.ledger.get_budget(scope)).headroom
                reserved = self.reserved(name)
                assert (row.reserved_micros, row.spent_micros) == (reserved, self.spent[name]), name
                if not self.may_pass[name]:
                    assert row.spent_micros + row.reserved_micros <= LIMITS[name], name

        @invariant()
        def usage_counts_every_charge_once(self) -> None:
            total = self.run(self.ledger.get_usage(UsageQuery())).total.counters
            assert total.cost_micros == sum(r.charged for r in self.res.values())
            assert (total.requests, total.over_estimate, total.late_commits) == (
                self.commits,
                self.over_commits,
                self.late_commits,
            )
            assert total.input_tokens == 5 * self.commits

        @invariant()
        def one_state_per_reservation(self) -> None:
            for r in self.res.values():
                assert r.state in (HELD, COMMITTED, RELEASED, EXPIRED)
                assert (r.state == COMMITTED) or (r.charged == 0 and not r.late)

    return BudgetMachine


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    yield from cluster_fixture()


@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster-mode", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ],
)
def test_the_store_contract_holds_under_random_operation_sequences(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = ""
    if kind == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    elif kind != "sqlite":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
    run_state_machine_as_test(machine_for(Backend(kind, url, tmp_path)), settings=SETTINGS)
