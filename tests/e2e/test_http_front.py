"""The router's OpenAI-compatible HTTP front door against the real mesh (budget, cache, two vLLM workers, router as
processes), driven by the official ``openai`` SDK — sync, async, streaming — and by raw HTTP for what an SDK would
never send. A second router with API keys on, beside the mesh's, serves the auth cases.

What must hold: the SDK works by pointing ``base_url`` at the router; the answer has OpenAI's schema with
``usage.prompt_tokens_details.cached_tokens`` and costmesh's figures in headers, which agree with the ledger; every
refused request gets its documented error and costs nothing; a client that drops a stream, or whose deadline
passes, is billed exactly what the workers generated and nothing stays reserved (the money oracle of
tests/e2e/test_money_tight.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from services.cli.certs import DeployCredentials, write_deploy_credentials
from services.common.health import wait_serving
from tests.support.mesh import Mesh, free_layout, running
from tests.support.oracle import assert_ledger_is_the_truth
from tests.support.procs import ServiceProcess
from tests.support.prom import scrape, total
from tests.support.traffic import money, track

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

LONG = "Write a very long story about a lighthouse keeper and the sea, with many chapters."
#: A system prompt long enough to fill several of vLLM's prefix-cache blocks.
SYSTEM = "You are a careful assistant for the costmesh test suite. " * 24


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    layout = free_layout(tmp_path_factory.mktemp("mesh-http"))
    with running(layout, {"router": {"COSTMESH_ROUTER_GRACE_PERIOD_S": "2"}}, timeout_s=900) as m:
        yield m


def new_tenant() -> str:
    return "h" + uuid.uuid4().hex[:10]


def headers(tenant: str, **more: str) -> dict[str, str]:
    return {"x-costmesh-tenant": tenant, "x-costmesh-team": "web", "x-costmesh-feature": "http", **more}


def sdk(mesh: Mesh, tenant: str) -> openai.OpenAI:
    # Auth is off on loopback: the SDK insists on a key, the router ignores it and takes the tenant header.
    return openai.OpenAI(
        base_url=mesh.layout.http_base_url,
        api_key="unused",
        max_retries=0,
        timeout=300,
        default_headers=headers(tenant),
    )


def async_sdk(mesh: Mesh, tenant: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=mesh.layout.http_base_url,
        api_key=str(kw.pop("api_key", "unused")),
        max_retries=0,
        timeout=300,
        default_headers=headers(tenant),
        **kw,  # type: ignore[arg-type]
    )


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def ledger_sync(mesh: Mesh, tenant: str) -> budget_pb2.UsageRow:
    with grpc.insecure_channel(mesh.layout.target("budget")) as ch:
        reply = budget_pb2_grpc.BudgetServiceStub(ch).GetUsage(budget_pb2.GetUsageRequest(tenant=tenant), timeout=30)
    return reply.total


# ---- the official SDK --------------------------------------------------------------------------------------------


def test_the_sync_sdk_gets_openais_schema_costmesh_headers_and_a_cache_hit_on_repeat(mesh: Mesh) -> None:
    t = new_tenant()
    client = sdk(mesh, t)
    question = f"What is the capital of France? ({uuid.uuid4().hex[:6]})"
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=user(question), max_tokens=8, temperature=0, user="end-user-1"
    )
    first = raw.parse()
    assert first.object == "chat.completion" and first.model in ("costmesh-cheap", "costmesh-full")
    assert first.choices[0].message.role == "assistant" and first.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage is not None and first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.usage.prompt_tokens_details is not None and first.usage.prompt_tokens_details.cached_tokens >= 0
    h = raw.headers
    assert h["x-costmesh-cache-hit"] == "false" and first.id == f"chatcmpl-{h['x-costmesh-request-id']}"
    assert h["x-costmesh-model-class"] in ("cheap", "full") and first.model == f"costmesh-{h['x-costmesh-model-class']}"
    cost = int(h["x-costmesh-cost-micros"])
    assert cost > 0
    # the same question again: the response cache answers, for nothing
    again = client.chat.completions.with_raw_response.create(
        model="auto", messages=user(question), max_tokens=8, temperature=0
    )
    assert again.headers["x-costmesh-cache-hit"] == "true" and again.headers["x-costmesh-cost-micros"] == "0"
    assert int(again.headers["x-costmesh-saved-micros"]) > 0
    assert again.parse().choices[0].message.content == first.choices[0].message.content
    assert ledger_sync(mesh, t).cost_micros == cost  # the ledger holds what the headers said
    # the HTTP door's own metric, by route and status, beside the router's request counters
    samples = scrape(mesh.layout.metrics_ports["router"])
    assert (
        total(
            samples,
            "http_server_request_duration_seconds_count",
            http_route="/v1/chat/completions",
            http_response_status_code="200",
        )
        >= 2
    )
    assert total(samples, "costmesh_requests_total", tenant=t, feature="http", outcome="ok") == 2


def test_a_repeated_long_prompt_reports_cached_tokens(mesh: Mesh) -> None:
    client = sdk(mesh, new_tenant())
    cached = []
    for i in range(3):
        r = client.chat.completions.create(
            model="costmesh-cheap",
            messages=[{"role": "system", "content": SYSTEM}, *user(f"question {i} {uuid.uuid4().hex[:6]}")],
            max_tokens=2,
            temperature=0.8,  # never response-cached: each is a generation
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert max(cached[1:]) > 0  # vLLM's prefix cache served the shared system prompt


async def test_the_async_sdk_with_pinned_and_automatic_models(mesh: Mesh) -> None:
    t = new_tenant()
    client = async_sdk(mesh, t)
    for model, tier in (("costmesh-cheap", "cheap"), ("costmesh-full", "full")):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=user(f"Name a colour. {uuid.uuid4().hex[:6]}"), max_tokens=4, temperature=0
        )
        r = raw.parse()
        assert raw.headers["x-costmesh-model-class"] == tier and r.model == model
    auto = await client.chat.completions.create(model="auto", messages=user("Say hi."), max_tokens=4, temperature=0)
    assert auto.model in ("costmesh-cheap", "costmesh-full") and auto.choices[0].message.content is not None
    listed = [m.id async for m in client.models.list()]
    assert listed == ["auto", "costmesh-cheap", "costmesh-full"]
    assert (await client.models.retrieve("costmesh-full")).id == "costmesh-full"
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=4)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    await client.close()


async def test_streaming_with_include_usage_sync_and_async(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    prompt = user(f"Count from one to ten. {uuid.uuid4().hex[:6]}")
    client = async_sdk(mesh, t)
    stream = await client.chat.completions.create(
        model="costmesh-cheap",
        messages=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens_details is not None
    figures = (last.model_extra or {})["costmesh"]
    assert figures["cache_hit"] is False and figures["model_class"] == "cheap" and figures["cost_micros"] > 0
    assert all(c.usage is None for c in chunks[:-1])
    await client.close()
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert usage.cost_micros == figures["cost_micros"]
    # the sync SDK, the same request: now a cache hit, streamed
    with sdk(mesh, t).chat.completions.create(
        model="costmesh-cheap", messages=prompt, max_tokens=12, temperature=0, stream=True
    ) as sync_stream:
        again = list(sync_stream)
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == text
    assert (again[-1].model_extra or {})["costmesh"]["cache_hit"] is True


# ---- the money path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 6])
async def test_a_client_that_drops_a_stream_pays_for_what_was_generated(mesh: Mesh, k: int) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    client = async_sdk(mesh, t)
    for _ in range(2):
        stream = await client.chat.completions.create(
            model="costmesh-full",
            messages=user(f"{LONG} ({uuid.uuid4().hex[:8]})"),
            max_tokens=256,
            temperature=0.8,  # never cached: each is a generation the ledger must account for
            stream=True,
        )
        got = 0
        async for c in stream:
            got += bool(c.choices and c.choices[0].delta.content)
            if got >= k:
                break
        await stream.close()  # drops the connection mid-body
    await client.close()
    usage = await assert_ledger_is_the_truth(mesh, t)
    assert usage.cost_micros > 0 and 2 * k <= usage.usage.output_tokens < 2 * 256


async def test_a_deadline_shorter_than_the_generation_is_504_and_pays_for_what_ran(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    async with httpx.AsyncClient(base_url=mesh.layout.http_base_url, timeout=120) as http:
        reply = await http.post(
            "/chat/completions",
            json={"model": "costmesh-full", "messages": user(f"{LONG} {uuid.uuid4().hex}"), "max_tokens": 512},
            headers=headers(t, **{"x-costmesh-timeout-ms": "700"}),
        )
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "deadline_exceeded" and reply.headers["x-should-retry"] == "false"
    await assert_ledger_is_the_truth(mesh, t)


# ---- refusals: documented errors, nothing charged ----------------------------------------------------------------


async def test_malformed_wrong_oversized_unknown_and_unattributed_requests_are_refused_for_free(mesh: Mesh) -> None:
    t = new_tenant()
    await track(mesh.layout.target("budget"), t)
    good = {"model": "auto", "messages": user("hi"), "max_tokens": 4}
    cases: list[tuple[str, dict[str, object], int, str, str | None]] = [
        ("malformed JSON", {"content": b'{"model": "auto", "messages": ['}, 400, "invalid_json", None),
        ("wrong types", {"json": {"model": "auto", "messages": "hi", "max_tokens": "4"}}, 400, "invalid_type", None),
        ("a string temperature", {"json": {**good, "temperature": "hot"}}, 400, "invalid_type", "temperature"),
        ("max_tokens out of range", {"json": {**good, "max_tokens": 10**7}}, 400, "invalid_argument", "max_tokens"),
        ("an unknown role", {"json": {**good, "messages": [{"role": "robot", "content": "x"}]}}, 400, "", None),
        (
            "oversized",
            {"content": b'{"model": "auto", "x": "' + b"x" * (5 << 20) + b'"}'},
            413,
            "request_too_large",
            None,
        ),
        ("an unknown model", {"json": {**good, "model": "gpt-4o"}}, 404, "model_not_found", "model"),
        ("no tenant", {"json": good, "headers": {}}, 400, "invalid_argument", "x-costmesh-tenant"),
    ]
    async with httpx.AsyncClient(base_url=mesh.layout.http_base_url, timeout=60) as http:
        for what, kw, status, code, param in cases:
            sent = {"headers": headers(t), **kw}
            reply = await http.post("/chat/completions", **sent)  # type: ignore[arg-type]
            assert reply.status_code == status, (what, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, what
            assert error["type"] == "invalid_request_error", what
            if code:
                assert error["code"] == code, (what, error)
            if param:
                assert error["param"] == param, (what, error)
            assert reply.headers["x-costmesh-request-id"], what
        wrong_path = await http.post("/completions", json=good, headers=headers(t))
        assert wrong_path.status_code == 404 and wrong_path.json()["error"]["code"] == "unknown_url"
    usage, reserved = await money(mesh.layout.target("budget"), t)
    assert usage.cost_micros == 0 and usage.requests == 0 and reserved == 0


async def test_a_budget_hard_stop_is_429_with_retry_after_and_costs_nothing(mesh: Mesh) -> None:
    t = new_tenant()
    policy = budget_pb2.BudgetPolicy(
        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=t),
        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_DAY, cost_micros=1)],
    )
    async with grpc.aio.insecure_channel(mesh.layout.target("budget")) as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(budget_pb2.SetBudgetRequest(policy=policy), timeout=30)
    client = async_sdk(mesh, t)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="auto", messages=user(f"hi {uuid.uuid4().hex}"), max_tokens=4)
    await client.close()
    e = err.value
    assert e.status_code == 429 and e.code == "budget_exceeded"
    assert int(e.response.headers["retry-after"]) >= 1 and e.response.headers["x-should-retry"] == "false"
    usage, reserved = await money(mesh.layout.target("budget"), t)
    assert usage.cost_micros == 0 and reserved == 0


# ---- auth --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def secured(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, DeployCredentials]]:
    """A second router, API keys on, over the mesh's cache, budget and workers: its HTTP base URL and keys."""
    creds = write_deploy_credentials(Path(tmp_path_factory.mktemp("http-auth")), tenants=("acme",))
    layout = mesh.layout
    proc = ServiceProcess(
        "services.router",
        env={
            "COSTMESH_ROUTER_AUTH__ENABLED": "true",
            "COSTMESH_ROUTER_AUTH__KEYS_FILE": str(creds.keys_file),
            "COSTMESH_ROUTER_BUDGET_TARGET": layout.target("budget"),
            "COSTMESH_ROUTER_CACHE_TARGET": layout.target("cache"),
            "COSTMESH_ROUTER_INFER_TARGETS__CHEAP": layout.target("infer-cheap"),
            "COSTMESH_ROUTER_INFER_TARGETS__FULL": layout.target("infer-full"),
            "COSTMESH_ROUTER_TOKENIZER_DIRS__CHEAP": str(layout.models_dir / "cheap"),
            "COSTMESH_ROUTER_TOKENIZER_DIRS__FULL": str(layout.models_dir / "full"),
        },
    ).start()
    try:
        try:
            await wait_serving(proc.target, timeout_s=240)
        except TimeoutError:
            pytest.fail(f"secured router did not start:\n{proc.log()[-4000:]}")
        yield f"http://127.0.0.1:{proc.http_port}/v1", creds
    finally:
        proc.kill()


async def test_with_api_keys_a_missing_unknown_or_foreign_key_is_refused_for_free(
    mesh: Mesh, secured: tuple[str, DeployCredentials]
) -> None:
    base_url, creds = secured
    await track(mesh.layout.target("budget"), "acme")
    before, _ = await money(mesh.layout.target("budget"), "acme")
    body = {"model": "costmesh-cheap", "messages": user(f"hi {uuid.uuid4().hex[:6]}"), "max_tokens": 4}
    acme = creds.keys.tenants["acme"]
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        missing = await http.post("/chat/completions", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        unknown = await http.post("/chat/completions", json=body, headers={"authorization": "Bearer cm_not-a-key"})
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "unknown_key"
        foreign = await http.post(
            "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {acme}", "x-costmesh-tenant": "globex"},
        )
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "tenant_mismatch"
        no_tenant = await http.post(
            "/chat/completions", json=body, headers={"authorization": f"Bearer {creds.keys.admin}"}
        )
        assert no_tenant.status_code == 400 and no_tenant.json()["error"]["param"] == "x-costmesh-tenant"
        assert (await http.get("/models")).status_code == 401
    after, reserved = await money(mesh.layout.target("budget"), "acme")
    assert after.cost_micros == before.cost_micros and reserved == 0
    # the tenant key, through the SDK: its tenant pays
    client = openai.AsyncOpenAI(base_url=base_url, api_key=acme, max_retries=0, timeout=300)
    raw = await client.chat.completions.with_raw_response.create(**body)  # type: ignore[call-overload]
    await client.close()
    cost = int(raw.headers["x-costmesh-cost-micros"])
    paid, _ = await money(mesh.layout.target("budget"), "acme")
    assert cost > 0 and paid.cost_micros == before.cost_micros + cost
