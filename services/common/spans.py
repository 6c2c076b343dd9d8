"""Span helpers shared by the services: cost attributes on the current span, attribution as W3C baggage, and the
trace context a durable job carries so its worker span can link back to the request that submitted it.

Nothing here imports gRPC: servicers and domain modules call these with plain values. Attribute names come from
:mod:`services.common.semconv` (documented in docs/telemetry.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import baggage, context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common import semconv as sc
from services.common.attribution import Attribution

AttributeValue = str | bool | int | float | Sequence[str]

_TRACECONTEXT = TraceContextTextMapPropagator()


def annotate(attributes: Mapping[str, AttributeValue | None], span: trace.Span | None = None) -> None:
    """Set ``attributes`` on ``span`` (default: the current span); ``None`` values and unsampled spans are skipped."""
    span = span or trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def attribution_attributes(attribution: Attribution) -> dict[str, str]:
    """``costmesh.tenant`` / ``costmesh.team`` / ``costmesh.feature`` for the non-empty fields of ``attribution``."""
    pairs = ((sc.TENANT, attribution.tenant), (sc.TEAM, attribution.team), (sc.FEATURE, attribution.feature))
    return {key: value for key, value in pairs if value}


def attribution_from_baggage(ctx: context.Context | None = None) -> Attribution:
    """The attribution an upstream service put in the W3C baggage of this request (empty fields when absent)."""

    entries = baggage.get_all(ctx)

    def get(key: str) -> str:
        value = entries.get(key)
        return value if isinstance(value, str) else ""

    return Attribution(tenant=get(sc.TENANT), team=get(sc.TEAM), feature=get(sc.FEATURE))


def with_baggage(attribution: Attribution) -> Attribution:
    """``attribution`` with its empty tenant/team/feature taken from the incoming baggage."""
    return attribution.merged_with(attribution_from_baggage())


def baggage_context(attribution: Attribution, ctx: context.Context | None = None) -> context.Context:
    """``ctx`` (default: the current context) with the non-empty fields of ``attribution`` set as baggage."""
    out = ctx if ctx is not None else context.get_current()
    present = baggage.get_all(out)
    for key, value in attribution_attributes(attribution).items():
        if present.get(key) != value:  # an entry that already has the value: a copy of the context changes nothing
            out = baggage.set_baggage(key, value, out)
    return out


@contextmanager
def attribution_baggage(attribution: Attribution) -> Iterator[None]:
    """Within the block, outgoing calls carry ``attribution`` (merged over any incoming baggage) as W3C baggage."""
    token = context.attach(baggage_context(with_baggage(attribution)))
    try:
        yield
    finally:
        context.detach(token)


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span ("" when there is none), to be stored with a durable job."""
    carrier: dict[str, str] = {}
    _TRACECONTEXT.inject(carrier)
    return carrier.get("traceparent", "")


def link_to(traceparent: str) -> list[trace.Link]:
    """A span link to the span named by a stored ``traceparent`` (none when it is empty or malformed)."""
    if not traceparent:
        return []
    ctx = trace.get_current_span(_TRACECONTEXT.extract({"traceparent": traceparent})).get_span_context()
    return [trace.Link(ctx)] if ctx.is_valid else []
