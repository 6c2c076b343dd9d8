"""OTLP span export with a cheaper encoder than the exporter's own.

``opentelemetry-exporter-otlp-proto-grpc`` turns each finished span into protobuf messages attribute by attribute
(a ``KeyValue`` and an ``AnyValue`` built in Python for every attribute of every span) and groups spans by hashing
their ``Resource`` — a JSON dump of the resource's attributes — once per span. On this project's 2-core machine that
is 107 µs a span with the ~18 attributes a costmesh span carries (``bench/telemetry.py``), paid in the export thread
of every service, which competes with the event loop for the GIL and the cores (docs/telemetry.md, Cost of
telemetry).

:func:`encode_spans` builds the same ``ExportTraceServiceRequest`` (tests/unit/test_span_export.py checks equality
with the library's encoder over generated spans) in 25 µs a span:

* a scalar attribute seen before reuses its serialized ``Span.attributes`` field: most attributes repeat from span to
  span (``rpc.system``, ``rpc.service``, the tenant, the tier, the model) — a bounded memo, cleared when full, so
  high-cardinality values (request ids, costs) cannot grow it;
* spans are grouped by resource and scope identity (a provider shares one ``Resource`` object across all its spans),
  comparing an object for equality only the first time it appears in a batch;
* each span is serialized without its attributes, the memoised fields are appended, and the request is assembled as
  bytes and parsed once.

:class:`OtlpSpanExporter` is the library's OTLP/gRPC exporter (channel, retries, compression, timeouts, its own
metrics) with this encoder in place of ``encode_spans``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes, _encode_key_value
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope as PbScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, SpanFlags, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

__all__ = ["OtlpSpanExporter", "encode_spans"]

_KIND = {
    SpanKind.INTERNAL: PbSpan.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PbSpan.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PbSpan.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PbSpan.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PbSpan.SpanKind.SPAN_KIND_CONSUMER,
}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_SCALARS = (str, bool, int, float, bytes)

#: Encoded attributes kept for reuse, at most this many (cleared when full; each entry is a few hundred bytes).
MEMO_LIMIT = 4096


def _varint(n: int) -> bytes:
    """``n`` (non-negative) as a protobuf base-128 varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited protobuf field: ``tag`` (field number and wire type 2), the length, then ``payload``."""
    return tag + _varint(len(payload)) + payload


# One-byte tags (field number << 3 | wire type 2) of the fields this encoder writes as bytes.
_SPAN_ATTRIBUTES = b"\x4a"  # Span.attributes = 9
_SCOPE_SPANS_SPANS = b"\x12"  # ScopeSpans.spans = 2
_RESOURCE_SPANS_SCOPE_SPANS = b"\x12"  # ResourceSpans.scope_spans = 2
_REQUEST_RESOURCE_SPANS = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1


class _AttributeMemo:
    """Each span attribute as its serialized ``Span.attributes`` field, memoised for scalar values.

    Keyed by ``(key, type, value)`` — exact types, so ``True`` and ``1``, or ``1`` and ``1.0``, stay different
    attributes — and bounded by ``limit`` (cleared when full).
    """

    def __init__(self, limit: int = MEMO_LIMIT) -> None:
        self._limit = limit
        self._fields: dict[tuple[str, type, object], bytes] = {}

    def span_fields(self, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        fields = self._fields
        out: list[bytes] = []
        for key, value in attributes.items():
            kind = type(value)
            if kind in _SCALARS:
                memo_key = (key, kind, value)
                field = fields.get(memo_key)
                if field is None:
                    field = _field(_SPAN_ATTRIBUTES, _encode_key_value(key, value).SerializeToString())
                    if len(fields) >= self._limit:
                        fields.clear()
                    fields[memo_key] = field
                out.append(field)
            else:  # sequences and anything else: the library's encoding, which also logs what it cannot encode
                out.extend(_field(_SPAN_ATTRIBUTES, kv.SerializeToString()) for kv in _encode_attributes({key: value}))
        return b"".join(out)


_MEMO = _AttributeMemo()


def _flags(context: SpanContext | None) -> int:
    return _HAS_IS_REMOTE | _IS_REMOTE if context is not None and context.is_remote else _HAS_IS_REMOTE


def _span(span: ReadableSpan, memo: _AttributeMemo) -> bytes:
    """One serialized ``Span``: every field but the attributes through protobuf, then the memoised attributes."""
    ctx = span.get_span_context()
    assert ctx is not None  # an SDK span always has one
    parent = span.parent
    status = span.status
    pb = PbSpan(
        trace_id=ctx.trace_id.to_bytes(16, "big"),
        span_id=ctx.span_id.to_bytes(8, "big"),
        parent_span_id=parent.span_id.to_bytes(8, "big") if parent else b"",
        name=span.name,
        kind=_KIND[span.kind],
        start_time_unix_nano=span.start_time or 0,
        end_time_unix_nano=span.end_time or 0,
        status=Status(code=Status.StatusCode.ValueType(status.status_code.value), message=status.description or ""),
        dropped_attributes_count=span.dropped_attributes,
        dropped_events_count=span.dropped_events,
        dropped_links_count=span.dropped_links,
        flags=_flags(parent),
    )
    if ctx.trace_state is not None:
        pb.trace_state = ",".join(f"{key}={value}" for key, value in ctx.trace_state.items())
    for event in span.events:
        pb.events.append(
            PbSpan.Event(
                name=event.name,
                time_unix_nano=event.timestamp,
                attributes=_encode_attributes(event.attributes),
                dropped_attributes_count=event.dropped_attributes,
            )
        )
    for link in span.links:
        pb.links.append(
            PbSpan.Link(
                trace_id=link.context.trace_id.to_bytes(16, "big"),
                span_id=link.context.span_id.to_bytes(8, "big"),
                attributes=_encode_attributes(link.attributes),
                dropped_attributes_count=link.dropped_attributes,
                flags=_flags(link.context),
            )
        )
    # A parser appends the elements of a repeated field in the order they come, wherever they are in the message:
    # the attributes after the other fields parse as the same Span.
    return pb.SerializeToString() + memo.span_fields(span.attributes)


class _Group:
    """The serialized spans of one resource in one request, by scope, in the order each scope first appears."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.scopes: list[tuple[InstrumentationScope | None, list[bytes]]] = []
        self._by_id: dict[int, list[bytes]] = {}

    def spans_of(self, scope: InstrumentationScope | None) -> list[bytes]:
        found = self._by_id.get(id(scope))
        if found is None:  # a scope object not seen in this request: an equal one shares its group
            found = next((spans for s, spans in self.scopes if s == scope), None)
            if found is None:
                found = []
                self.scopes.append((scope, found))
            self._by_id[id(scope)] = found
        return found

    def serialized(self) -> bytes:
        head = ResourceSpans(
            resource=PbResource(attributes=_encode_attributes(self.resource.attributes)),
            schema_url=self.resource.schema_url,
        ).SerializeToString()
        scope_spans = (
            ScopeSpans(scope=_scope(scope), schema_url=(scope.schema_url or "") if scope else "").SerializeToString()
            + b"".join([_field(_SCOPE_SPANS_SPANS, span) for span in spans])
            for scope, spans in self.scopes
        )
        return head + b"".join(_field(_RESOURCE_SPANS_SCOPE_SPANS, s) for s in scope_spans)


def encode_spans(spans: Sequence[ReadableSpan], memo: _AttributeMemo | None = None) -> ExportTraceServiceRequest:
    """The OTLP request for ``spans``: equal to the exporter library's ``encode_spans(spans)``, built faster.

    Spans are grouped by resource, then scope, each in order of first appearance, as the library does; objects are
    looked up by identity (a provider shares one ``Resource`` object across its spans) and compared for equality
    only the first time an object appears in the request. The request is assembled as bytes and parsed once.
    """
    memo = memo or _MEMO
    groups: list[_Group] = []
    by_id: dict[int, _Group] = {}
    for span in spans:
        resource = span.resource
        group = by_id.get(id(resource))
        if group is None:
            group = next((g for g in groups if g.resource == resource), None)
            if group is None:
                group = _Group(resource)
                groups.append(group)
            by_id[id(resource)] = group
        group.spans_of(span.instrumentation_scope or None).append(_span(span, memo))
    return ExportTraceServiceRequest.FromString(
        b"".join(_field(_REQUEST_RESOURCE_SPANS, group.serialized()) for group in groups)
    )


def _scope(scope: InstrumentationScope | None) -> PbScope:
    if scope is None:
        return PbScope()
    return PbScope(name=scope.name, version=scope.version or "", attributes=_encode_attributes(scope.attributes))


class OtlpSpanExporter(OTLPSpanExporter):
    """The library's OTLP/gRPC span exporter, encoding with :func:`encode_spans`."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return encode_spans(data)
