"""The floor: what Python gRPC (grpc.aio) itself costs on this machine, with handlers that do nothing.

Every costmesh call is at least one grpc.aio unary RPC, and a cache hit through the router is two in series
(client → router → cache). This measures the same shapes with trivial handlers — ``grpc.health.v1.Health/Check``
answered from memory, each server its own process, the load generator in this process, all on loopback — so the
mesh's figures (bench/mesh.py, bench/cache.py, bench/budget.py) can be read against what the transport alone costs:

* **1 hop**: client → A;
* **2 hops**: client → A → B (A awaits B before answering).

    .venv/bin/python bench/grpc_floor.py [--json PATH] [--requests N]

"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class Hop(health_pb2_grpc.HealthServicer):
    """Answers at once, or after one call to the next hop."""

    def __init__(self, next_target: str | None) -> None:
        self._next = next_target
        self._stub: health_pb2_grpc.HealthStub | None = None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        if self._next is not None:
            if self._stub is None:
                self._stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(self._next))
            await self._stub.Check(request)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve(port: int, next_target: str | None) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Hop(next_target), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


@dataclass
class Row:
    shape: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    rps: float


async def load(target: str, shape: str, n: int, concurrency: int) -> Row:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(200):  # warm up: connections, code paths
            await stub.Check(request, timeout=10)
        latencies: list[float] = []
        counter = iter(range(n))

        async def worker() -> None:
            for _ in counter:
                t0 = time.perf_counter()
                await stub.Check(request, timeout=10)
                latencies.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Row(shape, concurrency, n, pct(latencies, 0.5), pct(latencies, 0.99), n / wall)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--requests", type=int, default=5000, help="requests per measurement")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)  # internal: PORT [NEXT_TARGET]
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(int(args.serve[0]), args.serve[1] if len(args.serve) > 1 else None))
        return 0
    b_port, a_port = free_port(), free_port()
    b_target, a_target = f"127.0.0.1:{b_port}", f"127.0.0.1:{a_port}"
    me = [sys.executable, __file__, "--serve"]
    procs = [subprocess.Popen([*me, str(b_port)]), subprocess.Popen([*me, str(a_port), b_target])]
    rows: list[Row] = []
    try:
        asyncio.run(wait_ready(b_target))
        asyncio.run(wait_ready(a_target))
        for concurrency in (1, 32, 64):
            rows.append(asyncio.run(load(b_target, "1 hop", args.requests, concurrency)))
            rows.append(asyncio.run(load(a_target, "2 hops", args.requests, concurrency)))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    print(f"{'shape':<8} {'c':>3} {'p50':>9} {'p99':>9} {'req/s':>8}")
    for r in rows:
        print(f"{r.shape:<8} {r.concurrency:>3} {r.p50_ms:>6.3f} ms {r.p99_ms:>6.3f} ms {r.rps:>8.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
        payload = {"machine": machine, "grpcio": grpc.__version__, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
