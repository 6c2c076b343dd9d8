"""``costmesh cache stats|invalidate``: admin commands that talk to a running cache service over gRPC."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import grpc
import typer
from google.protobuf.json_format import MessageToDict

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from services.cli import credentials
from services.common.channels import create_channel
from services.common.settings import DEFAULT_PORTS

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Response cache: counters and invalidation.")
app.callback()(credentials.credentials_options)  # --admin-key / COSTMESH_ADMIN_KEY, TLS files

DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORTS['cache']}"
Target = Annotated[str, typer.Option(help="cache service host:port")]
Timeout = Annotated[float, typer.Option(help="deadline of the call, seconds")]

_COLUMNS = ("hits", "misses", "coalesced_waits", "uncacheable", "fills", "saved_micros", "store_errors")


async def _stats(target: str, tenant: str, timeout_s: float) -> cache_pb2.GetStatsResponse:
    async with create_channel(target, timeout_s=timeout_s, **credentials.current().channel_args()) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        return await stub.GetStats(cache_pb2.GetStatsRequest(tenant=tenant), timeout=timeout_s)


async def _invalidate(
    target: str, tenant: str, feature: str, key: str, timeout_s: float
) -> cache_pb2.InvalidateResponse:
    async with create_channel(target, timeout_s=timeout_s, **credentials.current().channel_args()) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        request = cache_pb2.InvalidateRequest(tenant=tenant, feature=feature, key=key)
        return await stub.Invalidate(request, timeout=timeout_s)


def _fail(err: grpc.aio.AioRpcError) -> typer.Exit:
    typer.echo(f"error: {err.code().name}: {err.details()}", err=True)
    return typer.Exit(2)


def _row(name: str, stats: cache_pb2.CacheStats) -> str:
    lookups = stats.hits + stats.misses
    rate = f"{100 * stats.hits / lookups:.1f}%" if lookups else "-"
    cells = " ".join(f"{getattr(stats, c):>15}" for c in _COLUMNS)
    return f"{name:<32} {cells} {rate:>8}"


@app.command()
def stats(
    tenant: Annotated[str, typer.Option(help="only this tenant; empty = every tenant")] = "",
    target: Target = DEFAULT_TARGET,
    timeout_s: Timeout = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the GetStatsResponse as JSON")] = False,
) -> None:
    """Hits, misses, coalesced waits, saved micro-USD … per tenant and feature."""
    try:
        response = asyncio.run(_stats(target, tenant, timeout_s))
    except grpc.aio.AioRpcError as err:
        raise _fail(err) from err
    if as_json:
        typer.echo(json.dumps(MessageToDict(response, always_print_fields_with_no_presence=True), indent=2))
        return
    header = " ".join(f"{c:>15}" for c in _COLUMNS)
    typer.echo(f"{'tenant/feature':<32} {header} {'hit rate':>8}")
    for group in response.groups:
        typer.echo(_row(f"{group.tenant}/{group.feature or '-'}", group.stats))
    typer.echo(_row("TOTAL", response.total))
    typer.echo(
        f"entries={response.entries} bytes={response.bytes} evictions={response.total.evictions} "
        f"saved_usd={response.total.saved_micros / 1_000_000:.6f}"
    )


@app.command()
def invalidate(
    tenant: Annotated[str, typer.Option(help="namespace (tenant) to invalidate in; required")],
    feature: Annotated[str, typer.Option(help="only entries stored for this feature")] = "",
    key: Annotated[str, typer.Option(help="only this 64-hex-digit key")] = "",
    target: Target = DEFAULT_TARGET,
    timeout_s: Timeout = 30.0,
) -> None:
    """Remove a tenant's entries: all of them, one feature's, or one key."""
    try:
        response = asyncio.run(_invalidate(target, tenant, feature, key, timeout_s))
    except grpc.aio.AioRpcError as err:
        raise _fail(err) from err
    typer.echo(f"removed {response.removed}")
