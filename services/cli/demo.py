"""``costmesh demo``: replay the bundled workload through a running mesh and report what it saved.

Starts the mesh (``costmesh up``) when the router is not already serving, and stops it afterwards unless asked to
keep it. The report compares what the same traffic would cost sent to the full tier with no cache (each response's
usage at full-tier list prices) with what the ledger charged, and checks that the ledger equals the sum of the
per-request costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.client import RouterClient
from costmesh.common.v1 import common_pb2
from services.cli.mesh import MeshLayout
from services.cli.workload import BUDGET_LIMIT_MICROS, BUDGETED_FEATURE, Request, build, expand_bursts
from services.common.health import check_target


@dataclass
class Outcome:
    tenant: str
    feature: str
    kind: str
    latency_ms: float
    ok: bool
    status: str = "OK"
    tier: str = ""
    cache_hit: bool = False
    cost_micros: int = 0
    saved_micros: int = 0
    baseline_micros: int = 0


@dataclass
class Report:
    requests: int
    served: int
    baseline_micros: int
    cost_micros: int
    savings_pct: float
    cache_hits: int
    cache_hit_rate: float
    coalesced_waits: int
    routed_cheap: int
    routed_full: int
    stopped_by_budget: int
    other_errors: int
    latency_p50_ms: float
    latency_p99_ms: float
    ledger_micros: int
    ledger_matches: bool
    wall_s: float
    per_feature: list[dict[str, Any]] = field(default_factory=list)


def _tier_name(t: common_pb2.Tier.ValueType) -> str:
    return {common_pb2.TIER_CHEAP: "cheap", common_pb2.TIER_FULL: "full"}.get(t, "")


async def _send(client: RouterClient, r: Request, max_tokens: int) -> Outcome:
    t0 = time.perf_counter()
    try:
        res = await client.generate(r.prompt, system=r.system, max_tokens=max_tokens, temperature=0.0)
    except grpc.aio.AioRpcError as err:
        return Outcome(r.tenant, r.feature, r.kind, (time.perf_counter() - t0) * 1000, False, err.code().name)
    return Outcome(
        r.tenant,
        r.feature,
        r.kind,
        (time.perf_counter() - t0) * 1000,
        True,
        tier=_tier_name(res.tier),
        cache_hit=res.cache_hit,
        cost_micros=res.cost_micros,
        saved_micros=res.saved_micros,
        baseline_micros=res.cost_micros + res.saved_micros,
    )


async def _set_budget(layout: MeshLayout, run_id: str) -> None:
    tenant, feature = BUDGETED_FEATURE
    policy = budget_pb2.BudgetPolicy(
        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_FEATURE, tenant=f"{tenant}-{run_id}", name=feature),
        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=BUDGET_LIMIT_MICROS)],
    )
    async with grpc.aio.insecure_channel(layout.target("budget")) as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(budget_pb2.SetBudgetRequest(policy=policy), timeout=10)


async def _ledger(layout: MeshLayout, tenants: list[str]) -> list[budget_pb2.UsageRow]:
    rows: list[budget_pb2.UsageRow] = []
    async with grpc.aio.insecure_channel(layout.target("budget")) as ch:
        stub = budget_pb2_grpc.BudgetServiceStub(ch)
        for t in tenants:
            reply = await stub.GetUsage(
                budget_pb2.GetUsageRequest(
                    tenant=t, group_by=[budget_pb2.GROUP_BY_TENANT, budget_pb2.GROUP_BY_FEATURE]
                ),
                timeout=10,
            )
            rows.extend(reply.rows)
    return rows


async def _coalesced(layout: MeshLayout, tenants: list[str]) -> int:
    total = 0
    async with grpc.aio.insecure_channel(layout.target("cache")) as ch:
        stub = cache_pb2_grpc.CacheServiceStub(ch)
        for t in tenants:
            reply = await stub.GetStats(cache_pb2.GetStatsRequest(tenant=t), timeout=10)
            total += reply.total.coalesced_waits
    return total


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def replay(layout: MeshLayout, *, concurrency: int, burst_size: int, max_tokens: int, console: Console) -> Report:
    run_id = uuid.uuid4().hex[:6]
    await _set_budget(layout, run_id)
    workload = expand_bursts(build(run_id=run_id), burst_size)
    total = sum(len(g) for g in workload)
    clients: dict[tuple[str, str, str], RouterClient] = {}

    def client(r: Request) -> RouterClient:
        key = (r.tenant, r.team, r.feature)
        if key not in clients:
            clients[key] = RouterClient(layout.target("router"), tenant=r.tenant, team=r.team, feature=r.feature)
        return clients[key]

    outcomes: list[Outcome] = []
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("replay", total=total)

        async def one(r: Request) -> None:
            async with gate:
                outcomes.append(await _send(client(r), r, max_tokens))
            progress.advance(task)

        async def group(g: list[Request]) -> None:
            if len(g) == 1:
                await one(g[0])
                return
            # A burst: every copy at once, outside the concurrency gate.
            results = await asyncio.gather(*(_send(client(r), r, max_tokens) for r in g))
            outcomes.extend(results)
            progress.advance(task, len(g))

        pending: set[asyncio.Task[None]] = set()
        for g in workload:
            if len(g) > 1:
                await asyncio.gather(*pending)
                pending.clear()
                await group(g)
                continue
            pending.add(asyncio.ensure_future(group(g)))
            if len(pending) >= concurrency * 2:
                _done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    wall = time.perf_counter() - t0
    for c in clients.values():
        await c.close()
    tenants = sorted({o.tenant for o in outcomes})
    hits = sum(o.ok and o.cache_hit for o in outcomes)
    rows = await _ledger(layout, tenants)
    for _ in range(50):  # hits' savings reach the ledger in batches, within ~50 ms of the response
        if sum(r.cache_hits for r in rows) >= hits:
            break
        await asyncio.sleep(0.1)
        rows = await _ledger(layout, tenants)
    coalesced = await _coalesced(layout, tenants)
    return summarize(outcomes, rows, coalesced, wall)


def summarize(outcomes: list[Outcome], rows: list[budget_pb2.UsageRow], coalesced: int, wall_s: float) -> Report:
    served = [o for o in outcomes if o.ok]
    misses = [o for o in served if not o.cache_hit]
    baseline = sum(o.baseline_micros for o in served)
    cost = sum(o.cost_micros for o in served)
    tiers = Counter(o.tier for o in misses)
    statuses = Counter(o.status for o in outcomes if not o.ok)
    ledger = sum(r.cost_micros for r in rows)
    per_feature = []
    by_feature: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        by_feature.setdefault((o.tenant, o.feature), []).append(o)
    for (tenant, feature), os_ in sorted(by_feature.items()):
        ok = [o for o in os_ if o.ok]
        row = next((r for r in rows if r.tenant == tenant and r.feature == feature), None)
        per_feature.append(
            {
                "tenant": tenant,
                "feature": feature,
                "requests": len(os_),
                "served": len(ok),
                "cache_hits": sum(o.cache_hit for o in ok),
                "cheap": sum(o.tier == "cheap" and not o.cache_hit for o in ok),
                "full": sum(o.tier == "full" and not o.cache_hit for o in ok),
                "stopped_by_budget": sum(o.status == "RESOURCE_EXHAUSTED" for o in os_),
                "baseline_micros": sum(o.baseline_micros for o in ok),
                "cost_micros": sum(o.cost_micros for o in ok),
                "ledger_cost_micros": row.cost_micros if row else 0,
                "ledger_saved_micros": row.saved_micros if row else 0,
            }
        )
    latencies = [o.latency_ms for o in served]
    return Report(
        requests=len(outcomes),
        served=len(served),
        baseline_micros=baseline,
        cost_micros=cost,
        savings_pct=100.0 * (1 - cost / baseline) if baseline else 0.0,
        cache_hits=sum(o.cache_hit for o in served),
        cache_hit_rate=sum(o.cache_hit for o in served) / len(served) if served else 0.0,
        coalesced_waits=coalesced,
        routed_cheap=tiers.get("cheap", 0),
        routed_full=tiers.get("full", 0),
        stopped_by_budget=statuses.get("RESOURCE_EXHAUSTED", 0),
        other_errors=sum(n for s, n in statuses.items() if s != "RESOURCE_EXHAUSTED"),
        latency_p50_ms=statistics.median(latencies) if latencies else 0.0,
        latency_p99_ms=_pct(latencies, 0.99),
        ledger_micros=ledger,
        ledger_matches=ledger == cost,
        wall_s=wall_s,
        per_feature=per_feature,
    )


def _usd(micros: int) -> str:
    return f"${micros / 1e6:,.4f}"


def render(report: Report, console: Console) -> None:
    console.print()
    console.print("[bold]costmesh demo — cost report[/bold]")
    summary = Table(show_header=False, box=None)
    summary.add_row("requests (served / sent)", f"{report.served} / {report.requests}")
    summary.add_row("full tier, no cache, would cost", _usd(report.baseline_micros))
    summary.add_row("costmesh charged", _usd(report.cost_micros))
    summary.add_row("savings", f"{report.savings_pct:.1f}%")
    summary.add_row("cache hits", f"{report.cache_hits} ({100 * report.cache_hit_rate:.1f}% of served)")
    summary.add_row("coalesced waits (single-flight)", str(report.coalesced_waits))
    summary.add_row("routed cheap / full (misses)", f"{report.routed_cheap} / {report.routed_full}")
    summary.add_row("stopped by budget (hard limit)", str(report.stopped_by_budget))
    summary.add_row("other errors", str(report.other_errors))
    summary.add_row("latency p50 / p99", f"{report.latency_p50_ms:.0f} ms / {report.latency_p99_ms:.0f} ms")
    check = "OK" if report.ledger_matches else "MISMATCH"
    summary.add_row("ledger = sum of response costs", f"{_usd(report.ledger_micros)} {check}")
    console.print(summary)
    table = Table(title="per feature")
    for col in ("tenant", "feature", "sent", "hits", "cheap", "full", "budget-stopped", "would cost", "cost", "saved"):
        table.add_column(col, justify="right" if col not in ("tenant", "feature") else "left")
    for f in report.per_feature:
        table.add_row(
            f["tenant"],
            f["feature"],
            str(f["requests"]),
            str(f["cache_hits"]),
            str(f["cheap"]),
            str(f["full"]),
            str(f["stopped_by_budget"]),
            _usd(f["baseline_micros"]),
            _usd(f["cost_micros"]),
            _usd(f["baseline_micros"] - f["cost_micros"]),
        )
    console.print(table)


async def _mesh_serving(layout: MeshLayout) -> bool:
    statuses = await asyncio.gather(*(check_target(layout.target(n), timeout_s=1.0) for n in layout.ports))
    return all(s == "SERVING" for s in statuses)


async def _wait_serving(layout: MeshLayout, proc: subprocess.Popen[bytes], timeout_s: float, console: Console) -> None:
    deadline = time.monotonic() + timeout_s
    with console.status("starting the mesh (vLLM engines warm up in ~30-60 s on CPU)…"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"costmesh up exited with code {proc.returncode}; see its log")
            if await _mesh_serving(layout):
                return
            await asyncio.sleep(1.0)
    raise TimeoutError(f"mesh not SERVING after {timeout_s:.0f}s")


def run_demo(
    *,
    json_path: Path | None,
    keep: bool,
    concurrency: int,
    burst_size: int,
    max_tokens: int,
    data_dir: Path,
    start_timeout_s: float,
) -> Report:
    console = Console() if sys.stdout.isatty() else Console(width=132)  # logs and CI: room for the tables
    layout = MeshLayout(data_dir=data_dir)
    proc: subprocess.Popen[bytes] | None = None
    log_file = data_dir / "mesh.log"
    if not asyncio.run(_mesh_serving(layout)):
        data_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"mesh not running: starting it (`costmesh up`, log in {log_file})")
        with log_file.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    try:
        if proc is not None:
            asyncio.run(_wait_serving(layout, proc, start_timeout_s, console))
        report = asyncio.run(
            replay(layout, concurrency=concurrency, burst_size=burst_size, max_tokens=max_tokens, console=console)
        )
        render(report, console)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
            console.print(f"wrote {json_path}")
        return report
    finally:
        if proc is not None and not keep:
            console.print("stopping the mesh")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc is not None:
            console.print(f"mesh left running (pid {proc.pid}); stop it with: kill {proc.pid}")
