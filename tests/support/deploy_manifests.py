"""What the deployment files tell each service process: its command, environment, settings file and ports.

Read from the rendered Kubernetes overlays (scripts/validate_deploy.py renders them with the pinned kustomize) and
from deploy/compose/compose.yaml, so that tests can hand exactly that to the services' real settings classes and
to real service processes.
"""

from __future__ import annotations

import base64
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scripts import validate_deploy as vd
from services.cli.certs import AUTH_SECRET
from services.common.settings import CONFIG_ENV, ServiceSettings

SERVICES = ("router", "cache", "budget", "infer")
#: Where manifests mount the settings file.
CONFIG_PATH = "/etc/costmesh/costmesh.yaml"
#: Stand-in for values of Secrets the production operator creates (documented in deploy/README.md).
EXTERNAL_SECRET_SAMPLE = {
    "budget-url": "rediss://:secret@redis.example.internal:6379/0",
    "jobs-url": "rediss://:secret@redis.example.internal:6379/0",
    "cache-url": "rediss://:secret@cache-redis.example.internal:6379/0",
    "address": "redis.example.internal:6379",
    "password": "secret",
}


#: Where compose mounts a service's secrets (short syntax, or long syntax without an absolute target).
COMPOSE_SECRETS_DIR = "/run/secrets"


@dataclass(frozen=True)
class MountedSecret:
    """A file a container gets from a secret: a Kubernetes Secret's key, or a compose secret's file."""

    secret: str  # the Kubernetes Secret, or the compose secret's name
    key: str  # the Secret's key, or the name of the compose secret's file (what `costmesh certs deploy` writes)


@dataclass(frozen=True)
class ServiceContainer:
    """One container that runs ``costmesh serve <service>`` in a deployment file."""

    source: str  # "dev-cpu", "prod-gpu" or "compose"
    name: str  # Deployment or compose service name
    service: str  # router | cache | budget | infer
    args: tuple[str, ...]
    env: Mapping[str, str]  # every variable, Secret references resolved (or sampled for external Secrets)
    config_text: str | None  # the settings file the container gets at CONFIG_PATH
    ports: Mapping[str, int] = field(default_factory=dict)  # container port name -> number (Kubernetes)
    readiness_service: str | None = None
    liveness_service: str | None = None
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    termination_grace_s: int | None = None  # the pod's terminationGracePeriodSeconds
    pre_stop: tuple[str, ...] = ()  # the container's preStop exec command
    secret_files: Mapping[str, MountedSecret] = field(default_factory=dict)  # path in the container -> its source

    @property
    def id(self) -> str:
        return f"{self.source}:{self.name}"

    def costmesh_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if k.startswith("COSTMESH_")}


def settings_class(service: str) -> type[ServiceSettings]:
    """The pydantic settings class ``services/<service>/config.py`` defines for ``COSTMESH_<SERVICE>_``."""
    module = importlib.import_module(f"services.{service}.config")
    prefix = f"COSTMESH_{service.upper()}_"
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, ServiceSettings)
        and obj.__module__ == module.__name__
        and obj.model_config.get("env_prefix") == prefix
    ]
    if len(found) != 1:
        raise LookupError(f"services/{service}/config.py: expected one settings class with prefix {prefix}: {found}")
    return found[0]


def _serve_args(args: list[str]) -> str | None:
    if len(args) >= 2 and args[0] == "serve" and args[1] in SERVICES:
        return args[1]
    return None


def _resolve_env(env_list: list[dict[str, Any]], objs: list[dict[str, Any]], overlay: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env_list:
        if "value" in item:
            out[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            raise ValueError(f"{overlay}: env {item['name']}: unsupported source {item.get('valueFrom')}")
        secret = next((o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"]), None)
        if secret is not None:
            data = secret.get("data", {})
            out[item["name"]] = (
                base64.b64decode(data[ref["key"]]).decode() if ref["key"] in data else secret["stringData"][ref["key"]]
            )
        elif (("Secret", ref["name"])) in vd.EXTERNAL.get(overlay, set()):
            out[item["name"]] = EXTERNAL_SECRET_SAMPLE[ref["key"]]
        else:
            raise ValueError(f"{overlay}: env {item['name']}: Secret {ref['name']} is not rendered")
    return out


def _mounted_config(pod_spec: dict[str, Any], container: dict[str, Any], objs: list[dict[str, Any]]) -> str | None:
    directory, filename = CONFIG_PATH.rsplit("/", 1)
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] != directory:
            continue
        volume = next(v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"])
        cm_name = volume["configMap"]["name"]
        cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name)
        return str(cm["data"][filename])
    return None


def _secret_files(
    pod_spec: dict[str, Any], container: dict[str, Any], objs: list[dict[str, Any]]
) -> dict[str, MountedSecret]:
    """Every file a container gets from a Secret volume: its path in the container and the Secret's key."""
    files: dict[str, MountedSecret] = {}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        name = source["secretName"]
        items = source.get("items")
        if items is None:
            secret = next((o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == name), None)
            keys = (
                {*secret.get("data", {}), *secret.get("stringData", {})}
                if secret is not None
                else vd.EXTERNAL_SECRET_KEYS.get(name, set())
            )
            items = [{"key": k, "path": k} for k in sorted(keys)]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = MountedSecret(name, item["key"])
    return files


def k8s_containers(overlay: str) -> Iterator[ServiceContainer]:
    objs = list(vd.render(overlay))
    for obj in objs:
        template = vd.pod_template(obj)
        if template is None:
            continue
        pod_spec = template["spec"]
        for c in pod_spec.get("containers", []):
            service = _serve_args(list(c.get("args", [])))
            if service is None:
                continue
            yield ServiceContainer(
                source=overlay,
                name=obj["metadata"]["name"],
                service=service,
                args=tuple(c["args"]),
                env=_resolve_env(c.get("env", []), objs, overlay),
                config_text=_mounted_config(pod_spec, c, objs),
                ports={p["name"]: int(p["containerPort"]) for p in c.get("ports", []) if "name" in p},
                readiness_service=c.get("readinessProbe", {}).get("grpc", {}).get("service", ""),
                liveness_service=c.get("livenessProbe", {}).get("grpc", {}).get("service", ""),
                pod_annotations=template.get("metadata", {}).get("annotations", {}),
                termination_grace_s=pod_spec.get("terminationGracePeriodSeconds"),
                pre_stop=tuple(c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])),
                secret_files=_secret_files(pod_spec, c, objs),
            )


def compose_containers() -> Iterator[ServiceContainer]:
    doc, errors = vd.load_compose()
    if errors:
        raise ValueError(errors)
    for name, svc in doc["services"].items():
        command = svc.get("command")
        service = _serve_args(list(command)) if isinstance(command, list) else None
        if service is None:
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        config_text = None
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if target == CONFIG_PATH:
                config_text = (vd.COMPOSE_DIR / source).read_text(encoding="utf-8")
        secret_files: dict[str, MountedSecret] = {}
        for ref in svc.get("secrets", []):
            secret_name = ref if isinstance(ref, str) else ref["source"]
            target = secret_name if isinstance(ref, str) else ref.get("target", secret_name)
            path = target if target.startswith("/") else f"{COMPOSE_SECRETS_DIR}/{target}"
            secret_files[path] = MountedSecret(secret_name, Path(doc["secrets"][secret_name]["file"]).name)
        yield ServiceContainer("compose", name, service, tuple(command), env, config_text, secret_files=secret_files)


def all_containers() -> list[ServiceContainer]:
    return [*(c for overlay in vd.overlays() for c in k8s_containers(overlay)), *compose_containers()]


def settings_env(
    container: ServiceContainer, config_dir: Path, files: Mapping[str, Path] | None = None
) -> dict[str, str]:
    """The container's environment with its settings file written under ``config_dir`` and pointed at.

    ``files`` maps paths in the container (its secret files) to local ones: where the environment or the settings
    file names one, the local path is substituted."""
    files = files or {}

    def local(text: str) -> str:
        for container_path, path in files.items():
            text = text.replace(container_path, str(path))
        return text

    env = {k: local(v) for k, v in container.costmesh_env().items()}
    if CONFIG_ENV in env:
        if env[CONFIG_ENV] != CONFIG_PATH:
            raise ValueError(f"{container.id}: {CONFIG_ENV}={env[CONFIG_ENV]}, but manifests mount {CONFIG_PATH}")
        if container.config_text is None:
            raise ValueError(f"{container.id}: {CONFIG_ENV} is set but nothing is mounted at {CONFIG_PATH}")
        path = config_dir / f"{container.source}-{container.name}.yaml"
        path.write_text(local(container.config_text), encoding="utf-8")
        env[CONFIG_ENV] = str(path)
    return env


def materialize_secret_files(container: ServiceContainer, certs_dir: Path, into: Path) -> dict[str, Path]:
    """Copy what the container's secret files would hold, from what ``costmesh certs deploy`` wrote in
    ``certs_dir``, under ``into``; returns container path -> local path, for :func:`settings_env`.

    Only what the container mounts is copied, so a setting naming a file its mounts lack finds nothing."""
    files: dict[str, Path] = {}
    for container_path, mounted in container.secret_files.items():
        if container.source != "compose" and mounted.secret != AUTH_SECRET:
            raise ValueError(f"{container.id}: {container_path} comes from Secret {mounted.secret}, not {AUTH_SECRET}")
        local = into / container.source / container.name / container_path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes((certs_dir / mounted.key).read_bytes())
        files[container_path] = local
    return files


def config_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every settings file the deployment files ship: (where, parsed YAML)."""
    docs: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for c in all_containers():
        if c.config_text is not None and c.config_text not in seen:
            seen.add(c.config_text)
            docs.append((c.id, yaml.safe_load(c.config_text) or {}))
    return docs
