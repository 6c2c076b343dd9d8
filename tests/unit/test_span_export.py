"""costmesh's OTLP span encoder builds exactly the request the exporter library's encoder builds.

Spans are made by the real SDK (``TracerProvider``; attributes, events, links, status, parents local and remote,
trace state, several providers and tracers) and collected by an in-memory exporter; the oracle is
``opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans``, compared as protobuf messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from services.common.span_export import OtlpSpanExporter, _AttributeMemo, encode_spans


class Collect(SpanExporter):
    def __init__(self, into: list[ReadableSpan]) -> None:
        self.into = into

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.into.extend(spans)
        return SpanExportResult.SUCCESS


keys = st.sampled_from(["rpc.system", "costmesh.tier", "costmesh.cost.micros", "gen_ai.request.model", "k", "é ü"])
scalars = st.one_of(
    st.text(max_size=300),  # past 127 bytes the field's length takes two varint bytes
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.sampled_from([0, 1, True, False, 1.0, 0.0, "", "cheap"]),  # equal across types: must stay distinct
)
arrays = st.one_of(
    st.lists(st.text(max_size=8), max_size=3),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.lists(st.booleans(), max_size=3),
)
attributes = st.dictionaries(keys, st.one_of(scalars, arrays), max_size=6)
contexts = st.builds(
    lambda t, s, remote: SpanContext(t, s, is_remote=remote, trace_flags=TraceFlags(TraceFlags.SAMPLED)),
    st.integers(min_value=1, max_value=2**128 - 1),
    st.integers(min_value=1, max_value=2**64 - 1),
    st.booleans(),
)


@st.composite
def span_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "provider": draw(st.integers(min_value=0, max_value=2)),
        "tracer": draw(st.integers(min_value=0, max_value=2)),
        "kind": draw(st.sampled_from(list(SpanKind))),
        "name": draw(st.text(max_size=20)),
        "attributes": draw(attributes),
        "events": draw(st.lists(st.tuples(st.text(max_size=10), attributes), max_size=2)),
        "links": draw(st.lists(st.tuples(contexts, attributes), max_size=2)),
        "parent": draw(st.one_of(st.none(), contexts)),
        "status": draw(
            st.one_of(
                st.just(None),
                st.just(Status(StatusCode.OK)),
                st.builds(lambda d: Status(StatusCode.ERROR, d), st.text(max_size=10)),
            )
        ),
    }


def make_spans(specs: list[dict[str, Any]]) -> list[ReadableSpan]:
    spans: list[ReadableSpan] = []
    # Providers 0 and 1 have equal resources in distinct objects (the library groups them by equality); 2 differs.
    resources = [
        Resource.create({"service.name": "costmesh-router"}),
        Resource.create({"service.name": "costmesh-router"}),
        Resource.create({"service.name": "costmesh-cache", "n": 2}, schema_url="https://example/schema"),
    ]
    providers = []
    for resource in resources:
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(Collect(spans)))
        providers.append(provider)
    for spec in specs:
        provider = providers[spec["provider"]]
        tracer = [
            provider.get_tracer("costmesh.router"),
            provider.get_tracer("opentelemetry.instrumentation.grpc", "0.66b0", schema_url="https://x/1"),
            provider.get_tracer("costmesh.router"),  # the same scope again: one group
        ][spec["tracer"]]
        parent = spec["parent"]
        ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
        span = tracer.start_span(
            spec["name"],
            context=ctx,
            kind=spec["kind"],
            attributes=spec["attributes"],
            links=[Link(c, a) for c, a in spec["links"]],
        )
        for name, attrs in spec["events"]:
            span.add_event(name, attrs)
        if spec["status"] is not None:
            span.set_status(spec["status"])
        span.end()
    for provider in providers:
        provider.shutdown()
    return spans


@settings(max_examples=150, deadline=None)
@given(st.lists(span_specs(), max_size=8))
def test_the_request_equals_the_library_encoders(specs: list[dict[str, Any]]) -> None:
    spans = make_spans(specs)
    expected = library_encode_spans(spans)
    assert encode_spans(spans, _AttributeMemo()) == expected
    # a memo warm with earlier spans (and one so small it keeps being cleared) gives the same request
    warm = _AttributeMemo()
    encode_spans(spans, warm)
    assert encode_spans(spans, warm) == expected
    assert encode_spans(spans, _AttributeMemo(limit=2)) == expected
    # what goes on the wire parses back to the same request
    assert ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString()) == expected


def test_values_equal_across_types_stay_distinct_attributes() -> None:
    memo = _AttributeMemo()
    spans = make_spans(
        [
            {**base, "attributes": {"k": value}}
            for base in [
                {
                    "provider": 0,
                    "tracer": 0,
                    "kind": SpanKind.INTERNAL,
                    "name": "s",
                    "events": [],
                    "links": [],
                    "parent": None,
                    "status": None,
                }
            ]
            for value in (1, True, 1.0, "1")
        ]
    )
    request = encode_spans(spans, memo)
    values = [s.attributes[0].value for s in request.resource_spans[0].scope_spans[0].spans]
    assert [v.WhichOneof("value") for v in values] == ["int_value", "bool_value", "double_value", "string_value"]
    assert request == library_encode_spans(spans)


def test_the_memo_is_bounded() -> None:
    memo = _AttributeMemo(limit=16)
    spec = {"provider": 0, "tracer": 0, "kind": SpanKind.SERVER, "name": "s", "events": [], "links": []}
    spans = make_spans([{**spec, "attributes": {"id": i}, "parent": None, "status": None} for i in range(100)])
    assert encode_spans(spans, memo) == library_encode_spans(spans)
    assert 0 < len(memo._fields) <= 16


def test_the_exporter_sends_what_the_encoder_builds() -> None:
    spans = make_spans(
        [
            {
                "provider": 2,
                "tracer": 1,
                "kind": SpanKind.CLIENT,
                "name": "x",
                "attributes": {"costmesh.tier": "cheap"},
                "events": [("first_token", {})],
                "links": [],
                "parent": None,
                "status": None,
            }
        ]
    )
    exporter = OtlpSpanExporter(endpoint="127.0.0.1:9", insecure=True)
    try:
        assert exporter._translate_data(spans) == library_encode_spans(spans)
    finally:
        exporter.shutdown()
