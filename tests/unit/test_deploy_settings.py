"""The settings the deployment files pass are the settings the services read and serve.

For every container that runs ``costmesh serve <svc>`` in a rendered Kubernetes overlay or in compose.yaml: each
``COSTMESH_*`` variable is a field of that service's real settings class (``services/<svc>/config.py``); the
environment plus the mounted settings file load into the class; the gRPC and metrics ports the service will bind
are the container ports, probe ports, scrape ports and router targets; readiness probes name the proto service;
container commands parse with the real ``costmesh`` CLI. tests/integration/test_deploy_health.py boots the services
from the same environment and asks the health service for the probe names.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel, Field
from typer._click.exceptions import UsageError

from costmesh.budget.v1 import budget_pb2
from costmesh.cache.v1 import cache_pb2
from costmesh.infer.v1 import infer_pb2
from costmesh.router.v1 import router_pb2
from scripts import validate_deploy as vd
from services.cli.main import app
from services.common.server import full_service_name
from services.common.settings import CONFIG_ENV, ServiceSettings
from tests.support import deploy_manifests as dm

CONTAINERS = dm.all_containers()
IDS = [c.id for c in CONTAINERS]
#: The proto service each costmesh service registers with the health service (services/<svc>/__main__.py).
PROTO_SERVICES = {
    "router": full_service_name(router_pb2, "RouterService"),
    "cache": full_service_name(cache_pb2, "CacheService"),
    "budget": full_service_name(budget_pb2, "BudgetService"),
    "infer": full_service_name(infer_pb2, "InferenceService"),
}
TIER_PORTS = {"cheap": 50054, "full": 50055}


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation admits (Optional/Union unwrapped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg) if t is not type(None)]
    return [annotation]


def field_path_exists(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether ``FIELD__SUB__...`` (lower-cased parts) names a field, walking nested models and dict keys."""
    name, rest = parts[0], parts[1:]
    if name not in model.model_fields:
        return False
    if not rest:
        return True
    for candidate in _unwrap(model.model_fields[name].annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and field_path_exists(candidate, rest):
            return True
        if typing.get_origin(candidate) is dict:
            if len(rest) == 1:
                return True
            value_type = typing.get_args(candidate)[1]
            if any(
                isinstance(t, type) and issubclass(t, BaseModel) and field_path_exists(t, rest[1:])
                for t in _unwrap(value_type)
            ):
                return True
    return False


def load_settings(container: dm.ServiceContainer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The service's real settings object, built from exactly this container's environment and settings file."""
    for key in list(os.environ):
        if key.startswith("COSTMESH_"):
            monkeypatch.delenv(key)
    for key, value in dm.settings_env(container, tmp_path).items():
        monkeypatch.setenv(key, value)
    return dm.settings_class(container.service)()


def test_every_service_is_deployed_everywhere() -> None:
    for source in (*vd.overlays(), "compose"):
        deployed = sorted(c.name for c in CONTAINERS if c.source == source)
        assert deployed == ["budget", "cache", "infer-cheap", "infer-full", "router"], source


@pytest.mark.parametrize("container", CONTAINERS, ids=IDS)
def test_env_names_are_fields_of_the_settings_class(container: dm.ServiceContainer) -> None:
    cls = dm.settings_class(container.service)
    prefix = f"COSTMESH_{container.service.upper()}_"
    for name in container.costmesh_env():
        if name == CONFIG_ENV:
            continue
        assert name.startswith(prefix), f"{container.id}: {name} is not read by the {container.service} service"
        parts = name[len(prefix) :].lower().split("__")
        assert field_path_exists(cls, parts), f"{container.id}: {name} names no field of {cls.__name__}"


@pytest.mark.parametrize("container", CONTAINERS, ids=IDS)
def test_settings_load_and_agree_with_ports(
    container: dm.ServiceContainer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = load_settings(container, monkeypatch, tmp_path)
    assert settings.host == "0.0.0.0"
    assert settings.metrics_port is not None, f"{container.id}: no /metrics endpoint"
    if container.service == "infer":
        tier = container.name.removeprefix("infer-")
        assert settings.tier == tier
        assert settings.port == TIER_PORTS[tier]
        assert settings.job_store == "redis"
    if container.service in ("cache", "budget"):
        assert settings.store == "redis"
    if container.source == "compose":
        assert container.env["HEALTHCHECK_TARGET"] == f"127.0.0.1:{settings.port}"
        return
    assert container.ports["grpc"] == settings.port
    assert container.ports["metrics"] == settings.metrics_port
    assert container.pod_annotations["prometheus.io/port"] == str(settings.metrics_port)


@pytest.mark.parametrize("container", [c for c in CONTAINERS if c.source != "compose"], ids=lambda c: c.id)
def test_graceful_stop_fits_the_termination_grace_period(
    container: dm.ServiceContainer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """preStop sleep + the service's own grace period (draining in-flight RPCs) end before the kubelet's SIGKILL."""
    settings = load_settings(container, monkeypatch, tmp_path)
    assert container.pre_stop[:1] == ("sleep",)
    assert container.termination_grace_s is not None
    budget = container.termination_grace_s - float(container.pre_stop[1])
    assert settings.grace_period_s + 5 <= budget, f"{container.id}: grace {settings.grace_period_s}s, budget {budget}s"


@pytest.mark.parametrize("overlay", vd.overlays())
def test_probes_use_the_served_port_and_proto_service(overlay: str) -> None:
    for obj in vd.render(overlay):
        for c in vd.containers(obj, init=False):
            service = dm._serve_args(list(c.get("args", [])))
            if service is None:
                continue
            grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": PROTO_SERVICES[service]}
            assert c["livenessProbe"]["grpc"] == {"port": grpc_port}
            assert c["startupProbe"]["grpc"] == {"port": grpc_port}


@pytest.mark.parametrize("overlay", vd.overlays())
def test_router_targets_are_headless_services_on_the_served_ports(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objs = list(vd.render(overlay))
    containers = {c.name: c for c in dm.k8s_containers(overlay)}
    router = load_settings(containers["router"], monkeypatch, tmp_path)
    targets = {"cache": router.cache_target, "budget": router.budget_target}
    targets |= {f"infer-{tier}": t for tier, t in router.infer_targets.items()}
    assert set(targets) == {"cache", "budget", "infer-cheap", "infer-full"}
    for workload, target in targets.items():
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert match, f"{workload}: {target} is not a dns:/// target (no client-side balancing)"
        svc_name, port = match.group(1), int(match.group(2))
        svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == svc_name)
        assert svc["spec"]["clusterIP"] == "None", f"{svc_name} is not headless"
        assert port in [p["port"] for p in svc["spec"]["ports"]]
        backend = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == workload)
        assert vd.selector_matches(svc["spec"]["selector"], vd._template_labels(backend))
        served = load_settings(containers[workload], monkeypatch, tmp_path)
        assert served.port == port, f"{svc_name}:{port}, but {workload} listens on {served.port}"


def test_compose_router_targets_and_scrape_targets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    containers = {c.name: c for c in dm.compose_containers()}
    served = {name: load_settings(c, monkeypatch, tmp_path) for name, c in containers.items()}
    router = served["router"]
    targets = {"cache": router.cache_target, "budget": router.budget_target}
    targets |= {f"infer-{tier}": t for tier, t in router.infer_targets.items()}
    for name, target in targets.items():
        assert target == f"dns:///{name}:{served[name].port}"
    prometheus = yaml.safe_load((vd.DEPLOY / "observability" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "costmesh")
    scraped = {t.split(":")[0]: int(t.split(":")[1]) for group in job["static_configs"] for t in group["targets"]}
    assert scraped == {name: s.metrics_port for name, s in served.items()}


def _parse(command: Any, args: list[str]) -> list[str]:
    """Parse ``args`` as the ``costmesh`` CLI would, without running anything; returns the command path.

    Raises typer's (vendored click's) ``UsageError`` for an unknown command or option."""
    ctx = command.make_context("costmesh", list(args), resilient_parsing=False)
    path = [str(command.name or "costmesh")]
    while hasattr(ctx.command, "resolve_command"):  # a group: resolve the subcommand and parse its arguments
        rest = [*getattr(ctx, "protected_args", getattr(ctx, "_protected_args", [])), *ctx.args]
        name, sub, sub_args = ctx.command.resolve_command(ctx, rest)
        path.append(str(name))
        ctx = sub.make_context(str(name), sub_args, parent=ctx, resilient_parsing=False)
    return path


def _all_costmesh_commands() -> list[Any]:
    return [pytest.param(where, args, id=where) for where, args in _costmesh_commands()]


def _costmesh_commands() -> list[tuple[str, list[str]]]:
    """(where, args) of every container that runs the costmesh image."""
    commands: list[tuple[str, list[str]]] = []
    for overlay in vd.overlays():
        for obj in vd.render(overlay):
            for c in vd.containers(obj):
                if str(c.get("image", "")).split("/")[-1].startswith("costmesh"):
                    commands.append((f"{overlay}:{obj['metadata']['name']}/{c['name']}", list(c["args"])))
    doc, _ = vd.load_compose()
    for name, svc in doc["services"].items():
        if str(svc.get("image", "")).startswith("costmesh"):
            commands.append((f"compose:{name}", list(svc["command"])))
    return commands


@pytest.mark.parametrize(("where", "args"), _all_costmesh_commands())
def test_container_commands_parse_with_the_cli(where: str, args: list[str]) -> None:
    command = typer.main.get_command(app)
    path = _parse(command, args)
    assert path[1:] == [a for a in args if not a.startswith("-")][: len(path) - 1], where


@pytest.mark.parametrize(
    ("where", "args"), [pytest.param(w, a, id=w) for w, a in _costmesh_commands() if a[:2] == ["models", "build"]]
)
def test_model_build_args_parse_with_the_infer_models_cli(where: str, args: list[str]) -> None:
    """`costmesh models build ...` as services/infer/cli.py defines it (whether or not the main CLI mounts it yet)."""
    from services.infer.cli import models_app

    params = _params(typer.main.get_command(models_app), args[1:])
    assert params["out"] == Path("/models"), where


def _params(command: Any, args: list[str]) -> dict[str, Any]:
    ctx = command.make_context("models", list(args), resilient_parsing=False)
    while hasattr(ctx.command, "resolve_command"):
        rest = [*getattr(ctx, "protected_args", getattr(ctx, "_protected_args", [])), *ctx.args]
        name, sub, sub_args = ctx.command.resolve_command(ctx, rest)
        ctx = sub.make_context(str(name), sub_args, parent=ctx, resilient_parsing=False)
    return dict(ctx.params)


def test_cli_parser_rejects_unknown_commands_and_options() -> None:
    command = typer.main.get_command(app)
    assert _parse(command, ["serve", "router"]) == ["costmesh", "serve"]
    with pytest.raises(UsageError, match="no-such-option"):
        _parse(command, ["serve", "router", "--no-such-option"])
    with pytest.raises(UsageError, match="No such command"):
        _parse(command, ["no-such-command"])


def test_settings_files_name_only_real_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    classes = {svc: dm.settings_class(svc) for svc in dm.SERVICES}
    docs = dm.config_documents()
    assert docs, "no settings file is mounted anywhere"
    for where, doc in docs:
        assert set(doc) <= {"common", *dm.SERVICES}, where
        for section, values in doc.items():
            owners = list(classes.values()) if section == "common" else [classes[section]]
            for key in values or {}:
                assert any(key in cls.model_fields for cls in owners), f"{where}: {section}.{key} is no setting"
        # Every service loads the file (values validated by pydantic), with nothing else set.
        path = tmp_path / "costmesh.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        for key in [k for k in os.environ if k.startswith("COSTMESH_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv(CONFIG_ENV, str(path))
        for svc, cls in classes.items():
            settings = cls()
            for key, value in {**(doc.get("common") or {}), **(doc.get(svc) or {})}.items():
                if key in cls.model_fields:
                    assert _contains(_plain(getattr(settings, key)), value), f"{where}: {svc}.{key}"


def _contains(actual: Any, expected: Any) -> bool:
    """``expected`` (from YAML) is ``actual`` (from the settings object), where mappings may hold more keys."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    return bool(actual == expected)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def test_field_path_walker() -> None:
    class Inner(BaseModel):
        ttl_s: int = 1

    class Demo(ServiceSettings):
        plain: int = 0
        nested: Inner = Inner()
        per_tier: dict[str, str] = Field(default_factory=dict)
        per_tenant: dict[str, Inner] = Field(default_factory=dict)
        maybe: Inner | None = None

    assert field_path_exists(Demo, ["plain"])
    assert field_path_exists(Demo, ["nested", "ttl_s"])
    assert field_path_exists(Demo, ["per_tier", "cheap"])
    assert field_path_exists(Demo, ["per_tenant", "acme", "ttl_s"])
    assert field_path_exists(Demo, ["maybe", "ttl_s"])
    assert not field_path_exists(Demo, ["plan"])
    assert not field_path_exists(Demo, ["nested", "ttl"])
    assert not field_path_exists(Demo, ["per_tenant", "acme", "nope"])


@pytest.mark.parametrize("overlay", vd.overlays())
def test_keda_watches_the_stream_and_group_the_workers_use(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ScaledObjects name the Redis Stream and consumer group the infer job store really uses."""
    from services.infer.jobs.redis import GROUP, RedisJobStore

    objs = list(vd.render(overlay))
    for c in dm.k8s_containers(overlay):
        if c.service != "infer":
            continue
        settings = load_settings(c, monkeypatch, tmp_path)
        store = RedisJobStore.from_url(settings.redis_url, queue=settings.queue_name)  # connects on first use only
        scaled = next(o for o in objs if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == c.name)
        streams = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"].startswith("redis")]
        assert streams
        for meta in streams:
            assert meta["stream"] == store._stream, c.id
            assert meta["consumerGroup"] == GROUP, c.id


@pytest.mark.parametrize("overlay", vd.overlays())
def test_keda_interactive_trigger_queries_the_workers_queue_gauge(overlay: str) -> None:
    """The Prometheus trigger reads `costmesh_infer_<snapshot key>`, the key the worker's stats expose for the
    interactive queue. The exporter that turns the snapshot into Prometheus series (with a `tier` label) is not
    written yet: this pins the name both sides must keep."""
    from services.infer.stats import InferStats

    assert "interactive_queue_depth" in InferStats().snapshot()
    for obj in vd.render(overlay):
        if obj["kind"] != "ScaledObject":
            continue
        tier = obj["spec"]["scaleTargetRef"]["name"].removeprefix("infer-")
        (prom,) = [t for t in obj["spec"]["triggers"] if t["type"] == "prometheus"]
        assert prom["metadata"]["query"] == f'sum(costmesh_infer_interactive_queue_depth{{tier="{tier}"}})'
