"""Settings of the router: ``COSTMESH_ROUTER_<FIELD>`` (nested with ``__``) or the ``router:`` YAML section."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.common.pricing import PriceTable
from services.common.settings import DEFAULT_PORTS, ServiceSettings, service_settings_config
from services.router.classifier.settings import RoutingSettings
from services.router.limits import LimitSettings

DEFAULT_HTTP_PORT = 8080


class HttpSettings(BaseModel):
    """The OpenAI-compatible HTTP front door (``services/router/http.py``): ``COSTMESH_ROUTER_HTTP__<FIELD>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="Serve POST /v1/chat/completions and GET /v1/models beside gRPC.")
    host: str | None = Field(
        None, description="Interface it binds; unset = the router's host (beyond loopback it needs auth.enabled)."
    )
    port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535, description="HTTP port; 0 picks a free one (tests).")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest request body (413 beyond it).")
    timeout_s: float = Field(
        300.0, gt=0, description="Deadline of a request without x-costmesh-timeout-ms (504 once it passes)."
    )
    max_timeout_s: float = Field(900.0, gt=0, description="Largest deadline a client may ask for.")


class RouterSettings(ServiceSettings):
    model_config = service_settings_config("router")

    port: int = Field(DEFAULT_PORTS["router"], ge=0, le=65535, description="gRPC port.")

    # --- where the other services are (host:port, a comma-separated list, or dns:///name:port) ---
    cache_target: str | None = Field("127.0.0.1:50052", description="Cache service; unset = no response cache.")
    budget_target: str = Field("127.0.0.1:50053", description="Budget service.")
    infer_targets: dict[str, str] = Field(
        default_factory=lambda: {"cheap": "127.0.0.1:50054", "full": "127.0.0.1:50055"},
        description="Workers per tier; round-robin over every address a target resolves to.",
    )
    models: dict[str, str] = Field(
        default_factory=lambda: {"cheap": "costmesh-cheap", "full": "costmesh-full"},
        description="Model name each tier's workers serve (prices and cache keys use it).",
    )
    tokenizer_dirs: dict[str, Path | None] = Field(
        default_factory=lambda: dict[str, Path | None](cheap=Path("var/models/cheap"), full=Path("var/models/full")),
        description="Tokenizer directory per tier for reservation estimates; missing = conservative estimate.",
    )
    prices: PriceTable = Field(default_factory=PriceTable, description="Price table (micro-USD per 1M tokens).")

    # --- calls to the other services ---
    cache_timeout_s: float = Field(2.0, gt=0, description="Deadline of cache calls (plus the coalescing wait).")
    cache_wait_ms: int = Field(10_000, ge=0, description="Most time to wait for an identical in-flight miss.")
    # Loose on purpose: the budget fails fast by itself when its store does (redis_timeout_s), so this deadline only
    # runs out on a budget that answers late. On a loaded 2-core machine a round trip that takes milliseconds
    # sometimes took over 2 s (the soak's commits timed out at the old 2 s default); three such Reserve attempts
    # fail the request UNAVAILABLE (BUDGET_TIMEOUT) when it only had to wait.
    budget_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Deadline of each budget call; a Reserve gets 3 attempts before UNAVAILABLE BUDGET_TIMEOUT.",
    )
    infer_timeout_s: float = Field(300.0, gt=0, description="Deadline of a generation (capped by the caller's).")
    reservation_ttl_s: int = Field(
        120, ge=3, description="Reservation lifetime of interactive requests; renewed every third of it while they run."
    )
    async_reservation_ttl_s: int = Field(
        900,
        ge=3,
        description="Reservation lifetime of async jobs (at most the budget's max_ttl_s); renewed while they wait/run.",
    )
    async_settle_every_s: float = Field(
        2.0, ge=0, description="How often this router settles finished async jobs from the job stores (0 = never)."
    )
    job_timeout_s: float = Field(10.0, gt=0, description="Deadline of job calls (submit, get, list, mark settled).")
    stop_timeout_s: float = Field(
        10.0, gt=0, description="How long an abandoned generation may take to stop and report what it generated."
    )
    fail_open_budget: bool = Field(False, description="Serve without a reservation when the budget is down.")
    savings_flush_s: float = Field(
        0.05, gt=0, le=60, description="How often cache hits' savings go to the budget (services/router/savings.py)."
    )
    savings_max_batch: int = Field(128, ge=1, le=1000, description="Most savings records in one RecordSavingsBatch.")

    # --- classifier and routing policy (services/router/classifier/settings.py) ---
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings, description="Cheap-share targets, uncertainty band, feature rules."
    )

    # --- request limits ---
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of requests that leave it 0.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_messages: int = Field(256, ge=1, description="Most messages in one request.")
    max_total_chars: int = Field(1_000_000, ge=1, description="Most characters over all messages.")
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="OpenAI-compatible HTTP front door (services/router/http.py)."
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Per-tenant concurrency and rate limits (services/router/limits.py)."
    )
