"""gRPC interceptors for telemetry that every service adds to its ``ServiceHost`` and its outgoing channels.

``ServerSpanInterceptor`` (added by ``ServiceHost`` when tracing is on) opens one SERVER span per inbound call,
continuing the caller's W3C trace context; ``client_interceptors`` send the current trace context and baggage on every
outgoing call, each call in a CLIENT span when tracing is on. Both record what ``opentelemetry-instrumentation-grpc``'s
aio interceptors record, for less CPU per call (docs/telemetry.md, Cost of telemetry); the library's client
interceptors interoperate with them (tests/integration/test_telemetry_interceptors.py).

``RpcMetricsInterceptor`` records ``rpc.server.duration`` (OpenTelemetry RPC semantic conventions: milliseconds,
labelled with ``rpc.system``, ``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``) for every call, so
error rates and latency come from one metric on every service. It sits outside the shared ``ErrorInterceptor``, so
the status it records is the one the client receives, and marks a failed call's server span with it.

``AttributionBaggageInterceptor`` puts the attribution of each request (its ``attribution`` field merged over the
``x-costmesh-*`` metadata and the incoming W3C ``baggage`` header) into the baggage of the current context for the
duration of the call: what the service records sees tenant, team and feature even when its request names only the
tenant, and every downstream call made while serving it carries them on, traced or not.

Composition roots build these before ``make_host`` (which takes the interceptors) and ``bind`` the metrics
interceptor to the process meter (:func:`host_meter`) once ``make_host`` has built it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import grpc
from opentelemetry import baggage, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.attribution import Attribution, from_metadata
from services.common.interceptors import WrappedHandlers, WrappingInterceptor
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


class RpcMetricsInterceptor(WrappingInterceptor):
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


class ServerSpanInterceptor(WrappingInterceptor):
    """One SERVER span per inbound call, continuing the caller's W3C trace context (``traceparent``/``tracestate``).

    What ``opentelemetry-instrumentation-grpc``'s aio server interceptor records — span name ``/pkg.Service/Method``,
    ``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``, the peer, the user agent — for less
    CPU per call (docs/telemetry.md, Cost of telemetry): the handler wrapper and the method's attributes are built once
    per method instead of once per call, and only the trace context is extracted here — the call's
    baggage is :class:`AttributionBaggageInterceptor`'s, which parses each distinct header once. A failed call's
    status and code are set by :class:`RpcMetricsInterceptor`, which sees the status the client receives.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._wrapped = WrappedHandlers(self._unary, self._stream)

    def _start(self, method: str, attributes: Mapping[str, str | int], context: Any) -> trace.Span:
        carrier: dict[str, str] = {}
        attrs = dict(attributes)
        for key, value in context.invocation_metadata() or ():
            if key in _TRACE_HEADERS and isinstance(value, str):
                carrier[key] = value
            elif key == "user-agent" and isinstance(value, str):
                attrs["rpc.user_agent"] = value
        attrs.update(_peer_attributes(context.peer()))
        parent = _TRACECONTEXT.extract(carrier) if carrier else None
        return self._tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER, attributes=attrs)

    def _unary(self, method: str, behavior: Any) -> Any:
        attributes = _method_attributes(method)

        async def wrapped(request: Any, context: Any) -> Any:
            span = self._start(method, attributes, context)
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                return await behavior(request, context)
            finally:
                span.end()
                otel_context.detach(token)

        return wrapped

    def _stream(self, method: str, behavior: Any) -> Any:
        attributes = _method_attributes(method)

        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            span = self._start(method, attributes, context)
            # Attached for the rest of the call's task and never detached: a stream the client cancels is closed from
            # another context, where detaching fails (see AttributionBaggageInterceptor._stream).
            otel_context.attach(trace.set_span_in_context(span))
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                span.end()

        return wrapped


_TRACECONTEXT = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


@functools.lru_cache(maxsize=1024)
def _method_attributes(method: str) -> Mapping[str, str | int]:
    """The span attributes every call of ``method`` (``/pkg.Service/Method``) has; the status code until it fails.
    Built once per method and shared: read only (a span copies the attributes it starts with)."""
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "rpc.grpc.status_code": 0}


@functools.lru_cache(maxsize=1024)
def _peer_attributes(peer: str) -> tuple[tuple[str, str], ...]:
    """``net.peer.ip`` / ``net.peer.port`` (and ``net.peer.name`` for loopback) of a gRPC peer string such as
    ``ipv4:127.0.0.1:57284`` or ``ipv6:[::1]:57284``, as the OpenTelemetry interceptor reports them."""
    if not peer or peer.startswith("unix:") or ":" not in peer:
        return ()
    address = peer.split(",", maxsplit=1)[0].split(":", 1)[1]
    ip, _, port = address.rpartition(":")
    if not ip:
        return ()
    ip = unquote(ip)
    out = [("net.peer.ip", ip), ("net.peer.port", port)]
    if ip in ("[::1]", "127.0.0.1"):
        out.append(("net.peer.name", "localhost"))
    return tuple(out)


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


class AttributionBaggageInterceptor(WrappingInterceptor):
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
            if hasattr(request, "__aiter__"):  # a streamed request: its first message's attribution, once read
                request = _attributed_from_first(request, context)
            async for item in behavior(request, context):
                yield item

        return wrapped


async def _attributed_from_first(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """The request stream; reading its first message attaches that message's attribution (over the baggage) to the
    reader's context — the handler's task, which reads the first message itself (an async generator runs in the
    context of whoever iterates it)."""
    first = True
    async for message in requests:
        if first:
            first = False
            otel_context.attach(_call_context(message, context))
        yield message


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


class _Outgoing:
    """Sends the current context on a call — W3C ``traceparent``/``tracestate`` and ``baggage`` in its metadata — and,
    with a tracer, wraps the call in a CLIENT span whose context is the one sent.

    The span has what ``opentelemetry-instrumentation-grpc``'s aio client interceptor records (name
    ``/pkg.Service/Method``, ``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``, ERROR status
    on a failed call) for less CPU: the method's attributes are built once, and the baggage header is encoded once per
    distinct baggage rather than on every call. Without a tracer (tracing off) only the baggage travels.
    """

    def __init__(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span | None, grpc.aio.ClientCallDetails]:
        span: trace.Span | None = None
        ctx: otel_context.Context | None = None
        if self._tracer is not None:
            method = details.method.decode() if isinstance(details.method, bytes) else details.method
            span = self._tracer.start_span(method, kind=trace.SpanKind.CLIENT, attributes=_method_attributes(method))
            ctx = trace.set_span_in_context(span)
        headers: dict[str, str] = {}
        if ctx is not None or trace.get_current_span().get_span_context().is_valid:
            _TRACECONTEXT.inject(headers, context=ctx)
        entries = tuple(baggage.get_all().items())
        if entries:
            try:
                header = _baggage_header(entries)
            except TypeError:  # a value that cannot be a cache key: encode it every time
                header = _encode_baggage(entries)
            if header:
                headers["baggage"] = header
        if not headers:
            return span, details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in headers.items():
            metadata.add(key, value)
        return span, grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    @staticmethod
    def _finish(span: trace.Span, code: grpc.StatusCode | None, details: str = "") -> None:
        if code is None:  # the call never started
            span.set_status(Status(StatusCode.ERROR, details))
        else:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, details or code.name))
        span.end()

    def _end_when_done(self, span: trace.Span, call: Any) -> None:
        """End ``span`` with the status of a streaming ``call`` once it is done (its status is known by then)."""

        async def finish() -> None:
            try:
                code, details = await call.code(), await call.details()
            except BaseException:  # noqa: BLE001 - the span must end whatever the call did
                code, details = grpc.StatusCode.CANCELLED, "cancelled"
            self._finish(span, code, details)

        def done(_: Any) -> None:
            _end_tasks.add(task := asyncio.get_running_loop().create_task(finish()))
            task.add_done_callback(_end_tasks.discard)

        try:
            call.add_done_callback(done)
        except NotImplementedError:  # a call type without callbacks: end the span now
            self._finish(span, None, "call without done callback")

    async def _unary_response(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = self._start(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
            code, text = await call.code(), await call.details()
        except BaseException as exc:
            self._finish(span, None, f"{type(exc).__name__}: {exc}")
            raise
        self._finish(span, code, text)
        return call

    async def _stream_response(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = self._start(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            self._finish(span, None, f"{type(exc).__name__}: {exc}")
            raise
        self._end_when_done(span, call)
        return call


#: Tasks that end the span of a finished stream (kept referenced until they have run).
_end_tasks: set[asyncio.Task[None]] = set()


class _UnaryUnary(_Outgoing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._unary_response(continuation, client_call_details, request)


class _UnaryStream(_Outgoing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._stream_response(continuation, client_call_details, request)


class _StreamUnary(_Outgoing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._unary_response(continuation, client_call_details, request_iterator)


class _StreamStream(_Outgoing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._stream_response(continuation, client_call_details, request_iterator)


def client_interceptors(tracer: trace.Tracer | None = None) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send the current W3C trace context and baggage on every call, each call in a CLIENT
    span of ``tracer`` when one is given (tracing on).

    One object per call kind: grpc.aio files an interceptor under the first kind it implements only.
    """
    return [_UnaryUnary(tracer), _UnaryStream(tracer), _StreamUnary(tracer), _StreamStream(tracer)]
