"""Settings of the cache service: ``COSTMESH_CACHE_<FIELD>`` (nested with ``__``) or the ``cache:`` YAML section.

Example (YAML named by ``COSTMESH_CONFIG``)::

    cache:
      store: redis
      redis_url: redis://cache-redis:6379/0
      policy: {ttl_s: 3600, features: {support-summaries: {ttl_s: 86400}, chat: {ttl_s: 0}}}
      tenants:
        acme: {normalizer: {casefold: true, patterns: {ticket: 'TCK-\\d+'}}}
        docs-bot-a: {share_as: public-docs}     # explicit cross-tenant sharing
        docs-bot-b: {share_as: public-docs}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.cache.namespaces import TENANT_ID, TenantConfig
from services.cache.normalizer import NormalizerConfig
from services.cache.policy import CachePolicy
from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServiceSettings, service_settings_config


class CacheSettings(ServiceSettings):
    """Everything the cache service can be told; every default works on one machine."""

    model_config = service_settings_config("cache")

    port: int = Field(
        default=DEFAULT_PORTS["cache"], ge=0, le=65535, description="gRPC port; 0 picks a free one (tests)."
    )
    metrics_port: int | None = Field(default=DEFAULT_METRICS_PORTS["cache"], ge=0, le=65535)

    store: Literal["memory", "redis"] = Field(
        default="memory", description="'memory' (one replica) or 'redis' (shared)."
    )
    memory_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0, description="Byte bound of the in-process LRU.")
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis for store=redis (a dedicated instance)."
    )
    redis_prefix: str = Field(
        default="costmesh:cache", pattern=r"^[A-Za-z0-9:._-]+$", description="Prefix of every key."
    )
    redis_timeout_ms: int = Field(
        default=250, gt=0, description="Connect and command timeout; past it the cache fails open."
    )
    redis_max_connections: int = Field(default=64, gt=0)
    redis_wake: Literal["pubsub", "poll"] = Field(
        default="pubsub", description="How waiters on other replicas learn of a fill: pub/sub, or polling with backoff."
    )

    lease_ttl_ms: int = Field(default=30_000, gt=0, description="A fill lease's lifetime: past it a waiter takes over.")
    default_wait_ms: int = Field(
        default=15_000, ge=0, description="Wait for an in-flight identical miss when wait_ms=0."
    )
    max_wait_ms: int = Field(default=60_000, ge=0, description="Upper bound on a request's wait_ms.")
    breaker_base_ms: int = Field(
        default=250, gt=0, description="First cool-down after the store failed (then doubles)."
    )
    breaker_max_ms: int = Field(default=5_000, gt=0, description="Longest cool-down after repeated store failures.")

    normalizer: NormalizerConfig = Field(default_factory=NormalizerConfig, description="Default normalization.")
    policy: CachePolicy = Field(default_factory=CachePolicy, description="Default caching policy.")
    tenants: dict[str, TenantConfig] = Field(default_factory=dict, description="Per-tenant overrides and sharing.")

    @model_validator(mode="after")
    def _check(self) -> CacheSettings:
        if self.default_wait_ms > self.max_wait_ms:
            raise ValueError("default_wait_ms must not exceed max_wait_ms")
        bad = [t for t in self.tenants if not TENANT_ID.match(t)]
        if bad:
            raise ValueError(f"tenant ids must match {TENANT_ID.pattern}: {bad}")
        return self
