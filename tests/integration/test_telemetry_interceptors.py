"""The telemetry interceptors on a real loopback server: attribution as baggage, call metrics, failed-span status.

A traced router-like hop: the client calls a server through costmesh's client interceptors (and, for
interoperability, through ``opentelemetry-instrumentation-grpc``'s) while attribution baggage is set; the server
(``ServerSpanInterceptor``, ``AttributionBaggageInterceptor``, ``RpcMetricsInterceptor``, the shared
``ErrorInterceptor``) continues the caller's trace, sees the baggage, times each call with its final status code, and
marks the span of a call that failed.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.attribution import Attribution
from services.common.errors import ResourceExhausted
from services.common.rpc_telemetry import (
    AttributionBaggageInterceptor,
    RpcMetricsInterceptor,
    client_interceptors,
)
from services.common.server import ServiceHost, full_service_name
from services.common.settings import ServiceSettings
from services.common.spans import attribution_baggage, attribution_from_baggage
from services.common.telemetry import Telemetry


class BaggageEcho(cache_pb2_grpc.CacheServiceServicer):
    """Answers with the attribution it finds in the call's baggage; a tenant named 'broke' gets a hard stop."""

    async def Lookup(self, request: cache_pb2.LookupRequest, context: Any) -> cache_pb2.LookupResponse:
        a = attribution_from_baggage()
        if a.tenant == "broke":
            raise ResourceExhausted("over budget", reason="BUDGET_EXCEEDED")
        return cache_pb2.LookupResponse(key=f"{a.tenant}|{a.team}|{a.feature}")

    async def Fill(self, request: cache_pb2.FillRequest, context: Any) -> cache_pb2.FillResponse:
        raise RuntimeError("a bug in the servicer")


@pytest.fixture(params=["costmesh", "opentelemetry"])
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[grpc.aio.Channel, InMemorySpanExporter, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    rpc_metrics = RpcMetricsInterceptor()
    spans, tracer_provider, host = traced_host(
        "cache",
        cache_pb2,
        "CacheService",
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(BaggageEcho(), server),
        meter_provider=meter_provider,
        rpc_metrics=rpc_metrics,
    )
    rpc_metrics.bind(meter_provider.get_meter("test"))
    port = await host.start()
    if request.param == "costmesh":
        interceptors = client_interceptors(tracer_provider.get_tracer("costmesh.rpc"))
    else:  # the library's client interceptors against costmesh's server ones
        interceptors = aio_client_interceptors(tracer_provider=tracer_provider)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors)
    yield channel, spans, reader
    await channel.close()
    await host.stop()  # shuts the providers down too


def durations(reader: InMemoryMetricReader) -> dict[tuple[str, int], int]:
    """(method, status code) -> calls recorded in rpc.server.duration."""
    out: dict[tuple[str, int], int] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "rpc.server.duration":
                    for p in m.data.data_points:
                        attrs = dict(p.attributes or {})
                        out[(str(attrs["rpc.method"]), int(attrs["rpc.grpc.status_code"]))] = p.count  # type: ignore[union-attr]
    return out


async def test_baggage_reaches_the_server_and_request_fields_win(
    served: tuple[grpc.aio.Channel, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    channel, spans, _ = served
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    # upstream baggage (as the router sets it) fills what this request leaves empty
    with attribution_baggage(Attribution(tenant="acme", team="search", feature="faq")):
        reply = await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)
    assert reply.key == "acme|search|faq"
    # the request's own attribution and the x-costmesh metadata win over upstream baggage
    with attribution_baggage(Attribution(tenant="acme", team="search", feature="faq")):
        reply = await stub.Lookup(
            cache_pb2.LookupRequest(attribution=common_pb2.Attribution(tenant="other"), model="m"),
            metadata=(("x-costmesh-feature", "chat"),),
            timeout=10,
        )
    assert reply.key == "other|search|chat"
    server = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    client = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(server) == len(client) == 2
    assert {s.parent.span_id for s in server if s.parent} == {c.context.span_id for c in client}
    assert {s.context.trace_id for s in server} == {c.context.trace_id for c in client}
    for span in (*server, *client):
        attrs = dict(span.attributes or {})
        assert span.name == "/costmesh.cache.v1.CacheService/Lookup"
        assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "costmesh.cache.v1.CacheService"
        assert attrs["rpc.method"] == "Lookup" and attrs["rpc.grpc.status_code"] == 0
    assert dict(server[0].attributes or {})["net.peer.ip"] == "127.0.0.1"


async def test_calls_are_timed_by_status_and_failed_spans_are_marked(
    served: tuple[grpc.aio.Channel, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    channel, spans, reader = served
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    await stub.Lookup(cache_pb2.LookupRequest(attribution=common_pb2.Attribution(tenant="acme")), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Lookup(cache_pb2.LookupRequest(attribution=common_pb2.Attribution(tenant="broke")), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as crashed:
        await stub.Fill(cache_pb2.FillRequest(), timeout=10)  # the servicer crashes
    assert crashed.value.code() == grpc.StatusCode.INTERNAL  # what the shared ErrorInterceptor makes of it
    assert durations(reader) == {("Lookup", 0): 1, ("Lookup", 8): 1, ("Fill", 13): 1}
    failed, ok = [], []
    for s in spans.get_finished_spans():
        if s.kind is SpanKind.SERVER and s.name.endswith("/Lookup"):
            (failed if s.status.status_code is StatusCode.ERROR else ok).append(s)
    assert len(failed) == len(ok) == 1
    assert dict(failed[0].attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    # the client side saw the same: one failed Lookup span, with the code the server sent
    failed_client = [
        s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.CLIENT and s.name.endswith("/Lookup") and s.status.status_code is StatusCode.ERROR
    ]
    assert len(failed_client) == 1
    assert (
        dict(failed_client[0].attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    )


async def test_baggage_travels_without_tracing() -> None:
    """No OpenTelemetry interceptors on either side: the baggage interceptors alone carry the attribution."""
    host = ServiceHost(name="cache", settings=ServiceSettings(), interceptors=[AttributionBaggageInterceptor()])
    servicer = BaggageEcho()
    host.add_service(
        full_service_name(cache_pb2, "CacheService"),
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
    )
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors()) as ch:
            stub = cache_pb2_grpc.CacheServiceStub(ch)
            with attribution_baggage(Attribution(tenant="acme", team="search", feature="faq")):
                reply = await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)
            assert reply.key == "acme|search|faq"
            reply = await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)  # no baggage: nothing leaks
            assert reply.key == "||"
    finally:
        await host.stop()


class EndlessStream(infer_pb2_grpc.InferenceServiceServicer):
    """Reads the request, streams the tenant it then finds in the baggage, then chunks until the client goes away."""

    async def Generate(
        self, request_iterator: AsyncIterator[infer_pb2.GenerateRequest], context: Any
    ) -> AsyncIterator[infer_pb2.GenerateResponse]:
        await anext(aiter(request_iterator))  # the first message's attribution joins the baggage once it is read
        yield infer_pb2.GenerateResponse(text=attribution_from_baggage().tenant)
        while True:  # suspended at a yield when the client cancels: grpc drops the stream instead of closing it
            yield infer_pb2.GenerateResponse(text="x" * 1024)


async def test_a_cancelled_stream_keeps_its_baggage_and_logs_no_context_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = ServiceHost(name="infer", settings=ServiceSettings(), interceptors=[AttributionBaggageInterceptor()])
    servicer = EndlessStream()
    host.add_service(
        full_service_name(infer_pb2, "InferenceService"),
        lambda server: infer_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
    )
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors()) as ch:
            request = infer_pb2.GenerateRequest(attribution=common_pb2.Attribution(tenant="acme"))
            call = infer_pb2_grpc.InferenceServiceStub(ch).Generate(iter((request,)), timeout=10)
            first = await anext(call.__aiter__())
            assert first.text == "acme"
            call.cancel()
            await asyncio.sleep(0.5)
    finally:
        await host.stop()
    gc.collect()  # a dropped stream is closed by the event loop's finalizer, in another context
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelname == "ERROR"]


def traced_host(
    name: str,
    module: Any,
    service: str,
    add: Callable[[grpc.aio.Server], None],
    *,
    meter_provider: MeterProvider | None = None,
    rpc_metrics: RpcMetricsInterceptor | None = None,
) -> tuple[InMemorySpanExporter, TracerProvider, ServiceHost]:
    """A host with tracing on (spans kept in memory) and the attribution interceptor (then ``rpc_metrics``, when
    given), serving one service."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    host = ServiceHost(
        name=name,
        settings=ServiceSettings(),
        telemetry=Telemetry(tracer_provider, meter_provider or MeterProvider(), tracing_enabled=True),
        interceptors=[AttributionBaggageInterceptor(), *([rpc_metrics] if rpc_metrics else [])],
    )
    host.add_service(full_service_name(module, service), add)
    return spans, tracer_provider, host


async def test_an_untraced_channel_still_continues_the_current_trace() -> None:
    """Tracing off in the caller's channel (no tracer): a span current in the caller still reaches the server."""
    spans, tracer_provider, host = traced_host(
        "cache",
        cache_pb2,
        "CacheService",
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(BaggageEcho(), server),
    )
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors()) as ch:
            stub = cache_pb2_grpc.CacheServiceStub(ch)
            with tracer_provider.get_tracer("test").start_as_current_span("caller") as caller:
                await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)
            await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)  # no current span: a new trace
    finally:
        await host.stop()
    served_spans = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(served_spans) == 2
    first, second = served_spans
    assert first.parent is not None and first.parent.span_id == caller.get_span_context().span_id
    assert first.parent.is_remote and first.context.trace_id == caller.get_span_context().trace_id
    assert second.parent is None and second.context.trace_id != caller.get_span_context().trace_id


async def test_a_traced_stream_ends_both_spans_with_the_status_of_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """A stream the client cancels after the first chunk, and one whose deadline passes mid-stream: each CLIENT span
    ends with its call's code and the SERVER span is its child; no context errors."""
    spans, tracer_provider, host = traced_host(
        "infer",
        infer_pb2,
        "InferenceService",
        lambda server: infer_pb2_grpc.add_InferenceServiceServicer_to_server(EndlessStream(), server),
    )
    port = await host.start()
    tracer = tracer_provider.get_tracer("costmesh.rpc")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors(tracer)) as ch:
            stub = infer_pb2_grpc.InferenceServiceStub(ch)
            call = stub.Generate(iter((infer_pb2.GenerateRequest(attribution=common_pb2.Attribution(tenant="acme")),)))
            first = await anext(call.__aiter__())
            assert first.text == "acme"
            call.cancel()
            # a stream that times out on the server's side of things: DEADLINE_EXCEEDED
            slow = stub.Generate(iter((infer_pb2.GenerateRequest(),)), timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in slow:
                    await asyncio.sleep(0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.5)
    finally:
        await host.stop()
    gc.collect()
    await asyncio.sleep(0.2)
    client = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    server = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    codes = sorted(dict(s.attributes or {})["rpc.grpc.status_code"] for s in client)  # type: ignore[type-var]
    assert codes == [grpc.StatusCode.CANCELLED.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]]
    assert all(s.status.status_code is StatusCode.ERROR for s in client)
    assert len(server) == 2
    assert {s.parent.span_id for s in server if s.parent} == {c.context.span_id for c in client}
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelname == "ERROR"]
