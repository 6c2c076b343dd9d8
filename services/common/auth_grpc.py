"""gRPC side of :mod:`services.common.auth`: the server interceptor that enforces it, and the client interceptor
that presents a key.

``ServiceHost`` installs :class:`AuthInterceptor` when ``settings.auth.enabled``. It authenticates the
``authorization: Bearer <key>`` metadata, checks the method's rule against the request's tenant field and its
``x-costmesh-tenant`` metadata, fills an empty tenant with a tenant key's own, and answers UNAUTHENTICATED /
PERMISSION_DENIED with the same rich status (``ErrorInfo``, domain ``costmesh.<svc>``) as every other error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import structlog
from grpc_status import rpc_status

from services.common.attribution import TENANT_KEY
from services.common.auth import (
    AUTHORIZATION,
    Authenticator,
    AuthSettings,
    MethodRule,
    Principal,
    Role,
    authorize,
    is_public,
    rule_for,
)
from services.common.errors import CostmeshError, PermissionDenied
from services.common.interceptors import to_rpc_status

log = structlog.get_logger("costmesh.auth")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _field(message: Any, path: str) -> str:
    for part in path.split(".")[:-1]:
        message = getattr(message, part)
    return str(getattr(message, path.rsplit(".", 1)[-1]))


def _set_field(message: Any, path: str, value: str) -> None:
    for part in path.split(".")[:-1]:
        message = getattr(message, part)
    setattr(message, path.rsplit(".", 1)[-1], value)


def _metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str, list[str]]:
    authorization = ""
    tenants: list[str] = []
    for key, value in metadata or ():
        k = key.lower()
        if not isinstance(value, str):
            continue
        if k == AUTHORIZATION:
            authorization = value
        elif k == TENANT_KEY:
            tenants.append(value)
    return authorization, tenants


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API keys and per-method rules on every RPC except health and reflection."""

    def __init__(self, authenticator: Authenticator, *, domain: str) -> None:
        self._auth = authenticator
        self._domain = domain

    async def _deny(self, context: grpc.aio.ServicerContext[Any, Any], err: CostmeshError) -> None:
        log.warning("rpc_denied", code=err.code.name, reason=err.reason)
        await context.abort_with_status(rpc_status.to_status(to_rpc_status(err, self._domain)))

    def _check(self, principal: Principal | CostmeshError, rule: MethodRule, request: Any, tenants: list[str]) -> None:
        if isinstance(principal, CostmeshError):
            raise principal
        named = _field(request, rule.tenant_field) if rule.tenant_field and request is not None else ""
        if rule.tenant_field and request is None and principal.role is Role.TENANT:
            # A streamed request cannot be inspected up front, so a tenant key's tenant cannot be checked: no
            # tenant-facing RPC streams requests. Service and admin keys act for any tenant (the infer worker's
            # bidirectional Generate is the router's).
            raise PermissionDenied("streamed requests need a service or admin key", reason="ROLE")
        verdict = authorize(principal, rule, named=named, metadata_tenants=tenants)
        if verdict.fill_tenant and rule.tenant_field:
            _set_field(request, rule.tenant_field, verdict.fill_tenant)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        method = handler_call_details.method
        found = await continuation(handler_call_details)
        if found is None or is_public(method):
            return found
        handler: Any = found
        authorization, tenants = _metadata(tuple(handler_call_details.invocation_metadata or ()))
        principal: Principal | CostmeshError
        try:
            principal = self._auth.authenticate(authorization)
            structlog.contextvars.bind_contextvars(principal=principal.name)
        except CostmeshError as err:
            principal = err
        rule = rule_for(method)
        check = self._check
        deny = self._deny

        def unary(behavior: Any, streamed_request: bool) -> Any:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    check(principal, rule, None if streamed_request else request, tenants)
                except CostmeshError as err:
                    await deny(context, err)
                return await behavior(request, context)

            return wrapped

        def streaming(behavior: Any, streamed_request: bool) -> Any:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                try:
                    check(principal, rule, None if streamed_request else request, tenants)
                except CostmeshError as err:
                    await deny(context, err)
                async for item in behavior(request, context):
                    yield item

            return wrapped

        common = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), **common)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream, False), **common)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), **common)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, True), **common)


def server_interceptors(settings: AuthSettings, *, domain: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server needs for ``settings`` (none when auth is off)."""
    if not settings.enabled:
        return []
    keys = settings.all_keys()
    if not keys:
        log.warning("auth_enabled_without_keys", note="every RPC but health and reflection will be UNAUTHENTICATED")
    return [AuthInterceptor(Authenticator(keys), domain=domain)]


# ---- client side ----------------------------------------------------------------------------------------------


class _Bearer:
    """Adds ``authorization: Bearer <key>`` to a call's metadata."""

    def __init__(self, key: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {key}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(key: str | None) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors presenting ``key`` on every call (none without a key).

    One object per call kind: grpc.aio files an interceptor under the first kind it implements only.
    """
    if not key:
        return []
    return [_BearerUnaryUnary(key), _BearerUnaryStream(key), _BearerStreamUnary(key), _BearerStreamStream(key)]
