"""Auth ON, mTLS ON, limits: the secured stack of real processes (tests/support/stack.py).

What must hold: a client without the mesh's client certificate is refused on every port; a missing or bad key is
UNAUTHENTICATED; a tenant key can neither name another tenant nor read another tenant's usage, cache counters or
async jobs; admin RPCs need the admin key, and the CLI can send it; the router reaches cache, budget and the worker
over mTLS with its service key and charges the key's tenant; oversized messages are RESOURCE_EXHAUSTED and the
server keeps serving; per-tenant rate and concurrency limits answer RESOURCE_EXHAUSTED with RetryInfo.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.cli.certs import write_dev_credentials
from services.cli.main import app as cli
from services.common.health import check
from tests.support.stack import Stack, shared_stack

SERVICES = ("router", "budget", "cache")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with shared_stack() as s:
        yield s


def detail(err: grpc.aio.AioRpcError, cls: Any) -> Any:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    for d in status.details:
        if d.Is(cls.DESCRIPTOR):
            msg = cls()
            d.Unpack(msg)
            return msg
    raise AssertionError(f"no {cls.__name__} in {status}")


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


async def fails(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def usage(stack: Stack, tenant: str) -> budget_pb2.UsageRow:
    async with stack.aio_channel("budget") as ch:
        reply = await budget_pb2_grpc.BudgetServiceStub(ch).GetUsage(
            budget_pb2.GetUsageRequest(tenant=tenant), metadata=stack.md("admin"), timeout=10
        )
    return reply.total


async def reserved(stack: Stack, tenant: str) -> int:
    async with stack.aio_channel("budget") as ch:
        reply = await budget_pb2_grpc.BudgetServiceStub(ch).GetBudget(
            budget_pb2.GetBudgetRequest(scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant)),
            metadata=stack.md("admin"),
            timeout=10,
        )
    return sum(h.reserved_micros for h in reply.headroom)


async def set_limit(stack: Stack, tenant: str, micros: int) -> None:
    policy = budget_pb2.BudgetPolicy(
        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant),
        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=micros)],
    )
    async with stack.aio_channel("budget") as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(
            budget_pb2.SetBudgetRequest(policy=policy), metadata=stack.md("admin"), timeout=10
        )


# ---- mTLS ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
async def test_a_client_without_the_mesh_certificate_is_refused(stack: Stack, name: str, tmp_path: Path) -> None:
    target = stack.target(name)
    ca = stack.creds.ca.read_bytes()
    other = write_dev_credentials(tmp_path / "other", tenants=())  # a valid chain, but another CA
    refused = {
        "plaintext": None,
        "TLS without a client certificate": grpc.ssl_channel_credentials(root_certificates=ca),
        "a client certificate of another CA": grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=other.client_key.read_bytes(),
            certificate_chain=other.client_cert.read_bytes(),
        ),
        "a server it does not trust": grpc.ssl_channel_credentials(
            root_certificates=other.ca.read_bytes(),
            private_key=stack.creds.client_key.read_bytes(),
            certificate_chain=stack.creds.client_cert.read_bytes(),
        ),
    }
    for what, creds in refused.items():
        channel = grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
        async with channel:
            assert (await check(channel, timeout_s=5)).startswith("DOWN (UNAVAILABLE)"), what
    async with stack.aio_channel(name) as ch:
        assert await check(ch, timeout_s=5) == "SERVING"


async def test_the_plaintext_health_port_serves_health_only(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.health_target("router")) as ch:
        assert await check(ch) == "SERVING"
        err = await fails(
            router_pb2_grpc.RouterServiceStub(ch).Classify(
                router_pb2.ClassifyRequest(messages=user("hi")), metadata=stack.md("acme"), timeout=5
            )
        )
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- authentication and tenant isolation ---------------------------------------------------------------------


async def test_missing_or_bad_keys_are_unauthenticated(stack: Stack) -> None:
    calls = {
        "router": lambda ch, md: router_pb2_grpc.RouterServiceStub(ch).Classify(
            router_pb2.ClassifyRequest(messages=user("hi")), metadata=md, timeout=5
        ),
        "budget": lambda ch, md: budget_pb2_grpc.BudgetServiceStub(ch).GetUsage(
            budget_pb2.GetUsageRequest(tenant="acme"), metadata=md, timeout=5
        ),
        "cache": lambda ch, md: cache_pb2_grpc.CacheServiceStub(ch).GetStats(
            cache_pb2.GetStatsRequest(tenant="acme"), metadata=md, timeout=5
        ),
    }
    cases = {
        (): "NO_KEY",
        (("authorization", "Bearer cm_not-a-key"),): "UNKNOWN_KEY",
        (("authorization", stack.key("acme")),): "MALFORMED_KEY",  # no scheme
        (("authorization", f"Bearer {stack.creds.admin_key[:-1]}"),): "UNKNOWN_KEY",
    }
    for name, call in calls.items():
        async with stack.aio_channel(name) as ch:
            for md, reason in cases.items():
                err = await fails(call(ch, md))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, md)
                info = detail(err, error_details_pb2.ErrorInfo)
                assert (info.reason, info.domain) == (reason, f"costmesh.{name}")
            await call(ch, stack.md("acme"))  # and the right key passes


async def test_a_tenant_key_acts_only_for_its_own_tenant(stack: Stack) -> None:
    async with stack.aio_channel("router") as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        # An empty tenant is the key's own: this request would otherwise be INVALID_ARGUMENT (no tenant).
        reply = await router.Classify(router_pb2.ClassifyRequest(messages=user("hi")), metadata=stack.md("acme"))
        assert reply.decision.tier in (common_pb2.TIER_CHEAP, common_pb2.TIER_FULL)
        for request_tenant, md_tenant in (("globex", ""), ("", "globex"), ("acme", "globex")):
            request = router_pb2.ClassifyRequest(
                attribution=common_pb2.Attribution(tenant=request_tenant), messages=user("hi")
            )
            extra = (("x-costmesh-tenant", md_tenant),) if md_tenant else ()
            err = await fails(router.Classify(request, metadata=stack.md("acme", *extra), timeout=5))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert detail(err, error_details_pb2.ErrorInfo).reason == "TENANT_MISMATCH"
        # Another tenant's async job is invisible even with a well-formed id.
        err = await fails(
            router.GetAsyncResult(
                router_pb2.GetAsyncResultRequest(job_id="cheap.x", attribution=common_pb2.Attribution(tenant="globex")),
                metadata=stack.md("acme"),
                timeout=5,
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # Spending another tenant's budget: refused before anything is reserved or run.
        before = await usage(stack, "globex")
        err = await fails(
            router.Generate(
                router_pb2.GenerateRequest(attribution=common_pb2.Attribution(tenant="globex"), messages=user("hi")),
                metadata=stack.md("acme"),
                timeout=10,
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await usage(stack, "globex") == before and await reserved(stack, "globex") == 0
    async with stack.aio_channel("budget") as ch:
        budget = budget_pb2_grpc.BudgetServiceStub(ch)
        own = await budget.GetUsage(budget_pb2.GetUsageRequest(tenant="acme"), metadata=stack.md("acme"), timeout=5)
        assert own.total.cost_micros >= 0
        for request in (budget_pb2.GetUsageRequest(tenant="globex"), budget_pb2.GetUsageRequest()):
            err = await fails(budget.GetUsage(request, metadata=stack.md("acme"), timeout=5))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # The budget's data plane is the router's: a tenant key cannot reserve, even for itself.
        err = await fails(
            budget.Reserve(
                budget_pb2.ReserveRequest(request_id="r1", attribution=common_pb2.Attribution(tenant="acme")),
                metadata=stack.md("acme"),
                timeout=5,
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    async with stack.aio_channel("cache") as ch:
        cache = cache_pb2_grpc.CacheServiceStub(ch)
        err = await fails(
            cache.Lookup(
                cache_pb2.LookupRequest(
                    attribution=common_pb2.Attribution(tenant="globex"), model="costmesh-cheap", messages=user("hi")
                ),
                metadata=stack.md("acme"),
                timeout=5,
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = await fails(cache.GetStats(cache_pb2.GetStatsRequest(tenant="globex"), metadata=stack.md("acme")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_rpcs_need_the_admin_key(stack: Stack) -> None:
    policy = budget_pb2.BudgetPolicy(
        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant="acme"),
        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_DAY, cost_micros=50_000_000)],
    )
    async with stack.aio_channel("budget") as bch, stack.aio_channel("cache") as cch:
        budget = budget_pb2_grpc.BudgetServiceStub(bch)
        cache = cache_pb2_grpc.CacheServiceStub(cch)
        admin_calls = {
            "SetBudget": lambda md: budget.SetBudget(budget_pb2.SetBudgetRequest(policy=policy), metadata=md),
            "GetUsage(all)": lambda md: budget.GetUsage(budget_pb2.GetUsageRequest(), metadata=md),
            "GetBudget(global)": lambda md: budget.GetBudget(
                budget_pb2.GetBudgetRequest(scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_GLOBAL)), metadata=md
            ),
            "Invalidate": lambda md: cache.Invalidate(cache_pb2.InvalidateRequest(tenant="acme"), metadata=md),
            "GetStats(all)": lambda md: cache.GetStats(cache_pb2.GetStatsRequest(), metadata=md),
        }
        for name, call in admin_calls.items():
            for who in ("acme", "router"):
                err = await fails(call(stack.md(who)))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, who)
                assert detail(err, error_details_pb2.ErrorInfo).reason == "ADMIN_REQUIRED"
            await call(stack.md("admin"))


def test_the_cli_sends_the_admin_credential(stack: Stack) -> None:
    runner = CliRunner()
    tls = {
        "COSTMESH_TLS_CA_FILE": str(stack.creds.ca),
        "COSTMESH_TLS_CERT_FILE": str(stack.creds.client_cert),
        "COSTMESH_TLS_KEY_FILE": str(stack.creds.client_key),
    }
    env = {**tls, "COSTMESH_ADMIN_KEY": stack.creds.admin_key}
    budget = ["budget", "set", "tenant:globex/feature:cli", "--day-usd", "3.5", "--target", stack.target("budget")]
    ok = runner.invoke(cli, budget, env=env)
    assert ok.exit_code == 0, ok.output
    assert "tenant:globex/feature:cli" in ok.output
    denied = runner.invoke(cli, budget, env={**tls, "COSTMESH_ADMIN_KEY": stack.key("globex")})
    assert denied.exit_code == 2 and "PERMISSION_DENIED" in denied.output
    anonymous = runner.invoke(cli, budget, env={**tls, "COSTMESH_ADMIN_KEY": ""})
    assert anonymous.exit_code == 2 and "UNAUTHENTICATED" in anonymous.output
    # The option works as well as the variable; the cache CLI takes the same credentials.
    cache = ["cache", "--admin-key", stack.creds.admin_key, "invalidate", "--tenant", "globex"]
    out = runner.invoke(cli, [*cache, "--target", stack.target("cache")], env=tls)
    assert out.exit_code == 0, out.output
    stats = runner.invoke(cli, ["cache", "stats", "--target", stack.target("cache")], env=env)
    assert stats.exit_code == 0, stats.output
    assert "COSTMESH_ADMIN_KEY" not in os.environ  # the test left the process environment alone


async def test_the_router_reaches_the_budget_over_mtls_with_its_service_key(stack: Stack) -> None:
    await set_limit(stack, "globex", 1)  # one micro-USD: any reservation passes it
    async with stack.aio_channel("router") as ch:
        err = await fails(
            router_pb2_grpc.RouterServiceStub(ch).Generate(
                router_pb2.GenerateRequest(messages=user("What is 2 + 2?"), tier=common_pb2.TIER_CHEAP),
                metadata=stack.md("globex"),
                timeout=30,
            )
        )
    # The budget's own hard stop reached the caller: the router's mTLS + service-key hop to the budget works.
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    quota = detail(err, error_details_pb2.QuotaFailure)
    assert any("globex" in v.subject for v in quota.violations)
    assert await reserved(stack, "globex") == 0


# ---- limits ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
async def test_an_oversized_message_is_resource_exhausted_and_the_server_survives(stack: Stack, name: str) -> None:
    huge = "x" * (5 * 1024 * 1024)  # over the 4 MiB max_message_bytes
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.secure_channel(stack.target(name), stack.credentials(), options=options) as ch:
        if name == "router":
            stub: Any = router_pb2_grpc.RouterServiceStub(ch)
            call = stub.Generate
            request: Any = router_pb2.GenerateRequest(messages=user(huge))
        elif name == "budget":
            call = budget_pb2_grpc.BudgetServiceStub(ch).Reserve
            request = budget_pb2.ReserveRequest(request_id=huge)
        else:
            call = cache_pb2_grpc.CacheServiceStub(ch).Lookup
            request = cache_pb2.LookupRequest(model="m", messages=user(huge))
        for _ in range(3):
            err = await fails(call(request, metadata=stack.md("admin"), timeout=30))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert await check(ch, timeout_s=5) == "SERVING"
    assert stack.alive()[name]


async def test_a_tenant_over_its_rate_is_refused_with_a_retry_hint(stack: Stack) -> None:
    async with stack.aio_channel("router") as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        request = router_pb2.ClassifyRequest(messages=user("hi"))
        outcomes = []
        for _ in range(4):  # burst 2 at 0.5/s: the 3rd and 4th in the same second are over
            try:
                await router.Classify(request, metadata=stack.md("ratelimited"), timeout=5)
                outcomes.append("ok")
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert detail(err, error_details_pb2.ErrorInfo).reason == "TENANT_RATE"
                retry = detail(err, error_details_pb2.RetryInfo).retry_delay
                assert 0 < retry.seconds + retry.nanos / 1e9 <= 2
                assert detail(err, error_details_pb2.QuotaFailure).violations[0].subject == "tenant:ratelimited"
                outcomes.append("limited")
        assert outcomes[:2] == ["ok", "ok"] and "limited" in outcomes[2:]
        for _ in range(5):  # another tenant is not affected
            await router.Classify(request, metadata=stack.md("acme"), timeout=5)


# ---- end to end with the worker ----------------------------------------------------------------------------------


@pytest.mark.vllm
async def test_end_to_end_over_mtls_the_keys_tenant_pays(stack: Stack) -> None:
    await asyncio.to_thread(stack.ensure_worker)
    before = await usage(stack, "acme")
    async with stack.aio_channel("router") as ch:
        reply = await router_pb2_grpc.RouterServiceStub(ch).Generate(
            router_pb2.GenerateRequest(
                messages=user("Name a colour. (security e2e)"),
                sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0),
                cache_mode=router_pb2.CACHE_MODE_BYPASS,
            ),
            metadata=stack.md("acme"),
            timeout=120,
        )
    r = reply.result
    assert r.cost_micros > 0 and r.usage.output_tokens > 0 and r.tier == common_pb2.TIER_CHEAP
    after = await usage(stack, "acme")
    assert after.cost_micros - before.cost_micros == r.cost_micros
    assert after.requests - before.requests == 1
    assert await reserved(stack, "acme") == 0
    # The worker itself refuses a tenant key (only the router's service key may call it).
    async with stack.aio_channel("infer") as ch:
        err = await fails(
            infer_pb2_grpc.InferenceServiceStub(ch).SubmitJob(
                infer_pb2.SubmitJobRequest(request_id="j", prompt="x"), metadata=stack.md("acme"), timeout=10
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.vllm
async def test_a_tenant_at_its_concurrency_limit_is_refused_until_a_slot_frees(stack: Stack) -> None:
    await asyncio.to_thread(stack.ensure_worker)
    request = router_pb2.GenerateStreamRequest(
        messages=user("Write a long story about a lighthouse."),
        sampling=common_pb2.SamplingParams(max_tokens=48, temperature=0.8),
        tier=common_pb2.TIER_CHEAP,
    )
    async with stack.aio_channel("router") as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        stream = router.GenerateStream(request, metadata=stack.md("single"), timeout=120)
        first = await anext(aiter(stream))  # the stream holds the tenant's only slot
        assert first.text or first.HasField("result")
        err = await fails(
            router.Classify(router_pb2.ClassifyRequest(messages=user("hi")), metadata=stack.md("single"), timeout=5)
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert detail(err, error_details_pb2.ErrorInfo).reason == "TENANT_CONCURRENCY"
        rest = [m async for m in stream]
        assert rest and rest[-1].HasField("result")
        await router.Classify(router_pb2.ClassifyRequest(messages=user("hi")), metadata=stack.md("single"), timeout=5)
    assert await reserved(stack, "single") == 0


@pytest.mark.vllm
async def test_oversized_messages_to_the_worker_are_resource_exhausted(stack: Stack) -> None:
    await asyncio.to_thread(stack.ensure_worker)
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.secure_channel(stack.target("infer"), stack.credentials(), options=options) as ch:
        stub = infer_pb2_grpc.InferenceServiceStub(ch)
        request = infer_pb2.SubmitJobRequest(request_id="big", prompt="x" * (5 * 1024 * 1024))
        err = await fails(stub.SubmitJob(request, metadata=stack.md("router"), timeout=30))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        models = await stub.ListModels(infer_pb2.ListModelsRequest(), metadata=stack.md("router"), timeout=10)
        assert models.models[0].name == "costmesh-cheap"
