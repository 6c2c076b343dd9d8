"""Server interceptors shared by every service.

``ErrorInterceptor`` is the one place where domain errors become gRPC statuses: ``google.rpc.Status`` with
``ErrorInfo(reason, domain="costmesh.<svc>")`` plus ``BadRequest`` / ``QuotaFailure`` / ``RetryInfo`` details.
Unknown exceptions become ``INTERNAL`` with a generic message; the traceback goes to the log, never the client.
``LogContextInterceptor`` binds ``rpc``, ``request_id``, ``tenant`` and ``feature`` into structlog's contextvars
for the duration of each call.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.attribution import REQUEST_ID_KEY, from_metadata, metadata_value
from services.common.errors import CostmeshError, InvalidArgument, ResourceExhausted, Unavailable, Unimplemented

log = structlog.get_logger("costmesh.rpc")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry_delay(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


#: Longest status message sent. Messages may quote the request (an unknown id), and the message travels twice in
#: the trailers (percent-encoded in grpc-message, up to 9 bytes a character, and inside grpc-status-details-bin):
#: unbounded, a long id would push the trailers past the client's 8 KiB metadata limit and turn a NOT_FOUND into
#: RESOURCE_EXHAUSTED.
MAX_MESSAGE_CHARS = 256
#: Most bytes of BadRequest / QuotaFailure sent: a request with thousands of bad fields gets the first ones.
MAX_DETAIL_BYTES = 2048


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def to_rpc_status(error: CostmeshError, domain: str) -> status_pb2.Status:
    """The ``google.rpc.Status`` for a domain error."""
    status = status_pb2.Status(code=error.code.value[0], message=_clip(error.message))
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain)
    info.metadata.update(error.metadata)
    status.details.append(_pack(info))
    if isinstance(error, InvalidArgument) and error.violations:
        bad = error_details_pb2.BadRequest()
        for v in error.violations:
            bad.field_violations.add(field=_clip(v.field), description=_clip(v.description), reason=v.reason)
            if bad.ByteSize() > MAX_DETAIL_BYTES:
                del bad.field_violations[-1]
                break
        status.details.append(_pack(bad))
    if isinstance(error, ResourceExhausted) and error.violations:
        quota = error_details_pb2.QuotaFailure()
        for q in error.violations:
            quota.violations.add(subject=_clip(q.subject), description=_clip(q.description))
            if quota.ByteSize() > MAX_DETAIL_BYTES:
                del quota.violations[-1]
                break
        status.details.append(_pack(quota))
    retry_after = getattr(error, "retry_after_s", None) if isinstance(error, ResourceExhausted | Unavailable) else None
    if retry_after is not None:
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_retry_delay(max(0.0, retry_after)))))
    return status


def _internal_status(domain: str) -> status_pb2.Status:
    status = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
    status.details.append(_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain)))
    return status


Wrap = Callable[[str, Any], Any]


def rewrap(handler: Any, unary: Callable[[Any], Any], stream: Callable[[Any], Any]) -> Any:
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


class WrappedHandlers:
    """An interceptor's wrapped handlers, by method: built once per method, not once per call.

    grpc.aio looks the handler up on every call and gets the same object back, so the wrapper (closures and a new
    ``RpcMethodHandler``) built for it the first time serves every later call. A handler that is not the one wrapped
    before (an outer interceptor that wraps per call) is wrapped anew.
    """

    #: Methods kept at most (the registered methods of a server are far fewer).
    MAX_METHODS = 512

    def __init__(self, unary: Wrap, stream: Wrap) -> None:
        self._unary = unary
        self._stream = stream
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def wrap(self, method: str, handler: Any) -> Any:
        known = self._by_method.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = rewrap(
            handler, lambda behavior: self._unary(method, behavior), lambda behavior: self._stream(method, behavior)
        )
        if len(self._by_method) >= self.MAX_METHODS:
            self._by_method.clear()
        self._by_method[method] = (handler, wrapped)
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once (its ``_wrapped``) and serves every call with it."""

    _wrapped: WrappedHandlers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.wrap(handler_call_details.method, handler)  # type: ignore[no-any-return]


class ErrorInterceptor(WrappingInterceptor):
    """Maps exceptions raised by handlers to rich gRPC statuses."""

    def __init__(self, *, domain: str) -> None:
        self._domain = domain
        self._wrapped = WrappedHandlers(self._wrap_unary, self._wrap_stream)

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
        if isinstance(exc, NotImplementedError):  # what a generated servicer base raises for a method not overridden
            exc = Unimplemented("method not implemented")
        if isinstance(exc, CostmeshError):
            if exc.code == grpc.StatusCode.INTERNAL:
                log.error("rpc_failed", reason=exc.reason, exc_info=exc)
            status = to_rpc_status(exc, self._domain)
        else:
            log.error("rpc_crashed", error_type=type(exc).__name__, exc_info=exc)
            status = _internal_status(self._domain)
        await context.abort_with_status(rpc_status.to_status(status))

    def _wrap_unary(self, _method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
                await self._abort(context, exc)

        return wrapped

    def _wrap_stream(self, _method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self._abort(context, exc)

        return wrapped


class LogContextInterceptor(grpc.aio.ServerInterceptor):
    """Binds per-call log context (rpc, request_id, tenant, feature) into structlog contextvars.

    The binding happens when the handler is looked up, which for grpc.aio runs in the task that then runs the
    handler, so the values are visible to every log line of the call and vanish with its task.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        md = tuple(handler_call_details.invocation_metadata or ())
        attribution = from_metadata(md)
        fields: dict[str, str] = {"rpc": handler_call_details.method}
        request_id = metadata_value(md, REQUEST_ID_KEY)
        if request_id:
            fields["request_id"] = request_id
        if attribution.tenant:
            fields["tenant"] = attribution.tenant
        if attribution.feature:
            fields["feature"] = attribution.feature
        structlog.contextvars.bind_contextvars(**fields)
        return await continuation(handler_call_details)
