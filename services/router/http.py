"""The router's OpenAI-compatible HTTP front door: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A second way into the same request path: every chat completion runs ``Pipeline.run`` — cache, routing, budget,
attribution, metrics, traces — exactly as ``RouterService.Generate``/``GenerateStream`` do; this module only reads
HTTP and writes OpenAI's shapes (``openaiconv.py``). Pointing an OpenAI SDK's ``base_url`` at
``http://127.0.0.1:8080/v1`` is all a client needs.

* **Who pays.** With ``auth.enabled`` the ``Authorization: Bearer <key>`` header authenticates the caller with the
  router's own API keys and the rule of ``RouterService.Generate`` (``services/common/auth.py``): a tenant key acts
  for its tenant (a different ``x-costmesh-tenant`` is 403), service and admin keys name the tenant in
  ``x-costmesh-tenant``. With auth off (loopback only), the tenant is ``x-costmesh-tenant`` and the SDK's API key is
  ignored. ``x-costmesh-team`` / ``x-costmesh-feature`` attribute the spend, the request's ``user`` is the end user.
* **Answer.** OpenAI's ``chat.completion`` with ``usage.prompt_tokens_details.cached_tokens``, and costmesh's figures
  in headers: ``x-costmesh-request-id``, ``-cost-micros``, ``-saved-micros``, ``-cache-hit``, ``-model-class``. A
  stream (``stream: true``; ``stream_options.include_usage`` adds the usage chunk) starts once the pipeline's first
  event is there, so a refusal before any token is still a plain HTTP error; its headers carry the request id, and
  its last chunk carries the other figures as a ``costmesh`` object (they are known only at the end). Its chunks
  name the model the request asked for (``auto`` included) until the finish chunk, which names the one that
  answered: the pipeline says which only with its result.
* **Errors** in OpenAI's shape with the HTTP status of the domain error's code (400, 401, 403, 404
  ``model_not_found``, 413, 429 with ``Retry-After``, 503, 504); after a stream started, as a final
  ``data: {"error": …}`` event.
* **Limits.** The body cap (``http.max_body_bytes``, 413), the per-tenant limiter the gRPC servicer uses (one per
  process, shared by both doors), and a deadline per request: ``x-costmesh-timeout-ms`` or ``http.timeout_s``,
  propagated to every downstream call (504 once it passes).
* **The money path.** A client that disconnects, or whose deadline passes, cancels its request at once: a watcher
  on the ASGI ``receive`` channel cancels the request's task when ``http.disconnect`` arrives (uvicorn drops writes
  to a closed connection silently, so waiting for a write to fail would keep the worker generating), and the
  pipeline's generator, held in ``contextlib.aclosing``, stops the worker and bills what it generated.

The server is uvicorn (httptools parser) running Starlette in the router's own event loop beside the gRPC server
(:class:`HttpFront`, started and stopped by ``ServiceHost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
import uvicorn
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common import deadline
from services.common.attribution import END_USER_KEY, FEATURE_KEY, REQUEST_ID_KEY, TEAM_KEY, TENANT_KEY, Attribution
from services.common.auth import AUTHORIZATION, HTTP_RULES, Authenticator, MethodRule, authorize
from services.common.errors import (
    CostmeshError,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
)
from services.common.http_telemetry import ASGIApp, HttpMetrics, HttpTelemetry, Receive, Scope, Send, starlette_routes
from services.common.spans import baggage_context
from services.router.classifier.types import Tier
from services.router.config import HttpSettings
from services.router.domain import CacheMode, Event, GenerateInput, GenerateResult, TextDelta
from services.router.limits import TenantLimiter, admission
from services.router.openai_types import ChatCompletionRequest
from services.router.openaiconv import (
    chunk,
    completion,
    error_body,
    error_headers,
    extras,
    finish_reason,
    from_validation_error,
    http_status,
    include_usage,
    model_list,
    model_object,
    openai_violations,
    requested_tier,
    result_headers,
    to_input,
    unsupported,
    usage_chunk,
    valid_request_id,
)
from services.router.pipeline import Pipeline

log = structlog.get_logger("costmesh.router.http")

CHAT_ROUTE = "/v1/chat/completions"
TIMEOUT_KEY = "x-costmesh-timeout-ms"
CACHE_KEY = "x-costmesh-cache"
_CACHE_MODES = {
    "": CacheMode.DEFAULT,
    "default": CacheMode.DEFAULT,
    "bypass": CacheMode.BYPASS,
    "refresh": CacheMode.REFRESH,
}
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class FrontDoor:
    """What the endpoints share: the pipeline, the model names, the limits and the router's API keys."""

    pipeline: Pipeline
    models: Mapping[Tier, str]
    settings: HttpSettings
    limiter: TenantLimiter | None = None
    #: The router's keys when ``auth.enabled``; None = auth off (loopback).
    authenticator: Authenticator | None = None

    def principal_tenant(self, authorization: str, rule: MethodRule, tenants: list[str]) -> str:
        """Authenticate and authorize (no-op with auth off); the tenant a tenant key fills in, else ""."""
        if self.authenticator is None:
            return ""
        try:
            principal = self.authenticator.authenticate(authorization)
        except Unauthenticated as err:
            if err.reason == "UNKNOWN_KEY":
                raise
            raise Unauthenticated(
                "an API key is required: header 'Authorization: Bearer <key>'", reason=err.reason
            ) from None
        return authorize(principal, rule, named="", metadata_tenants=tenants).fill_tenant


#: The request headers the door reads (an SDK sends a dozen more, never decoded).
_WANTED = frozenset(
    k.encode()
    for k in (
        AUTHORIZATION,
        TENANT_KEY,
        TEAM_KEY,
        FEATURE_KEY,
        END_USER_KEY,
        REQUEST_ID_KEY,
        "content-length",
        "x-costmesh-timeout-ms",
        "x-costmesh-cache",
    )
)


def _headers(scope: Scope) -> tuple[dict[str, str], list[str]]:
    """The headers the door reads (the last value wins) and every ``x-costmesh-tenant`` value. ASGI servers give
    header names in lower case."""
    out: dict[str, str] = {}
    tenants: list[str] = []
    for raw_key, raw_value in scope["headers"]:
        if raw_key in _WANTED:
            key = raw_key.decode("latin-1")
            value = raw_value.decode("latin-1")
            out[key] = value
            if key == TENANT_KEY:
                tenants.append(value)
    return out, tenants


async def _next(events: AsyncIterator[Event]) -> Event | None:
    async for event in events:
        return event
    return None


def _sse(obj: Any) -> bytes:
    return b"data: " + to_json(obj) + b"\n\n"


async def _send_json(
    send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]], ex: _Exchange | None = None
) -> None:
    data = to_json(body)
    if ex is not None:
        ex.started = ex.answered = True
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _too_large(cap: int) -> InvalidArgument:
    return InvalidArgument(f"request body larger than {cap} bytes", reason="REQUEST_TOO_LARGE")


async def _read_body(receive: Receive, headers: dict[str, str], cap: int) -> bytes | None:
    """The whole body, at most ``cap`` bytes (413 beyond); None when the client went away first."""
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise _too_large(cap)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        size += len(part)
        if size > cap:
            raise _too_large(cap)
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass
class _Exchange:
    """One chat completion in flight: how far its response got."""

    request_id: str
    created: int
    req: ChatCompletionRequest | None = None
    #: The response has started (a stream's headers are out): errors go into the stream.
    started: bool = False
    #: The last byte is being or has been sent: a disconnect now is the end of the exchange, not a client gone.
    answered: bool = False


class _ClientWatch:
    """Within the block, a client that disconnects cancels the current task; that cancellation ends the block
    quietly (nobody is left to answer). Any other cancellation (server shutdown) propagates.

    The watcher reads the ASGI ``receive`` channel, so the request body must have been read before the block; uvicorn
    answers it with ``http.disconnect`` when the connection drops (or once the response is complete, which is why
    the exchange says when it is being answered). It starts only once the block has run for ``ARM_AFTER_S`` (a
    cache hit is answered before that, and a task per request would be a tenth of its cost); a client gone earlier
    is noticed then. It can cancel the task only while the task is inside the block: leaving the block disarms it
    first.
    """

    ARM_AFTER_S = 0.01

    def __init__(self, receive: Receive, ex: _Exchange) -> None:
        self._receive = receive
        self._ex = ex
        self.gone = False
        self._watcher: asyncio.Task[None] | None = None

    async def _watch(self, task: asyncio.Task[Any]) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._ex.answered:
            self.gone = True
            task.cancel()

    def _arm(self) -> None:
        self._watcher = self._loop.create_task(self._watch(self._task))

    async def __aenter__(self) -> _ClientWatch:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(self.ARM_AFTER_S, self._arm)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self.gone and exc_type is asyncio.CancelledError and self._task.uncancel() == 0:
            log.info("http_client_disconnected")
            return True
        return False


class ChatCompletions:
    """``POST /v1/chat/completions`` as an ASGI app (it needs the raw ``receive`` channel to watch for disconnects)."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._rule = HTTP_RULES[f"POST {CHAT_ROUTE}"]

    def _timeout_s(self, headers: dict[str, str]) -> float:
        s = self._door.settings
        raw = headers.get(TIMEOUT_KEY)
        if raw is None:
            return s.timeout_s
        if not raw.isdigit() or int(raw) == 0:
            raise InvalidArgument(
                "invalid deadline", violations=[FieldViolation(TIMEOUT_KEY, "a positive integer (milliseconds)")]
            )
        return min(int(raw) / 1000, s.max_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, tenants = _headers(scope)
        ex = _Exchange(request_id=uuid.uuid4().hex, created=int(time.time()))
        try:
            given_id = headers.get(REQUEST_ID_KEY, "")
            if given_id:
                if not valid_request_id(given_id):
                    raise InvalidArgument(
                        "invalid request id",
                        violations=[FieldViolation(REQUEST_ID_KEY, "1-128 characters of [A-Za-z0-9._~-]")],
                    )
                ex.request_id = given_id
            door = self._door
            filled = door.principal_tenant(headers.get(AUTHORIZATION, ""), self._rule, tenants)
            attribution = Attribution(
                tenant=tenants[-1] if tenants else filled,
                team=headers.get(TEAM_KEY, ""),
                feature=headers.get(FEATURE_KEY, ""),
                end_user=headers.get(END_USER_KEY, ""),
            )
            body = await _read_body(receive, headers, door.settings.max_body_bytes)
            if body is None:
                return  # the client went away before its request was complete
            try:
                ex.req = req = ChatCompletionRequest.model_validate_json(body)
            except ValidationError as err:
                raise from_validation_error(err) from None
            tier = requested_tier(req.model, door.models)
            refused = unsupported(req)
            if refused:
                raise InvalidArgument("unsupported parameters", violations=refused, reason="UNSUPPORTED")
            timeout_s = self._timeout_s(headers)
            cache = _CACHE_MODES.get(headers.get(CACHE_KEY, "").lower())
            if cache is None:
                raise InvalidArgument(
                    "invalid cache mode", violations=[FieldViolation(CACHE_KEY, "default, bypass or refresh")]
                )
            inp = to_input(
                req, request_id=ex.request_id, attribution=attribution, requested_tier=tier, cache_mode=cache
            )
        except CostmeshError as err:
            await self._fail(send, err, ex)
            return
        a = inp.attribution
        structlog.contextvars.bind_contextvars(
            route=CHAT_ROUTE, request_id=ex.request_id, tenant=a.tenant, feature=a.feature
        )
        deadline.set_remaining(timeout_s)
        # Downstream calls carry tenant/team/feature as W3C baggage, as on the gRPC door.
        token = otel_context.attach(baggage_context(a))
        try:
            async with _ClientWatch(receive, ex):
                try:
                    with admission(door.limiter, a.tenant):
                        async with asyncio.timeout(timeout_s):
                            if req.stream:
                                await self._stream(inp, req, send, ex)
                            else:
                                result = await door.pipeline.generate(inp)
                                body_json = completion(result, created=ex.created)
                                await _send_json(send, 200, body_json, result_headers(result), ex)
                except TimeoutError:
                    await self._fail(send, DeadlineExceeded(f"deadline of {timeout_s:g} s exceeded"), ex)
                except CostmeshError as err:
                    await self._fail(send, err, ex)
                except Exception as exc:  # the one place this door maps every error
                    log.error("http_request_crashed", error_type=type(exc).__name__, exc_info=exc)
                    await self._fail(send, CostmeshError("internal error"), ex)
        finally:
            otel_context.detach(token)

    async def _stream(self, inp: GenerateInput, req: ChatCompletionRequest, send: Send, ex: _Exchange) -> None:
        with_usage = include_usage(req)
        rid, created = ex.request_id, ex.created
        # aclosing: a client that goes away closes the pipeline's stream now, so it stops the worker and bills what
        # was generated (as RouterServicer.GenerateStream does).
        async with contextlib.aclosing(self._door.pipeline.run(inp)) as events:
            first = await anext(events)  # a refusal before the first token is still a plain HTTP error
            headers = [*_SSE, (b"x-costmesh-request-id", rid.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            ex.started = True
            role = True
            event: Event | None = first
            while event is not None:
                if isinstance(event, TextDelta):
                    delta = {"role": "assistant", "content": event.text} if role else {"content": event.text}
                    role = False
                    data = _sse(chunk(rid, created=created, model=req.model, delta=delta, with_usage=with_usage))
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                else:
                    tail = self._tail(event, req, created, with_usage, role)
                    ex.answered = True
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
                event = await _next(events)  # up to the end of the pipeline's stream (it ends after the result)

    @staticmethod
    def _tail(r: GenerateResult, req: ChatCompletionRequest, created: int, with_usage: bool, role: bool) -> bytes:
        """The finish chunk (with the model that answered), the usage chunk when asked for, and ``[DONE]``."""
        delta = {"role": "assistant", "content": ""} if role else {}
        last = chunk(
            r.request_id,
            created=created,
            model=r.model,
            delta=delta,
            finish=finish_reason(r.finish_reason),
            with_usage=with_usage,
        )
        parts = [last]
        if with_usage:
            parts.append(usage_chunk(r, created=created))
        parts[-1]["costmesh"] = extras(r)
        return b"".join(_sse(p) for p in parts) + _DONE

    @staticmethod
    async def _fail(send: Send, err: CostmeshError, ex: _Exchange) -> None:
        if isinstance(err, InvalidArgument):
            err = openai_violations(err, ex.req)
        status = http_status(err)
        if status >= 500 and status not in (503, 504):
            log.error("http_request_failed", reason=err.reason, error=err.message)
        if ex.answered:  # every byte went out already (the failure came after): nothing to tell the client
            log.warning("http_failed_after_answer", reason=err.reason, error=err.message)
            return
        if ex.started:  # the stream is open: end it with OpenAI's error event
            ex.answered = True
            await send({"type": "http.response.body", "body": _sse(error_body(err)), "more_body": False})
            return
        headers = [(b"x-costmesh-request-id", ex.request_id.encode()), *error_headers(err)]
        await _send_json(send, status, error_body(err), headers, ex)


def _json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(to_json(body), status_code=status, media_type="application/json", headers=headers)


def _error_response(err: CostmeshError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error_headers(err)}
    return _json_response(http_status(err), error_body(err), headers)


class Models:
    """``GET /v1/models`` and ``GET /v1/models/{model}``: the names a request may use."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._rule = HTTP_RULES["GET /v1/models"]

    def _check(self, request: Request) -> None:
        self._door.principal_tenant(request.headers.get(AUTHORIZATION, ""), self._rule, [])

    async def list(self, request: Request) -> Response:
        try:
            self._check(request)
        except CostmeshError as err:
            return _error_response(err)
        return _json_response(200, {"object": "list", "data": model_list(self._door.models)})

    async def retrieve(self, request: Request) -> Response:
        name = str(request.path_params["model"])
        try:
            self._check(request)
            requested_tier(name, self._door.models)  # NotFound unless a request may name it
        except CostmeshError as err:
            return _error_response(err)
        return _json_response(200, model_object(name))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(status, "internal")
    message = f"Unknown request URL: {request.method} {request.url.path}" if status == 404 else str(exc)
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return _json_response(status, body)


def build_app(door: FrontDoor, *, metrics: HttpMetrics | None = None, tracer: trace.Tracer | None = None) -> ASGIApp:
    """The ASGI app of the front door, inside its telemetry middleware."""
    models = Models(door)
    routes = [
        Route(CHAT_ROUTE, ChatCompletions(door), methods=["POST"]),
        Route("/v1/models", models.list, methods=["GET"]),
        Route("/v1/models/{model:path}", models.retrieve, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    return HttpTelemetry(app, route_of=starlette_routes(routes), metrics=metrics, tracer=tracer)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn in a loop it does not own: SIGTERM/SIGINT belong to the ``ServiceHost``, which stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise RuntimeError(f"could not bind HTTP port {host}:{port}: {err}") from err
    sock.set_inheritable(True)
    return sock


class HttpFront:
    """The HTTP server: uvicorn serving ``app`` in the current event loop (``ServiceHost.add_server``)."""

    def __init__(self, app: ASGIApp, *, host: str, port: int) -> None:
        self._app = app
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = _bind(self.host, self.requested_port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            # No X-Forwarded-For rewriting: nothing here reads the client address but telemetry, and a proxy in
            # front would have to be trusted by name (forwarded_allow_ips) — one middleware less per request.
            proxy_headers=False,
            server_header=False,
            backlog=2048,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("http_server_started", host=self.host, port=self.port, routes=[CHAT_ROUTE, "/v1/models"])

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, give requests in flight ``grace_s`` (streams then are cancelled: billed for what ran)."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        self._server.should_exit = True
        await self._task
        log.info("http_server_stopped")
