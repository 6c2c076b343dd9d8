"""Secure by default in the deployment files: every service compose and both Kubernetes overlays run has auth on.

Each container's real settings (environment plus mounted settings file, as tests/unit/test_deploy_settings.py loads
them) must have API keys on, read from a file the container gets from the auth secret; the router must present its
own service key to cache, budget and the workers; the bind check of services/common/exposure.py must pass on those
settings and refuse them once auth is taken away. The files come from ``costmesh certs deploy``: its keys.yaml lets
the router's key in as a service and the admin and tenant keys in as themselves, and its Kubernetes Secret holds
exactly what the Deployments mount. ``costmesh up`` on loopback stays open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from scripts import validate_deploy as vd
from services.cli.certs import (
    AUTH_SECRET,
    AUTH_SECRET_FILE,
    KEYS_FILE,
    SERVICE_KEY_FILE,
    DeployCredentials,
    write_deploy_credentials,
)
from services.cli.main import app as cli
from services.cli.mesh import MeshLayout
from services.common.auth import Authenticator, AuthSettings, Role
from services.common.exposure import InsecureBind, require_secure_listeners
from services.common.settings import CONFIG_ENV
from tests.support import deploy_manifests as dm

CONTAINERS = dm.all_containers()
IDS = [c.id for c in CONTAINERS]


def load(
    container: dm.ServiceContainer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    files: dict[str, Path] | None = None,
) -> Any:
    for key in [k for k in os.environ if k.startswith("COSTMESH_")]:
        monkeypatch.delenv(key)
    for key, value in dm.settings_env(container, tmp_path, files).items():
        monkeypatch.setenv(key, value)
    return dm.settings_class(container.service)()


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> DeployCredentials:
    return write_deploy_credentials(tmp_path_factory.mktemp("auth") / "out", tenants=("acme",), namespace="costmesh")


@pytest.mark.parametrize("container", CONTAINERS, ids=IDS)
def test_every_deployed_service_has_auth_on(
    container: dm.ServiceContainer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = load(container, monkeypatch, tmp_path)
    assert settings.host == "0.0.0.0"  # so the check below is a real one
    assert settings.auth.enabled and not settings.allow_insecure, container.id
    require_secure_listeners(settings)  # it starts
    keys_file = str(settings.auth.keys_file)
    assert keys_file in container.secret_files, f"{container.id}: {keys_file} is not mounted from a secret"
    assert container.secret_files[keys_file].key == KEYS_FILE
    if container.source != "compose":
        assert container.secret_files[keys_file].secret == AUTH_SECRET
    # The same settings without auth would not start: the check is what keeps them secure.
    with pytest.raises(InsecureBind, match=f"COSTMESH_{container.service.upper()}_AUTH__ENABLED"):
        require_secure_listeners(settings.model_copy(update={"auth": AuthSettings()}))


@pytest.mark.parametrize("container", CONTAINERS, ids=IDS)
def test_only_the_router_holds_the_service_key(
    container: dm.ServiceContainer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = load(container, monkeypatch, tmp_path)
    mounted = {m.key for m in container.secret_files.values()}
    if container.service == "router":
        client_key = str(settings.auth.client_key_file)
        assert client_key in container.secret_files, f"{container.id}: the router's key {client_key} is not mounted"
        assert container.secret_files[client_key].key == SERVICE_KEY_FILE
        assert settings.auth.client_key is None
    else:
        assert settings.auth.client_key_file is None and settings.auth.client_key is None
        assert SERVICE_KEY_FILE not in mounted, f"{container.id} gets the router's key"


@pytest.mark.parametrize("container", CONTAINERS, ids=IDS)
def test_the_keys_costmesh_certs_deploy_writes_are_accepted_where_they_should_be(
    container: dm.ServiceContainer, creds: DeployCredentials, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = dm.materialize_secret_files(container, creds.dir, tmp_path / "mounts")
    settings = load(container, monkeypatch, tmp_path, files)
    auth = Authenticator(settings.auth.all_keys())  # reads the mounted keys.yaml
    assert auth.authenticate(f"Bearer {creds.keys.service}").role is Role.SERVICE
    assert auth.authenticate(f"Bearer {creds.keys.admin}").role is Role.ADMIN
    acme = auth.authenticate(f"Bearer {creds.keys.tenants['acme']}")
    assert (acme.role, acme.tenant) == (Role.TENANT, "acme")
    if container.service == "router":
        assert settings.auth.outgoing_key() == creds.keys.service  # what its calls to the others present


def test_the_auth_secret_holds_what_the_deployments_mount(creds: DeployCredentials) -> None:
    docs = [d for d in yaml.safe_load_all(creds.secret_manifest.read_text(encoding="utf-8")) if d]
    assert len(docs) == 1
    secret = docs[0]
    assert vd.validate_k8s_object(secret) == []
    assert (secret["kind"], secret["metadata"]["name"], secret["metadata"]["namespace"]) == (
        "Secret",
        AUTH_SECRET,
        "costmesh",
    )
    assert set(secret["stringData"]) == vd.EXTERNAL_SECRET_KEYS[AUTH_SECRET] == {KEYS_FILE, SERVICE_KEY_FILE}
    assert secret["stringData"][KEYS_FILE] == creds.keys_file.read_text(encoding="utf-8")
    assert secret["stringData"][SERVICE_KEY_FILE].strip() == creds.keys.service
    for overlay in vd.overlays():
        assert ("Secret", AUTH_SECRET) in vd.EXTERNAL[overlay]
    # compose mounts files of that directory; the validator knows the same names.
    assert set(vd.COMPOSE_SECRET_FILES) == {KEYS_FILE, SERVICE_KEY_FILE}
    doc, _ = vd.load_compose()
    assert {Path(s["file"]).name for s in doc["secrets"].values()} <= set(vd.COMPOSE_SECRET_FILES)
    assert all(Path(s["file"]).parent == Path("secrets") for s in doc["secrets"].values())
    assert "/deploy/compose/secrets/" in (vd.ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_costmesh_certs_deploy_keeps_keys_private(tmp_path: Path) -> None:
    out = tmp_path / "auth"
    result = CliRunner().invoke(cli, ["certs", "deploy", "--out", str(out), "--tenant", "acme", "--tenant", "globex"])
    assert result.exit_code == 0, result.output
    mode = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert mode["."] == 0o700 and mode["clients"] == 0o700
    for private in ("clients/admin.key", "clients/acme.key", "clients/globex.key", AUTH_SECRET_FILE):
        assert mode[private] == 0o600, private
    # Mounted into containers whose user does not own them (compose bind-mounts); the directory keeps others out.
    assert mode[KEYS_FILE] == mode[SERVICE_KEY_FILE] == 0o644
    again = CliRunner().invoke(cli, ["certs", "deploy", "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    assert CliRunner().invoke(cli, ["certs", "deploy", "--out", str(out), "--force"]).exit_code == 0


def test_compose_publishes_only_the_router_beyond_loopback() -> None:
    doc, _ = vd.load_compose()
    published = {name: svc.get("ports", []) for name, svc in doc["services"].items() if svc.get("ports")}
    assert published.pop("router") == ["50051:50051"]  # auth on (above)
    for name, ports in published.items():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), f"{name} publishes {ports} beyond loopback"


@pytest.mark.parametrize(("host", "opens"), [("127.0.0.1", True), ("0.0.0.0", False)])
def test_costmesh_up_is_open_on_loopback_only(host: str, opens: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    for child in MeshLayout(host=host).children():
        service = next(a for a in child.argv if a.startswith("services.")).removeprefix("services.")
        for key in [k for k in os.environ if k.startswith("COSTMESH_")]:
            monkeypatch.delenv(key)
        for key, value in child.env.items():
            monkeypatch.setenv(key, value)
        settings = dm.settings_class(service)()
        assert not settings.auth.enabled
        if opens:
            require_secure_listeners(settings)
        else:
            with pytest.raises(InsecureBind):
                require_secure_listeners(settings)
