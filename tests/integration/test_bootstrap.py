"""The shared bootstrap on a real loopback server: health, reflection, rich errors, log context, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.channels import create_channel
from services.common.errors import FieldViolation, InvalidArgument, ResourceExhausted, Unavailable
from services.common.health import check
from services.common.server import ServiceHost, full_service_name
from services.common.settings import ServiceSettings

seen_context: list[dict[str, Any]] = []


class FailingBudget(budget_pb2_grpc.BudgetServiceServicer):
    """A test seam: a servicer whose domain raises, to see what a real client receives."""

    def __init__(self) -> None:
        self.release_calls = 0

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: Any) -> budget_pb2.ReserveResponse:
        seen_context.append(structlog.contextvars.get_contextvars())
        if not request.attribution.tenant:
            raise InvalidArgument("tenant is required", violations=[FieldViolation("attribution.tenant", "required")])
        raise ResourceExhausted("over budget", retry_after_s=3.5, reason="BUDGET_EXCEEDED")

    async def Release(self, request: budget_pb2.ReleaseRequest, context: Any) -> budget_pb2.ReleaseResponse:
        self.release_calls += 1
        if self.release_calls < 3:
            raise Unavailable("store flapping")
        return budget_pb2.ReleaseResponse(released_micros=7)

    async def Commit(self, request: budget_pb2.CommitRequest, context: Any) -> budget_pb2.CommitResponse:
        raise ZeroDivisionError("secret internal detail")


class SlowInfer(infer_pb2_grpc.InferenceServiceServicer):
    async def Generate(
        self, request_iterator: AsyncIterator[infer_pb2.GenerateRequest], context: Any
    ) -> AsyncIterator[infer_pb2.GenerateResponse]:
        for i in range(3):
            yield infer_pb2.GenerateResponse(text=f"t{i}", token_count=1)
            await asyncio.sleep(0.05)
        raise Unavailable("engine died", reason="ENGINE_DEAD")


@pytest.fixture
async def host() -> AsyncIterator[tuple[ServiceHost, FailingBudget]]:
    h = ServiceHost(name="budget", settings=ServiceSettings(port=0, grace_period_s=1.0))
    servicer = FailingBudget()
    h.add_service(
        full_service_name(budget_pb2, "BudgetService"),
        lambda s: budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, s),
    )
    h.add_service(
        full_service_name(infer_pb2, "InferenceService"),
        lambda s: infer_pb2_grpc.add_InferenceServiceServicer_to_server(SlowInfer(), s),
    )
    await h.start()
    yield h, servicer
    await h.stop()


def _detail(err: grpc.aio.AioRpcError, cls: Any) -> Any:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    for d in status.details:
        if d.Is(cls.DESCRIPTOR):
            msg = cls()
            d.Unpack(msg)
            return msg
    raise AssertionError(f"no {cls.__name__} in {status}")


async def test_health_goes_serving_only_when_told(host: tuple[ServiceHost, FailingBudget]) -> None:
    h, _ = host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
        assert await check(ch) == "NOT_SERVING"
        await h.set_serving(True)
        assert await check(ch) == "SERVING"
        assert await check(ch, service="costmesh.budget.v1.BudgetService") == "SERVING"
        assert await check(ch, service="nope.Service") == "DOWN (NOT_FOUND)"


async def test_reflection_lists_the_services(host: tuple[ServiceHost, FailingBudget]) -> None:
    h, _ = host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for reply in call:
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"costmesh.budget.v1.BudgetService", "grpc.health.v1.Health"} <= names


async def test_domain_errors_reach_the_client_as_rich_statuses(host: tuple[ServiceHost, FailingBudget]) -> None:
    h, _ = host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
        stub = budget_pb2_grpc.BudgetServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Reserve(budget_pb2.ReserveRequest(), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = _detail(bad.value, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "costmesh.budget")
        assert _detail(bad.value, error_details_pb2.BadRequest).field_violations[0].field == "attribution.tenant"

        req = budget_pb2.ReserveRequest(attribution={"tenant": "acme"})
        with pytest.raises(grpc.aio.AioRpcError) as quota:
            await stub.Reserve(req, timeout=5, metadata=(("x-costmesh-tenant", "acme"), ("x-request-id", "r-1")))
        assert quota.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _detail(quota.value, error_details_pb2.ErrorInfo).reason == "BUDGET_EXCEEDED"
        assert _detail(quota.value, error_details_pb2.RetryInfo).retry_delay.seconds == 3
        assert seen_context[-1]["tenant"] == "acme" and seen_context[-1]["request_id"] == "r-1"
        assert seen_context[-1]["rpc"] == "/costmesh.budget.v1.BudgetService/Reserve"


async def test_unknown_errors_become_generic_internal(host: tuple[ServiceHost, FailingBudget]) -> None:
    h, _ = host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await budget_pb2_grpc.BudgetServiceStub(ch).Commit(budget_pb2.CommitRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (err.value.details() or "") and "ZeroDivision" not in (err.value.details() or "")
    assert _detail(err.value, error_details_pb2.ErrorInfo).reason == "INTERNAL"


async def test_a_method_the_servicer_lacks_is_unimplemented_not_internal(
    host: tuple[ServiceHost, FailingBudget],
) -> None:
    """FailingBudget does not override GetUsage: the generated base raises NotImplementedError, which must reach the
    client as UNIMPLEMENTED (a client can tell "not here" from "broke"), not as a crash."""
    h, _ = host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await budget_pb2_grpc.BudgetServiceStub(ch).GetUsage(budget_pb2.GetUsageRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert _detail(err.value, error_details_pb2.ErrorInfo).reason == "UNIMPLEMENTED"


async def test_streaming_errors_arrive_after_the_streamed_items(host: tuple[ServiceHost, FailingBudget]) -> None:
    h, _ = host
    async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as ch:
        call = infer_pb2_grpc.InferenceServiceStub(ch).Generate(iter((infer_pb2.GenerateRequest(),)), timeout=5)
        texts = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for chunk in call:
                texts.append(chunk.text)
    assert texts == ["t0", "t1", "t2"]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _detail(err.value, error_details_pb2.ErrorInfo).reason == "ENGINE_DEAD"


async def test_channel_retries_unavailable_only(host: tuple[ServiceHost, FailingBudget]) -> None:
    h, servicer = host
    async with create_channel(f"127.0.0.1:{h.port}", timeout_s=5, max_attempts=3) as ch:
        reply = await budget_pb2_grpc.BudgetServiceStub(ch).Release(budget_pb2.ReleaseRequest())
        assert reply.released_micros == 7 and servicer.release_calls == 3  # two UNAVAILABLE, retried
        with pytest.raises(grpc.aio.AioRpcError):
            await budget_pb2_grpc.BudgetServiceStub(ch).Commit(budget_pb2.CommitRequest())
