"""Each service as a real process on an ephemeral port: health SERVING, reflection listing its service, a domain
error arriving at a real client as the right status with ErrorInfo, SIGTERM stopping it within the grace period."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.health import wait_serving
from tests.support.procs import ServiceProcess

GRACE_S = 2.0


def _bad_call(svc: str, channel: grpc.aio.Channel) -> Any:
    """A request each service must reject as INVALID_ARGUMENT (no tenant / no messages)."""
    if svc == "cache":
        return cache_pb2_grpc.CacheServiceStub(channel).Lookup(cache_pb2.LookupRequest(), timeout=5)
    if svc == "budget":
        return budget_pb2_grpc.BudgetServiceStub(channel).Reserve(
            budget_pb2.ReserveRequest(request_id="r", estimated_cost_micros=-5), timeout=5
        )
    return router_pb2_grpc.RouterServiceStub(channel).Generate(
        router_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]),
        timeout=5,
    )


SERVICES = {
    "cache": "costmesh.cache.v1.CacheService",
    "budget": "costmesh.budget.v1.BudgetService",
    "router": "costmesh.router.v1.RouterService",
}


@pytest.fixture(params=sorted(SERVICES))
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = request.param
    prefix = f"COSTMESH_{svc.upper()}_"
    env = {f"{prefix}GRACE_PERIOD_S": str(GRACE_S)}
    if svc == "budget":
        env[f"{prefix}SQLITE_PATH"] = str(tmp_path_factory.mktemp("budget") / "budget.sqlite3")
    proc = ServiceProcess(f"services.{svc}", env=env).start()
    yield proc
    proc.kill()


async def test_service_process_lifecycle(service: ServiceProcess) -> None:
    svc = service.svc
    try:
        await wait_serving(service.target, timeout_s=60)
    except TimeoutError:
        pytest.fail(f"{svc} never became SERVING; log:\n{service.log()[-4000:]}")
    await wait_serving(service.target, service=SERVICES[svc], timeout_s=5)
    async with grpc.aio.insecure_channel(service.target) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        reply = await anext(aiter(call))
        assert SERVICES[svc] in {s.name for s in reply.list_services_response.service}
        call.cancel()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _bad_call(svc, channel)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
        assert status is not None
        infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        assert infos, status
        info = error_details_pb2.ErrorInfo()
        infos[0].Unpack(info)
        assert info.domain == f"costmesh.{svc}" and info.reason

    code, took = service.terminate(timeout_s=GRACE_S + 15)
    assert code == 0, service.log()[-4000:]
    assert took < GRACE_S + 5, f"{svc} took {took:.1f}s to stop"
    assert "server_stopped" in service.log()
