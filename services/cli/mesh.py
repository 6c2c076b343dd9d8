"""The layout of a whole mesh on one machine, as ``costmesh up`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.supervisor import ChildSpec, python_module
from services.common.health import wait_serving
from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from services.router.config import DEFAULT_HTTP_PORT

INFER_PORTS = {"cheap": DEFAULT_PORTS["infer"], "full": DEFAULT_PORTS["infer"] + 1}
INFER_METRICS_PORTS = {"cheap": DEFAULT_METRICS_PORTS["infer"], "full": DEFAULT_METRICS_PORTS["infer"] + 1}


#: CPU niceness of the inference workers when the whole mesh shares one machine (``costmesh up``, tests, benches).
INFER_NICE = 5


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

    #: The router's OpenAI-compatible HTTP front door.
    http_port: int = DEFAULT_HTTP_PORT

    def target(self, name: str) -> str:
        return f"{self.host}:{self.ports[name]}"

    @property
    def http_base_url(self) -> str:
        """What an OpenAI SDK's ``base_url`` points at."""
        return f"http://{self.host}:{self.http_port}/v1"

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
            # One machine for everything: the engines run at a lower CPU priority. The control plane (router, cache,
            # budget) needs little CPU but must answer in milliseconds; starved by two busy engines, a Reserve took
            # seconds under load (bench/mesh.py at c=32). The engines get every cycle the control plane leaves.
            argv = ["nice", "-n", str(INFER_NICE), *python_module("services.infer")]
            specs.append(ChildSpec(name, argv, env))
        router = self._common("router", "router")
        router.update(
            {
                "COSTMESH_ROUTER_BUDGET_TARGET": self.target("budget"),
                "COSTMESH_ROUTER_CACHE_TARGET": self.target("cache"),
                "COSTMESH_ROUTER_INFER_TARGETS__CHEAP": self.target("infer-cheap"),
                "COSTMESH_ROUTER_INFER_TARGETS__FULL": self.target("infer-full"),
                "COSTMESH_ROUTER_TOKENIZER_DIRS__CHEAP": str(self.models_dir / "cheap"),
                "COSTMESH_ROUTER_TOKENIZER_DIRS__FULL": str(self.models_dir / "full"),
                "COSTMESH_ROUTER_HTTP__PORT": str(self.http_port),
            }
        )
        specs.append(ChildSpec("router", python_module("services.router"), router))
        return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NAMES = ("budget", "cache", "infer-cheap", "infer-full", "router")


def free_layout(
    data_dir: Path, *, models_dir: Path, redis_url: str | None = None, otlp_endpoint: str | None = None
) -> MeshLayout:
    """A layout on free loopback ports (tests and benchmarks run beside whatever else is listening)."""
    return MeshLayout(
        data_dir=data_dir,
        models_dir=models_dir,
        redis_url=redis_url,
        otlp_endpoint=otlp_endpoint,
        ports={n: free_port() for n in NAMES},
        metrics_ports={n: free_port() for n in NAMES},
        http_port=free_port(),
    )


@dataclass
class LocalMesh:
    """The mesh's processes started directly (no supervisor), each logging to its own file; for tests and benches."""

    layout: MeshLayout
    cwd: Path = Path()
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, *names: str) -> None:
        specs = {s.name: s for s in self.layout.children()}
        for name in names or tuple(specs):
            spec = specs[name]
            log = Path(tempfile.mkstemp(prefix=f"costmesh-{name}-", suffix=".log")[1])
            self.logs[name] = log
            env = {**os.environ, **spec.env, **self.extra_env.get(name, {}), "PYTHONUNBUFFERED": "1"}
            with log.open("ab") as out:
                # Each service leads its own process group, so a kill also reaches its children (vLLM's engine core).
                self.procs[name] = subprocess.Popen(
                    list(spec.argv), cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )

    async def wait_serving(self, *names: str, timeout_s: float = 240.0) -> None:
        await asyncio.gather(*(wait_serving(self.layout.target(n), timeout_s=timeout_s) for n in names or self.procs))

    def log(self, name: str) -> str:
        return self.logs[name].read_text(encoding="utf-8", errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a service and, for SIGKILL, every process of its group (a crash leaves no orphans behind)."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(60)
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the service left behind
