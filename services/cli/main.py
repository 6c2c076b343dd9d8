"""``costmesh``: serve one service, run the whole mesh, check health, and each service's admin commands."""

from __future__ import annotations

import asyncio
import os
import runpy
from pathlib import Path
from typing import Annotated

import typer

from services.budget.cli import app as budget_app
from services.cache.cli import app as cache_app
from services.cli.certs import app as certs_app
from services.cli.mesh import MeshLayout
from services.cli.supervisor import Supervisor
from services.common.health import check_target
from services.infer.cli import app as infer_app
from services.infer.cli import models_app
from services.router.cli import app as router_app

SERVICES = ("router", "cache", "budget", "infer")

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(budget_app, name="budget")
app.add_typer(cache_app, name="cache")
app.add_typer(models_app, name="models")
app.add_typer(infer_app, name="infer")
app.add_typer(router_app, name="router")
app.add_typer(certs_app, name="certs")


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="router | cache | budget | infer")],
    config: Annotated[Path | None, typer.Option(help="YAML settings file (COSTMESH_CONFIG)")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (COSTMESH_<SVC>_PORT)")] = None,
    tier: Annotated[str | None, typer.Option(help="infer only: cheap | full (COSTMESH_INFER_TIER)")] = None,
) -> None:
    """Run one service in the foreground (the same as ``python -m services.<service>``)."""
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    # The command line is an entry point: it may translate its options into the settings' environment.
    if config is not None:
        os.environ["COSTMESH_CONFIG"] = str(config)
    if port is not None:
        os.environ[f"COSTMESH_{service.upper()}_PORT"] = str(port)
    if tier is not None:
        os.environ["COSTMESH_INFER_TIER"] = tier
    runpy.run_module(f"services.{service}", run_name="__main__", alter_sys=True)


@app.command()
def up(
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL: cache, budget and jobs in Redis")] = None,
    otlp_endpoint: Annotated[str | None, typer.Option(help="OTLP/gRPC collector, e.g. 127.0.0.1:4317")] = None,
    trace_sample_ratio: Annotated[float | None, typer.Option(help="share of traces sampled")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML settings file for every service")] = None,
    data_dir: Annotated[Path, typer.Option(help="SQLite files and state")] = Path("var"),
    models_dir: Annotated[Path, typer.Option(help="model directories <dir>/cheap and <dir>/full")] = Path("var/models"),
    host: Annotated[str, typer.Option(help="interface every service binds")] = "127.0.0.1",
) -> None:
    """Run the whole mesh (budget, cache, two infer workers, router) as supervised processes until Ctrl-C."""
    data_dir.mkdir(parents=True, exist_ok=True)
    layout = MeshLayout(
        host=host,
        data_dir=data_dir,
        models_dir=models_dir,
        redis_url=redis,
        otlp_endpoint=otlp_endpoint,
        trace_sample_ratio=trace_sample_ratio,
        config_file=config,
    )
    _ensure_models(models_dir)
    asyncio.run(Supervisor(layout.children()).run())


def _ensure_models(models_dir: Path) -> None:
    from services.infer.models import ensure_local_models

    ensure_local_models(models_dir)


@app.command()
def health(
    target: Annotated[list[str] | None, typer.Option(help="name=host:port; default: the local mesh")] = None,
    timeout_s: Annotated[float, typer.Option(help="per-check deadline")] = 2.0,
) -> None:
    """Health of each service; exits 1 unless every one is SERVING."""
    layout = MeshLayout()
    targets = dict(t.split("=", 1) for t in target) if target else {n: layout.target(n) for n in layout.ports}

    async def run() -> dict[str, str]:
        results = await asyncio.gather(*(check_target(t, timeout_s=timeout_s) for t in targets.values()))
        return dict(zip(targets, results, strict=True))

    statuses = asyncio.run(run())
    for name, status in statuses.items():
        typer.echo(f"{name:<12} {targets[name]:<22} {status}")
    if any(s != "SERVING" for s in statuses.values()):
        raise typer.Exit(1)


@app.command()
def demo(
    json_path: Annotated[Path | None, typer.Option("--json", help="write the whole report as JSON")] = None,
    keep: Annotated[bool, typer.Option(help="leave a mesh that demo started running")] = False,
    concurrency: Annotated[int, typer.Option(help="requests in flight (bursts excepted)")] = 8,
    burst_size: Annotated[int, typer.Option(help="identical requests per burst")] = 12,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request")] = 32,
    data_dir: Annotated[Path, typer.Option(help="state of a mesh that demo starts")] = Path("var/demo"),
    start_timeout_s: Annotated[float, typer.Option(help="how long the mesh may take to become SERVING")] = 300,
) -> None:
    """Replay the bundled workload through the mesh (starting it if needed) and print the cost report."""
    from services.cli.demo import run_demo

    _ensure_models(Path("var/models"))
    report = run_demo(
        json_path=json_path,
        keep=keep,
        concurrency=concurrency,
        burst_size=burst_size,
        max_tokens=max_tokens,
        data_dir=data_dir,
        start_timeout_s=start_timeout_s,
    )
    if not report.ledger_matches or report.served == 0:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
