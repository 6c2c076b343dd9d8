"""Peers benchmark: costmesh's OpenAI-compatible HTTP front door against LiteLLM's proxy, one openai SDK client.

Starts the whole costmesh mesh (budget, cache, two vLLM CPU workers, router with its HTTP front door) on free
loopback ports, and LiteLLM's proxy — installed by this script into its own virtualenv (``var/peers/litellm-venv``,
``python -m venv`` + pip from PyPI, pinned) — serving one mock model (``mock_response``: no backend) with its local
in-memory cache on. Then, from this process, the same ``openai.AsyncOpenAI`` client code drives both, in alternating
rounds (``--rounds``), pooled per peer, so the drift of a shared machine falls on both alike:

* **hit**: ``chat.completions.create`` on prompts already in the peer's cache (16 hot prompts, warmed first);
  checked: costmesh answers ``x-costmesh-cache-hit: true``, LiteLLM sends ``x-litellm-cache-key``;
* **miss**: the same call on a unique prompt every time. Behind costmesh it is a real generation on the cheap vLLM
  worker (lookup + lease, classify, Reserve, generate, Commit, Fill); behind LiteLLM, the mock model answers at once;
* **direct** (costmesh only): the same request straight to the cheap worker (``InferenceService.Generate`` through
  the router's own worker client), i.e. the backend's own time;
* **costmesh-grpc** (reference): the same hits and misses through ``RouterService.Generate`` with a gRPC stub, so
  the table also shows what the HTTP door and the SDK client cost over the gRPC door on the same pipeline;

each at concurrency 1 and 32 (``max_tokens`` 4, temperature 0), with the CPU each side spent per answered request
(``/proc``: the peer's server processes — costmesh's router, cache and budget, not the workers — and this load
generator). **Added latency on a miss** is what the front door costs beyond its backend: costmesh's miss minus the
direct worker call (p50 − p50, p99 − p99); LiteLLM's mock model has no backend time, so its miss is all of its
overhead. Both peers run with their defaults otherwise: costmesh's router untraced with metrics on, auth off
(loopback); LiteLLM's proxy with one worker, no database, no master key (its "local development" switch), its
logging at ERROR.

    .venv/bin/python bench/peers.py [--json PATH] [--requests N] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.cli.mesh import LocalMesh, MeshLayout, free_layout, free_port
from services.common.attribution import Attribution
from services.infer.models import ensure_local_models
from services.router.classifier.types import Message, Tier
from services.router.clients import GrpcInfer
from services.router.domain import Sampling

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "var" / "models"
PEERS_DIR = ROOT / "var" / "peers"
LITELLM_VENV = PEERS_DIR / "litellm-venv"
#: Pinned, and not a 1.107 release (those were compromised on PyPI and are gone from it). Later releases need
#: proxy packages (``litellm-proxy``, newer ``litellm-proxy-extras``) that the package index here does not carry.
LITELLM = "litellm[proxy]==1.106.12"
MAX_TOKENS = 4
HOT = 16
MOCK_ANSWER = "Paris is the capital of France."


@dataclass
class Row:
    peer: str
    path: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: dict[str, int] = field(default_factory=dict)
    #: CPU milliseconds per answered request: the peer's server processes (costmesh: router + cache + budget), and
    #: this load generator (the openai SDK or the gRPC stub).
    server_cpu_ms: float = 0.0
    client_cpu_ms: float = 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is the process group; utime, stime are fields 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / tick


# ---- LiteLLM -----------------------------------------------------------------------------------------------------


def ensure_litellm() -> Path:
    """LiteLLM's proxy in its own virtualenv (its dependencies never meet costmesh's); returns its ``litellm``."""
    exe = LITELLM_VENV / "bin" / "litellm"
    stamp = LITELLM_VENV / ".installed"
    if exe.exists() and stamp.exists() and stamp.read_text() == LITELLM:
        return exe
    print(f"installing {LITELLM} into {LITELLM_VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, LITELLM], check=True)
    stamp.write_text(LITELLM)
    return exe


LITELLM_CONFIG = f"""
model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock
      api_key: mock-key
      mock_response: "{MOCK_ANSWER}"
litellm_settings:
  cache: true
  cache_params:
    type: local
  set_verbose: false
general_settings:
  # No master key, like costmesh's router on loopback with auth off: neither peer authenticates the bench.
  dangerously_permit_weak_or_unset_master_key: true
"""


def start_litellm(exe: Path, port: int, work: Path) -> subprocess.Popen[bytes]:
    config = work / "litellm.yaml"
    config.write_text(LITELLM_CONFIG)
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the price table ships with the package: nothing fetched
        "NO_DOCS": "True",
    }
    env.pop("PYTHONPATH", None)
    log = (work / "litellm.log").open("ab")
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"LiteLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up in {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- load --------------------------------------------------------------------------------------------------------


class Peer:
    """One gateway behind the same openai SDK client code: its model name, how it says "cache hit", its hot set."""

    def __init__(self, name: str, base_url: str, model: str, headers: dict[str, str], hit_header: str) -> None:
        self.name = name
        self.model = model
        self.hit_header = hit_header
        self.run = uuid.uuid4().hex[:8]
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key="bench", max_retries=0, timeout=120, default_headers=headers
        )
        self.hot = [f"hot question {k} of run {self.run}: what is {k} times {k}?" for k in range(HOT)]
        self._seq = 0

    async def ask(self, prompt: str) -> bool:
        """One chat completion; whether the peer says it came from its cache."""
        raw = await self.client.chat.completions.with_raw_response.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        raw.parse()
        return self._is_hit(raw.headers)

    def _is_hit(self, headers: httpx.Headers) -> bool:
        if self.hit_header == "x-costmesh-cache-hit":
            return headers.get(self.hit_header) == "true"
        return bool(headers.get(self.hit_header))

    async def hit(self, i: int) -> None:
        if not await self.ask(self.hot[i % HOT]):
            raise AssertionError(f"{self.name}: a hot prompt missed the cache")

    def miss_fn(self) -> Callable[[int], Awaitable[None]]:
        self._seq += 1
        tag = f"{self.run}-{self._seq}"

        async def miss(i: int) -> None:
            if await self.ask(f"miss {tag} {i}: what is {i} plus {i}?"):
                raise AssertionError(f"{self.name}: a unique prompt hit the cache")

        return miss

    async def warm(self) -> None:
        for k in range(4):
            await self.ask(f"warm-up {self.run} {k}")
        for prompt in self.hot:
            await self.ask(prompt)
        await asyncio.sleep(0.5)  # costmesh fills its cache in the background
        for prompt in self.hot:  # every hot prompt answers from the cache now
            if not await self.ask(prompt):
                raise AssertionError(f"{self.name}: warm-up did not cache {prompt!r}")

    async def close(self) -> None:
        await self.client.close()


class GrpcPeer(Peer):
    """costmesh's gRPC front door (``RouterService.Generate``) with the same requests, for reference: the two doors
    share the router's pipeline, so this row tells what the HTTP door itself costs."""

    def __init__(self, target: str, tenant: dict[str, str]) -> None:
        self.name = "costmesh-grpc"
        self.run = uuid.uuid4().hex[:8]
        self.hot = [f"hot question {k} of run {self.run}: what is {k} times {k}?" for k in range(HOT)]
        self._seq = 0
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._md = tuple(tenant.items())

    async def ask(self, prompt: str) -> bool:
        request = router_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            tier=common_pb2.TIER_CHEAP,
        )
        reply = await self._stub.Generate(request, timeout=120, metadata=self._md)
        return reply.result.cache_hit

    async def close(self) -> None:
        await self._channel.close()


class Direct:
    """The cheap worker called directly, with the router's own worker client: the backend's own time."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._infer = GrpcInfer({Tier.CHEAP: self._channel}, timeout_s=120)
        self._seq = 0

    def fn(self) -> Callable[[int], Awaitable[None]]:
        self._seq += 1
        tag = uuid.uuid4().hex[:8]

        async def direct(i: int) -> None:
            gen = self._infer.generate(
                tier=Tier.CHEAP,
                request_id=f"direct-{tag}-{i}",
                messages=(Message("user", f"miss {tag} {i}: what is {i} plus {i}?"),),
                sampling=Sampling(max_tokens=MAX_TOKENS, temperature=0.0),
                attribution=Attribution(tenant="bench"),
            )
            async for _ in gen:
                pass

        return direct

    async def close(self) -> None:
        await self._channel.close()


async def run_load(
    fn: Callable[[int], Awaitable[None]], n: int, concurrency: int, errors: dict[str, int]
) -> tuple[list[float], float]:
    """Latencies (ms) of the answered calls and the wall time; failures counted in ``errors`` by type."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            try:
                await fn(i)
            except (openai.APIError, grpc.aio.AioRpcError, AssertionError) as err:
                name = type(err).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


async def measure(
    peers: list[Peer],
    direct: Direct,
    n: int,
    concurrencies: tuple[int, ...],
    rounds: int,
    groups: dict[str, list[int]],
) -> list[Row]:
    for p in peers:
        await p.warm()
    for _ in range(4):
        await direct.fn()(0)
    rows: list[Row] = []
    for c in concurrencies:
        for path in ("hit", "miss", "direct"):
            count = n * 4 if path == "hit" else n
            per_round = max(1, count // rounds)
            runners: list[tuple[str, Callable[[], Callable[[int], Awaitable[None]]]]] = (
                [("costmesh", direct.fn)]
                if path == "direct"
                else [(p.name, (lambda p=p: p.hit) if path == "hit" else p.miss_fn) for p in peers]
            )
            lats: dict[str, list[float]] = {name: [] for name, _ in runners}
            walls = dict.fromkeys(lats, 0.0)
            server_cpu = dict.fromkeys(lats, 0.0)
            client_cpu = dict.fromkeys(lats, 0.0)
            errs: dict[str, dict[str, int]] = {name: {} for name in lats}
            for r in range(rounds):
                for name, make in runners if r % 2 == 0 else list(reversed(runners)):
                    pgids = groups["litellm" if name == "litellm" else "costmesh"]
                    s0, c0 = sum(group_cpu_s(g) for g in pgids), time.process_time()
                    more, took = await run_load(make(), per_round, c, errs[name])
                    server_cpu[name] += sum(group_cpu_s(g) for g in pgids) - s0
                    client_cpu[name] += time.process_time() - c0
                    lats[name].extend(more)
                    walls[name] += took
            for name, _ in runners:
                lat = lats[name] or [float("nan")]
                row = Row(
                    name,
                    path,
                    c,
                    len(lats[name]),
                    statistics.median(lat),
                    pct(lat, 0.99),
                    len(lats[name]) / walls[name] if walls[name] else 0.0,
                    errs[name],
                    1000 * server_cpu[name] / max(1, len(lats[name])),
                    1000 * client_cpu[name] / max(1, len(lats[name])),
                )
                rows.append(row)
                print(
                    f"  {name:<13} {path:<7} c={c:<3} p50 {row.p50_ms:8.2f} ms  p99 {row.p99_ms:8.2f} ms"
                    f"  {row.rps:8.1f} req/s  cpu/req server {row.server_cpu_ms:6.2f} ms"
                    f" client {row.client_cpu_ms:6.2f} ms  errors {row.errors or 0}",
                    flush=True,
                )
    return rows


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for c in sorted({r.concurrency for r in rows}):
        by = {(r.peer, r.path): r for r in rows if r.concurrency == c}
        direct = by[("costmesh", "direct")]
        for peer in ("costmesh", "litellm", "costmesh-grpc"):
            hit, miss = by[(peer, "hit")], by[(peer, "miss")]
            base_p50, base_p99 = (0.0, 0.0) if peer == "litellm" else (direct.p50_ms, direct.p99_ms)
            out.append(
                {
                    "peer": peer,
                    "concurrency": c,
                    "hit_p50_ms": hit.p50_ms,
                    "hit_p99_ms": hit.p99_ms,
                    "hit_rps": hit.rps,
                    "miss_p50_ms": miss.p50_ms,
                    "miss_added_p50_ms": miss.p50_ms - base_p50,
                    "miss_added_p99_ms": miss.p99_ms - base_p99,
                    "hit_server_cpu_ms": hit.server_cpu_ms,
                    "hit_client_cpu_ms": hit.client_cpu_ms,
                    "errors": sum(sum(r.errors.values()) for r in (hit, miss)),
                }
            )
    return out


def ratios(summary: list[dict[str, Any]]) -> dict[str, float]:
    """costmesh's advantage: LiteLLM's hit p50 over costmesh's, and costmesh's hit req/s over LiteLLM's."""
    out: dict[str, float] = {}
    for c in sorted({s["concurrency"] for s in summary}):
        cm = next(s for s in summary if s["peer"] == "costmesh" and s["concurrency"] == c)
        ll = next(s for s in summary if s["peer"] == "litellm" and s["concurrency"] == c)
        out[f"hit_p50_c{c}"] = ll["hit_p50_ms"] / cm["hit_p50_ms"]
        out[f"hit_rps_c{c}"] = cm["hit_rps"] / ll["hit_rps"]
        grpc_door = next((s for s in summary if s["peer"] == "costmesh-grpc" and s["concurrency"] == c), None)
        if grpc_door is not None:  # the HTTP door against the gRPC one, same pipeline behind both
            out[f"http_vs_grpc_hit_p50_c{c}"] = cm["hit_p50_ms"] / grpc_door["hit_p50_ms"]
    return out


def start_mesh(layout: MeshLayout) -> LocalMesh:
    mesh = LocalMesh(
        layout,
        cwd=ROOT,
        extra_env={svc: {f"COSTMESH_{svc.upper()}_LOG_LEVEL": "warning"} for svc in ("router", "cache", "budget")},
    )
    mesh.start()
    try:
        asyncio.run(mesh.wait_serving(timeout_s=900))
    except BaseException:
        mesh.stop()
        raise
    return mesh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--requests", type=int, default=120, help="requests per row (hits: 4x)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per row")
    parser.add_argument("--quick", action="store_true", help="few requests (smoke run)")
    args = parser.parse_args()
    n = 24 if args.quick else args.requests
    rounds = max(1, args.rounds)
    ensure_local_models(MODELS)
    exe = ensure_litellm()
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="costmesh-peers-") as tmp:
        work = Path(tmp)
        layout = free_layout(work / "mesh", models_dir=MODELS)
        taken = {*layout.ports.values(), *layout.metrics_ports.values(), layout.http_port}
        litellm_port = next(p for p in iter(free_port, 0) if p not in taken)  # none of the mesh's (not bound yet)
        litellm = start_litellm(exe, litellm_port, work)  # its imports take a minute: it starts beside the mesh
        mesh: LocalMesh | None = None
        try:
            print("costmesh mesh: starting", flush=True)
            mesh = start_mesh(layout)
            wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm, 300, work / "litellm.log")

            async def bench() -> list[Row]:
                tenant = {"x-costmesh-tenant": f"bench-{uuid.uuid4().hex[:6]}", "x-costmesh-feature": "peers"}
                peers = [
                    Peer("costmesh", layout.http_base_url, "costmesh-cheap", tenant, "x-costmesh-cache-hit"),
                    Peer("litellm", f"http://127.0.0.1:{litellm_port}/v1", "mock", {}, "x-litellm-cache-key"),
                    GrpcPeer(layout.target("router"), tenant),
                ]
                direct = Direct(layout.target("infer-cheap"))
                try:
                    # costmesh's control plane (the workers' CPU is the generation's, not the door's)
                    control = [mesh.procs[svc].pid for svc in ("router", "cache", "budget")]
                    groups = {"costmesh": control, "litellm": [litellm.pid]}
                    return await measure(peers, direct, n, (1, 32), rounds, groups)
                finally:
                    for p in peers:
                        await p.close()
                    await direct.close()

            rows = asyncio.run(bench())
        finally:
            if mesh is not None:
                mesh.stop()
            stop_group(litellm)
    summary = summarize(rows)
    adv = ratios(summary)
    print()
    print(
        f"{'peer':<13} {'c':>3} {'hit p50':>9} {'hit p99':>9} {'hit req/s':>10} {'miss p50':>10} "
        f"{'miss added p50':>15} {'miss added p99':>15} {'errors':>7}"
    )
    for s in summary:
        print(
            f"{s['peer']:<13} {s['concurrency']:>3} {s['hit_p50_ms']:>6.2f} ms {s['hit_p99_ms']:>6.2f} ms "
            f"{s['hit_rps']:>10.1f} {s['miss_p50_ms']:>7.2f} ms {s['miss_added_p50_ms']:>12.2f} ms "
            f"{s['miss_added_p99_ms']:>12.2f} ms {s['errors']:>7}"
        )
    print(
        "costmesh vs LiteLLM: hit p50 "
        + ", ".join(f"{adv[f'hit_p50_c{c}']:.2f}x faster at c={c}" for c in (1, 32))
        + "; hit req/s "
        + ", ".join(f"{adv[f'hit_rps_c{c}']:.2f}x at c={c}" for c in (1, 32))
    )
    print(
        "added latency on a miss: costmesh = its miss - the direct worker call (the backend's own time); "
        "LiteLLM = its whole miss (the mock model has no backend)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "python": sys.version.split()[0],
                        "load_average": os.getloadavg(),
                    },
                    "litellm": LITELLM,
                    "openai_sdk": openai.__version__,
                    "max_tokens": MAX_TOKENS,
                    "requests": n,
                    "rounds": rounds,
                    "rows": [asdict(r) for r in rows],
                    "summary": summary,
                    "costmesh_advantage": adv,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
