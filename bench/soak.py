"""Soak: the whole mesh under steady load for a long while — does it leak memory or money?

Starts the mesh (budget, cache, two vLLM CPU workers on the local models, router) as processes on free loopback
ports — embedded stores by default, Redis with ``--redis`` — then keeps ``--concurrency`` clients busy for
``--duration-s`` with a steady mix:

* unary Generate on fresh prompts (cache misses, both tiers as the classifier decides),
* unary Generate on a small set of repeated prompts (cache hits after the first),
* GenerateStream read to the end,
* GenerateStream cancelled after the first chunk, on the same tenant as the rest: the router stops the worker and
  bills what it generated, which the client cannot know,
* SubmitAsync, polled to completion.

Every few seconds it samples the resident memory of each service (the whole process tree: a worker's vLLM engine
core is a child process). When the load stops it waits for in-flight money to settle and checks the two invariants
that matter: **reserved money returns to zero**, and **the ledger is the truth**: it equals what the workers counted
as generated for the tenant (every prompt and output token at the worker's price, from their own
``costmesh_infer_cost_micros_total``) — the sum of the costs the answered requests reported plus what the cancelled
streams were billed. It prints a table and, with ``--json PATH``, writes everything.

    .venv/bin/python bench/soak.py [--duration-s 600] [--concurrency 6] [--redis] [--json PATH]

``tests/e2e/test_soak.py`` runs the same soak for about a minute in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.cli.mesh import LocalMesh, free_layout
from tests.support.prom import scrape, total

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "var" / "models"
SERVICES = ("router", "budget", "cache", "infer-cheap", "infer-full")
TERMINAL = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED)
REPEATED = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Summarise the plot of Hamlet in one sentence.",
]
FRESH = [
    "Write a haiku about {x}.",
    "Explain step by step how a hash map handles collisions, with an example about {x}.",
    "Prove that the square root of 2 is irrational, then relate it to {x}.",
    "Give one fact about {x}.",
    "Write a Python function that sorts a list of {x} by length and explain its complexity.",
]
#: Share of each kind of request in the mix.
MIX = {"miss": 0.40, "hit": 0.25, "stream": 0.20, "cancel": 0.05, "async": 0.10}
#: Share of fresh unary and streamed prompts that ask for the full tier: the mix's short prompts with few output
#: tokens all classify as cheap, and the soak must keep both workers busy.
FULL_SHARE = 1 / 3


# ---- memory ----------------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (0 once it is gone)."""
    kids = _children()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += kids.get(p, [])
    return total


@dataclass
class MemorySeries:
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def sample(self, pids: dict[str, int], t: float) -> None:
        for name, pid in pids.items():
            self.samples.setdefault(name, []).append((t, tree_rss_bytes(pid)))

    def summary(self, warmup_s: float) -> dict[str, dict[str, float]]:
        """Per service: RSS after warm-up, at the end, growth, peak (MiB), and the fitted growth per 10 minutes."""
        out: dict[str, dict[str, float]] = {}
        for name, series in self.samples.items():
            steady = [(t, b) for t, b in series if t >= warmup_s] or series
            first, last = steady[0][1], steady[-1][1]
            slope = 0.0
            if len(steady) >= 3:
                ts = [t for t, _ in steady]
                bs = [b for _, b in steady]
                mt, mb = statistics.fmean(ts), statistics.fmean(bs)
                var = sum((t - mt) ** 2 for t in ts)
                slope = sum((t - mt) * (b - mb) for t, b in steady) / var if var else 0.0
            half = [b for t, b in steady if t >= (steady[0][0] + steady[-1][0]) / 2] or [last]
            out[name] = {
                "start_mib": first / 2**20,
                "end_mib": last / 2**20,
                "growth_mib": (last - first) / 2**20,
                "peak_mib": max(b for _, b in series) / 2**20,
                "trend_mib_per_10min": slope * 600 / 2**20,
                # a leak keeps growing; first-touch of preallocated memory (a worker's KV cache) flattens out
                "second_half_growth_mib": (last - half[0]) / 2**20,
            }
        return out


# ---- load ------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    served: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    escalated: int = 0
    cost_micros: int = 0  # sum of the cost every answered request reported (tenant "soak")
    charged_requests: int = 0  # answered requests that were not cache hits
    cancelled: int = 0
    poll_retries: int = 0  # GetAsyncResult polls that met a transient error and were retried
    tiers: Counter[str] = field(default_factory=Counter)  # answered requests by the tier that served them
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, kind: str, result: router_pb2.GenerateResult, started: float) -> None:
        self.served[kind] += 1
        self.cost_micros += result.cost_micros
        self.cache_hits += result.cache_hit
        self.escalated += result.escalated
        self.charged_requests += not result.cache_hit
        self.tiers[common_pb2.Tier.Name(result.tier).removeprefix("TIER_").lower()] += 1
        self.latencies_ms.append((time.perf_counter() - started) * 1000)


def _messages(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


class Load:
    def __init__(self, target: str, *, tenant: str, max_tokens: int, seed: int) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.tenant = tenant
        self.max_tokens = max_tokens
        self.tally = Tally()
        self._rng = random.Random(seed)
        self._n = 0

    def _attribution(self, tenant: str | None = None) -> common_pb2.Attribution:
        return common_pb2.Attribution(tenant=tenant or self.tenant, team="soak", feature="soak")

    def _fresh(self) -> str:
        self._n += 1
        return self._rng.choice(FRESH).format(x=f"item {self._n}-{uuid.uuid4().hex[:6]}")

    def _sampling(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0.0)

    def _tier(self) -> common_pb2.Tier.ValueType:
        return common_pb2.TIER_FULL if self._rng.random() < FULL_SHARE else common_pb2.TIER_UNSPECIFIED

    async def one(self) -> None:
        kind = self._rng.choices(list(MIX), weights=list(MIX.values()))[0]
        started = time.perf_counter()
        try:
            if kind in ("miss", "hit"):
                text = self._fresh() if kind == "miss" else self._rng.choice(REPEATED)
                reply = await self.stub.Generate(
                    router_pb2.GenerateRequest(
                        attribution=self._attribution(),
                        messages=_messages(text),
                        sampling=self._sampling(),
                        tier=self._tier() if kind == "miss" else common_pb2.TIER_UNSPECIFIED,
                    ),
                    timeout=300,
                )
                self.tally.add(kind, reply.result, started)
            elif kind == "stream":
                call = self.stub.GenerateStream(
                    router_pb2.GenerateStreamRequest(
                        attribution=self._attribution(),
                        messages=_messages(self._fresh()),
                        sampling=self._sampling(),
                        tier=self._tier(),
                    ),
                    timeout=300,
                )
                last = None
                async for chunk in call:
                    last = chunk
                assert last is not None and last.HasField("result")
                self.tally.add(kind, last.result, started)
            elif kind == "cancel":
                call = self.stub.GenerateStream(
                    router_pb2.GenerateStreamRequest(
                        attribution=self._attribution(),
                        messages=_messages(self._fresh()),
                        sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens * 4, temperature=0.7),
                    ),
                    timeout=300,
                )
                async for _ in call:
                    break
                call.cancel()
                self.tally.cancelled += 1
            else:
                await self._async(started)
        except grpc.aio.AioRpcError as err:
            self.tally.errors[f"{kind}:{err.code().name}"] += 1

    async def _async(self, started: float) -> None:
        sub = await self.stub.SubmitAsync(
            router_pb2.SubmitAsyncRequest(
                attribution=self._attribution(), messages=_messages(self._fresh()), sampling=self._sampling()
            ),
            timeout=60,
        )
        if sub.state == common_pb2.JOB_STATE_SUCCEEDED:
            self.tally.add("async", sub.result, started)
            return
        request = router_pb2.GetAsyncResultRequest(job_id=sub.job_id, attribution=self._attribution())
        delay = 0.2
        give_up = time.monotonic() + 300
        while True:
            try:
                reply = await self.stub.GetAsyncResult(request, timeout=30)
            except grpc.aio.AioRpcError as err:  # polling is idempotent: a transient failure is retried
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if time.monotonic() > give_up:
                    raise
                self.tally.poll_retries += 1
            else:
                if reply.state in TERMINAL:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        if reply.state != common_pb2.JOB_STATE_SUCCEEDED:
            self.tally.errors[f"async:{common_pb2.JobState.Name(reply.state)}"] += 1
            return
        self.tally.add("async", reply.result, started)

    async def run(self, *, duration_s: float, concurrency: int) -> float:
        stop_at = time.monotonic() + duration_s

        async def client() -> None:
            while time.monotonic() < stop_at:
                await self.one()

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.monotonic() - t0

    async def close(self) -> None:
        await self.channel.close()


# ---- the ledger ------------------------------------------------------------------------------------------------


async def ledger(target: str, tenant: str) -> tuple[budget_pb2.UsageRow, int]:
    """(usage total, reserved micro-USD) of one tenant; the tenant needs a policy for reserved to show. Reserved is
    read first: a commit landing between the reads then shows in the usage, never 'nothing reserved' without it."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = budget_pb2_grpc.BudgetServiceStub(ch)
        scope = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant)
        budget = await stub.GetBudget(budget_pb2.GetBudgetRequest(scope=scope), timeout=30)
        usage = await stub.GetUsage(budget_pb2.GetUsageRequest(tenant=tenant), timeout=30)
    return usage.total, sum(h.reserved_micros for h in budget.headroom)


def workers_generated(mesh: LocalMesh, tenant: str) -> tuple[int, int]:
    """(cost micro-USD, output tokens) the workers counted as generated for ``tenant``, at their own prices."""
    cost = out = 0.0
    for name in ("infer-cheap", "infer-full"):
        samples = scrape(mesh.layout.metrics_ports[name])
        cost += total(samples, "costmesh_infer_cost_micros_total", tenant=tenant)
        out += total(samples, "costmesh_infer_tokens_total", tenant=tenant, type="output")
    return round(cost), round(out)


async def track(target: str, tenant: str) -> None:
    """A lifetime limit nobody reaches, so the tenant's reserved money is visible."""
    policy = budget_pb2.BudgetPolicy(
        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant),
        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=10**14)],
    )
    async with grpc.aio.insecure_channel(target) as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(budget_pb2.SetBudgetRequest(policy=policy), timeout=30)


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    max_tokens: int
    store: str
    served: dict[str, int]
    requests_served: int
    errors: dict[str, int]
    cancelled_streams: int
    poll_retries: int
    tiers: dict[str, int]
    cache_hits: int
    escalated: int
    rps: float
    p50_ms: float
    p99_ms: float
    responses_cost_micros: int
    ledger_cost_micros: int
    workers_cost_micros: int  # what the workers counted as generated for the tenant
    ledger_output_tokens: int
    workers_output_tokens: int
    ledger_requests: int
    charged_requests: int
    reserved_after_micros: int
    settle_s: float
    memory: dict[str, dict[str, float]]
    services_alive: dict[str, bool]
    rss_mib: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (seconds, MiB) per service
    machine: str = ""

    @property
    def cancelled_billed_micros(self) -> int:
        """What the cancelled streams were billed: the ledger beyond the costs the answered requests reported."""
        return self.ledger_cost_micros - self.responses_cost_micros

    @property
    def ledger_matches(self) -> bool:
        """The ledger holds every generated token (the workers' count) and every answered request's cost."""
        return (
            self.ledger_cost_micros == self.workers_cost_micros
            and self.ledger_output_tokens == self.workers_output_tokens
            and self.ledger_cost_micros >= self.responses_cost_micros
            and self.ledger_requests >= self.charged_requests
        )

    @property
    def money_lost_micros(self) -> int:
        return abs(self.workers_cost_micros - self.ledger_cost_micros) + self.reserved_after_micros


async def soak(
    mesh: LocalMesh,
    *,
    duration_s: float,
    concurrency: int,
    max_tokens: int = 8,
    sample_every_s: float = 5.0,
    warmup_s: float = 15.0,
    seed: int = 7,
    log: Any = None,
) -> SoakReport:
    """Run the soak against a serving mesh and return what happened."""
    say = log or (lambda *_: None)
    tenant = "soak-" + uuid.uuid4().hex[:6]
    router, budget = mesh.layout.target("router"), mesh.layout.target("budget")
    await track(budget, tenant)
    pids = {name: p.pid for name, p in mesh.procs.items()}
    memory = MemorySeries()
    load = Load(router, tenant=tenant, max_tokens=max_tokens, seed=seed)
    t0 = time.monotonic()
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            memory.sample(pids, time.monotonic() - t0)
            served, errors = sum(load.tally.served.values()), sum(load.tally.errors.values())
            say(f"  t={time.monotonic() - t0:5.0f}s served={served} errors={errors}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), sample_every_s)

    sampling = asyncio.ensure_future(sampler())
    try:
        elapsed = await load.run(duration_s=duration_s, concurrency=concurrency)
    finally:
        done.set()
        await sampling
        await load.close()
    memory.sample(pids, time.monotonic() - t0)
    # Traffic stopped: in-flight money must settle (background fills/savings, async settlement, cancelled streams).
    settle_start = time.monotonic()
    usage, reserved = await ledger(budget, tenant)
    while reserved and time.monotonic() - settle_start < 60:
        await asyncio.sleep(0.5)
        usage, reserved = await ledger(budget, tenant)
    settle_s = time.monotonic() - settle_start
    workers_cost, workers_out = workers_generated(mesh, tenant)
    tally = load.tally
    lat = sorted(tally.latencies_ms) or [0.0]
    served = sum(tally.served.values())
    return SoakReport(
        duration_s=elapsed,
        concurrency=concurrency,
        max_tokens=max_tokens,
        store="redis" if mesh.layout.redis_url else "embedded",
        served=dict(tally.served),
        requests_served=served,
        errors=dict(tally.errors),
        cancelled_streams=tally.cancelled,
        poll_retries=tally.poll_retries,
        tiers=dict(tally.tiers),
        cache_hits=tally.cache_hits,
        escalated=tally.escalated,
        rps=served / elapsed if elapsed else 0.0,
        p50_ms=lat[len(lat) // 2],
        p99_ms=lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
        responses_cost_micros=tally.cost_micros,
        ledger_cost_micros=usage.cost_micros,
        workers_cost_micros=workers_cost,
        ledger_output_tokens=usage.usage.output_tokens,
        workers_output_tokens=workers_out,
        ledger_requests=usage.requests,
        charged_requests=tally.charged_requests,
        reserved_after_micros=reserved,
        settle_s=settle_s,
        memory=memory.summary(warmup_s),
        rss_mib={n: [(round(t, 1), round(b / 2**20, 1)) for t, b in ser] for n, ser in memory.samples.items()},
        services_alive={name: p.poll() is None for name, p in mesh.procs.items()},
    )


def print_report(r: SoakReport) -> None:
    print(f"\nsoak: {r.duration_s:.0f} s at concurrency {r.concurrency}, max_tokens {r.max_tokens}, {r.store} stores")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.served.items()))
    print(f"{'requests served':<34}{r.requests_served:>12}  ({kinds})")
    print(f"{'cancelled streams':<34}{r.cancelled_streams:>12}")
    print(f"{'errors':<34}{sum(r.errors.values()):>12}  {r.errors or ''}")
    print(f"{'async polls retried':<34}{r.poll_retries:>12}")
    print(f"{'served by tier':<34}{'':>12}  {', '.join(f'{k} {v}' for k, v in sorted(r.tiers.items()))}")
    print(f"{'cache hits / escalations':<34}{r.cache_hits:>12} / {r.escalated}")
    print(f"{'throughput':<34}{r.rps:>12.2f} req/s   p50 {r.p50_ms:.0f} ms   p99 {r.p99_ms:.0f} ms")
    print(f"{'sum of response costs (micro-USD)':<34}{r.responses_cost_micros:>12}")
    print(f"{'cancelled streams billed':<34}{r.cancelled_billed_micros:>12}")
    print(f"{'workers counted generated':<34}{r.workers_cost_micros:>12}  ({r.workers_output_tokens} output tokens)")
    print(
        f"{'ledger cost (micro-USD)':<34}{r.ledger_cost_micros:>12}  {'= match' if r.ledger_matches else '!= MISMATCH'}"
        f"  ({r.ledger_output_tokens} output tokens)"
    )
    print(f"{'ledger requests / charged answers':<34}{r.ledger_requests:>12} / {r.charged_requests}")
    print(f"{'reserved after traffic (micro-USD)':<34}{r.reserved_after_micros:>12}  (settled in {r.settle_s:.1f} s)")
    print(f"{'money lost (micro-USD)':<34}{r.money_lost_micros:>12}")
    print(
        f"\n{'service':<12} {'RSS start':>10} {'RSS end':>10} {'growth':>9} {'peak':>9} {'trend/10min':>12} "
        f"{'2nd half':>9}   (MiB)"
    )
    for name, m in r.memory.items():
        print(
            f"{name:<12} {m['start_mib']:>10.1f} {m['end_mib']:>10.1f} {m['growth_mib']:>+9.1f} {m['peak_mib']:>9.1f} "
            f"{m['trend_mib_per_10min']:>+12.1f} {m['second_half_growth_mib']:>+9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--redis", action="store_true", help="start a redis-server and keep cache, budget, jobs in it")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} CPUs")
    args = parser.parse_args()

    from services.infer.models import ensure_local_models

    ensure_local_models(MODELS)
    redis = None
    if args.redis:
        from tests.support.redis_server import RedisServer

        redis = RedisServer()
        redis.start()
    data = Path(tempfile.mkdtemp(prefix="costmesh-soak-"))
    layout = free_layout(data, models_dir=MODELS, redis_url=redis.url if redis else None)
    mesh = LocalMesh(layout, cwd=ROOT)
    mesh.start()
    try:
        print("starting the mesh (vLLM workers take a while on CPU)…", file=sys.stderr)
        asyncio.run(mesh.wait_serving(timeout_s=900))
        report = asyncio.run(
            soak(
                mesh,
                duration_s=args.duration_s,
                concurrency=args.concurrency,
                max_tokens=args.max_tokens,
                sample_every_s=10.0,
                warmup_s=min(60.0, args.duration_s / 5),
                log=lambda line: print(line, file=sys.stderr),
            )
        )
    finally:
        mesh.stop()
        if redis is not None:
            redis.stop()
    report.machine = args.machine
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            **asdict(report),
            "ledger_matches": report.ledger_matches,
            "cancelled_billed_micros": report.cancelled_billed_micros,
            "money_lost_micros": report.money_lost_micros,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    ok = report.ledger_matches and report.reserved_after_micros == 0 and not report.errors
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
