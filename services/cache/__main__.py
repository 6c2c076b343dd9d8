"""Composition root of the cache service: ``python -m services.cache`` (or ``costmesh serve cache``).

Builds the store (in-process LRU by default, Redis when ``store=redis``), the domain cache and the servicer,
registers them on the shared server bootstrap and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import structlog

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from services.cache.config import CacheSettings
from services.cache.memory_store import MemoryStore
from services.cache.metrics import CacheMetrics
from services.cache.namespaces import Namespaces
from services.cache.redis_store import RedisStore
from services.cache.server import CacheServicer
from services.cache.singleflight import Breaker, ResponseCache
from services.cache.store import CacheStore, StoreUnavailable
from services.common.rpc_telemetry import AttributionBaggageInterceptor, RpcMetricsInterceptor, host_meter
from services.common.server import ServiceHost, full_service_name, make_host

log = structlog.get_logger("costmesh.cache")


def build_store(settings: CacheSettings) -> CacheStore:
    if settings.store == "redis":
        return RedisStore.from_url(
            settings.redis_url,
            timeout_ms=settings.redis_timeout_ms,
            max_connections=settings.redis_max_connections,
            prefix=settings.redis_prefix,
            wake=settings.redis_wake,
        )
    return MemoryStore(max_bytes=settings.memory_max_bytes)


def build_cache(settings: CacheSettings, store: CacheStore) -> ResponseCache:
    return ResponseCache(
        store=store,
        namespaces=Namespaces(normalizer=settings.normalizer, policy=settings.policy, tenants=settings.tenants),
        lease_ttl_ms=settings.lease_ttl_ms,
        default_wait_ms=settings.default_wait_ms,
        max_wait_ms=settings.max_wait_ms,
        breaker=Breaker(base_s=settings.breaker_base_ms / 1000, max_s=settings.breaker_max_ms / 1000),
    )


async def assemble(settings: CacheSettings, host: ServiceHost, *, store: CacheStore | None = None) -> ResponseCache:
    """Build the store, cache and servicer and register them on ``host`` (tests call this with their own host)."""
    store = store or build_store(settings)
    await store.start()
    host.on_stop(store.close)
    cache = build_cache(settings, store)
    servicer = CacheServicer(
        cache=cache, metrics=CacheMetrics(host_meter(host, "costmesh.cache"), waiting=cache.waiting)
    )
    host.add_service(
        full_service_name(cache_pb2, "CacheService"),
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
    )

    async def check_store() -> None:
        # The cache fails open, so an unreachable store does not keep it from serving; say so once.
        try:
            await store.ping()
        except StoreUnavailable as exc:
            log.warning("cache_store_unavailable_at_start", store=settings.store, error=str(exc))

    await check_store()
    return cache


async def serve(settings: CacheSettings) -> None:
    rpc_metrics = RpcMetricsInterceptor()
    host = make_host("cache", settings, interceptors=[AttributionBaggageInterceptor(), rpc_metrics])
    rpc_metrics.bind(host_meter(host, "costmesh.cache"))
    await assemble(settings, host)
    await host.run()


def load_settings() -> CacheSettings:
    """Settings from the environment and the YAML file (every field has a default)."""
    # cast: without the pydantic mypy plugin, mypy takes Field(<default>, ...) in the shared base for required.
    return cast(Callable[[], CacheSettings], CacheSettings)()


def main() -> None:
    asyncio.run(serve(load_settings()))


if __name__ == "__main__":
    main()
