"""The budget service on a real loopback server (SQLite and a real redis-server): the wire contract, rich errors,
fail-closed / fail-open when Redis is down, NOSCRIPT recovery, and the ``costmesh budget`` commands."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis
from typer.testing import CliRunner

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.budget import redis_scripts
from services.budget.__main__ import assemble, wait_for_store
from services.budget.cli import app as budget_cli
from services.budget.config import BudgetSettings
from services.common.channels import create_channel
from services.common.server import ServiceHost
from tests.support.redis_server import RedisServer

Stub = Any


def settings(store: str, tmp_path: Path, redis_url: str = "", **overrides: Any) -> BudgetSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "grace_period_s": 0.5,
        "store": store,
        "sqlite_path": tmp_path / "budget.sqlite3",
        "redis_url": redis_url or "redis://127.0.0.1:1/0",
        "redis_timeout_s": 0.5,
        **overrides,
    }
    return BudgetSettings(**values)


@asynccontextmanager
async def running(s: BudgetSettings) -> AsyncIterator[str]:
    host = ServiceHost(name="budget", settings=s)
    await assemble(s, host)
    port = await host.start()
    await host.set_serving(True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await host.stop()


@asynccontextmanager
async def client(target: str) -> AsyncIterator[Stub]:
    async with create_channel(target, timeout_s=10.0, max_attempts=1) as channel:
        yield budget_pb2_grpc.BudgetServiceStub(channel)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    async with running(settings(request.param, tmp_path, url)) as t:
        yield t


def attribution(tenant: str = "acme", team: str = "search", feature: str = "chat") -> common_pb2.Attribution:
    return common_pb2.Attribution(tenant=tenant, team=team, feature=feature)


def details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    out: dict[str, Any] = {}
    for d in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if d.Is(kind.DESCRIPTOR):
                msg = kind()
                d.Unpack(msg)
                out[kind.__name__] = msg
    return out


async def set_limit(stub: Stub, scope: budget_pb2.Scope, window: int, cost: int, **extra: Any) -> None:
    policy = budget_pb2.BudgetPolicy(scope=scope, limits=[budget_pb2.Limit(window=window, cost_micros=cost)], **extra)
    await stub.SetBudget(budget_pb2.SetBudgetRequest(policy=policy))


TENANT = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant="acme")
TEAM = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TEAM, tenant="acme", name="search")


async def test_reserve_commit_release_over_the_wire(target: str) -> None:
    async with client(target) as stub:
        await set_limit(stub, TENANT, budget_pb2.WINDOW_MONTH, 10_000, max_tokens_per_request=1024)
        r = await stub.Reserve(
            budget_pb2.ReserveRequest(
                request_id="req-1",
                attribution=attribution(),
                estimated_cost_micros=6_000,
                estimated_tokens=300,
                model="full-model",
                tier=common_pb2.TIER_FULL,
            )
        )
        assert r.reservation_id and not r.replayed and r.max_tokens_cap == 1024
        assert r.state == budget_pb2.RESERVATION_STATE_HELD
        assert r.HasField("remaining_micros") and r.remaining_micros == 4_000
        (h,) = r.headroom
        assert (h.scope.kind, h.window, h.limit_micros, h.reserved_micros) == (
            budget_pb2.SCOPE_KIND_TENANT,
            budget_pb2.WINDOW_MONTH,
            10_000,
            6_000,
        )
        assert not h.HasField("limit_tokens") and h.resets_unix_ms > 0
        again = await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="req-1", attribution=attribution(), estimated_cost_micros=6_000)
        )
        assert again.replayed and again.reservation_id == r.reservation_id
        assert again.state == budget_pb2.RESERVATION_STATE_HELD
        c = await stub.Commit(
            budget_pb2.CommitRequest(
                reservation_id=r.reservation_id,
                tenant="acme",
                actual_cost_micros=7_000,
                usage=common_pb2.Usage(input_tokens=200, output_tokens=150, cached_input_tokens=50),
                model="full-model",
                tier=common_pb2.TIER_FULL,
                saved_micros=0,
            )
        )
        assert (c.charged_micros, c.over_estimate, c.replayed, c.remaining_micros) == (7_000, True, False, 3_000)
        assert not c.late
        settled = await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="req-1", attribution=attribution(), estimated_cost_micros=6_000)
        )
        assert settled.replayed and settled.state == budget_pb2.RESERVATION_STATE_COMMITTED
        # The tenant may come from metadata (the mesh carries attribution on every hop).
        md = (("x-costmesh-tenant", "acme"),)
        r2 = await stub.Reserve(budget_pb2.ReserveRequest(request_id="req-2", estimated_cost_micros=1_000), metadata=md)
        rel = await stub.Release(budget_pb2.ReleaseRequest(reservation_id=r2.reservation_id), metadata=md)
        assert (rel.released_micros, rel.replayed) == (1_000, False)
        saved = await stub.RecordSavings(
            budget_pb2.RecordSavingsRequest(
                request_id="hit-1",
                attribution=attribution(),
                saved_micros=5_000,
                reason=budget_pb2.SAVINGS_REASON_CACHE_HIT,
                model="full-model",
                tier=common_pb2.TIER_FULL,
            )
        )
        assert not saved.replayed
        usage = await stub.GetUsage(
            budget_pb2.GetUsageRequest(tenant="acme", group_by=[budget_pb2.GROUP_BY_TEAM, budget_pb2.GROUP_BY_TIER])
        )
        (row,) = usage.rows
        assert (row.team, row.tier, row.cost_micros, row.requests) == ("search", common_pb2.TIER_FULL, 7_000, 1)
        assert (row.saved_micros, row.cache_hits, row.over_estimate_commits) == (5_000, 1, 1)
        assert (row.usage.input_tokens, row.usage.output_tokens, row.usage.cached_input_tokens) == (200, 150, 50)
        assert usage.total.cost_micros == 7_000 and usage.total.tenant == ""
        view = await stub.GetBudget(budget_pb2.GetBudgetRequest(scope=TENANT))
        assert view.policy.soft_threshold == pytest.approx(0.8)
        assert view.policy.limits[0].cost_micros == 10_000 and not view.policy.limits[0].HasField("tokens")
        assert (view.headroom[0].spent_micros, view.headroom[0].reserved_micros) == (7_000, 0)
        missing = await stub.GetBudget(budget_pb2.GetBudgetRequest(scope=TEAM))
        assert not missing.HasField("policy") and not missing.headroom


async def test_hard_stop_is_resource_exhausted_with_quota_failure_and_retry_info(target: str) -> None:
    async with client(target) as stub:
        await set_limit(stub, TEAM, budget_pb2.WINDOW_DAY, 1_000)
        await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="a", attribution=attribution(), estimated_cost_micros=800)
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Reserve(
                budget_pb2.ReserveRequest(request_id="b", attribution=attribution(), estimated_cost_micros=300)
            )
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        d = details(exc.value)
        info = d["ErrorInfo"]
        assert (info.domain, info.reason) == ("costmesh.budget", "BUDGET_EXCEEDED")
        assert info.metadata["scope"] == "tenant:acme/team:search" and info.metadata["reserved"] == "800"
        (v,) = d["QuotaFailure"].violations
        assert v.subject == "tenant:acme/team:search/day/cost_micros"
        assert "limit 1000" in v.description and "reserved 800" in v.description
        delay = d["RetryInfo"].retry_delay
        assert 0 < delay.seconds <= 86_400


async def test_bad_input_is_invalid_argument_with_field_violations(target: str) -> None:
    async with client(target) as stub:
        await set_limit(stub, TENANT, budget_pb2.WINDOW_DAY, 1_000)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Reserve(
                budget_pb2.ReserveRequest(
                    request_id="x" * 200,
                    attribution=common_pb2.Attribution(team="t" * 100),
                    estimated_cost_micros=-1,
                    tier=9,
                )
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = {v.field for v in details(exc.value)["BadRequest"].field_violations}
        assert fields == {"request_id", "attribution.tenant", "attribution.team", "estimated_cost_micros", "tier"}
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.SetBudget(
                budget_pb2.SetBudgetRequest(
                    policy=budget_pb2.BudgetPolicy(
                        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_GLOBAL, tenant="acme"),
                        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_DAY, cost_micros=-3)],
                        soft_threshold=2.0,
                    )
                )
            )
        fields = {v.field for v in details(exc.value)["BadRequest"].field_violations}
        assert fields == {"policy.scope.tenant", "policy.limits[0].cost_micros", "policy.soft_threshold"}
        # Unknown and foreign reservation ids are NOT_FOUND; the ledger is unchanged.
        r = await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="mine", attribution=attribution(), estimated_cost_micros=400)
        )
        for req in (
            budget_pb2.CommitRequest(reservation_id=r.reservation_id, tenant="globex", actual_cost_micros=400),
            budget_pb2.CommitRequest(reservation_id="res_nope", tenant="acme", actual_cost_micros=400),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Commit(req)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            assert details(exc.value)["ErrorInfo"].reason == "RESERVATION_NOT_FOUND"
        view = await stub.GetBudget(budget_pb2.GetBudgetRequest(scope=TENANT))
        assert (view.headroom[0].spent_micros, view.headroom[0].reserved_micros) == (0, 400)
        assert not (await stub.GetUsage(budget_pb2.GetUsageRequest())).rows


def saving(
    request_id: str, saved: int = 100, tenant: str = "", team: str = "search"
) -> budget_pb2.RecordSavingsRequest:
    return budget_pb2.RecordSavingsRequest(
        request_id=request_id,
        attribution=attribution(tenant, team),
        saved_micros=saved,
        reason=budget_pb2.SAVINGS_REASON_CACHE_HIT,
        model="full-model",
        tier=common_pb2.TIER_FULL,
    )


async def savings_total(stub: Stub) -> tuple[int, int]:
    total = (await stub.GetUsage(budget_pb2.GetUsageRequest())).total
    return total.saved_micros, total.cache_hits


async def test_record_savings_batch_over_the_wire(target: str) -> None:
    async with client(target) as stub:
        assert not (await stub.RecordSavings(saving("hit-0", 700, "acme"))).replayed
        batch = budget_pb2.RecordSavingsBatchRequest(
            tenant="acme",
            records=[saving("hit-1", 1_000), saving("hit-0", 700, "acme"), saving("hit-2", 300, team="ads")],
        )
        assert list((await stub.RecordSavingsBatch(batch)).replayed) == [False, True, False]
        usage = await stub.GetUsage(budget_pb2.GetUsageRequest(tenant="acme", group_by=[budget_pb2.GROUP_BY_TEAM]))
        assert {r.team: (r.saved_micros, r.cache_hits) for r in usage.rows} == {"search": (1_700, 2), "ads": (300, 1)}
        assert (usage.total.saved_micros, usage.total.cache_hits) == (2_000, 3)
        # Idempotent per record: the same batch again replays every record and adds nothing.
        assert list((await stub.RecordSavingsBatch(batch)).replayed) == [True, True, True]
        # The batch's tenant may come from metadata, like Commit's.
        md = (("x-costmesh-tenant", "acme"),)
        again = await stub.RecordSavingsBatch(
            budget_pb2.RecordSavingsBatchRequest(records=[saving("hit-3")]), metadata=md
        )
        assert list(again.replayed) == [False]
        assert await savings_total(stub) == (2_100, 4)


async def test_a_bad_savings_batch_is_invalid_argument_and_records_nothing(target: str) -> None:
    def batch(*records: budget_pb2.RecordSavingsRequest) -> budget_pb2.RecordSavingsBatchRequest:
        return budget_pb2.RecordSavingsBatchRequest(tenant="acme", records=records)

    cases = [
        (batch(), {"records"}),
        (batch(*(saving(f"h{i}") for i in range(1_001))), {"records"}),
        (batch(saving("a"), saving("b", tenant="globex")), {"records[1].attribution.tenant"}),
        (batch(saving("a", -1), saving("b")), {"records[0].saved_micros"}),
        (
            batch(saving("a", -1), saving("a", tenant="globex")),
            {"records[0].saved_micros", "records[1].attribution.tenant"},
        ),
        (budget_pb2.RecordSavingsBatchRequest(records=[saving("a")]), {"tenant", "records[0].attribution.tenant"}),
    ]
    async with client(target) as stub:
        for request, fields in cases:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.RecordSavingsBatch(request)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            violations = details(exc.value)["BadRequest"].field_violations
            assert {v.field for v in violations} == fields, request.records[:2]
        # The single RPC keeps its plain field paths.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.RecordSavings(saving("a", -1, "acme"))
        assert {v.field for v in details(exc.value)["BadRequest"].field_violations} == {"saved_micros"}
        # All or nothing: no rejected batch recorded anything, not even its good records' ids.
        assert await savings_total(stub) == (0, 0)
        good = await stub.RecordSavingsBatch(batch(saving("a"), saving("b")))
        assert list(good.replayed) == [False, False]
        assert await savings_total(stub) == (200, 2)
        # A request id repeated within a batch is no error: it counts once, its later records replay.
        repeated = await stub.RecordSavingsBatch(batch(saving("c"), saving("c", 999), saving("a")))
        assert list(repeated.replayed) == [False, True, True]
        assert await savings_total(stub) == (300, 3)


async def test_renew_and_late_commits_over_the_wire(target: str) -> None:
    md = (("x-costmesh-tenant", "acme"),)
    async with client(target) as stub:
        await set_limit(stub, TENANT, budget_pb2.WINDOW_DAY, 10_000)
        r = await stub.Reserve(
            budget_pb2.ReserveRequest(
                request_id="long", attribution=attribution(), estimated_cost_micros=4_000, ttl_seconds=60
            )
        )
        renewed = await stub.RenewReservation(
            budget_pb2.RenewReservationRequest(reservation_id=r.reservation_id, tenant="acme", ttl_seconds=600)
        )
        assert renewed.expires_unix_ms >= r.expires_unix_ms + 500_000
        # The tenant may come from metadata; ttl 0 is the default (300 s), which never shortens it.
        again = await stub.RenewReservation(
            budget_pb2.RenewReservationRequest(reservation_id=r.reservation_id), metadata=md
        )
        assert again.expires_unix_ms == renewed.expires_unix_ms
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.RenewReservation(
                budget_pb2.RenewReservationRequest(reservation_id=r.reservation_id, tenant="globex")
            )
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(exc.value)["ErrorInfo"].reason == "RESERVATION_NOT_FOUND"
        # Released: renewing it is FAILED_PRECONDITION; committing it is late, charged in full and counted.
        await stub.Release(budget_pb2.ReleaseRequest(reservation_id=r.reservation_id, tenant="acme"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.RenewReservation(
                budget_pb2.RenewReservationRequest(reservation_id=r.reservation_id, tenant="acme")
            )
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = details(exc.value)["ErrorInfo"]
        assert (info.domain, info.reason) == ("costmesh.budget", "RESERVATION_SETTLED")
        # The request id of a released reservation is admitted afresh.
        fresh = await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="long", attribution=attribution(), estimated_cost_micros=4_000)
        )
        assert not fresh.replayed and fresh.reservation_id != r.reservation_id
        assert fresh.state == budget_pb2.RESERVATION_STATE_HELD
        commit = budget_pb2.CommitRequest(reservation_id=r.reservation_id, tenant="acme", actual_cost_micros=3_000)
        late = await stub.Commit(commit)
        assert (late.charged_micros, late.late, late.replayed) == (3_000, True, False)
        replay = await stub.Commit(commit)
        assert (replay.charged_micros, replay.late, replay.replayed) == (3_000, True, True)
        usage = await stub.GetUsage(budget_pb2.GetUsageRequest(tenant="acme"))
        assert (usage.total.cost_micros, usage.total.late_commits, usage.total.requests) == (3_000, 1, 1)
        view = await stub.GetBudget(budget_pb2.GetBudgetRequest(scope=TENANT))
        assert (view.headroom[0].spent_micros, view.headroom[0].reserved_micros) == (3_000, 4_000)


@pytest.mark.redis
async def test_redis_down_fails_closed_and_open_when_configured(tmp_path: Path) -> None:
    server = RedisServer()
    server.start()
    try:
        closed = settings("redis", tmp_path, server.url)
        opened = settings("redis", tmp_path, server.url, fail_open=True)
        async with running(closed) as t_closed, running(opened) as t_open:
            async with client(t_closed) as stub:
                await set_limit(stub, TENANT, budget_pb2.WINDOW_DAY, 1_000)
                ok = await stub.Reserve(
                    budget_pb2.ReserveRequest(request_id="up", attribution=attribution(), estimated_cost_micros=10)
                )
                assert ok.reservation_id.startswith("res_")
            server.stop()
            async with client(t_closed) as stub:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.Reserve(
                        budget_pb2.ReserveRequest(request_id="down", attribution=attribution(), estimated_cost_micros=1)
                    )
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                d = details(exc.value)
                assert d["ErrorInfo"].reason == "STORE_UNAVAILABLE" and "RetryInfo" in d
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.Commit(
                        budget_pb2.CommitRequest(reservation_id=ok.reservation_id, tenant="acme", actual_cost_micros=1)
                    )
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            async with client(t_open) as stub:
                r = await stub.Reserve(
                    budget_pb2.ReserveRequest(request_id="down", attribution=attribution(), estimated_cost_micros=1)
                )
                assert r.reservation_id.startswith("open_") and not r.headroom
                c = await stub.Commit(
                    budget_pb2.CommitRequest(reservation_id=r.reservation_id, tenant="acme", actual_cost_micros=1)
                )
                assert c.charged_micros == 1
            server.start()  # same port (the test server keeps no data): the service recovers without a restart
            async with client(t_closed) as stub:
                again = await stub.Reserve(
                    budget_pb2.ReserveRequest(request_id="back", attribution=attribution(), estimated_cost_micros=1)
                )
                assert again.reservation_id.startswith("res_")
    finally:
        server.stop()


@pytest.mark.redis
async def test_a_hung_redis_fails_closed_within_one_store_timeout(tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP: its sockets stay open) costs one ``redis_timeout_s``, not one per retry:
    the budget must answer UNAVAILABLE well inside the router's deadline on it (2 s), or the router would see its own
    deadline pass and the caller a DEADLINE_EXCEEDED instead of a retryable UNAVAILABLE."""
    server = RedisServer()
    server.start()
    assert server.proc is not None
    try:
        async with running(settings("redis", tmp_path, server.url)) as t, client(t) as stub:
            await set_limit(stub, TENANT, budget_pb2.WINDOW_DAY, 1_000)
            server.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.Reserve(
                        budget_pb2.ReserveRequest(
                            request_id="hung", attribution=attribution(), estimated_cost_micros=1
                        ),
                        timeout=10,
                    )
                took = time.monotonic() - started
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details(exc.value)["ErrorInfo"].reason == "STORE_UNAVAILABLE"
            assert took < 2 * 0.5, f"{took:.2f} s: the timeout was retried"  # redis_timeout_s = 0.5
            back = await stub.Reserve(
                budget_pb2.ReserveRequest(request_id="back", attribution=attribution(), estimated_cost_micros=1)
            )
            assert back.reservation_id.startswith("res_")
    finally:
        server.stop()


@pytest.mark.redis
async def test_scripts_are_reloaded_after_script_flush(tmp_path: Path, redis_url: str) -> None:
    async with running(settings("redis", tmp_path, redis_url)) as t, client(t) as stub:
        await set_limit(stub, TENANT, budget_pb2.WINDOW_DAY, 1_000)
        await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="a", attribution=attribution(), estimated_cost_micros=1)
        )
        raw = Redis.from_url(redis_url)
        try:
            await raw.script_flush()
            assert await raw.script_exists(hashlib.sha1(redis_scripts.RESERVE.encode()).hexdigest()) == [False]
        finally:
            await raw.aclose()
        r = await stub.Reserve(
            budget_pb2.ReserveRequest(request_id="b", attribution=attribution(), estimated_cost_micros=1)
        )
        assert r.headroom[0].reserved_micros == 2
        raw = Redis.from_url(redis_url)
        try:
            await raw.script_flush()
        finally:
            await raw.aclose()
        saved = await stub.RecordSavingsBatch(
            budget_pb2.RecordSavingsBatchRequest(tenant="acme", records=[saving("s1"), saving("s2")])
        )
        assert list(saved.replayed) == [False, False]


async def test_readiness_waits_for_the_store(tmp_path: Path) -> None:
    from services.budget.__main__ import build_store

    store = await build_store(settings("redis", tmp_path, "redis://127.0.0.1:1/0"))
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wait_for_store(store), timeout=0.5)
    finally:
        await store.close()


async def test_budget_cli_set_show_usage(tmp_path: Path) -> None:
    runner = CliRunner()
    async with running(settings("sqlite", tmp_path)) as t:
        out = await asyncio.to_thread(
            runner.invoke,
            budget_cli,
            [
                "set",
                "tenant:acme/team:search",
                "--month-usd",
                "12.5",
                "--day-tokens",
                "1000",
                "--rpm",
                "60",
                "--target",
                t,
            ],
        )
        assert out.exit_code == 0, out.output
        assert "tenant:acme/team:search" in out.output and "60" in out.output
        async with client(t) as stub:
            r = await stub.Reserve(
                budget_pb2.ReserveRequest(
                    request_id="a", attribution=attribution(), estimated_cost_micros=2_000_000, estimated_tokens=10
                )
            )
            await stub.Commit(
                budget_pb2.CommitRequest(
                    reservation_id=r.reservation_id,
                    tenant="acme",
                    actual_cost_micros=1_250_000,
                    model="m",
                    tier=common_pb2.TIER_CHEAP,
                    usage=common_pb2.Usage(input_tokens=7, output_tokens=3),
                )
            )
        shown = await asyncio.to_thread(runner.invoke, budget_cli, ["show", "tenant:acme/team:search", "--target", t])
        assert shown.exit_code == 0, shown.output
        month_line = next(line for line in shown.output.splitlines() if line.startswith("month"))
        assert "12.500000" in month_line and "1.250000" in month_line and "11.250000" in month_line
        as_json = await asyncio.to_thread(
            runner.invoke, budget_cli, ["show", "tenant:acme/team:search", "--json", "--target", t]
        )
        data = json.loads(as_json.output)
        assert data["policy"]["limits"] == [
            {"window": "WINDOW_DAY", "tokens": "1000"},
            {"window": "WINDOW_MONTH", "costMicros": "12500000"},
        ]
        used = await asyncio.to_thread(
            runner.invoke, budget_cli, ["usage", "--tenant", "acme", "--group-by", "team,tier", "--target", t]
        )
        assert used.exit_code == 0, used.output
        row = next(line for line in used.output.splitlines() if line.startswith("search"))
        assert "cheap" in row and "1.250000" in row
        assert used.output.splitlines()[0].split()[-1] == "late" and row.split()[-1] == "0"
        assert "TOTAL" in used.output
        bad = await asyncio.to_thread(
            runner.invoke, budget_cli, ["set", "tenant:acme", "--day-usd", "0.0000001", "--target", t]
        )
        assert bad.exit_code != 0
        refused = await asyncio.to_thread(
            runner.invoke, budget_cli, ["set", "tenant:no pe", "--day-usd", "1", "--target", t]
        )
        assert refused.exit_code == 2 and "INVALID_ARGUMENT" in refused.output
