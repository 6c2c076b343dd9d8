"""Server interceptors for telemetry that every service may add to its ``ServiceHost``.

``RpcMetricsInterceptor`` records ``rpc.server.duration`` (OpenTelemetry RPC semantic conventions: milliseconds,
labelled with ``rpc.system``, ``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``) for every call, so
error rates and latency come from one metric on every service. It sits outside the shared ``ErrorInterceptor``, so
the status it records is the one the client receives.

``AttributionBaggageInterceptor`` puts the attribution of each request (its ``attribution`` field merged over the
``x-costmesh-*`` metadata and the incoming W3C ``baggage`` header) into the baggage of the current context for the
duration of the call: what the service records sees tenant, team and feature even when its request names only the
tenant, and every downstream call made while serving it carries them on. ``baggage_client_interceptors`` send the
baggage on a channel whose calls are not traced (the OpenTelemetry client interceptors send it when they are), so
attribution travels whether or not tracing is on.

Composition roots build these before ``make_host`` (which takes the interceptors) and ``bind`` the metrics
interceptor to the process meter (:func:`host_meter`) once ``make_host`` has built it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace import Status, StatusCode

from services.common.attribution import Attribution, from_metadata
from services.common.spans import attribution_from_baggage, baggage_context

if TYPE_CHECKING:
    from services.common.server import ServiceHost

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

#: Bucket bounds (milliseconds) of ``rpc.server.duration``: loopback cache hits up to multi-minute generations.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    1,
    2.5,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10_000,
    30_000,
    60_000,
    300_000,
)


def host_meter(host: ServiceHost, name: str) -> metrics.Meter:
    """The meter ``name`` of the process ``MeterProvider`` that ``make_host`` built (a no-op one without it)."""
    return host.telemetry.meter(name) if host.telemetry is not None else metrics.NoOpMeter(name)


def _rewrap(handler: Any, unary: Callable[[Any], Any], stream: Callable[[Any], Any]) -> Any:
    """The same handler with its behaviour wrapped (``unary`` for unary responses, ``stream`` for streamed ones)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        stream(handler.stream_stream),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RpcMetrics:
    """The ``rpc.server.duration`` histogram of one process."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._duration = meter.create_histogram(
            "rpc.server.duration",
            unit="ms",
            description="Duration of inbound gRPC calls, by method and status code",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_MS),
        )

    def record(self, method: str, code: grpc.StatusCode, duration_ms: float) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self._duration.record(
            duration_ms,
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": code.value[0],
            },
        )


def _status(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # GeneratorExit: a stream dropped by a cancel
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every call and records it with its final status code (nothing is recorded until ``bind``); a call that
    fails marks its server span with that status."""

    def __init__(self) -> None:
        self._metrics: RpcMetrics | None = None

    def bind(self, meter: metrics.Meter) -> None:
        self._metrics = RpcMetrics(meter)

    def _record(self, method: str, context: Any, started: float, exc: BaseException | None) -> None:
        code = _status(context, exc)
        if code is not grpc.StatusCode.OK:
            # The shared ErrorInterceptor aborts with a rich status, which the OpenTelemetry interceptor does not
            # see: mark the server span here so failed calls stand out in the trace.
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(Status(StatusCode.ERROR, code.name))
        if self._metrics is not None:
            self._metrics.record(method, code, (time.perf_counter() - started) * 1000)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def unary(behavior: Any) -> Any:
            async def wrapped(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    self._record(method, context, started, exc)
                    raise
                self._record(method, context, started, None)
                return response

            return wrapped

        def stream(behavior: Any) -> Any:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    self._record(method, context, started, exc)
                    raise
                self._record(method, context, started, None)

            return wrapped

        return _rewrap(handler, unary, stream)  # type: ignore[no-any-return]


_BAGGAGE = W3CBaggagePropagator()


def _incoming_baggage(context: Any) -> otel_context.Context:
    """The current context with the call's ``baggage`` header applied (what the tracing interceptor would do)."""
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if k == "baggage" and isinstance(v, str)}
    return _BAGGAGE.extract(carrier) if carrier else otel_context.get_current()


def _call_context(request: Any, context: Any) -> otel_context.Context:
    """The call's context: incoming baggage with the request's own attribution over it."""
    incoming = _incoming_baggage(context)
    merged = request_attribution(request, context).merged_with(attribution_from_baggage(incoming))
    return baggage_context(merged, incoming)


def request_attribution(request: Any, context: Any) -> Attribution:
    """A request's own ``attribution`` field (when it has one) over the call's ``x-costmesh-*`` metadata."""
    fallback = from_metadata(tuple(context.invocation_metadata() or ()))
    own = getattr(request, "attribution", None)
    if own is None:
        return fallback
    return Attribution(tenant=own.tenant, team=own.team, feature=own.feature, end_user=own.end_user).merged_with(
        fallback
    )


class AttributionBaggageInterceptor(grpc.aio.ServerInterceptor):
    """Puts each request's attribution, over the incoming baggage, into the call's context while it is served."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None

        def unary(behavior: Any) -> Any:
            async def wrapped(request: Any, context: Any) -> Any:
                token = otel_context.attach(_call_context(request, context))
                try:
                    return await behavior(request, context)
                finally:
                    otel_context.detach(token)

            return wrapped

        def stream(behavior: Any) -> Any:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                # Attached for the rest of the call's own task and never detached: a stream the client cancels is
                # closed from another context, where detaching fails (and OpenTelemetry logs an error). The task ends
                # with the call, and an outer interceptor's detach restores what was there before.
                otel_context.attach(_call_context(request, context))
                async for item in behavior(request, context):
                    yield item

            return wrapped

        return _rewrap(handler, unary, stream)  # type: ignore[no-any-return]


class _BaggageOut:
    """Adds the current context's W3C ``baggage`` header to a call's metadata."""

    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        carrier: dict[str, str] = {}
        _BAGGAGE.inject(carrier)
        if not carrier:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in carrier.items():
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _BaggageUnaryUnary(_BaggageOut, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BaggageUnaryStream(_BaggageOut, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BaggageStreamUnary(_BaggageOut, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _BaggageStreamStream(_BaggageOut, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def baggage_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send the current W3C baggage on every call of an untraced channel.

    One object per call kind: grpc.aio files an interceptor under the first kind it implements only.
    """
    return [_BaggageUnaryUnary(), _BaggageUnaryStream(), _BaggageStreamUnary(), _BaggageStreamStream()]
