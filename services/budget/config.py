"""Settings of the budget service: ``COSTMESH_BUDGET_<FIELD>`` or the ``budget:`` section of the YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServiceSettings, service_settings_config


class BudgetSettings(ServiceSettings):
    model_config = service_settings_config("budget")

    port: int = Field(DEFAULT_PORTS["budget"], ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        DEFAULT_METRICS_PORTS["budget"], ge=0, le=65535, description="Prometheus /metrics port; unset = none."
    )
    store: Literal["sqlite", "redis"] = Field("sqlite", description="'sqlite' (embedded default) or 'redis'.")
    sqlite_path: Path = Field(Path("var/budget.sqlite3"), description="SQLite file; several processes may share it.")
    sqlite_busy_timeout_ms: int = Field(5000, ge=0, description="How long a transaction waits for the write lock.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis (or one Redis Cluster node) URL.")
    redis_cluster: bool = Field(
        False, description="Redis Cluster: the global scope is settled in its own slot (see services/budget/README)."
    )
    redis_timeout_s: float = Field(1.0, gt=0, description="Socket timeout of Redis calls; past it the call fails.")
    redis_max_connections: int = Field(128, gt=0, description="Connection pool size per process.")
    fail_open: bool = Field(
        False,
        description="When the store is unreachable: False = reject with UNAVAILABLE (fail closed); True = admit "
        "without accounting (spend during the outage is only logged).",
    )
    default_ttl_s: int = Field(300, gt=0, description="Reservation TTL when a request sets none.")
    max_ttl_s: int = Field(3600, gt=0, description="Longest TTL a request may ask for.")
    retention_s: int = Field(86_400, gt=0, description="How long settled records stay for idempotent replays.")
    max_request_micros: int = Field(
        10**12, gt=0, le=10**15, description="Largest estimate or actual cost of one request (micro-USD)."
    )
    usage_minute_retention_s: int = Field(8 * 86_400, gt=0, description="Minute usage rollups kept this long.")
    usage_hour_retention_s: int = Field(400 * 86_400, gt=0, description="Hour usage rollups kept this long.")
