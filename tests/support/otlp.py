"""A real OTLP/gRPC trace receiver for tests: opentelemetry-proto's ``TraceService`` on a grpc.aio server.

Services started with ``COSTMESH_<SVC>_OTLP_ENDPOINT=127.0.0.1:<port>`` export their spans here exactly as they would
to an OpenTelemetry Collector; the receiver keeps them decoded (hex ids, plain attribute values) for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
CONSUMER = trace_pb2.Span.SPAN_KIND_CONSUMER


def any_value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def attributes(kvs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class Event:
    name: str
    time_unix_nano: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_unix_nano: int
    end_unix_nano: int
    attributes: dict[str, Any]
    events: tuple[Event, ...]
    links: tuple[Link, ...]
    status_code: int

    @classmethod
    def from_proto(cls, service: str, s: trace_pb2.Span) -> Span:
        return cls(
            service=service,
            trace_id=s.trace_id.hex(),
            span_id=s.span_id.hex(),
            parent_span_id=s.parent_span_id.hex(),
            name=s.name,
            kind=s.kind,
            start_unix_nano=s.start_time_unix_nano,
            end_unix_nano=s.end_time_unix_nano,
            attributes=attributes(s.attributes),
            events=tuple(Event(e.name, e.time_unix_nano, attributes(e.attributes)) for e in s.events),
            links=tuple(Link(x.trace_id.hex(), x.span_id.hex()) for x in s.links),
            status_code=s.status.code,
        )


@dataclass
class SpanReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span; ``port`` is set by :meth:`start`."""

    spans: list[Span] = field(default_factory=list)
    port: int = 0
    _server: grpc.aio.Server | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            service = str(attributes(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                self.spans.extend(Span.from_proto(service, s) for s in ss.spans)
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> str:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, ready: Callable[[], bool], *, timeout_s: float = 60.0) -> None:
        """Wait until ``ready()`` holds over the spans received so far (the exporters batch every few seconds)."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"spans did not arrive in {timeout_s}s ({len(self.spans)} received)")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=min(remaining, 1.0))
