"""The auth interceptors on a real loopback server: all four call kinds, both directions.

A server with auth on hosts a test service with one method of each kind (unary-unary, unary-stream, stream-unary,
stream-stream); a channel with ``bearer_interceptors`` must get through on every kind, a bare channel must get
UNAUTHENTICATED on every kind, and a tenant key the admin-only rule of an unknown method refuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2
from services.common.auth import RULES, ApiKey, AuthSettings, MethodRule, Role, digest
from services.common.auth_grpc import bearer_interceptors
from services.common.server import ServiceHost
from services.common.settings import ServiceSettings

ADMIN = "cm_admin-interceptor-test"
TENANT = "cm_tenant-interceptor-test"
SERVICE = "costmesh.test.v1.EchoService"


def _ident(x: bytes) -> bytes:
    return x


async def _unary(request: bytes, context: Any) -> bytes:
    return b"uu:" + request


async def _unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(3):
        yield b"us%d:" % i + request


async def _stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"su:" + b"".join([r async for r in requests])


async def _stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for r in requests:
        yield b"ss:" + r


def _register(server: grpc.aio.Server) -> None:
    codec = {"request_deserializer": _ident, "response_serializer": _ident}
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, **codec),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream, **codec),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary, **codec),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream, **codec),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def port() -> AsyncIterator[int]:
    keys = (
        ApiKey(name="ops", role=Role.ADMIN, sha256=digest(ADMIN)),
        ApiKey(name="acme", role=Role.TENANT, tenant="acme", sha256=digest(TENANT)),
    )
    settings = ServiceSettings(port=0, auth=AuthSettings(enabled=True, keys=keys))
    host = ServiceHost(name="test", settings=settings)
    host.add_service(SERVICE, _register)
    yield await host.start()
    await host.stop()


async def _all_kinds(channel: grpc.aio.Channel, payload: tuple[bytes, ...] = (b"a", b"b")) -> list[Any]:
    """Every call kind once; ``payload`` is what the client-streaming kinds send."""

    async def items() -> AsyncIterator[bytes]:
        for x in payload:
            yield x

    uu = channel.unary_unary(f"/{SERVICE}/Unary", _ident, _ident)
    us = channel.unary_stream(f"/{SERVICE}/UnaryStream", _ident, _ident)
    su = channel.stream_unary(f"/{SERVICE}/StreamUnary", _ident, _ident)
    ss = channel.stream_stream(f"/{SERVICE}/StreamStream", _ident, _ident)
    results: list[Any] = []
    for call in (
        lambda: uu(b"x", timeout=5),
        lambda: _collect(us(b"x", timeout=5)),
        lambda: su(items(), timeout=5),
        lambda: _collect(ss(items(), timeout=5)),
    ):
        try:
            results.append(await call())
        except grpc.aio.AioRpcError as err:
            results.append(err.code())
    return results


async def _collect(call: Any) -> list[bytes]:
    return [x async for x in call]


async def test_the_key_reaches_the_server_on_every_call_kind(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_interceptors(ADMIN)) as ch:
        assert await _all_kinds(ch) == [b"uu:x", [b"us0:x", b"us1:x", b"us2:x"], b"su:ab", [b"ss:a", b"ss:b"]]


async def test_no_key_is_unauthenticated_on_every_call_kind(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        # Refused calls stream nothing: a client still writing requests after the server's status races it (seen
        # once on a loaded CI machine: the stream-stream call ended INTERNAL on the client after the server had
        # logged the refusal and sent PERMISSION_DENIED).
        assert await _all_kinds(ch, payload=()) == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert bearer_interceptors(None) == [] and bearer_interceptors("") == []


async def test_a_method_without_a_rule_is_admin_only(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_interceptors(TENANT)) as ch:
        assert await _all_kinds(ch, payload=()) == [grpc.StatusCode.PERMISSION_DENIED] * 4  # nothing streamed (above)


# ---- streamed requests: service keys only (a tenant key's tenant cannot be checked up front) ---------------------

ROUTER = "cm_router-interceptor-test"
GENERATE = "/costmesh.infer.v1.InferenceService/Generate"
TENANT_STREAM = f"/{SERVICE}/TenantStream"


async def _echo_tenants(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for r in requests:
        yield infer_pb2.GenerateResponse(text=r.attribution.tenant)


@pytest.fixture
async def stream_port(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    # A streamed method whose rule lets tenants in (no real one exists).
    monkeypatch.setitem(RULES, TENANT_STREAM, MethodRule(frozenset({Role.TENANT, Role.SERVICE}), "attribution.tenant"))
    keys = (
        ApiKey(name="acme", role=Role.TENANT, tenant="acme", sha256=digest(TENANT)),
        ApiKey(name="router", role=Role.SERVICE, sha256=digest(ROUTER)),
    )
    host = ServiceHost(name="test", settings=ServiceSettings(port=0, auth=AuthSettings(enabled=True, keys=keys)))
    codec = {
        "request_deserializer": infer_pb2.GenerateRequest.FromString,
        "response_serializer": infer_pb2.GenerateResponse.SerializeToString,
    }

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(_echo_tenants, **codec)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE, {"TenantStream": handler}),
                grpc.method_handlers_generic_handler("costmesh.infer.v1.InferenceService", {"Generate": handler}),
            )
        )

    host.add_service(SERVICE, register)
    yield await host.start()
    await host.stop()


async def _tenants(channel: grpc.aio.Channel, method: str, *tenants: str) -> list[str] | grpc.StatusCode:
    call = channel.stream_stream(
        method, infer_pb2.GenerateRequest.SerializeToString, infer_pb2.GenerateResponse.FromString
    )
    messages = [infer_pb2.GenerateRequest(attribution=common_pb2.Attribution(tenant=t)) for t in tenants]
    try:
        return [r.text async for r in call(iter(messages), timeout=5)]
    except grpc.aio.AioRpcError as err:
        return err.code()


async def test_a_streamed_request_takes_a_service_key_not_a_tenant_key(stream_port: int) -> None:
    target = f"127.0.0.1:{stream_port}"
    async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(TENANT)) as ch:
        # Refused before any message is read, even where the rule lets tenants in.
        assert await _tenants(ch, TENANT_STREAM, "acme") == grpc.StatusCode.PERMISSION_DENIED
        assert await _tenants(ch, GENERATE, "acme") == grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(ROUTER)) as ch:
        # The worker's bidirectional Generate is the router's: a service key acts for any tenant.
        assert await _tenants(ch, GENERATE, "globex", "") == ["globex", ""]
