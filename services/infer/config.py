"""Settings of one inference worker: ``COSTMESH_INFER_<FIELD>`` env vars or the ``infer:`` section of the YAML file.

A worker serves one model tier on one vLLM ``AsyncLLM``. Engine settings pass straight through to vLLM's
``AsyncEngineArgs``; the queue settings shape how interactive and async traffic share that engine:

* interactive requests enter the engine at once (priority 0) up to ``interactive_max_concurrency``; beyond that they
  wait at most ``interactive_max_wait_s`` in a line of at most ``interactive_max_waiting`` before RESOURCE_EXHAUSTED;
* async requests (durable jobs and ``Generate`` with ``QUEUE_CLASS_ASYNC``) run at priority 1, and only while the
  requests this worker has in the engine stay below ``max_num_seqs - interactive_reserve`` and the async ones below
  ``async_max_concurrency``; at most ``async_queue_capacity`` wait (else RESOURCE_EXHAUSTED with RetryInfo), at most
  ``async_max_wait_s`` each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.common.pricing import PriceTable
from services.common.settings import DEFAULT_PORTS, ServiceSettings, service_settings_config

TierName = Literal["cheap", "full"]


class InferSettings(ServiceSettings):
    model_config = service_settings_config("infer")

    port: int = Field(
        default=DEFAULT_PORTS["infer"], ge=0, le=65535, description="gRPC port (cheap 50054, full 50055)."
    )

    # --- model and engine (passed through to vLLM) ---
    tier: TierName = Field(
        default="cheap", description="Tier this worker serves; requests naming another tier are rejected."
    )
    model_dir: Path | None = Field(default=None, description="Hugging Face model directory; None = var/models/<tier>.")
    served_model_name: str | None = Field(
        default=None, description="Name reported in ListModels/usage; default: dir name."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weights/activations. 'auto': the model's own dtype on GPUs; on CPUs bfloat16 where the CPU "
        "computes it natively (AVX512-BF16 or AMX), else float32 (on AVX2-only CPUs bfloat16 ran 3.5x slower).",
    )
    max_model_len: int = Field(default=2048, ge=16, description="Longest prompt + output in tokens.")
    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences the engine batches at once.")
    max_num_batched_tokens: int | None = Field(default=None, ge=16, description="Tokens per engine step; vLLM default.")
    kv_cache_gib: int = Field(
        default=1,
        ge=1,
        description="CPU only: KV cache size in whole GiB (vLLM's VLLM_CPU_KVCACHE_SPACE); GPUs size it from "
        "gpu_memory_utilization instead.",
    )
    block_size: int | None = Field(
        default=32,
        ge=1,
        description=(
            "KV block size in tokens; prefix caching reuses whole blocks. vLLM's CPU default is 128, which leaves up "
            "to 127 shared prompt tokens uncached; 32 is the smallest size the CPU kernels run at full speed. "
            "None = vLLM's default."
        ),
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV blocks of shared prompt prefixes (keep on)."
    )
    prefix_cache_per_tenant: bool = Field(
        default=True,
        description="Salt the prefix cache with the tenant, so one tenant's prompts never hit another's cache.",
    )
    enforce_eager: bool = Field(default=True, description="No torch.compile / CUDA graphs: fast start (CPU, tests).")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per worker (vLLM tensor parallelism); CPU: 1.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="GPU only: share of GPU memory vLLM may use."
    )
    seed: int = Field(default=0, description="Engine seed (sampling without a request seed).")
    warmup_timeout_s: float = Field(default=600, gt=0, description="Longest engine start + warm-up before giving up.")
    health_poll_s: float = Field(default=1.0, gt=0, description="How often the engine's liveness is checked.")

    # --- request limits ---
    max_output_tokens: int = Field(default=1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens when a request leaves it 0.")
    max_prompt_chars: int = Field(default=200_000, ge=1, description="Longest prompt text accepted before tokenizing.")

    # --- interactive class ---
    interactive_max_concurrency: int | None = Field(
        default=None, ge=1, description="Most interactive requests in the engine at once; None = max_num_seqs."
    )
    interactive_max_waiting: int = Field(default=64, ge=0, description="Most interactive requests waiting for a slot.")
    interactive_max_wait_s: float = Field(
        default=5.0, ge=0, description="Longest an interactive request waits for a slot."
    )
    interactive_priority: int = Field(
        default=0, description="vLLM priority of interactive requests (lower runs first)."
    )

    # --- async class ---
    interactive_reserve: int = Field(
        default=8,
        ge=0,
        description="Engine sequences kept free for interactive work; async runs only beyond this reserve.",
    )
    async_max_concurrency: int | None = Field(
        default=None, ge=1, description="Most async requests in the engine at once; None = max_num_seqs - reserve."
    )
    async_queue_capacity: int = Field(
        default=1000,
        ge=1,
        description="Most async jobs queued (and most streamed async requests waiting) per worker tier.",
    )
    async_max_wait_s: float = Field(
        default=3600.0,
        gt=0,
        description="Longest an async request or job may wait to start; a job claimed later than this after its "
        "submission (a takeover included) fails as expired.",
    )
    async_priority: int = Field(
        default=1, description="vLLM priority of async requests (must be > interactive_priority)."
    )

    # --- durable jobs ---
    job_store: Literal["sqlite", "redis"] = Field(default="sqlite", description="Where async jobs live.")
    sqlite_path: Path | None = Field(default=None, description="SQLite job store file; None = var/jobs-<tier>.sqlite3.")
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis job store (Streams + consumer group)."
    )
    job_queue: str | None = Field(
        default=None, description="Queue name shared by the workers of a tier; None = the tier."
    )
    worker_id: str | None = Field(default=None, description="Consumer name of this worker; None = host-pid-random.")
    job_lease_s: float = Field(
        default=30.0, gt=0, description="A job not renewed for this long is reclaimed by another."
    )
    job_max_attempts: int = Field(default=3, ge=1, description="Claims before a job that keeps killing workers fails.")
    job_poll_s: float = Field(default=0.5, gt=0, description="Idle workers look for new or orphaned jobs this often.")
    job_result_ttl_s: float = Field(default=7 * 24 * 3600, gt=0, description="Finished jobs are kept this long.")
    job_max_run_s: float = Field(
        default=600.0,
        gt=0,
        description="A job's run is stopped this long after it started; it succeeds with the text and usage so far "
        "(finish reason ABORT). A job ends at most async_max_wait_s + job_max_run_s after its submission.",
    )

    prices: PriceTable = Field(default_factory=PriceTable, description="Prices reported by ListModels.")

    @model_validator(mode="after")
    def _check(self) -> InferSettings:
        if self.interactive_reserve >= self.max_num_seqs:
            raise ValueError(
                f"interactive_reserve ({self.interactive_reserve}) must be below max_num_seqs ({self.max_num_seqs})"
            )
        if self.interactive_max_concurrency is not None and self.interactive_max_concurrency > self.max_num_seqs:
            raise ValueError("interactive_max_concurrency cannot exceed max_num_seqs")
        if self.async_max_concurrency is not None and self.async_max_concurrency > self.async_slots:
            raise ValueError(
                f"async_max_concurrency ({self.async_max_concurrency}) cannot exceed max_num_seqs - interactive_reserve"
                f" ({self.async_slots})"
            )
        if self.async_priority <= self.interactive_priority:
            raise ValueError("async_priority must be greater (= runs later) than interactive_priority")
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError("default_max_tokens cannot exceed max_output_tokens")
        if self.max_output_tokens >= self.max_model_len:
            raise ValueError("max_output_tokens must leave room for a prompt below max_model_len")
        return self

    @property
    def async_slots(self) -> int:
        return self.max_num_seqs - self.interactive_reserve

    @property
    def model_path(self) -> Path:
        return self.model_dir if self.model_dir is not None else Path("var/models") / self.tier

    @property
    def sqlite_file(self) -> Path:
        return self.sqlite_path if self.sqlite_path is not None else Path("var") / f"jobs-{self.tier}.sqlite3"

    @property
    def model_name(self) -> str:
        from services.infer.models import model_display_name

        return self.served_model_name or model_display_name(self.model_path)

    @property
    def interactive_slots(self) -> int:
        return self.interactive_max_concurrency or self.max_num_seqs

    @property
    def async_concurrency(self) -> int:
        return self.async_max_concurrency or self.async_slots

    @property
    def queue_name(self) -> str:
        return self.job_queue or self.tier
