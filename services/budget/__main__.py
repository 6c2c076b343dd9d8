"""Composition root of the budget service: ``python -m services.budget`` (or ``costmesh serve budget``).

Builds the store (SQLite file by default, Redis when ``store=redis``), the ledger and the servicer, registers them
on the shared server bootstrap, reports SERVING once the store answers, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from services.budget.config import BudgetSettings
from services.budget.ledger import BudgetLedger, LedgerSettings
from services.budget.metrics import BudgetMetrics
from services.budget.redis_store import RedisBudgetStore
from services.budget.server import BudgetServicer
from services.budget.sqlite_store import SqliteBudgetStore
from services.budget.store import BudgetStore, StoreUnavailable
from services.common.rpc_telemetry import AttributionBaggageInterceptor, RpcMetricsInterceptor, host_meter
from services.common.server import ServiceHost, full_service_name, make_host

log = structlog.get_logger("costmesh.budget")


async def build_store(settings: BudgetSettings) -> SqliteBudgetStore | RedisBudgetStore:
    """The store the settings name (opened; nothing is contacted for Redis until the first call)."""
    retention = {
        "minute_retention_ms": settings.usage_minute_retention_s * 1000,
        "hour_retention_ms": settings.usage_hour_retention_s * 1000,
    }
    if settings.store == "redis":
        client: Redis | RedisCluster
        # One immediate retry on a broken connection (a pooled one may be stale after a Redis restart), then fail.
        # Not on a timeout: a hung Redis must cost one timeout, so the budget answers UNAVAILABLE well inside the
        # router's deadline on it instead of running past it.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        timeout = settings.redis_timeout_s
        if settings.redis_cluster:
            client = RedisCluster.from_url(
                settings.redis_url,
                decode_responses=False,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=retry,
                max_connections=settings.redis_max_connections,
            )
        else:
            # A blocking pool: past max_connections a call waits (up to the timeout) for a free connection instead
            # of failing with "Too many connections".
            pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_max_connections,
                timeout=timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=retry,
            )
            client = Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
        return RedisBudgetStore(
            client=client,
            cluster=settings.redis_cluster,
            retention_ms=settings.retention_s * 1000,
            **retention,
        )
    store = SqliteBudgetStore(path=settings.sqlite_path, busy_timeout_ms=settings.sqlite_busy_timeout_ms, **retention)
    await store.open()
    return store


async def wait_for_store(store: BudgetStore) -> None:
    """Readiness: SERVING only once the store answers (retries with backoff until then)."""
    delay = 0.1
    while True:
        try:
            await store.ping()
            return
        except StoreUnavailable as err:
            log.warning("budget_store_unavailable", error=str(err), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def ledger_settings(settings: BudgetSettings) -> LedgerSettings:
    return LedgerSettings(
        default_ttl_s=settings.default_ttl_s,
        max_ttl_s=settings.max_ttl_s,
        retention_s=settings.retention_s,
        max_request_micros=settings.max_request_micros,
        minute_retention_s=settings.usage_minute_retention_s,
        hour_retention_s=settings.usage_hour_retention_s,
        fail_open=settings.fail_open,
    )


async def assemble(settings: BudgetSettings, host: ServiceHost) -> BudgetStore:
    """Build the store, ledger and servicer and register them on ``host`` (tests call this with their own host)."""
    store = await build_store(settings)
    host.on_stop(store.close)
    ledger = BudgetLedger(store=store, settings=ledger_settings(settings))
    servicer = BudgetServicer(ledger=ledger, metrics=BudgetMetrics(host_meter(host, "costmesh.budget")))
    host.add_service(
        full_service_name(budget_pb2, "BudgetService"),
        lambda server: budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server),
    )
    log.info("budget_store", store=settings.store, cluster=settings.redis_cluster, fail_open=settings.fail_open)
    return store


async def serve(settings: BudgetSettings) -> None:
    rpc_metrics = RpcMetricsInterceptor()
    host = make_host("budget", settings, interceptors=[AttributionBaggageInterceptor(), rpc_metrics])
    rpc_metrics.bind(host_meter(host, "costmesh.budget"))
    store = await assemble(settings, host)
    await host.run(ready=lambda: wait_for_store(store))


def load_settings() -> BudgetSettings:
    """Settings from the environment and the YAML file (every field has a default)."""
    # cast: without the pydantic mypy plugin, mypy takes Field(<default>, ...) in the shared base for required.
    return cast(Callable[[], BudgetSettings], BudgetSettings)()


def main() -> None:
    asyncio.run(serve(load_settings()))


if __name__ == "__main__":
    main()
