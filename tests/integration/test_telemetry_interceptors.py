"""The telemetry interceptors on a real loopback server: attribution as baggage, call metrics, failed-span status.

A traced router-like hop: the client calls a server through the OpenTelemetry client interceptor while attribution
baggage is set; the server (OpenTelemetry server interceptor, ``AttributionBaggageInterceptor``,
``RpcMetricsInterceptor``, the shared ``ErrorInterceptor``) sees the baggage, times each call with its final status
code, and marks the span of a call that failed.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
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
    baggage_client_interceptors,
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


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    rpc_metrics = RpcMetricsInterceptor()
    host = ServiceHost(
        name="cache",
        settings=ServiceSettings(),
        telemetry=Telemetry(tracer_provider, meter_provider, tracing_enabled=True),
        interceptors=[AttributionBaggageInterceptor(), rpc_metrics],
    )
    rpc_metrics.bind(meter_provider.get_meter("test"))
    servicer = BaggageEcho()
    host.add_service(
        full_service_name(cache_pb2, "CacheService"),
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
    )
    port = await host.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=aio_client_interceptors(tracer_provider=tracer_provider)
    )
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
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=baggage_client_interceptors()) as ch:
            stub = cache_pb2_grpc.CacheServiceStub(ch)
            with attribution_baggage(Attribution(tenant="acme", team="search", feature="faq")):
                reply = await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)
            assert reply.key == "acme|search|faq"
            reply = await stub.Lookup(cache_pb2.LookupRequest(model="m"), timeout=10)  # no baggage: nothing leaks
            assert reply.key == "||"
    finally:
        await host.stop()


class EndlessStream(infer_pb2_grpc.InferenceServiceServicer):
    """Streams the tenant it finds in the baggage, then chunks until the client goes away."""

    async def Generate(
        self, request: infer_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[infer_pb2.GenerateResponse]:
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
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=baggage_client_interceptors()) as ch:
            request = infer_pb2.GenerateRequest(attribution=common_pb2.Attribution(tenant="acme"))
            call = infer_pb2_grpc.InferenceServiceStub(ch).Generate(request, timeout=10)
            first = await anext(call.__aiter__())
            assert first.text == "acme"
            call.cancel()
            await asyncio.sleep(0.5)
    finally:
        await host.stop()
    gc.collect()  # a dropped stream is closed by the event loop's finalizer, in another context
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelname == "ERROR"]
