"""Telemetry of an HTTP (ASGI) server, the twin of :mod:`services.common.rpc_telemetry` for the router's HTTP door.

:class:`HttpTelemetry` is an ASGI middleware. For every request it

* records ``http.server.request.duration`` (OpenTelemetry HTTP semantic conventions: seconds, labelled with
  ``http.request.method``, ``http.route``, ``http.response.status_code``, ``url.scheme``,
  ``network.protocol.version`` and, on failures, ``error.type``), from the request's arrival to its last body byte
  (a streamed answer: the end of the stream);
* with a tracer (tracing on), opens one SERVER span named ``{method} {route}`` that continues the caller's W3C
  ``traceparent``/``tracestate`` and carries the request attributes the conventions name (``url.path``,
  ``client.address``, ``user_agent.original``, ``http.response.status_code``; status ERROR on a 5xx or a crash).
  The span is current while the application runs, so what the application annotates (the router pipeline's
  ``costmesh.*`` and ``gen_ai.*`` attributes) lands on it;
* applies an incoming W3C ``baggage`` header to the context, as ``AttributionBaggageInterceptor`` does on gRPC.

``http.route`` is the template of the route that matched, which ``route_of`` reads from the scope once the
application has routed the request (for Starlette: :func:`starlette_routes`); a request that matched none has no
route, so label values stay bounded. Built by hand rather than with opentelemetry-instrumentation-asgi
for the same reason as the gRPC interceptors: it does what the conventions ask and no more per request.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import baggage, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Bucket bounds (seconds) of ``http.server.request.duration``: loopback cache hits up to multi-minute generations.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)

_TRACECONTEXT = TraceContextTextMapPropagator()
_BAGGAGE = W3CBaggagePropagator()


class HttpMetrics:
    """The ``http.server.request.duration`` histogram of one process."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of inbound HTTP requests, by route and status code",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_S),
        )

    def record(self, attributes: dict[str, str | int], duration_s: float) -> None:
        self._duration.record(duration_s, attributes)


@functools.lru_cache(maxsize=256)
def _baggage_entries(header: str) -> tuple[tuple[str, object], ...]:
    """The entries of a W3C ``baggage`` header, parsed once per distinct header."""
    return tuple(baggage.get_all(_BAGGAGE.extract({"baggage": header}, context=otel_context.Context())).items())


RouteOf = Callable[[Scope], str]


def starlette_routes(routes: Any) -> RouteOf:
    """``route_of`` for a Starlette app: its router writes the matched route's ``endpoint`` into the scope."""
    paths = {id(r.endpoint): str(r.path) for r in routes if hasattr(r, "endpoint")}
    return lambda scope: paths.get(id(scope.get("endpoint")), "")


class HttpTelemetry:
    """ASGI middleware: request duration metric, SERVER span, incoming baggage (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, *, route_of: RouteOf, metrics: HttpMetrics | None, tracer: trace.Tracer | None
    ) -> None:
        self._app = app
        self._route_of = route_of
        self._metrics = metrics
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        method: str = scope["method"]
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            if key in (b"traceparent", b"tracestate", b"baggage", b"user-agent"):
                headers[key.decode("latin-1")] = value.decode("latin-1")
        ctx = otel_context.get_current()
        if "baggage" in headers:
            for name, entry in _baggage_entries(headers["baggage"]):
                ctx = baggage.set_baggage(name, entry, ctx)
        span: trace.Span | None = None
        if self._tracer is not None:
            carrier = {k: v for k, v in headers.items() if k in ("traceparent", "tracestate")}
            parent = _TRACECONTEXT.extract(carrier, context=ctx) if carrier else ctx
            attrs: dict[str, str | int] = {
                "http.request.method": method,
                "url.path": scope.get("path", ""),
                "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", "1.1"),
            }
            client = scope.get("client")
            if client:
                attrs["client.address"] = client[0]
            server = scope.get("server")
            if server:
                attrs["server.address"], attrs["server.port"] = server[0], server[1]
            if "user-agent" in headers:
                attrs["user_agent.original"] = headers["user-agent"]
            span = self._tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER, attributes=attrs)
            ctx = trace.set_span_in_context(span, ctx)
        status = 0

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        token = otel_context.attach(ctx) if ctx is not otel_context.get_current() else None
        error = ""
        try:
            await self._app(scope, receive, send_and_watch)
        except BaseException as exc:
            error = type(exc).__qualname__
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
            route = self._route_of(scope)
            if status >= 500 and not error:
                error = str(status)
            if span is not None:
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status)
                if error:
                    span.set_attribute("error.type", error)
                    span.set_status(Status(StatusCode.ERROR, error))
                span.end()
            if self._metrics is not None:
                attributes: dict[str, str | int] = {
                    "http.request.method": method,
                    "url.scheme": scope.get("scheme", "http"),
                    "network.protocol.version": scope.get("http_version", "1.1"),
                }
                if route:
                    attributes["http.route"] = route
                if status:
                    attributes["http.response.status_code"] = status
                if error:
                    attributes["error.type"] = error
                self._metrics.record(attributes, time.perf_counter() - started)
