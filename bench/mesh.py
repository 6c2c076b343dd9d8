"""Mesh benchmark: the latency costmesh adds over calling an inference worker directly, and tracing's cost.

Starts the whole mesh (budget, cache, two vLLM CPU workers on the local models, router) as processes on free
loopback ports, then, from this process (grpc.aio; the load generator shares the 2 cores with the mesh):

* **direct**: ``InferenceService.Generate`` on the cheap worker, one unique prompt per request;
* **miss**: ``RouterService.Generate`` with the same shape of request (unique prompt, tier cheap, temperature 0), so
  every request is a cache miss that reserves, runs on the same worker, commits and fills; *added* = miss − direct;
* **hit**: ``RouterService.Generate`` on prompts already in the cache (lookup + savings record only);

each at concurrency 1 and 32 (``max_tokens`` 4, so the worker's own time stays small and steady), plus cache hits
per second at concurrency 32. With ``--tracing`` a second mesh exporting every span (sample ratio 1.0) over OTLP/gRPC
to a receiver in a process of its own runs beside the first, and every row is measured on both in ``--rounds``
alternating rounds, pooled per mesh: the drift of a shared machine falls on both alike instead of on whichever mesh
ran second. The table shows tracing on versus off.

    .venv/bin/python bench/mesh.py [--json PATH] [--requests N] [--tracing [--rounds R]] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.cli.mesh import LocalMesh, free_layout
from services.infer.models import ensure_local_models

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "var" / "models"
MAX_TOKENS = 4


@dataclass
class Row:
    tracing: str
    path: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: dict[str, int]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


def sampling() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


async def run_load(
    fn: Callable[[int], Awaitable[None]], n: int, concurrency: int, errors: dict[str, int]
) -> tuple[list[float], float]:
    """Latencies (ms) of the answered calls and the wall time; failed calls are counted in ``errors`` by code."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            try:
                await fn(i)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts spans (what a collector would receive)."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any) -> Any:
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans += len(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


PATHS = ("direct infer", "router miss", "router hit")


class Driver:
    """The load of one mesh: channels, warm-up and the hot set of cached prompts, then one path at a time."""

    def __init__(self, mesh: LocalMesh, label: str) -> None:
        self.mesh = mesh
        self.label = label
        self.run = uuid.uuid4().hex[:8]
        self.md = (("x-costmesh-tenant", f"bench-{self.run}"), ("x-costmesh-feature", "bench"))
        self.hot = [f"hot question {k} of run {self.run}" for k in range(16)]
        self._rch = grpc.aio.insecure_channel(mesh.layout.target("router"))
        self._ich = grpc.aio.insecure_channel(mesh.layout.target("infer-cheap"))
        self.router = router_pb2_grpc.RouterServiceStub(self._rch)
        self.infer = infer_pb2_grpc.InferenceServiceStub(self._ich)
        self._seq = 0

    async def close(self) -> None:
        await self._rch.close()
        await self._ich.close()

    async def direct(self, i: int, tag: str) -> None:
        req = infer_pb2.GenerateRequest(
            request_id=f"d-{tag}-{i}", messages=user(f"direct {tag} {i}: what is {i} plus {i}?"), sampling=sampling()
        )
        async for _ in self.infer.Generate(iter((req,)), timeout=120):  # bidi: one request, half-closed
            pass

    async def miss(self, i: int, tag: str) -> None:
        req = router_pb2.GenerateRequest(
            messages=user(f"routed {tag} {i}: what is {i} plus {i}?"), sampling=sampling(), tier=common_pb2.TIER_CHEAP
        )
        reply = await self.router.Generate(req, timeout=120, metadata=self.md)
        assert not reply.result.cache_hit

    async def hit(self, i: int) -> None:
        req = router_pb2.GenerateRequest(
            messages=user(self.hot[i % len(self.hot)]), sampling=sampling(), tier=common_pb2.TIER_CHEAP
        )
        reply = await self.router.Generate(req, timeout=60, metadata=self.md)
        assert reply.result.cache_hit

    async def warm(self) -> None:
        """Connections, tokenizer, engine; then fill the hot set."""
        for k in range(8):
            await self.direct(k, f"warm-{self.run}")
            await self.miss(k, f"warm-{self.run}")
        for prompt in self.hot:
            req = router_pb2.GenerateRequest(messages=user(prompt), sampling=sampling(), tier=common_pb2.TIER_CHEAP)
            await self.router.Generate(req, timeout=120, metadata=self.md)
        await asyncio.sleep(0.5)  # fills are written in the background

    async def load(self, path: str, count: int, c: int, errors: dict[str, int]) -> tuple[list[float], float]:
        self._seq += 1
        tag = f"{self.run}-{self._seq}"  # unique prompts on every round: a miss stays a miss
        fn: Callable[[int], Awaitable[None]] = {
            "direct infer": functools.partial(self.direct, tag=tag),
            "router miss": functools.partial(self.miss, tag=tag),
        }.get(path, self.hit)
        return await run_load(fn, count, c, errors)


async def measure(drivers: list[Driver], n: int, concurrencies: tuple[int, ...], rounds: int) -> list[Row]:
    """Every (concurrency, path) measured on each mesh in ``rounds`` alternating rounds of ``n / rounds`` requests
    (hits: 4x), pooled per mesh: with two meshes up, slow drift of a shared machine falls on both alike."""
    for d in drivers:
        await d.warm()
    rows: list[Row] = []
    for c in concurrencies:
        for path in PATHS:
            count = n if path != "router hit" else n * 4
            per_round = max(1, count // rounds)
            lats: dict[str, list[float]] = {d.label: [] for d in drivers}
            walls = dict.fromkeys(lats, 0.0)
            errs: dict[str, dict[str, int]] = {label: {} for label in lats}
            for r in range(rounds):
                for d in drivers if r % 2 == 0 else list(reversed(drivers)):
                    more, took = await d.load(path, per_round, c, errs[d.label])
                    lats[d.label].extend(more)
                    walls[d.label] += took
            for d in drivers:
                lat, wall, errors = lats[d.label], walls[d.label], errs[d.label]
                rows.append(
                    Row(d.label, path, c, len(lat), statistics.median(lat), pct(lat, 0.99), len(lat) / wall, errors)
                )
                print(
                    f"  {d.label:<11} {path:<13} c={c:<3} p50 {rows[-1].p50_ms:7.2f} ms  p99 {rows[-1].p99_ms:7.2f} ms"
                    f"  {rows[-1].rps:8.1f} req/s  errors {errors or 0}",
                    flush=True,
                )
    for d in drivers:
        await d.close()
    return rows


def start_mesh(data_dir: Path, otlp: str | None) -> LocalMesh:
    layout = free_layout(data_dir, models_dir=MODELS, otlp_endpoint=otlp)
    mesh = LocalMesh(
        layout,
        cwd=ROOT,
        extra_env={
            "router": {"COSTMESH_ROUTER_LOG_LEVEL": "warning"},
            "cache": {"COSTMESH_CACHE_LOG_LEVEL": "warning"},
            "budget": {"COSTMESH_BUDGET_LOG_LEVEL": "warning"},
        },
    )
    mesh.start()
    try:
        asyncio.run(mesh.wait_serving(timeout_s=900))
    except BaseException:
        mesh.stop()
        raise
    return mesh


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for label in sorted({r.tracing for r in rows}):
        for c in sorted({r.concurrency for r in rows}):
            by = {r.path: r for r in rows if r.tracing == label and r.concurrency == c}
            d, m, h = by["direct infer"], by["router miss"], by["router hit"]
            out.append(
                {
                    "tracing": label,
                    "concurrency": c,
                    "miss_added_p50_ms": m.p50_ms - d.p50_ms,
                    "miss_added_p99_ms": m.p99_ms - d.p99_ms,
                    "hit_p50_ms": h.p50_ms,
                    "hit_p99_ms": h.p99_ms,
                    "hit_rps": h.rps,
                    "errors": sum(sum(r.errors.values()) for r in (d, m, h)),
                }
            )
    return out


def run_sink(port: int, count_file: Path) -> None:
    """An OTLP/gRPC receiver process: counts spans until SIGTERM, then writes the count to ``count_file``."""
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(5)
    count_file.write_text(str(sink.spans))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink", nargs=2, help=argparse.SUPPRESS)  # internal: PORT COUNT_FILE
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement (hits: 4x)")
    parser.add_argument("--tracing", action="store_true", help="repeat with OTLP export of every span")
    parser.add_argument("--quick", action="store_true", help="few requests (smoke run)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per row with --tracing")
    args = parser.parse_args()
    if args.sink:
        run_sink(int(args.sink[0]), Path(args.sink[1]))
        return 0
    n = 30 if args.quick else args.requests
    rounds = max(1, args.rounds) if args.tracing else 1
    ensure_local_models(MODELS)
    rows: list[Row] = []
    spans = 0
    with tempfile.TemporaryDirectory(prefix="costmesh-bench-") as tmp:
        meshes: list[tuple[str, LocalMesh]] = []
        sink: subprocess.Popen[bytes] | None = None
        count_file = Path(tmp) / "spans"
        try:
            print("mesh without tracing: starting", flush=True)
            meshes.append(("off", start_mesh(Path(tmp) / "plain", None)))
            if args.tracing:
                # The receiver runs in its own process (as a collector would), not in the load generator's.
                port = free_port()
                sink = subprocess.Popen([sys.executable, __file__, "--sink", str(port), str(count_file)])
                print("mesh with tracing (OTLP, sample ratio 1.0): starting", flush=True)
                meshes.append(("on (100%)", start_mesh(Path(tmp) / "traced", f"127.0.0.1:{port}")))

            async def bench() -> list[Row]:
                return await measure([Driver(m, label) for label, m in meshes], n, (1, 32), rounds)

            rows += asyncio.run(bench())
        finally:
            for _, m in meshes:
                m.stop()  # the services flush their last spans on shutdown
            if sink is not None:
                sink.send_signal(signal.SIGTERM)
                sink.wait(30)
                spans = int(count_file.read_text()) if count_file.exists() else 0
    summary = summarize(rows)
    print()
    print(
        f"{'tracing':<11} {'c':>3} {'miss added p50':>15} {'miss added p99':>15} {'hit p50':>9} {'hit p99':>9} "
        f"{'hit req/s':>10} {'errors':>7}"
    )
    for s in summary:
        print(
            f"{s['tracing']:<11} {s['concurrency']:>3} {s['miss_added_p50_ms']:>12.2f} ms "
            f"{s['miss_added_p99_ms']:>12.2f} ms {s['hit_p50_ms']:>6.2f} ms {s['hit_p99_ms']:>6.2f} ms "
            f"{s['hit_rps']:>10.1f} {s['errors']:>7}"
        )
    if args.tracing:
        print(f"spans received by the OTLP receiver (its own process): {spans}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "python": sys.version.split()[0],
                    },
                    "max_tokens": MAX_TOKENS,
                    "requests": n,
                    "rounds": rounds,
                    "rows": [asdict(r) for r in rows],
                    "summary": summary,
                    "spans_exported": spans,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
