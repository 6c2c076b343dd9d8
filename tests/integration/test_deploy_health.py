"""The services boot from exactly what the Kubernetes manifests give them and answer the probes they are given.

budget, cache and router run as real processes with the environment and settings file of their dev-cpu
Deployment (rendered by kustomize), changed only where this machine differs from a cluster: loopback addresses and
free ports, the test's own Redis, no trace export, and the router's targets pointing at the processes started
here. Their auth secret (``costmesh-auth``) is what ``costmesh certs deploy`` writes, mounted as the Deployments
project it. The health service must answer SERVING for the readiness probe's service name and the liveness probe's
"" (health needs no key); the images' HEALTHCHECK command (taken from the Dockerfile) must succeed against a serving
process and fail once it is gone. Auth is on: a call without a key is refused, and the router reaches budget and
cache with its own service key. The inference worker is left out: it needs a vLLM engine (its probe name is checked
in tests/unit/test_deploy_settings.py against the proto).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from scripts import validate_deploy as vd
from services.cli.certs import DeployCredentials, write_deploy_credentials
from services.common.health import wait_serving
from tests.support import deploy_manifests as dm
from tests.support.procs import ServiceProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

OVERLAY = "dev-cpu"
TENANT = "acme"


def healthcheck_command(dockerfile: Path, stage: str) -> list[str]:
    """The exec-form ``HEALTHCHECK ... CMD [...]`` of one stage of a Dockerfile."""
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    stages = re.split(r"(?im)^FROM\s+", text)
    body = next(s for s in stages if re.match(rf"\S+\s+AS\s+{re.escape(stage)}\s*$", s.splitlines()[0], re.I))
    match = re.search(r"(?m)^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", body)
    assert match, f"no exec-form HEALTHCHECK in stage {stage}"
    return list(json.loads(match.group(1)))


def run_healthcheck(command: list[str], target: str) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)  # where `costmesh` is installed, as on the image's PATH
    env = {**os.environ, "HEALTHCHECK_TARGET": target, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def manifest_env(
    container: dm.ServiceContainer, tmp_path: Path, redis_url: str, creds: DeployCredentials
) -> dict[str, str]:
    prefix = f"COSTMESH_{container.service.upper()}_"
    files = dm.materialize_secret_files(container, creds.dir, tmp_path / "mounts")
    env = dm.settings_env(container, tmp_path, files)
    for key in ("HOST", "PORT", "METRICS_PORT"):  # ServiceProcess binds loopback and free ports instead
        env.pop(prefix + key)
    if prefix + "REDIS_URL" in env:
        env[prefix + "REDIS_URL"] = redis_url
    env[prefix + "OTLP_ENDPOINT"] = ""  # the collector of the manifests is not here
    env[prefix + "GRACE_PERIOD_S"] = "1"
    return env


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> DeployCredentials:
    """The auth secret's files, as `costmesh certs deploy` writes them."""
    return write_deploy_credentials(tmp_path_factory.mktemp("auth") / "out", tenants=(TENANT,))


@pytest.fixture(scope="module")
def mesh(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, creds: DeployCredentials
) -> Iterator[dict[str, tuple[dm.ServiceContainer, ServiceProcess]]]:
    """budget, cache and router, started once for this module (the last test stops budget)."""
    redis_server.flush()
    redis_url = redis_server.url
    tmp_path = tmp_path_factory.mktemp("deploy-health")
    containers = {c.name: c for c in dm.k8s_containers(OVERLAY)}
    started: dict[str, tuple[dm.ServiceContainer, ServiceProcess]] = {}
    try:
        for name in ("budget", "cache"):
            c = containers[name]
            started[name] = (
                c,
                ServiceProcess(f"services.{c.service}", env=manifest_env(c, tmp_path, redis_url, creds)).start(),
            )
        router = containers["router"]
        env = manifest_env(router, tmp_path, redis_url, creds)
        assert {"COSTMESH_ROUTER_CACHE_TARGET", "COSTMESH_ROUTER_BUDGET_TARGET"} <= set(env)
        env["COSTMESH_ROUTER_CACHE_TARGET"] = started["cache"][1].target
        env["COSTMESH_ROUTER_BUDGET_TARGET"] = started["budget"][1].target
        started["router"] = (router, ServiceProcess("services.router", env=env).start())
        yield started
    finally:
        for _c, proc in started.values():
            proc.kill()


async def serving(proc: ServiceProcess, service: str, timeout_s: float = 90) -> None:
    """Wait until ``proc`` answers SERVING for ``service``; fail at once, with its log, if it exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            pytest.fail(f"{proc.module} exited; log:\n{proc.log()[-4000:]}")
        try:
            await wait_serving(proc.target, service=service, timeout_s=2)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                pytest.fail(f"{proc.module} never served {service!r}; log:\n{proc.log()[-4000:]}")


async def test_services_serve_the_probed_names_with_manifest_settings(
    mesh: dict[str, tuple[dm.ServiceContainer, ServiceProcess]],
) -> None:
    for name, (container, proc) in mesh.items():
        assert container.readiness_service, name
        await serving(proc, container.readiness_service or "")
        await serving(proc, container.liveness_service or "", timeout_s=5)


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


async def test_auth_is_on_and_the_router_calls_with_its_service_key(
    mesh: dict[str, tuple[dm.ServiceContainer, ServiceProcess]], creds: DeployCredentials
) -> None:
    router, budget, cache = (mesh[n][1] for n in ("router", "budget", "cache"))
    for proc in (router, budget, cache):
        await serving(proc, "")
    hi = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="What is 2 + 2? (deploy auth)")]
    admin = bearer(creds.keys.admin)
    async with grpc.aio.insecure_channel(budget.target) as ch:
        stub = budget_pb2_grpc.BudgetServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetUsage(budget_pb2.GetUsageRequest(tenant=TENANT), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        scope = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=TENANT)
        limit = budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=1)  # any reservation passes it
        policy = budget_pb2.BudgetPolicy(scope=scope, limits=[limit])
        await stub.SetBudget(budget_pb2.SetBudgetRequest(policy=policy), metadata=admin, timeout=10)
    async with grpc.aio.insecure_channel(router.target) as ch:
        stub_r = router_pb2_grpc.RouterServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub_r.Classify(router_pb2.ClassifyRequest(messages=hi), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        request = router_pb2.GenerateRequest(
            messages=hi, sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub_r.Generate(request, metadata=bearer(creds.keys.tenants[TENANT]), timeout=30)
    # The budget's own hard stop reached the tenant: the router's call to the budget carried its service key.
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    async with grpc.aio.insecure_channel(cache.target) as ch:
        stats = await cache_pb2_grpc.CacheServiceStub(ch).GetStats(
            cache_pb2.GetStatsRequest(tenant=TENANT), metadata=admin, timeout=10
        )
    # ... and its cache lookup before it was let in (a refused one counts nothing).
    assert stats.total.misses + stats.total.uncacheable >= 1, stats


async def test_image_healthcheck_follows_the_health_service(
    mesh: dict[str, tuple[dm.ServiceContainer, ServiceProcess]],
) -> None:
    command = healthcheck_command(vd.DEPLOY / "docker" / "Dockerfile", "service")
    assert command == healthcheck_command(vd.DEPLOY / "docker" / "Dockerfile", "worker-cpu")
    assert command == healthcheck_command(vd.DEPLOY / "docker" / "Dockerfile.gpu", "worker-gpu")
    _container, proc = mesh["budget"]
    await serving(proc, "")
    ok = run_healthcheck(command, proc.target)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    proc.kill()
    down = run_healthcheck(command, proc.target)
    assert down.returncode == 1, down.stdout + down.stderr
