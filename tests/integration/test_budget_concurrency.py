"""No overspend under concurrency: two budget service processes (real ``python -m services.budget``) share one
store — one Redis, or one SQLite file — and 64 concurrent reservers race for a limit that admits exactly K.

Exactly K are admitted, and a monitor that keeps reading committed + reserved (GetBudget is one atomic step on
either store) never sees it above the limit, neither during the race nor while money churns between reserved
and spent (commits, releases, and reservations left to expire as if their caller had crashed)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.common.channels import create_channel
from services.common.health import wait_serving
from tests.support.procs import ServiceProcess
from tests.support.redis_server import RedisServer

K = 10
EST = 1_000
REQUESTERS = 64


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def two_processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServiceProcess]]:
    """Two processes per store for the whole module (each test uses its own tenant)."""
    env = {"COSTMESH_BUDGET_GRACE_PERIOD_S": "1", "COSTMESH_BUDGET_LOG_LEVEL": "warning"}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        env |= {"COSTMESH_BUDGET_STORE": "redis", "COSTMESH_BUDGET_REDIS_URL": server.url}
    else:
        path = tmp_path_factory.mktemp("budget") / "shared.sqlite3"
        env |= {"COSTMESH_BUDGET_STORE": "sqlite", "COSTMESH_BUDGET_SQLITE_PATH": str(path)}
    procs = [ServiceProcess("services.budget", env=env).start() for _ in range(2)]
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture(scope="module")
async def stubs(two_processes: list[ServiceProcess]) -> AsyncIterator[list[Any]]:
    for p in two_processes:
        try:
            await wait_serving(p.target, timeout_s=60)
        except TimeoutError:
            pytest.fail(f"budget process never became SERVING:\n{p.log()[-3000:]}")
    channels = [create_channel(p.target, timeout_s=30.0, max_attempts=1) for p in two_processes]
    yield [budget_pb2_grpc.BudgetServiceStub(c) for c in channels]
    for c in channels:
        await c.close()


def scope(kind: int, tenant: str = "", name: str = "") -> budget_pb2.Scope:
    return budget_pb2.Scope(kind=kind, tenant=tenant, name=name)  # type: ignore[arg-type]


async def set_day_limit(stub: Any, s: budget_pb2.Scope, cost: int) -> None:
    policy = budget_pb2.BudgetPolicy(scope=s, limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_DAY, cost_micros=cost)])
    await stub.SetBudget(budget_pb2.SetBudgetRequest(policy=policy))


@dataclass
class Monitor:
    """Keeps sampling committed + reserved of some scopes through both processes until stopped."""

    stubs: list[Any]
    scopes: list[tuple[budget_pb2.Scope, int]]
    samples: int = 0
    worst: dict[str, int] = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        i = 0
        while not self._stop.is_set():
            for s, limit in self.scopes:
                view = await self.stubs[i % 2].GetBudget(budget_pb2.GetBudgetRequest(scope=s))
                (h,) = view.headroom
                used = h.spent_micros + h.reserved_micros
                key = f"{s.kind}/{s.tenant}/{s.name}"
                self.worst[key] = max(self.worst.get(key, 0), used)
                if used > limit:
                    self.breaches.append(f"{key}: spent {h.spent_micros} + reserved {h.reserved_micros} > {limit}")
                self.samples += 1
                i += 1

    def stop(self) -> None:
        self._stop.set()


async def test_exactly_k_of_64_concurrent_reservers_are_admitted(stubs: list[Any]) -> None:
    tenant = scope(budget_pb2.SCOPE_KIND_TENANT, "acme")
    team = scope(budget_pb2.SCOPE_KIND_TEAM, "acme", "search")
    global_ = scope(budget_pb2.SCOPE_KIND_GLOBAL)
    await set_day_limit(stubs[0], global_, 1_000 * EST)
    await set_day_limit(stubs[1], tenant, K * EST)  # the binding limit: admits exactly K
    await set_day_limit(stubs[0], team, 2 * K * EST)
    monitor = Monitor(stubs, [(tenant, K * EST), (global_, 1_000 * EST)])
    watcher = asyncio.create_task(monitor.run())
    gate = asyncio.Event()

    async def reserver(i: int) -> str:
        await gate.wait()  # all 64 calls leave together
        try:
            r = await stubs[i % 2].Reserve(
                budget_pb2.ReserveRequest(
                    request_id=f"race-{i}",
                    attribution=common_pb2.Attribution(tenant="acme", team="search", feature="chat"),
                    estimated_cost_micros=EST,
                    estimated_tokens=100,
                )
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return "admitted" if r.reservation_id.startswith("res_") else "?"

    tasks = [asyncio.create_task(reserver(i)) for i in range(REQUESTERS)]
    await asyncio.sleep(0.05)
    gate.set()
    outcomes = await asyncio.gather(*tasks)
    monitor.stop()
    await watcher
    assert outcomes.count("admitted") == K, outcomes
    assert outcomes.count("RESOURCE_EXHAUSTED") == REQUESTERS - K, outcomes
    assert monitor.breaches == []
    assert monitor.samples > 0
    for s, expected in ((tenant, K * EST), (team, K * EST), (global_, K * EST)):
        (h,) = (await stubs[0].GetBudget(budget_pb2.GetBudgetRequest(scope=s))).headroom
        assert (h.spent_micros, h.reserved_micros) == (0, expected)


async def test_committed_plus_reserved_never_exceeds_the_limit_under_churn(stubs: list[Any]) -> None:
    limit = 40 * EST
    tenant = scope(budget_pb2.SCOPE_KIND_TENANT, "churn")
    await set_day_limit(stubs[0], tenant, limit)
    monitor = Monitor(stubs, [(tenant, limit)])
    watcher = asyncio.create_task(monitor.run())
    charged: list[int] = []
    abandoned = 0
    rng = random.Random(7)

    async def worker(w: int) -> None:
        nonlocal abandoned
        for n in range(6):
            stub = stubs[(w + n) % 2]
            est = rng.randrange(200, 1_500)
            action = rng.choice(("commit", "commit", "release", "abandon"))
            try:
                r = await stub.Reserve(
                    budget_pb2.ReserveRequest(
                        request_id=f"churn-{w}-{n}",
                        attribution=common_pb2.Attribution(tenant="churn"),
                        estimated_cost_micros=est,
                        ttl_seconds=1 if action == "abandon" else 60,
                    )
                )
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                continue
            await asyncio.sleep(rng.random() / 50)
            other = stubs[(w + n + 1) % 2]  # settle through the other process
            if action == "commit":
                c = await other.Commit(
                    budget_pb2.CommitRequest(
                        reservation_id=r.reservation_id, tenant="churn", actual_cost_micros=rng.randrange(0, est + 1)
                    )
                )
                charged.append(c.charged_micros)
            elif action == "release":
                await other.Release(budget_pb2.ReleaseRequest(reservation_id=r.reservation_id, tenant="churn"))
            else:
                abandoned += 1  # a crashed caller: only the TTL gives this money back

    await asyncio.gather(*(worker(w) for w in range(REQUESTERS)))
    await asyncio.sleep(1.1)  # every abandoned reservation has expired now
    monitor.stop()
    await watcher
    assert monitor.breaches == []
    assert monitor.samples > 10
    assert charged and abandoned
    (h,) = (await stubs[1].GetBudget(budget_pb2.GetBudgetRequest(scope=tenant))).headroom
    assert h.reserved_micros == 0  # expired reservations do not count, with no sweeper
    assert h.spent_micros == sum(charged) <= limit
