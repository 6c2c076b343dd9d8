"""``costmesh budget set|show|usage``: admin commands that talk to a running budget service over gRPC.

Scopes are written as ``global``, ``tenant:<t>``, ``tenant:<t>/team:<name>``, ``tenant:<t>/feature:<name>`` or
``tenant:<t>/end_user:<id>``. Money is given in USD as a decimal (``12.50``) and converted exactly to micro-USD.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf.json_format import MessageToDict

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from services.cli import credentials
from services.common.channels import create_channel
from services.common.settings import DEFAULT_PORTS

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Budgets: limits, headroom and usage.")
app.callback()(credentials.credentials_options)  # --admin-key / COSTMESH_ADMIN_KEY, TLS files

T = TypeVar("T")
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORTS['budget']}"
Target = Annotated[str, typer.Option(help="budget service host:port")]
Timeout = Annotated[float, typer.Option(help="deadline of the call, seconds")]
AsJson = Annotated[bool, typer.Option("--json", help="print the response as JSON")]

_KINDS = {
    "team": budget_pb2.SCOPE_KIND_TEAM,
    "feature": budget_pb2.SCOPE_KIND_FEATURE,
    "end_user": budget_pb2.SCOPE_KIND_END_USER,
}
_WINDOWS = {
    "hour": budget_pb2.WINDOW_HOUR,
    "day": budget_pb2.WINDOW_DAY,
    "month": budget_pb2.WINDOW_MONTH,
    "lifetime": budget_pb2.WINDOW_LIFETIME,
}
_GROUPS = {
    "tenant": budget_pb2.GROUP_BY_TENANT,
    "team": budget_pb2.GROUP_BY_TEAM,
    "feature": budget_pb2.GROUP_BY_FEATURE,
    "model": budget_pb2.GROUP_BY_MODEL,
    "tier": budget_pb2.GROUP_BY_TIER,
    "end_user": budget_pb2.GROUP_BY_END_USER,
}
_TIERS = {0: "-", 1: "cheap", 2: "full"}


def parse_scope(text: str) -> budget_pb2.Scope:
    """``global`` | ``tenant:<t>`` | ``tenant:<t>/<team|feature|end_user>:<name>`` → Scope."""
    if text == "global":
        return budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_GLOBAL)
    head, slash, rest = text.partition("/")
    kind, _, tenant = head.partition(":")
    if kind != "tenant" or not tenant or (slash and not rest):
        raise typer.BadParameter(f"{text!r}: expected global, tenant:<t> or tenant:<t>/<team|feature|end_user>:<n>")
    if not rest:
        return budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant)
    sub, _, name = rest.partition(":")
    if sub not in _KINDS or not name:
        raise typer.BadParameter(f"{text!r}: the part after '/' must be team:<n>, feature:<n> or end_user:<n>")
    return budget_pb2.Scope(kind=_KINDS[sub], tenant=tenant, name=name)


def scope_label(scope: budget_pb2.Scope) -> str:
    if scope.kind == budget_pb2.SCOPE_KIND_GLOBAL:
        return "global"
    base = f"tenant:{scope.tenant}"
    names = {v: k for k, v in _KINDS.items()}
    return f"{base}/{names[scope.kind]}:{scope.name}" if scope.kind in names else base


def usd_to_micros(text: str) -> int:
    """``"12.5"`` → 12_500_000 exactly; finer than one micro-USD is refused."""
    try:
        value = Decimal(text) * 1_000_000
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not a decimal amount of USD") from None
    if value != value.to_integral_value():
        raise typer.BadParameter(f"{text!r}: finer than one micro-USD")
    return int(value)


def micros_to_usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def _parse_time(text: str) -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


async def _call(target: str, timeout_s: float, fn: Callable[[Any], Awaitable[T]]) -> T:
    async with create_channel(target, timeout_s=timeout_s, **credentials.current().channel_args()) as channel:
        return await fn(budget_pb2_grpc.BudgetServiceStub(channel))


def _run(target: str, timeout_s: float, fn: Callable[[Any], Awaitable[T]]) -> T:
    try:
        return asyncio.run(_call(target, timeout_s, fn))
    except grpc.aio.AioRpcError as err:
        typer.echo(f"error: {err.code().name}: {err.details()}", err=True)
        raise typer.Exit(2) from err


def _print_json(message: Any) -> None:
    typer.echo(json.dumps(MessageToDict(message, always_print_fields_with_no_presence=True), indent=2))


def _print_policy(policy: budget_pb2.BudgetPolicy) -> None:
    typer.echo(f"scope           {scope_label(policy.scope)}")
    typer.echo(f"soft threshold  {policy.soft_threshold:.3f}")
    typer.echo(f"requests/min    {policy.requests_per_minute or '-'}")
    typer.echo(f"tokens/min      {policy.tokens_per_minute or '-'}")
    typer.echo(f"max tokens/req  {policy.max_tokens_per_request or '-'}")


def _print_headroom(rows: Any) -> None:
    if not rows:
        return
    typer.echo(
        f"{'window':<9} {'limit USD':>14} {'spent USD':>14} {'reserved USD':>14} {'remaining USD':>14} "
        f"{'limit tok':>12} {'used tok':>12} {'soft':>5}  resets (UTC)"
    )
    names = {v: k for k, v in _WINDOWS.items()}
    for h in rows:
        resets = (
            datetime.fromtimestamp(h.resets_unix_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
            if h.resets_unix_ms
            else "never"
        )
        typer.echo(
            f"{names.get(h.window, '?'):<9} "
            f"{micros_to_usd(h.limit_micros) if h.HasField('limit_micros') else '-':>14} "
            f"{micros_to_usd(h.spent_micros):>14} {micros_to_usd(h.reserved_micros):>14} "
            f"{micros_to_usd(h.remaining_micros) if h.HasField('remaining_micros') else '-':>14} "
            f"{h.limit_tokens if h.HasField('limit_tokens') else '-':>12} {h.used_tokens:>12} "
            f"{'yes' if h.soft_exceeded else 'no':>5}  {resets}"
        )


@app.command("set")
def set_budget(
    scope: Annotated[str, typer.Argument(help="global | tenant:<t> | tenant:<t>/<team|feature|end_user>:<name>")],
    hour_usd: Annotated[str | None, typer.Option(help="hard limit per UTC hour, USD")] = None,
    day_usd: Annotated[str | None, typer.Option(help="hard limit per UTC day, USD")] = None,
    month_usd: Annotated[str | None, typer.Option(help="hard limit per UTC calendar month, USD")] = None,
    lifetime_usd: Annotated[str | None, typer.Option(help="hard limit that never resets, USD")] = None,
    hour_tokens: Annotated[int | None, typer.Option(min=0, help="token limit per hour")] = None,
    day_tokens: Annotated[int | None, typer.Option(min=0, help="token limit per day")] = None,
    month_tokens: Annotated[int | None, typer.Option(min=0, help="token limit per month")] = None,
    lifetime_tokens: Annotated[int | None, typer.Option(min=0, help="token limit, lifetime")] = None,
    soft: Annotated[float | None, typer.Option(help="soft threshold as a share of each limit (default 0.8)")] = None,
    rpm: Annotated[int, typer.Option(min=0, help="requests per rolling minute (0 = no cap)")] = 0,
    tpm: Annotated[int, typer.Option(min=0, help="estimated tokens per rolling minute (0 = no cap)")] = 0,
    max_tokens: Annotated[int, typer.Option(min=0, help="per-request max_tokens cap (0 = none)")] = 0,
    target: Target = DEFAULT_TARGET,
    timeout_s: Timeout = 5.0,
    as_json: AsJson = False,
) -> None:
    """Create or replace the policy of one scope."""
    policy = budget_pb2.BudgetPolicy(
        scope=parse_scope(scope), requests_per_minute=rpm, tokens_per_minute=tpm, max_tokens_per_request=max_tokens
    )
    if soft is not None:
        policy.soft_threshold = soft
    per_window = {
        "hour": (hour_usd, hour_tokens),
        "day": (day_usd, day_tokens),
        "month": (month_usd, month_tokens),
        "lifetime": (lifetime_usd, lifetime_tokens),
    }
    for name, (usd, tokens) in per_window.items():
        if usd is None and tokens is None:
            continue
        limit = policy.limits.add(window=_WINDOWS[name])
        if usd is not None:
            limit.cost_micros = usd_to_micros(usd)
        if tokens is not None:
            limit.tokens = tokens
    request = budget_pb2.SetBudgetRequest(policy=policy)
    response = _run(target, timeout_s, lambda stub: stub.SetBudget(request, timeout=timeout_s))
    if as_json:
        _print_json(response)
        return
    typer.echo("stored")
    _print_policy(response.policy)


@app.command()
def show(
    scope: Annotated[str, typer.Argument(help="global | tenant:<t> | tenant:<t>/<team|feature|end_user>:<name>")],
    target: Target = DEFAULT_TARGET,
    timeout_s: Timeout = 5.0,
    as_json: AsJson = False,
) -> None:
    """A scope's policy and its headroom in each limited window."""
    request = budget_pb2.GetBudgetRequest(scope=parse_scope(scope))
    response = _run(target, timeout_s, lambda stub: stub.GetBudget(request, timeout=timeout_s))
    if as_json:
        _print_json(response)
        return
    if not response.HasField("policy"):
        typer.echo(f"{scope}: no policy (not limited)")
        return
    _print_policy(response.policy)
    _print_headroom(response.headroom)


@app.command()
def usage(
    tenant: Annotated[str, typer.Option(help="one tenant; empty = every tenant")] = "",
    window: Annotated[str, typer.Option(help="hour | day | month | lifetime (used when --since is not given)")] = (
        "month"
    ),
    since: Annotated[str | None, typer.Option(help="range start, ISO 8601 (UTC unless an offset is given)")] = None,
    until: Annotated[str | None, typer.Option(help="range end, ISO 8601 (default now)")] = None,
    group_by: Annotated[str, typer.Option(help="comma list of tenant,team,feature,model,tier,end_user")] = "",
    target: Target = DEFAULT_TARGET,
    timeout_s: Timeout = 30.0,
    as_json: AsJson = False,
) -> None:
    """Spend, tokens, requests and savings, grouped by attribution dimensions."""
    if window not in _WINDOWS:
        raise typer.BadParameter(f"window must be one of {', '.join(_WINDOWS)}")
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in _GROUPS]
    if unknown:
        raise typer.BadParameter(f"unknown --group-by {', '.join(unknown)}; use {', '.join(_GROUPS)}")
    request = budget_pb2.GetUsageRequest(
        tenant=tenant,
        window=_WINDOWS[window],
        start_unix_ms=_parse_time(since) if since else 0,
        end_unix_ms=_parse_time(until) if until else 0,
        group_by=[_GROUPS[g] for g in groups],
    )
    response = _run(target, timeout_s, lambda stub: stub.GetUsage(request, timeout=timeout_s))
    if as_json:
        _print_json(response)
        return
    cols = groups or ["total"]
    key_width = max(12, *(len(c) + 2 for c in cols))
    header = " ".join(f"{c:<{key_width}}" for c in cols)
    typer.echo(
        f"{header} {'spent USD':>14} {'saved USD':>14} {'requests':>9} {'in tok':>11} {'out tok':>11} "
        f"{'cache hits':>10} {'over est':>8} {'late':>6}"
    )

    def line(keys: list[str], row: budget_pb2.UsageRow) -> str:
        cells = " ".join(f"{k or '-':<{key_width}}" for k in keys)
        return (
            f"{cells} {micros_to_usd(row.cost_micros):>14} {micros_to_usd(row.saved_micros):>14} {row.requests:>9} "
            f"{row.usage.input_tokens:>11} {row.usage.output_tokens:>11} {row.cache_hits:>10} "
            f"{row.over_estimate_commits:>8} {row.late_commits:>6}"
        )

    for row in response.rows if groups else []:
        values = {
            "tenant": row.tenant,
            "team": row.team,
            "feature": row.feature,
            "model": row.model,
            "tier": _TIERS.get(int(row.tier), str(row.tier)),
            "end_user": row.end_user,
        }
        typer.echo(line([values[g] for g in groups], row))
    typer.echo(line(["TOTAL"] + [""] * (len(cols) - 1), response.total))
