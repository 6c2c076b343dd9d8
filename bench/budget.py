"""Budget service benchmark: Reserve+Commit throughput and latency through gRPC, and overspend under a race.

Runs the real service (``python -m services.budget``) as separate processes on loopback, once per store: the
SQLite file store and the Redis store against a redis-server this script starts. The client is this process
(grpc.aio). Two measurements:

* throughput and latency: workers at concurrency 1, 16 and 64 each loop Reserve → Commit for ``--duration``
  seconds; pairs/s, pair p50/p99 and Reserve p50/p99. Three scopes have policies (global, tenant, team), so every
  Reserve checks and holds three scopes. The limits are far away: nothing is rejected.
* overspend: a limit that admits exactly K requests, and 64 concurrent clients spread over two server processes
  (replicas) sharing the store, each looping Reserve → (simulated inference) → Commit until it is refused. The
  same load runs against a naive "check then increment" implementation of the same gRPC API (read spent from
  Redis, compare, then INCRBY — how gateways that admit first and charge after behave), served by this script.

    .venv/bin/python bench/budget.py [--json PATH] [--duration S] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from services.common.health import wait_serving

ROOT = Path(__file__).resolve().parent.parent
EST = 1_000
ATTR = common_pb2.Attribution(tenant="bench", team="search", feature="chat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    data = tempfile.mkdtemp(prefix="costmesh-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(data, ignore_errors=True)


def flush(redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(16)


@contextlib.asynccontextmanager
async def servers(
    kind: str, n: int, *, redis_url: str = "", sqlite_path: Path | None = None
) -> AsyncIterator[list[str]]:
    """``n`` server processes of ``kind`` (sqlite | redis | naive-<mode>) sharing one store; yields their targets."""
    procs: list[asyncio.subprocess.Process] = []
    targets: list[str] = []
    try:
        for _ in range(n):
            port = free_port()
            if kind.startswith("naive-"):
                cmd = [sys.executable, __file__, "--serve-naive", str(port), redis_url, kind.removeprefix("naive-")]
                env = dict(os.environ)
            else:
                cmd = [sys.executable, "-m", "services.budget"]
                env = {
                    **os.environ,
                    "COSTMESH_BUDGET_PORT": str(port),
                    "COSTMESH_BUDGET_METRICS_PORT": str(free_port()),
                    "COSTMESH_BUDGET_LOG_LEVEL": "warning",
                    "COSTMESH_BUDGET_STORE": kind,
                    "COSTMESH_BUDGET_REDIS_URL": redis_url,
                    "COSTMESH_BUDGET_SQLITE_PATH": str(sqlite_path),
                }
                env.pop("COSTMESH_CONFIG", None)
            procs.append(await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=env))
            targets.append(f"127.0.0.1:{port}")
        for t in targets:
            await wait_serving(t, timeout_s=60)
        yield targets
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            await p.wait()


@contextlib.asynccontextmanager
async def stubs_for(targets: list[str]) -> AsyncIterator[list[Any]]:
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        yield [budget_pb2_grpc.BudgetServiceStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close()


# -- the naive implementation ------------------------------------------------------------------------------------


class NaiveServicer(budget_pb2_grpc.BudgetServiceServicer):
    """Two naive budget checks over the same gRPC API, each Redis command atomic on its own:

    * ``increment``: check, then increment — ``GET spent``; if ``spent + estimate <= limit``, ``INCRBY spent
      estimate``; Commit adjusts spent by (actual - estimate). The pair of commands is not atomic.
    * ``post-charge``: admit if ``spent + estimate <= limit``, charge only at Commit (``INCRBY spent actual``) —
      how gateways that admit first and charge after the response behave.
    * ``noop``: answers at once without Redis — the floor cost of a Python grpc.aio round trip on this machine.
    """

    def __init__(self, redis: Any, mode: str) -> None:
        self.r = redis
        self.mode = mode

    async def SetBudget(self, request: Any, context: Any) -> Any:
        limit = request.policy.limits[0].cost_micros
        await self.r.set("naive:limit", limit)
        return budget_pb2.SetBudgetResponse(policy=request.policy)

    async def Reserve(self, request: Any, context: Any) -> Any:
        if self.mode == "noop":
            return budget_pb2.ReserveResponse(reservation_id="n_0_0")
        limit = int(await self.r.get("naive:limit") or 0)
        spent = int(await self.r.get("naive:spent") or 0)
        if spent + request.estimated_cost_micros > limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "budget exceeded")
        held = request.estimated_cost_micros if self.mode == "increment" else 0
        if held:
            await self.r.incrby("naive:spent", held)
        return budget_pb2.ReserveResponse(reservation_id=f"n_{held}_{secrets.token_hex(6)}")

    async def Commit(self, request: Any, context: Any) -> Any:
        if self.mode == "noop":
            return budget_pb2.CommitResponse(charged_micros=request.actual_cost_micros)
        held = int(request.reservation_id.split("_")[1])
        await self.r.incrby("naive:spent", request.actual_cost_micros - held)
        return budget_pb2.CommitResponse(charged_micros=request.actual_cost_micros)

    async def GetBudget(self, request: Any, context: Any) -> Any:
        spent = int(await self.r.get("naive:spent") or 0)
        limit = int(await self.r.get("naive:limit") or 0)
        h = budget_pb2.ScopeHeadroom(window=budget_pb2.WINDOW_DAY, spent_micros=spent, limit_micros=limit)
        return budget_pb2.GetBudgetResponse(headroom=[h])


async def serve_naive(port: int, redis_url: str, mode: str) -> None:
    from grpc_health.v1 import _async as health_aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    server = grpc.aio.server()
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(NaiveServicer(redis, mode), server)  # type: ignore[arg-type]
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)
    await redis.aclose()


# -- load --------------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Throughput:
    store: str
    concurrency: int
    pairs: int
    seconds: float
    pairs_per_s: float
    pair_p50_ms: float
    pair_p99_ms: float
    reserve_p50_ms: float
    reserve_p99_ms: float
    errors: int
    pairs_per_s_rounds: list[float] = field(default_factory=list)
    reserve_lat_s: list[float] = field(default_factory=list, repr=False)
    pair_lat_s: list[float] = field(default_factory=list, repr=False)


async def set_limit(stub: Any, scope: budget_pb2.Scope, cost: int) -> None:
    policy = budget_pb2.BudgetPolicy(
        scope=scope, limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_DAY, cost_micros=cost)]
    )
    await stub.SetBudget(budget_pb2.SetBudgetRequest(policy=policy))


async def throughput(store: str, stubs: list[Any], concurrency: int, duration_s: float) -> Throughput:
    pair_lat: list[float] = []
    reserve_lat: list[float] = []
    errors = 0
    measuring = False
    stop_at = 0.0
    run = secrets.token_hex(4)

    async def worker(w: int) -> None:
        nonlocal errors
        stub = stubs[w % len(stubs)]
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            t0 = time.perf_counter()
            try:
                r = await stub.Reserve(
                    budget_pb2.ReserveRequest(
                        request_id=f"{run}-{w}-{n}", attribution=ATTR, estimated_cost_micros=EST, estimated_tokens=300
                    )
                )
                t1 = time.perf_counter()
                await stub.Commit(
                    budget_pb2.CommitRequest(
                        reservation_id=r.reservation_id,
                        tenant="bench",
                        actual_cost_micros=EST // 2,
                        usage=common_pb2.Usage(input_tokens=100, output_tokens=50),
                        model="cheap-model",
                        tier=common_pb2.TIER_CHEAP,
                    )
                )
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if measuring:
                t2 = time.perf_counter()
                reserve_lat.append(t1 - t0)
                pair_lat.append(t2 - t0)

    warmup = min(1.0, duration_s / 3)
    stop_at = time.perf_counter() + warmup + duration_s
    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    t_start = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    ms = 1000.0
    return Throughput(
        store=store,
        concurrency=concurrency,
        pairs=len(pair_lat),
        seconds=round(elapsed, 2),
        pairs_per_s=round(len(pair_lat) / elapsed, 1),
        pair_p50_ms=round(pct(pair_lat, 0.5) * ms, 3),
        pair_p99_ms=round(pct(pair_lat, 0.99) * ms, 3),
        reserve_p50_ms=round(pct(reserve_lat, 0.5) * ms, 3),
        reserve_p99_ms=round(pct(reserve_lat, 0.99) * ms, 3),
        errors=errors,
        reserve_lat_s=reserve_lat,
        pair_lat_s=pair_lat,
    )


def combine(runs: list[Throughput]) -> Throughput:
    """Rounds of one (store, concurrency): median pairs/s over rounds, latency percentiles over every sample."""
    pair_lat = [x for r in runs for x in r.pair_lat_s]
    reserve_lat = [x for r in runs for x in r.reserve_lat_s]
    rates = sorted(r.pairs_per_s for r in runs)
    ms = 1000.0
    return Throughput(
        store=runs[0].store,
        concurrency=runs[0].concurrency,
        pairs=len(pair_lat),
        seconds=round(sum(r.seconds for r in runs), 2),
        pairs_per_s=rates[len(rates) // 2],
        pair_p50_ms=round(pct(pair_lat, 0.5) * ms, 3),
        pair_p99_ms=round(pct(pair_lat, 0.99) * ms, 3),
        reserve_p50_ms=round(pct(reserve_lat, 0.5) * ms, 3),
        reserve_p99_ms=round(pct(reserve_lat, 0.99) * ms, 3),
        errors=sum(r.errors for r in runs),
        pairs_per_s_rounds=[r.pairs_per_s for r in runs],
    )


@dataclass
class Overspend:
    implementation: str
    store: str
    replicas: int
    clients: int
    limit_micros: int
    admits_exactly: int
    admitted: int
    spent_micros: int
    overspend_pct: float


async def overspend(impl: str, store: str, stubs: list[Any], k: int, clients: int, inference_s: float) -> Overspend:
    limit = k * EST
    tenant = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant="race")
    await set_limit(stubs[0], tenant, limit)
    admitted = 0
    gate = asyncio.Event()

    async def client(c: int) -> None:
        nonlocal admitted
        await gate.wait()
        n = 0
        while True:
            n += 1
            stub = stubs[(c + n) % len(stubs)]
            try:
                r = await stub.Reserve(
                    budget_pb2.ReserveRequest(
                        request_id=f"race-{c}-{n}",
                        attribution=common_pb2.Attribution(tenant="race"),
                        estimated_cost_micros=EST,
                    )
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return
            admitted += 1
            await asyncio.sleep(inference_s)  # the inference (real LLM calls take far longer)
            await stub.Commit(
                budget_pb2.CommitRequest(reservation_id=r.reservation_id, tenant="race", actual_cost_micros=EST)
            )

    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(*tasks)
    view = await stubs[0].GetBudget(budget_pb2.GetBudgetRequest(scope=tenant))
    spent = view.headroom[0].spent_micros
    return Overspend(
        impl, store, len(stubs), clients, limit, k, admitted, spent, round(100 * (spent - limit) / limit, 1)
    )


# -- main --------------------------------------------------------------------------------------------------------


async def setup_throughput_policies(stub: Any) -> None:
    big = 10**15
    await set_limit(stub, budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_GLOBAL), big)
    await set_limit(stub, budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant="bench"), big)
    await set_limit(stub, budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TEAM, tenant="bench", name="search"), big)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    races: list[Overspend] = []
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    kinds = args.stores.split(",") + ([] if args.skip_naive else ["naive-increment", "naive-noop"])
    labels = {"naive-increment": "naive", "naive-noop": "grpc-floor"}
    runs: dict[tuple[str, int], list[Throughput]] = {}
    with redis_server() as redis_url, tempfile.TemporaryDirectory(prefix="costmesh-bench-budget-") as tmp:
        # Throughput: every implementation up at once, measured in interleaved rounds, so a burst of load from
        # elsewhere on this shared machine hits all of them alike.
        async with contextlib.AsyncExitStack() as stack:
            stubs_by_kind: dict[str, list[Any]] = {}
            for kind in kinds:
                targets = await stack.enter_async_context(
                    servers(kind, args.servers, redis_url=redis_url, sqlite_path=Path(tmp) / "throughput.sqlite3")
                )
                stubs_by_kind[kind] = await stack.enter_async_context(stubs_for(targets))
                if kind in ("sqlite", "redis", "naive-increment"):
                    await setup_throughput_policies(stubs_by_kind[kind][0])
            for rnd in range(args.rounds):
                for c in concurrencies:
                    for kind in kinds:
                        label = labels.get(kind, kind)
                        r = await throughput(label, stubs_by_kind[kind], c, args.duration)
                        runs.setdefault((label, c), []).append(r)
                        print(f"  round {rnd + 1} {label:<10} c={c:<3} {r.pairs_per_s:>8.1f} pairs/s")
        for store in args.stores.split(","):
            flush(redis_url)
            sqlite_path = Path(tmp) / f"{store}-race.sqlite3"
            async with (
                servers(store, 2, redis_url=redis_url, sqlite_path=sqlite_path) as targets,
                stubs_for(targets) as stubs,
            ):
                races.append(await overspend("costmesh", store, stubs, args.k, 64, args.inference_ms / 1000))
        if not args.skip_naive:
            for mode, label in (("increment", "naive check-then-increment"), ("post-charge", "naive charge-after")):
                flush(redis_url)
                async with servers(f"naive-{mode}", 2, redis_url=redis_url) as targets, stubs_for(targets) as stubs:
                    races.append(await overspend(label, "redis", stubs, args.k, 64, args.inference_ms / 1000))
    results = [combine(v) for v in runs.values()]
    return {
        "benchmark": "budget",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "note": args.machine,
            # The machine is shared: the 1-minute load average before and after says how much CPU others used.
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "servers": args.servers,
            "k": args.k,
            "estimate_micros": EST,
            "inference_ms": args.inference_ms,
        },
        "throughput": [
            {k: v for k, v in asdict(r).items() if k not in ("reserve_lat_s", "pair_lat_s")} for r in results
        ],
        "overspend": [asdict(o) for o in races],
    }


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\n{m['cpus']} CPUs, load average before {m['loadavg_before'][0]}, after {m['loadavg_after'][0]}")
    print(
        f"Reserve+Commit through gRPC (one client process, grpc.aio; 3 scopes with policies per Reserve); "
        f"pairs/s = median of {report['settings']['rounds']} interleaved rounds"
    )
    print("naive = check-then-increment on Redis (not atomic); grpc-floor = a server that answers at once")
    print(
        f"{'store':<10} {'conc':>4} {'pairs/s':>9} {'pair p50':>9} {'pair p99':>9} {'rsv p50':>8} {'rsv p99':>8} "
        f"{'errors':>6}"
    )
    for r in report["throughput"]:
        print(
            f"{r['store']:<10} {r['concurrency']:>4} {r['pairs_per_s']:>9.1f} {r['pair_p50_ms']:>7.2f}ms "
            f"{r['pair_p99_ms']:>7.2f}ms {r['reserve_p50_ms']:>6.2f}ms {r['reserve_p99_ms']:>6.2f}ms {r['errors']:>6}"
        )
    print()
    s = report["settings"]
    print(
        f"Overspend: a limit admitting exactly K, 64 concurrent clients over 2 replicas sharing the store, "
        f"Reserve -> {s['inference_ms']:.0f} ms inference -> Commit(actual = estimate)"
    )
    print(f"{'implementation':<28} {'store':<7} {'K':>5} {'admitted':>9} {'spent/limit':>12} {'overspend':>10}")
    for o in report["overspend"]:
        ratio = o["spent_micros"] / o["limit_micros"]
        print(
            f"{o['implementation']:<28} {o['store']:<7} {o['admits_exactly']:>5} {o['admitted']:>9} {ratio:>12.3f} "
            f"{o['overspend_pct']:>9.1f}%"
        )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-naive":
        asyncio.run(serve_naive(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write results as JSON here")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per level and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (pairs/s = median over rounds)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--servers", type=int, default=1, help="server processes for the throughput runs")
    parser.add_argument("--k", type=int, default=200, help="requests the overspend limit admits")
    parser.add_argument("--inference-ms", type=float, default=50.0, help="simulated inference in the overspend race")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 s per level (a smoke run, not a measurement)")
    parser.add_argument("--machine", default="", help="free-text description of the machine for the report")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 1.0, 1
    report = asyncio.run(bench(args))
    print_tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
