"""A secured costmesh stack as real processes, shared by the security and fuzzing tests of one pytest session.

Budget (SQLite), cache (memory), router and one cheap vLLM worker, each ``python -m services.<svc>`` with the
credentials of ``costmesh certs dev``: mTLS on every port (client certificates required), API keys on every RPC,
and a plaintext health-only port used for readiness. The router calls the others over mTLS with its service key;
both tiers' traffic goes to the one cheap worker (the full tier is not configured, so requests pinned to it get
UNAVAILABLE and unpinned ones escalate to cheap).

The worker is started on first use (engine start takes minutes on a loaded CPU) and everything stops at the end of
the session: every test module that uses the stack holds it through a session-scoped fixture, and the last one to
let go stops it.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.cli.certs import DevCredentials, write_dev_credentials
from services.common.health import wait_serving
from services.infer.models import ensure_local_models
from tests.support.procs import ROOT, ServiceProcess
from tests.support.redis_server import free_port

MODELS = ROOT / "var" / "models"
TENANTS = ("acme", "globex", "fuzz", "ratelimited", "single")
#: Router limits of the stack: tight ones on two tenants so the limit tests need no other router.
ROUTER_LIMITS = {
    "default": {"max_concurrent": 64},
    "tenants": {
        "ratelimited": {"max_concurrent": 0, "requests_per_s": 0.5, "burst": 2},
        "single": {"max_concurrent": 1},
    },
}
MAX_TOKENS_LIMIT = 48  # the router's and the worker's max_tokens cap: keeps every accepted generation short


@dataclass
class Stack:
    creds: DevCredentials
    root: Path
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _worker_lock: threading.Lock = field(default_factory=threading.Lock)

    def target(self, name: str) -> str:
        return self.procs[name].target

    def health_target(self, name: str) -> str:
        return f"127.0.0.1:{self.health_ports[name]}"

    def credentials(self) -> grpc.ChannelCredentials:
        """mTLS with the dev client certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.creds.ca.read_bytes(),
            private_key=self.creds.client_key.read_bytes(),
            certificate_chain=self.creds.client_cert.read_bytes(),
        )

    def channel(self, name: str) -> grpc.Channel:
        """A shared blocking mTLS channel to one service (for the hypothesis tests)."""
        if name not in self._channels:
            self._channels[name] = grpc.secure_channel(
                self.target(name), self.credentials(), options=[("grpc.max_send_message_length", 64 << 20)]
            )
        return self._channels[name]

    def aio_channel(self, name: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.target(name), self.credentials())

    def key(self, who: str) -> str:
        if who == "admin":
            return self.creds.admin_key
        if who == "router":
            return self.creds.service_key
        return self.creds.tenant_keys[who]

    def md(self, who: str | None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        """Call metadata presenting ``who``'s key (none for ``None``)."""
        auth = (("authorization", f"Bearer {self.key(who)}"),) if who else ()
        return (*auth, *extra)

    def log(self, name: str) -> str:
        return self.procs[name].log()

    def _start(self, name: str, module: str, env: dict[str, str], port: int | None = None) -> None:
        svc = module.rsplit(".", 1)[-1].upper()
        health = free_port()
        self.health_ports[name] = health
        full_env = {
            "COSTMESH_CONFIG": str(self.creds.config),
            f"COSTMESH_{svc}_HEALTH_PORT": str(health),
            f"COSTMESH_{svc}_GRACE_PERIOD_S": "1",
            **env,
        }
        proc = ServiceProcess(module, env=full_env) if port is None else ServiceProcess(module, env=full_env, port=port)
        self.procs[name] = proc.start()

    async def wait(self, names: Sequence[str], timeout_s: float) -> None:
        try:
            await asyncio.gather(*(wait_serving(self.health_target(n), timeout_s=timeout_s) for n in names))
        except TimeoutError as err:
            logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in names)
            raise RuntimeError(f"stack did not start: {err}\n{logs}") from err

    def start(self) -> None:
        worker_port = free_port()
        self.procs["infer"] = ServiceProcess("services.infer", port=worker_port)  # started by ensure_worker()
        self._start("budget", "services.budget", {"COSTMESH_BUDGET_SQLITE_PATH": str(self.root / "budget.sqlite3")})
        self._start("cache", "services.cache", {"COSTMESH_CACHE_STORE": "memory"})
        self._start(
            "router",
            "services.router",
            {
                "COSTMESH_ROUTER_BUDGET_TARGET": self.target("budget"),
                "COSTMESH_ROUTER_CACHE_TARGET": self.target("cache"),
                "COSTMESH_ROUTER_INFER_TARGETS": json.dumps({"cheap": f"127.0.0.1:{worker_port}"}),
                "COSTMESH_ROUTER_INFER_TIMEOUT_S": "60",
                "COSTMESH_ROUTER_MAX_TOKENS_LIMIT": str(MAX_TOKENS_LIMIT),
                "COSTMESH_ROUTER_DEFAULT_MAX_TOKENS": "8",
                "COSTMESH_ROUTER_CACHE_WAIT_MS": "2000",
                "COSTMESH_ROUTER_LIMITS": json.dumps(ROUTER_LIMITS),
                "COSTMESH_ROUTER_TOKENIZER_DIRS": json.dumps(
                    {"cheap": str(MODELS / "cheap"), "full": str(MODELS / "full")}
                ),
            },
        )
        asyncio.run(self.wait(("budget", "cache", "router"), timeout_s=120))

    def ensure_worker(self, timeout_s: float = 900) -> None:
        """Start the worker on first use and wait until its engine is warm."""
        with self._worker_lock:
            proc = self.procs["infer"]
            if proc.alive():
                return
            if proc.proc is not None:
                raise RuntimeError(f"the shared worker died:\n{proc.log()[-4000:]}")
            ensure_local_models(MODELS)
            port = proc.port
            del self.procs["infer"]
            self._start(
                "infer",
                "services.infer",
                {
                    "COSTMESH_INFER_TIER": "cheap",
                    "COSTMESH_INFER_MODEL_DIR": str(MODELS / "cheap"),
                    "COSTMESH_INFER_SQLITE_PATH": str(self.root / "jobs.sqlite3"),
                    "COSTMESH_INFER_MAX_MODEL_LEN": "1024",
                    "COSTMESH_INFER_MAX_NUM_SEQS": "16",
                    "COSTMESH_INFER_MAX_OUTPUT_TOKENS": str(MAX_TOKENS_LIMIT),
                    "COSTMESH_INFER_DEFAULT_MAX_TOKENS": "8",
                    "COSTMESH_INFER_KV_CACHE_GIB": "1",
                    "COSTMESH_INFER_JOB_POLL_S": "0.1",
                },
                port=port,
            )
            asyncio.run(self.wait(("infer",), timeout_s=timeout_s))

    def alive(self) -> dict[str, bool]:
        return {name: p.alive() for name, p in self.procs.items() if p.proc is not None}

    def stop(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        for proc in self.procs.values():
            if proc.alive():
                try:
                    proc.terminate(timeout_s=30)
                except Exception:  # noqa: BLE001 - stop the rest whatever happens
                    proc.kill()


_lock = threading.Lock()
_stack: Stack | None = None
_users = 0


def _stop_at_exit() -> None:
    if _stack is not None:
        _stack.stop()


@contextmanager
def shared_stack() -> Iterator[Stack]:
    """The session's stack (started by the first user, stopped when the last one lets go)."""
    global _stack, _users
    with _lock:
        if _stack is None:
            root = Path(tempfile.mkdtemp(prefix="costmesh-stack-"))
            creds = write_dev_credentials(root / "certs", tenants=TENANTS)
            stack = Stack(creds=creds, root=root)
            atexit.register(_stop_at_exit)
            try:
                stack.start()
            except BaseException:
                stack.stop()
                raise
            _stack = stack
        _users += 1
        current = _stack
    try:
        yield current
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _stack is not None:
                _stack.stop()
                _stack = None
