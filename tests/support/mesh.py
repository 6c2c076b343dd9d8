"""The whole mesh as separate processes for e2e tests: the same layout ``costmesh up`` uses, on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.mesh import MeshLayout
from services.common.health import wait_serving
from tests.support.procs import ROOT
from tests.support.redis_server import free_port

MODELS_DIR = ROOT / "var" / "models"


def free_layout(data_dir: Path, *, redis_url: str | None = None, otlp_endpoint: str | None = None) -> MeshLayout:
    return MeshLayout(
        data_dir=data_dir,
        models_dir=MODELS_DIR,
        redis_url=redis_url,
        otlp_endpoint=otlp_endpoint,
        ports={n: free_port() for n in ("budget", "cache", "infer-cheap", "infer-full", "router")},
        metrics_ports={n: free_port() for n in ("budget", "cache", "infer-cheap", "infer-full", "router")},
    )


@dataclass
class Mesh:
    layout: MeshLayout
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
                self.procs[name] = subprocess.Popen(
                    list(spec.argv), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )

    async def wait_serving(self, *names: str, timeout_s: float = 240.0) -> None:
        await asyncio.gather(*(wait_serving(self.layout.target(n), timeout_s=timeout_s) for n in names or self.procs))

    def log(self, name: str) -> str:
        return self.logs[name].read_text(encoding="utf-8", errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(60)

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
