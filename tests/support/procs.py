"""Start costmesh services as real processes for integration and e2e tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    """``python -m services.<module>`` on a free port, with its log captured to a file."""

    module: str
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    #: The router's HTTP front door (a free port, so routers started side by side never meet on 8080).
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="costmesh-svc-", suffix=".log")[1]))

    @property
    def svc(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        prefix = f"COSTMESH_{self.svc.upper()}_"
        env = {
            **os.environ,
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}PORT": str(self.port),
            f"{prefix}METRICS_PORT": str(self.metrics_port),
            f"{prefix}LOG_FORMAT": "json",
            **({f"{prefix}HTTP__PORT": str(self.http_port)} if self.svc == "router" else {}),
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGTERM, wait; returns (exit code, seconds it took)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
