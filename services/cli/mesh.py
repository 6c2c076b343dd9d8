"""The layout of a whole mesh on one machine, as ``costmesh up`` runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.cli.supervisor import ChildSpec, python_module
from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS

INFER_PORTS = {"cheap": DEFAULT_PORTS["infer"], "full": DEFAULT_PORTS["infer"] + 1}
INFER_METRICS_PORTS = {"cheap": DEFAULT_METRICS_PORTS["infer"], "full": DEFAULT_METRICS_PORTS["infer"] + 1}


@dataclass(frozen=True)
class MeshLayout:
    """Where each service of a local mesh listens and how it is configured."""

    host: str = "127.0.0.1"
    data_dir: Path = Path("var")
    models_dir: Path = Path("var/models")
    redis_url: str | None = None
    otlp_endpoint: str | None = None
    trace_sample_ratio: float | None = None
    config_file: Path | None = None
    cpu_bind: dict[str, str] = field(default_factory=lambda: {"cheap": "0", "full": "1"})
    ports: dict[str, int] = field(
        default_factory=lambda: {
            "budget": DEFAULT_PORTS["budget"],
            "cache": DEFAULT_PORTS["cache"],
            "infer-cheap": INFER_PORTS["cheap"],
            "infer-full": INFER_PORTS["full"],
            "router": DEFAULT_PORTS["router"],
        }
    )
    metrics_ports: dict[str, int] = field(
        default_factory=lambda: {
            "budget": DEFAULT_METRICS_PORTS["budget"],
            "cache": DEFAULT_METRICS_PORTS["cache"],
            "infer-cheap": INFER_METRICS_PORTS["cheap"],
            "infer-full": INFER_METRICS_PORTS["full"],
            "router": DEFAULT_METRICS_PORTS["router"],
        }
    )

    def target(self, name: str) -> str:
        return f"{self.host}:{self.ports[name]}"

    def _common(self, svc: str, name: str) -> dict[str, str]:
        prefix = f"COSTMESH_{svc.upper()}_"
        env = {f"{prefix}HOST": self.host, f"{prefix}PORT": str(self.ports[name])}
        env[f"{prefix}METRICS_PORT"] = str(self.metrics_ports[name])
        if self.otlp_endpoint:
            env[f"{prefix}OTLP_ENDPOINT"] = self.otlp_endpoint
        if self.trace_sample_ratio is not None:
            env[f"{prefix}TRACE_SAMPLE_RATIO"] = str(self.trace_sample_ratio)
        if self.redis_url:
            env[f"{prefix}REDIS_URL"] = self.redis_url
        if self.config_file is not None:
            env["COSTMESH_CONFIG"] = str(self.config_file)
        return env

    def children(self) -> list[ChildSpec]:
        data = self.data_dir
        budget = self._common("budget", "budget")
        cache = self._common("cache", "cache")
        # The bundled local models have random weights and almost never emit end-of-sequence, so nearly every
        # answer ends at max_tokens; let the cache keep those (its key includes max_tokens, so a repeat of the same
        # request gets the same answer). With real models, the service default (STOP only) is the safer choice.
        cache["COSTMESH_CACHE_POLICY__STORE_FINISH_REASONS"] = '["STOP", "LENGTH"]'
        if self.redis_url:
            budget["COSTMESH_BUDGET_STORE"] = "redis"
            cache["COSTMESH_CACHE_STORE"] = "redis"
        else:
            budget["COSTMESH_BUDGET_SQLITE_PATH"] = str(data / "budget.sqlite3")
        specs = [
            ChildSpec("budget", python_module("services.budget"), budget),
            ChildSpec("cache", python_module("services.cache"), cache),
        ]
        for tier in ("cheap", "full"):
            name = f"infer-{tier}"
            env = self._common("infer", name)
            env.update(
                {
                    "COSTMESH_INFER_TIER": tier,
                    "COSTMESH_INFER_MODEL_DIR": str(self.models_dir / tier),
                    "COSTMESH_INFER_JOB_STORE": "redis" if self.redis_url else "sqlite",
                    "COSTMESH_INFER_SQLITE_PATH": str(data / f"jobs-{tier}.sqlite3"),
                    # vLLM's CPU engine pins its threads to core 0 by default; on one machine give each tier its
                    # own core so the two engines do not share one.
                    "VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind[tier],
                }
            )
            specs.append(ChildSpec(name, python_module("services.infer"), env))
        router = self._common("router", "router")
        router.update(
            {
                "COSTMESH_ROUTER_BUDGET_TARGET": self.target("budget"),
                "COSTMESH_ROUTER_CACHE_TARGET": self.target("cache"),
                "COSTMESH_ROUTER_INFER_TARGETS__CHEAP": self.target("infer-cheap"),
                "COSTMESH_ROUTER_INFER_TARGETS__FULL": self.target("infer-full"),
                "COSTMESH_ROUTER_TOKENIZER_DIRS__CHEAP": str(self.models_dir / "cheap"),
                "COSTMESH_ROUTER_TOKENIZER_DIRS__FULL": str(self.models_dir / "full"),
            }
        )
        specs.append(ChildSpec("router", python_module("services.router"), router))
        return specs
