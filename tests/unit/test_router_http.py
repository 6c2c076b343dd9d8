"""The HTTP front door's request handling, driven through its ASGI app over the pipeline on in-memory ports (the
unit-test seam of tests/unit/test_router_pipeline.py; no sockets). tests/e2e/test_http_front.py runs the same door
with the official openai SDK against the real mesh."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.auth import ApiKey, Authenticator, Role, digest
from services.common.http_telemetry import ASGIApp, HttpMetrics
from services.common.pricing import PriceTable, TokenUsage
from services.router.classifier.types import Tier
from services.router.config import HttpSettings
from services.router.http import FrontDoor, build_app
from services.router.limits import LimitSettings, TenantLimit, TenantLimiter
from services.router.pipeline import Pipeline
from tests.unit.test_router_pipeline import CHUNK_TOKENS, MODELS, Ledger, MemCache, Workers, make


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Each body message as sent (a stream's chunks).
    parts: list[bytes] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The SSE ``data:`` payloads, ``[DONE]`` as the string."""
        out: list[Any] = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out


class Client:
    """Calls an ASGI app as uvicorn does: one ``http`` scope, the body on ``receive``, then ``receive`` waits until
    the client disconnects (``disconnect()``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def start(
        self, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = (), chunked: bool = False
    ) -> Call:
        return Call(self.app, method, path, body, headers, chunked)

    async def post(self, body: Any, headers: Sequence[tuple[str, str]] = (("x-costmesh-tenant", "acme"),)) -> Reply:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.start("POST", "/v1/chat/completions", raw, headers).reply()

    async def get(self, path: str, headers: Sequence[tuple[str, str]] = ()) -> Reply:
        return await self.start("GET", path, headers=headers).reply()


class Call:
    def __init__(
        self, app: ASGIApp, method: str, path: str, body: bytes, headers: Sequence[tuple[str, str]], chunked: bool
    ) -> None:
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        hdrs = [(k.lower().encode(), v.encode()) for k, v in headers]
        if chunked:  # the body in pieces, with no content-length
            for i in range(0, len(body), 1024):
                self._inbox.put_nowait({"type": "http.request", "body": body[i : i + 1024], "more_body": True})
            self._inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        else:
            hdrs.append((b"content-length", str(len(body)).encode()))
            self._inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": hdrs,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
        }
        self.sent: list[dict[str, Any]] = []
        self.body_sent = asyncio.Event()
        self.task = asyncio.ensure_future(app(scope, self._inbox.get, self._send))

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.body_sent.set()

    def disconnect(self) -> None:
        self._inbox.put_nowait({"type": "http.disconnect"})

    async def reply(self) -> Reply:
        await asyncio.wait_for(self.task, 30)
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        parts = [m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"]
        return Reply(start["status"], headers, b"".join(parts), parts)


TENANT = (("x-costmesh-tenant", "acme"), ("x-costmesh-feature", "faq"))


def chat(text: str = "What is 2+2?", **kw: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 50, "temperature": 0, **kw}


def door(
    pipeline: Pipeline,
    *,
    settings: HttpSettings | None = None,
    limiter: TenantLimiter | None = None,
    authenticator: Authenticator | None = None,
    metrics: HttpMetrics | None = None,
    tracer: Any = None,
) -> Client:
    front = FrontDoor(
        pipeline=pipeline,
        models=MODELS,
        settings=settings or HttpSettings(),
        limiter=limiter,
        authenticator=authenticator,
    )
    return Client(build_app(front, metrics=metrics, tracer=tracer))


FULL_COST = PriceTable().price_for(tier="full").cost_micros(TokenUsage(100, 20, 40))


# ---- answers -----------------------------------------------------------------------------------------------------


async def test_a_completion_is_openais_object_with_costmesh_headers_and_the_ledger_agrees() -> None:
    p, _cache, ledger, _ = make()
    client = door(p)
    miss = await client.post(chat(), TENANT)
    await p.drain()
    assert miss.status == 200 and miss.headers["content-type"] == "application/json"
    body = miss.json()
    assert body["object"] == "chat.completion" and body["model"] == "full-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello world", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 40},
    }
    h = miss.headers
    assert h["x-costmesh-cache-hit"] == "false" and h["x-costmesh-model-class"] == "full"
    assert int(h["x-costmesh-cost-micros"]) == FULL_COST == ledger.committed
    assert body["id"] == f"chatcmpl-{h['x-costmesh-request-id']}"
    hit = await client.post(chat(), TENANT)
    assert hit.headers["x-costmesh-cache-hit"] == "true" and hit.headers["x-costmesh-cost-micros"] == "0"
    assert int(hit.headers["x-costmesh-saved-micros"]) > 0
    assert hit.headers["x-costmesh-request-id"] != h["x-costmesh-request-id"]


async def test_a_model_name_pins_its_tier_and_x_request_id_is_the_request_id() -> None:
    p, _, ledger, workers = make()
    client = door(p)
    reply = await client.post(chat(model="cheap-model"), (*TENANT, ("x-request-id", "my-req.1")))
    assert reply.status == 200 and reply.headers["x-costmesh-model-class"] == "cheap"
    assert workers.calls[0][0] is Tier.CHEAP and reply.headers["x-costmesh-request-id"] == "my-req.1"
    assert reply.json()["id"] == "chatcmpl-my-req.1"


async def test_a_stream_sends_deltas_then_the_finish_the_usage_and_done() -> None:
    p, _, ledger, _ = make()
    client = door(p)
    reply = await client.post(chat(stream=True, stream_options={"include_usage": True}), TENANT)
    await p.drain()
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": "hello "},
        {"content": "world"},
    ]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks[:3])
    assert chunks[2]["choices"][0]["finish_reason"] == "stop" and chunks[2]["model"] == "full-model"
    last = chunks[3]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 20
    assert last["costmesh"]["cost_micros"] == ledger.committed == FULL_COST
    assert last["costmesh"]["request_id"] == reply.headers["x-costmesh-request-id"]
    assert len({c["id"] for c in chunks}) == 1
    assert len(reply.parts) == 3  # two deltas, then the finish, the usage and [DONE] in one write


async def test_a_stream_without_include_usage_has_no_usage_and_the_figures_on_the_finish_chunk() -> None:
    p, *_ = make()
    reply = await door(p).post(chat(stream=True), TENANT)
    chunks = reply.events()[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["costmesh"]["cache_hit"] is False


# ---- the money path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_disconnects_mid_generation_pays_for_what_was_generated(stream: bool) -> None:
    workers = Workers(hang=True)
    p, cache, ledger, _ = make(workers=workers)
    call = door(p).start("POST", "/v1/chat/completions", json.dumps(chat(stream=stream)).encode(), TENANT)
    await asyncio.wait_for(workers.started.wait(), 10)
    if stream:
        await asyncio.wait_for(call.body_sent.wait(), 10)  # the first delta reached the client
    assert ledger.reserved  # held while the worker runs
    call.disconnect()
    await asyncio.wait_for(call.task, 10)  # ends quietly: nobody to answer
    await p.drain()
    assert workers.stops == 1 and workers.generated == [(Tier.FULL, TokenUsage(100, CHUNK_TOKENS, 40))]
    assert ledger.committed == workers.owed() > 0 and ledger.reserved == {}
    assert cache.leases == {}
    assert not any(m.get("more_body") is False for m in call.sent)  # nothing more was written
    assert [m["type"] for m in call.sent].count("http.response.start") == (1 if stream else 0)


async def test_a_deadline_shorter_than_the_generation_is_504_and_billed() -> None:
    workers = Workers(hang=True)
    p, _, ledger, _ = make(workers=workers)
    reply = await door(p).post(chat(), (*TENANT, ("x-costmesh-timeout-ms", "200")))
    await p.drain()
    assert reply.status == 504 and reply.json()["error"]["code"] == "deadline_exceeded"
    assert reply.headers["x-should-retry"] == "false"
    assert ledger.committed == workers.owed() > 0 and ledger.reserved == {}


async def test_a_stream_past_its_deadline_ends_with_an_error_event_and_is_billed() -> None:
    workers = Workers(hang=True)
    p, _, ledger, _ = make(workers=workers)
    reply = await door(p).post(chat(stream=True), (*TENANT, ("x-costmesh-timeout-ms", "300")))
    await p.drain()
    events = reply.events()
    assert reply.status == 200 and events[0]["choices"][0]["delta"]["content"] == "hello "
    assert events[-1]["error"]["code"] == "deadline_exceeded" and "[DONE]" not in events
    assert ledger.committed == workers.owed() > 0 and ledger.reserved == {}


async def test_a_worker_that_dies_mid_stream_ends_it_with_an_error_and_bills_what_was_received() -> None:
    p, _, ledger, _ = make(workers=Workers(fail_after_first=True))
    reply = await door(p).post(chat(stream=True), TENANT)
    await p.drain()
    events = reply.events()
    assert events[-1]["error"]["type"] == "server_error" and events[-1]["error"]["code"] == "unavailable"
    assert ledger.committed > 0 and ledger.reserved == {}


# ---- refusals: each its documented error, nothing charged -------------------------------------------------------


async def refused(client: Client, ledger: Ledger, workers: Workers, body: Any, headers: Any = TENANT) -> Reply:
    reply = await client.post(body, headers)
    assert reply.status >= 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert ledger.committed == 0 and ledger.reserved == {} and workers.calls == []
    return reply


async def test_bad_requests_are_400s_naming_the_parameter_and_cost_nothing() -> None:
    p, _, ledger, workers = make()
    client = door(p)
    malformed = await refused(client, ledger, workers, b'{"model": "auto", "messages": [')
    assert malformed.status == 400 and malformed.json()["error"]["code"] == "invalid_json"
    wrong = await refused(client, ledger, workers, {"model": "auto", "messages": "hi", "temperature": "warm"})
    assert wrong.status == 400 and wrong.json()["error"]["param"] == "messages"
    assert "temperature" in wrong.json()["error"]["message"]
    # the pipeline's own rules, with OpenAI's parameter names
    big = await refused(client, ledger, workers, chat(max_completion_tokens=10**9))
    assert big.json()["error"]["param"] == "max_completion_tokens" and "0..32768" in big.json()["error"]["message"]
    role = await refused(client, ledger, workers, {"model": "auto", "messages": [{"role": "robot", "content": "x"}]})
    assert role.json()["error"]["param"] == "messages[0].role"
    tools = await refused(client, ledger, workers, chat(tools=[{"type": "function"}]))
    assert tools.json()["error"]["param"] == "tools" and tools.json()["error"]["code"] == "unsupported"
    no_tenant = await refused(client, ledger, workers, chat(), headers=())
    assert no_tenant.status == 400 and no_tenant.json()["error"]["param"] == "x-costmesh-tenant"
    bad_id = await refused(client, ledger, workers, chat(), headers=(*TENANT, ("x-request-id", "a b")))
    assert bad_id.json()["error"]["param"] == "x-request-id"
    bad_timeout = await refused(client, ledger, workers, chat(), headers=(*TENANT, ("x-costmesh-timeout-ms", "-1")))
    assert bad_timeout.json()["error"]["param"] == "x-costmesh-timeout-ms"
    bad_cache = await refused(client, ledger, workers, chat(), headers=(*TENANT, ("x-costmesh-cache", "never")))
    assert bad_cache.json()["error"]["param"] == "x-costmesh-cache"
    stream_bad = await refused(client, ledger, workers, chat(stream=True, max_tokens=-1))
    assert stream_bad.status == 400 and stream_bad.headers["content-type"] == "application/json"


async def test_an_unknown_model_is_404_model_not_found() -> None:
    p, _, ledger, workers = make()
    reply = await refused(door(p), ledger, workers, chat(model="gpt-4o"))
    assert reply.status == 404
    assert reply.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_oversized_body_is_413(chunked: bool) -> None:
    p, _, ledger, workers = make()
    client = door(p, settings=HttpSettings(max_body_bytes=2048))
    body = json.dumps(chat("x" * 4096)).encode()
    reply = await client.start("POST", "/v1/chat/completions", body, TENANT, chunked=chunked).reply()
    assert reply.status == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert ledger.committed == 0 and workers.calls == []


async def test_a_budget_hard_stop_is_429_with_retry_after_and_no_retry_advice() -> None:
    p, _, ledger, workers = make(ledger=Ledger(limit=10))
    reply = await door(p).post(chat(), TENANT)
    assert reply.status == 429 and reply.json()["error"]["type"] == "insufficient_quota"
    assert reply.json()["error"]["code"] == "budget_exceeded" and reply.headers["x-should-retry"] == "false"
    assert ledger.committed == 0 and ledger.reserved == {} and workers.calls == []


async def test_the_tenant_limiter_of_the_grpc_door_applies_with_retry_after() -> None:
    workers = Workers(hang=True)
    p, *_ = make(workers=workers)
    limiter = TenantLimiter(LimitSettings(default=TenantLimit(max_concurrent=1)))
    client = door(p, limiter=limiter)
    first = client.start("POST", "/v1/chat/completions", json.dumps(chat(stream=True)).encode(), TENANT)
    await asyncio.wait_for(workers.started.wait(), 10)
    second = await client.post(chat("another"), TENANT)
    assert second.status == 429 and second.json()["error"]["code"] == "tenant_concurrency"
    assert second.headers["retry-after"] == "1" and second.headers["x-should-retry"] == "true"
    assert limiter.in_flight("acme") == 1  # the open stream holds its slot
    first.disconnect()
    await asyncio.wait_for(first.task, 10)
    assert limiter.in_flight("acme") == 0
    await p.drain()


async def test_a_tier_that_is_down_is_503() -> None:
    p, _, ledger, _ = make(workers=Workers(down={Tier.CHEAP, Tier.FULL}))
    reply = await door(p).post(chat(), TENANT)
    await p.drain()
    assert reply.status == 503 and reply.json()["error"]["type"] == "server_error"
    assert reply.headers["x-should-retry"] == "true" and ledger.committed == 0 and ledger.reserved == {}


# ---- auth --------------------------------------------------------------------------------------------------------

KEYS = {"acme": "cm_acme-key", "router": "cm_service-key"}
AUTH = Authenticator(
    [
        ApiKey(name="acme", role=Role.TENANT, tenant="acme", sha256=digest(KEYS["acme"])),
        ApiKey(name="router", role=Role.SERVICE, sha256=digest(KEYS["router"])),
    ]
)


def bearer(who: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {KEYS[who]}")


async def test_with_auth_the_key_gives_the_tenant_and_refusals_are_401_and_403() -> None:
    p, _, ledger, workers = make()
    client = door(p, authenticator=AUTH)
    missing = await refused(client, ledger, workers, chat(), headers=())
    assert missing.status == 401 and missing.json()["error"]["code"] == "no_key"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    unknown = await refused(client, ledger, workers, chat(), headers=(("authorization", "Bearer cm_nope"),))
    assert unknown.status == 401 and unknown.json()["error"]["type"] == "authentication_error"
    foreign = await refused(client, ledger, workers, chat(), headers=(bearer("acme"), ("x-costmesh-tenant", "globex")))
    assert foreign.status == 403 and foreign.json()["error"]["code"] == "tenant_mismatch"
    service_without_tenant = await refused(client, ledger, workers, chat(), headers=(bearer("router"),))
    assert service_without_tenant.status == 400
    assert service_without_tenant.json()["error"]["param"] == "x-costmesh-tenant"
    own = await client.post(chat(), (bearer("acme"),))  # the tenant key's tenant is filled in
    assert own.status == 200 and ledger.committed > 0
    service = await client.post(chat("other question"), (bearer("router"), ("x-costmesh-tenant", "globex")))
    assert service.status == 200


async def test_the_model_list_needs_a_key_with_auth_and_lists_auto_and_every_tier() -> None:
    p, *_ = make()
    client = door(p, authenticator=AUTH)
    assert (await client.get("/v1/models")).status == 401
    listing = await client.get("/v1/models", (bearer("acme"),))
    assert listing.status == 200 and listing.json()["object"] == "list"
    assert [m["id"] for m in listing.json()["data"]] == ["auto", "cheap-model", "full-model"]
    one = await client.get("/v1/models/full-model", (bearer("acme"),))
    assert one.status == 200 and one.json()["id"] == "full-model"
    missing = await client.get("/v1/models/gpt-4o", (bearer("acme"),))
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_unknown_urls_and_methods_answer_in_openais_shape() -> None:
    p, *_ = make()
    client = door(p)
    nowhere = await client.get("/v1/embeddings")
    assert nowhere.status == 404 and nowhere.json()["error"]["code"] == "unknown_url"
    wrong = await client.get("/v1/chat/completions")
    assert wrong.status == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


# ---- telemetry ---------------------------------------------------------------------------------------------------


async def test_every_request_is_timed_by_route_and_status_in_a_server_span_with_the_pipelines_attributes() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    p, *_ = make(cache=MemCache())
    client = door(p, metrics=HttpMetrics(provider.get_meter("t")), tracer=tracing.get_tracer("t"))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert (await client.post(chat(), (*TENANT, ("traceparent", parent)))).status == 200
    assert (await client.post(chat(model="nope"), TENANT)).status == 404
    assert (await client.get("/nowhere")).status == 404
    await p.drain()
    points = [
        dict(pt.attributes or {})
        for rm in (reader.get_metrics_data() or _empty()).resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "http.server.request.duration"
        for pt in m.data.data_points
    ]
    keyed = {(a.get("http.route"), a.get("http.response.status_code")) for a in points}
    assert keyed == {("/v1/chat/completions", 200), ("/v1/chat/completions", 404), (None, 404)}
    assert all(a["http.request.method"] in ("POST", "GET") and a["url.scheme"] == "http" for a in points)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ok = next(s for s in exporter.get_finished_spans() if (s.attributes or {}).get("http.response.status_code") == 200)
    assert ok.name == "POST /v1/chat/completions" and ok.kind.name == "SERVER"
    assert format(ok.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"  # continues the caller's trace
    attrs = dict(ok.attributes or {})
    assert attrs["costmesh.tenant"] == "acme" and attrs["costmesh.feature"] == "faq"
    assert attrs["costmesh.cost.micros"] == FULL_COST and attrs["costmesh.tier"] == "full"
    assert attrs["gen_ai.usage.output_tokens"] == 20 and attrs["http.route"] == "/v1/chat/completions"
    assert "GET" in spans  # no route matched: the method alone
    provider.shutdown()
    tracing.shutdown()


def _empty() -> Any:
    raise AssertionError("no metrics recorded")
