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
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry import baggage, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace import Status, StatusCode

from services.common.attribution import Attribution, from_metadata
from services.common.interceptors import WrappedHandlers
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
        self._wrapped = WrappedHandlers(self._unary, self._stream)

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

    def _unary(self, method: str, behavior: Any) -> Any:
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

    def _stream(self, method: str, behavior: Any) -> Any:
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

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.wrap(handler_call_details.method, handler)  # type: ignore[no-any-return]


_BAGGAGE = W3CBaggagePropagator()


@functools.lru_cache(maxsize=256)
def _baggage_entries(header: str) -> tuple[tuple[str, object], ...]:
    """The entries of a W3C ``baggage`` header, in order, as the propagator extracts them: parsed once per distinct
    header (a service sees the same few tenant/feature headers over and over, and parsing one cost ~40 us)."""
    return tuple(baggage.get_all(_BAGGAGE.extract({"baggage": header}, context=otel_context.Context())).items())


def _incoming_baggage(metadata: tuple[tuple[str, str | bytes], ...]) -> otel_context.Context:
    """The current context with the call's ``baggage`` header applied (what the tracing interceptor would do)."""
    header = ""
    for key, value in metadata:
        if key == "baggage" and isinstance(value, str):
            header = value  # the last one, as a dict carrier would keep
    ctx = otel_context.get_current()
    if header:
        for name, entry in _baggage_entries(header):
            ctx = baggage.set_baggage(name, entry, ctx)
    return ctx


def _call_context(request: Any, context: Any) -> otel_context.Context:
    """The call's context: incoming baggage with the request's own attribution over it."""
    metadata = tuple(context.invocation_metadata() or ())
    incoming = _incoming_baggage(metadata)
    merged = request_attribution(request, context, metadata).merged_with(attribution_from_baggage(incoming))
    return baggage_context(merged, incoming)


def request_attribution(
    request: Any, context: Any, metadata: tuple[tuple[str, str | bytes], ...] | None = None
) -> Attribution:
    """A request's own ``attribution`` field (when it has one) over the call's ``x-costmesh-*`` metadata (``metadata``:
    the call's invocation metadata when the caller already has it)."""
    fallback = from_metadata(tuple(context.invocation_metadata() or ()) if metadata is None else metadata)
    own = getattr(request, "attribution", None)
    if own is None:
        return fallback
    return Attribution(tenant=own.tenant, team=own.team, feature=own.feature, end_user=own.end_user).merged_with(
        fallback
    )


class AttributionBaggageInterceptor(grpc.aio.ServerInterceptor):
    """Puts each request's attribution, over the incoming baggage, into the call's context while it is served."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers(self._unary, self._stream)

    @staticmethod
    def _unary(_method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: Any) -> Any:
            token = otel_context.attach(_call_context(request, context))
            try:
                return await behavior(request, context)
            finally:
                otel_context.detach(token)

        return wrapped

    @staticmethod
    def _stream(_method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            # Attached for the rest of the call's own task and never detached: a stream the client cancels is
            # closed from another context, where detaching fails (and OpenTelemetry logs an error). The task ends
            # with the call, and an outer interceptor's detach restores what was there before.
            otel_context.attach(_call_context(request, context))
            async for item in behavior(request, context):
                yield item

        return wrapped

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.wrap(handler_call_details.method, handler)  # type: ignore[no-any-return]


def _encode_baggage(entries: tuple[tuple[str, object], ...]) -> str:
    """The W3C ``baggage`` header the propagator sends for ``entries`` ("" when it sends none)."""
    ctx = otel_context.Context()
    for key, value in entries:
        ctx = baggage.set_baggage(key, value, ctx)
    carrier: dict[str, str] = {}
    _BAGGAGE.inject(carrier, context=ctx)
    return carrier.get("baggage", "")


#: Encoded once per distinct baggage: every call made while serving one request carries the same.
_baggage_header = functools.lru_cache(maxsize=256)(_encode_baggage)


class _BaggageOut:
    """Adds the current context's W3C ``baggage`` header to a call's metadata."""

    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        entries = tuple(baggage.get_all().items())
        if not entries:
            return details
        try:
            header = _baggage_header(entries)
        except TypeError:  # a value that cannot be a cache key: encode it every time
            header = _encode_baggage(entries)
        if not header:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("baggage", header)
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
