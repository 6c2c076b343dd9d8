"""Span helpers: attribution as W3C baggage across a hop, the traceparent a job stores, and the job span's link."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import semconv as sc
from services.common.attribution import Attribution
from services.common.spans import (
    annotate,
    attribution_baggage,
    attribution_from_baggage,
    current_traceparent,
    link_to,
    with_baggage,
)
from services.infer.domain import GenerationRequest
from services.infer.jobs.store import Job, JobState
from services.infer.metrics import job_span


@pytest.fixture
def tracer() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_attribution_travels_as_w3c_baggage_and_is_read_back_on_the_other_side() -> None:
    carrier: dict[str, str] = {}
    with attribution_baggage(Attribution(tenant="acme", team="search ops", feature="faq")):
        propagate.inject(carrier)  # what the gRPC client interceptor does with the call's metadata
    assert "costmesh.tenant=acme" in carrier["baggage"]
    assert baggage.get_all() == {}  # nothing leaks out of the block
    token = context.attach(propagate.extract(carrier))  # what the server interceptor does
    try:
        assert attribution_from_baggage() == Attribution(tenant="acme", team="search ops", feature="faq")
        # a request's own fields win; empty ones are filled from the baggage
        assert with_baggage(Attribution(tenant="acme", feature="other")) == Attribution(
            tenant="acme", team="search ops", feature="other"
        )
    finally:
        context.detach(token)


def test_nested_baggage_keeps_upstream_fields_the_request_leaves_empty() -> None:
    with attribution_baggage(Attribution(tenant="acme", team="search")):
        with attribution_baggage(Attribution(tenant="acme", feature="faq")):
            assert attribution_from_baggage() == Attribution(tenant="acme", team="search", feature="faq")
        assert attribution_from_baggage() == Attribution(tenant="acme", team="search")


def test_annotate_skips_none_and_unsampled_spans(tracer: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    t, exporter = tracer
    annotate({sc.TIER: "full"})  # no current span: nothing to do, no error
    with t.start_as_current_span("s"):
        annotate({sc.TIER: "full", sc.BUDGET_REMAINING_MICROS: None})
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {}) == {sc.TIER: "full"}


def test_a_job_span_starts_a_new_trace_linked_to_the_submitting_span(
    tracer: tuple[trace.Tracer, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, exporter = tracer
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: t)  # job_span uses the process (global) tracer
    with t.start_as_current_span("SubmitJob") as submit:
        traceparent = current_traceparent()
        request = GenerationRequest(request_id="r1", prompt="hi", trace_context=traceparent)
    assert GenerationRequest.from_json(request.to_json()).trace_context == traceparent
    job = Job("job_1", "r1", "acme", JobState.RUNNING, request.to_json(), "", 2, 0)
    with t.start_as_current_span("runner loop"), job_span(job) as span:
        assert span.get_span_context().trace_id != submit.get_span_context().trace_id
    finished = {s.name: s for s in exporter.get_finished_spans()}
    run = finished["costmesh.infer.job"]
    assert run.parent is None and run.kind is trace.SpanKind.CONSUMER
    (link,) = run.links
    assert link.context.trace_id == submit.get_span_context().trace_id
    assert link.context.span_id == submit.get_span_context().span_id
    assert dict(run.attributes or {}) == {sc.JOB_ID: "job_1", sc.JOB_ATTEMPT: 2, sc.TENANT: "acme"}


def test_a_job_without_trace_context_gets_an_unlinked_span(
    tracer: tuple[trace.Tracer, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, exporter = tracer
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: t)
    old = json.dumps({"request_id": "r1", "prompt": "hi"})  # a job queued before trace_context existed
    for payload in (old, "not json"):
        with job_span(Job("job_1", "r1", "acme", JobState.RUNNING, payload, "", 1, 0)):
            pass
    assert [s.links for s in exporter.get_finished_spans()] == [(), ()]
    assert current_traceparent() == "" and link_to("") == [] and link_to("00-garbage") == []
