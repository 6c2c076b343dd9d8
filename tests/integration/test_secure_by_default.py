"""Secure by default, as real processes: a service told to bind 0.0.0.0 without auth refuses to start.

Every service (router, cache, budget, infer) exits with status 78 (EX_CONFIG) before it binds anything, and its
output names the settings that would fix it. With API keys (and metrics_public for its /metrics port) the router
starts on 0.0.0.0 and refuses a caller without a key, on gRPC and on its HTTP front door; with allow_insecure it
starts open and says so in a warning for each listener.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.cli.certs import write_deploy_credentials
from services.common.exposure import EX_CONFIG
from services.common.health import wait_serving
from tests.support.procs import ServiceProcess

EXIT_TIMEOUT_S = 180  # imports alone take seconds on the shared machine (vLLM's for infer)


def events(proc: ServiceProcess) -> list[dict[str, object]]:
    out = []
    for line in proc.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@pytest.fixture
def procs() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


def start(procs: list[ServiceProcess], module: str, env: dict[str, str]) -> ServiceProcess:
    proc = ServiceProcess(module, env=env).start()
    procs.append(proc)
    return proc


def wait_exit(proc: ServiceProcess) -> int:
    assert proc.proc is not None
    try:
        return proc.proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.module} did not exit; log:\n{proc.log()[-4000:]}")


@pytest.mark.parametrize("svc", ["router", "cache", "budget", "infer"])
def test_a_service_on_0000_without_auth_exits_naming_the_settings(svc: str, procs: list[ServiceProcess]) -> None:
    prefix = f"COSTMESH_{svc.upper()}_"
    # Refused before its store or engine is built: nothing else needs setting.
    proc = start(procs, f"services.{svc}", {f"{prefix}HOST": "0.0.0.0"})
    code = wait_exit(proc)
    log = proc.log()
    assert code == EX_CONFIG, log[-4000:]
    for setting in (
        f"{prefix}AUTH__ENABLED",
        f"{prefix}AUTH__KEYS_FILE",
        f"{prefix}TLS_CA_FILE",
        f"{prefix}ALLOW_INSECURE",
    ):
        assert setting in log, setting
    # ServiceProcess also sets a metrics port: refused in the same message, with its own setting.
    assert f"{prefix}METRICS_PUBLIC" in log
    refused = [e for e in events(proc) if e.get("event") == "insecure_listener_refused"]
    assert len(refused) == 1 and refused[0]["level"] == "error", log[-4000:]
    assert "server_started" not in log  # nothing was bound


async def test_the_router_on_0000_with_api_keys_starts_and_wants_a_key(
    procs: list[ServiceProcess], tmp_path: Path
) -> None:
    creds = write_deploy_credentials(tmp_path / "auth", tenants=("acme",))
    proc = start(
        procs,
        "services.router",
        {
            "COSTMESH_ROUTER_HOST": "0.0.0.0",
            "COSTMESH_ROUTER_AUTH__ENABLED": "true",
            "COSTMESH_ROUTER_AUTH__KEYS_FILE": str(creds.keys_file),
            "COSTMESH_ROUTER_METRICS_PUBLIC": "true",
        },
    )
    await serving(proc)
    assert not [e for e in events(proc) if str(e.get("event", "")).startswith("insecure_listener")]
    request = router_pb2.ClassifyRequest(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")])
    async with grpc.aio.insecure_channel(proc.target) as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Classify(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = creds.keys.tenants["acme"]
        await router.Classify(request, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
    # The HTTP front door follows the router's host and keys: open on 0.0.0.0, closed without a key.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=10) as http:
        assert (await http.get("/v1/models")).status_code == 401
        listing = await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert listing.status_code == 200 and listing.json()["data"][0]["id"] == "auto"
    code, _took = proc.terminate()
    assert code == 0, proc.log()[-4000:]


async def test_allow_insecure_starts_open_and_warns(procs: list[ServiceProcess]) -> None:
    env = {"COSTMESH_ROUTER_HOST": "0.0.0.0", "COSTMESH_ROUTER_ALLOW_INSECURE": "true"}
    proc = start(procs, "services.router", env)
    await serving(proc)
    warned = [e for e in events(proc) if e.get("event") == "insecure_listener_allowed"]
    listeners = {f"gRPC port {proc.port}", f"/metrics port {proc.metrics_port}", f"HTTP port {proc.http_port}"}
    assert {e["listener"] for e in warned} == listeners
    assert all(e["level"] == "warning" and e["setting"] == "COSTMESH_ROUTER_ALLOW_INSECURE" for e in warned)
    request = router_pb2.ClassifyRequest(
        attribution=common_pb2.Attribution(tenant="anyone"),
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")],
    )
    async with grpc.aio.insecure_channel(proc.target) as ch:
        await router_pb2_grpc.RouterServiceStub(ch).Classify(request, timeout=10)  # open, as asked
    code, _took = proc.terminate()
    assert code == 0, proc.log()[-4000:]


async def serving(proc: ServiceProcess) -> None:
    try:
        await wait_serving(proc.target, timeout_s=120)
    except TimeoutError:
        pytest.fail(f"{proc.module} never became SERVING; log:\n{proc.log()[-4000:]}")
