"""API keys, principals and per-method rules (services/common/auth.py): pure, no sockets."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.auth import (
    RULES,
    ApiKey,
    Authenticator,
    AuthSettings,
    Principal,
    Role,
    authorize,
    digest,
    is_public,
    new_key,
    rule_for,
)
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.settings import ServiceSettings, service_settings_config

ACME_KEY = "cm_acme-test-key"
ADMIN_KEY = "cm_admin-test-key"
ROUTER_KEY = "cm_router-test-key"

ACME = Principal("acme", Role.TENANT, "acme")
ROUTER = Principal("router", Role.SERVICE)
ADMIN = Principal("ops", Role.ADMIN)


def authenticator() -> Authenticator:
    return Authenticator(
        [
            ApiKey(name="acme", role=Role.TENANT, tenant="acme", sha256=digest(ACME_KEY)),
            ApiKey(name="ops", role=Role.ADMIN, sha256=digest(ADMIN_KEY)),
            ApiKey(name="router", role=Role.SERVICE, sha256=digest(ROUTER_KEY)),
        ]
    )


def test_keys_are_random_256_bit_tokens_and_settings_hold_only_their_digest() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(k.startswith("cm_") and len(k) == 46 for k in keys)
    key = new_key()
    assert digest(key) == hashlib.sha256(key.encode()).hexdigest()
    entry = ApiKey(name="x", role=Role.ADMIN, sha256="sha256:" + digest(key).upper())
    assert entry.sha256 == digest(key)  # prefix and case normalised
    with pytest.raises(ValidationError, match="never the key itself"):
        ApiKey(name="x", role=Role.ADMIN, sha256=key)  # a plaintext key is refused


def test_roles_and_tenants_must_agree() -> None:
    with pytest.raises(ValidationError, match="tenant key needs tenant"):
        ApiKey(name="x", role=Role.TENANT, sha256=digest("k"))
    with pytest.raises(ValidationError, match="tenant key needs tenant"):
        ApiKey(name="x", role=Role.TENANT, tenant="bad tenant!", sha256=digest("k"))
    with pytest.raises(ValidationError, match="leave tenant empty"):
        ApiKey(name="x", role=Role.ADMIN, tenant="acme", sha256=digest("k"))
    with pytest.raises(ValueError, match="twice"):
        Authenticator([ApiKey(name=n, role=Role.ADMIN, sha256=digest("same")) for n in ("a", "b")])


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("", "NO_KEY"),
        ("Bearer", "MALFORMED_KEY"),
        ("Bearer   ", "MALFORMED_KEY"),
        (f"Basic {ACME_KEY}", "MALFORMED_KEY"),
        (ACME_KEY, "MALFORMED_KEY"),
        ("Bearer " + "x" * 600, "MALFORMED_KEY"),
        ("Bearer cm_unknown", "UNKNOWN_KEY"),
        (f"Bearer {digest(ACME_KEY)}", "UNKNOWN_KEY"),  # the digest itself is not a credential
    ],
)
def test_missing_malformed_or_unknown_keys_are_unauthenticated(header: str, reason: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        authenticator().authenticate(header)
    assert err.value.reason == reason


def test_a_known_key_maps_to_its_principal() -> None:
    auth = authenticator()
    assert auth.authenticate(f"Bearer {ACME_KEY}") == ACME
    assert auth.authenticate(f"bearer  {ADMIN_KEY} ") == ADMIN
    assert auth.authenticate(f"Bearer {ROUTER_KEY}") == ROUTER


def test_every_rpc_of_every_costmesh_service_has_a_rule() -> None:
    methods = []
    for svc in ("router", "budget", "cache", "infer"):
        module = importlib.import_module(f"costmesh.{svc}.v1.{svc}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods += [f"/{service.full_name}/{m.name}" for m in service.methods]
    assert len(methods) == 24
    assert sorted(methods) == sorted(RULES)
    assert rule_for("/costmesh.budget.v1.BudgetService/Unknown").roles == frozenset()  # closed by default
    assert is_public("/grpc.health.v1.Health/Check") and is_public("/grpc.health.v1.Health/Watch")
    assert is_public("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_public("/costmesh.router.v1.RouterService/Generate")


GENERATE = "/costmesh.router.v1.RouterService/Generate"
SET_BUDGET = "/costmesh.budget.v1.BudgetService/SetBudget"
GET_USAGE = "/costmesh.budget.v1.BudgetService/GetUsage"
RESERVE = "/costmesh.budget.v1.BudgetService/Reserve"
RENEW = "/costmesh.budget.v1.BudgetService/RenewReservation"
INVALIDATE = "/costmesh.cache.v1.CacheService/Invalidate"
GET_STATS = "/costmesh.cache.v1.CacheService/GetStats"
GET_JOB = "/costmesh.infer.v1.InferenceService/GetJob"
LIST_JOBS = "/costmesh.infer.v1.InferenceService/ListJobs"
MARK_JOB_SETTLED = "/costmesh.infer.v1.InferenceService/MarkJobSettled"


def decide(principal: Principal, method: str, named: str = "", metadata: tuple[str, ...] = ()) -> str:
    """'fill:<tenant>', 'ok' or the PermissionDenied reason."""
    try:
        verdict = authorize(principal, rule_for(method), named=named, metadata_tenants=metadata)
    except PermissionDenied as err:
        return err.reason
    return f"fill:{verdict.fill_tenant}" if verdict.fill_tenant else "ok"


def test_a_tenant_key_acts_only_for_its_tenant() -> None:
    assert decide(ACME, GENERATE, "acme") == "ok"
    assert decide(ACME, GENERATE, "") == "fill:acme"  # an empty tenant is the key's own
    assert decide(ACME, GENERATE, "", ("acme",)) == "ok"  # metadata names its own tenant
    assert decide(ACME, GENERATE, "globex") == "TENANT_MISMATCH"
    assert decide(ACME, GENERATE, "", ("globex",)) == "TENANT_MISMATCH"
    assert decide(ACME, GENERATE, "acme", ("globex",)) == "TENANT_MISMATCH"  # a second name is not ignored
    assert decide(ACME, GET_USAGE, "acme") == "ok"
    assert decide(ACME, GET_USAGE, "globex") == "TENANT_MISMATCH"
    # Empty means every tenant here; metadata does not narrow it (the servicer would not read it).
    assert decide(ACME, GET_USAGE, "", ("acme",)) == "ADMIN_REQUIRED"
    assert decide(ACME, GET_STATS, "") == "ADMIN_REQUIRED"
    assert decide(ACME, RESERVE, "acme") == "ROLE"  # the budget's data plane is the router's


def test_admin_rpcs_need_an_admin_key() -> None:
    for method in (SET_BUDGET, INVALIDATE):
        assert decide(ACME, method, "acme") == "ADMIN_REQUIRED"
        assert decide(ROUTER, method, "acme") == "ADMIN_REQUIRED"
        assert decide(ADMIN, method, "acme") == "ok"
    for method in (GET_USAGE, GET_STATS):
        assert decide(ROUTER, method, "") == "ADMIN_REQUIRED"  # across tenants
        assert decide(ROUTER, method, "globex") == "ok"
        assert decide(ADMIN, method, "") == "ok"


def test_the_service_role_acts_for_any_tenant_on_the_data_plane() -> None:
    assert decide(ROUTER, RESERVE, "acme") == "ok"
    assert decide(ROUTER, RESERVE, "") == "ok"  # validation answers INVALID_ARGUMENT, not auth
    assert decide(ROUTER, RENEW, "acme") == "ok" and decide(ADMIN, RENEW, "acme") == "ok"
    assert decide(ACME, RENEW, "acme") == "ROLE"  # like Commit and Release: the router's
    assert decide(ROUTER, GENERATE, "globex") == "ok"
    assert decide(ROUTER, GET_JOB, "") == "ok"  # the router's internal read of its own jobs
    assert decide(ACME, GET_JOB, "acme") == "ROLE"
    # The settlement sweep: the router lists every tenant's jobs and marks them settled; tenants may do neither.
    assert decide(ROUTER, LIST_JOBS) == "ok" and decide(ACME, LIST_JOBS) == "ROLE"
    assert decide(ROUTER, MARK_JOB_SETTLED, "") == "ok" and decide(ROUTER, MARK_JOB_SETTLED, "acme") == "ok"
    assert decide(ACME, MARK_JOB_SETTLED, "acme") == "ROLE"


def test_auth_settings_from_env_and_a_keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class DemoSettings(ServiceSettings):
        model_config = service_settings_config("demo")

    monkeypatch.delenv("COSTMESH_CONFIG", raising=False)
    assert DemoSettings().auth.enabled is False  # off by default: the embedded path needs no keys
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys:\n  - {{name: ops, role: admin, sha256: {digest(ADMIN_KEY)}}}\n")
    key_file = tmp_path / "router.key"
    key_file.write_text(ROUTER_KEY + "\n")
    monkeypatch.setenv("COSTMESH_DEMO_AUTH__ENABLED", "true")
    monkeypatch.setenv("COSTMESH_DEMO_AUTH__KEYS_FILE", str(keys_file))
    monkeypatch.setenv("COSTMESH_DEMO_AUTH__CLIENT_KEY_FILE", str(key_file))
    monkeypatch.setenv(
        "COSTMESH_DEMO_AUTH__KEYS", f'[{{"name": "acme", "tenant": "acme", "sha256": "{digest(ACME_KEY)}"}}]'
    )
    s = DemoSettings().auth
    assert s.enabled and [k.name for k in s.all_keys()] == ["acme", "ops"]
    assert s.outgoing_key() == ROUTER_KEY
    assert Authenticator(s.all_keys()).authenticate(f"Bearer {ADMIN_KEY}").role is Role.ADMIN
    assert AuthSettings(client_key=ROUTER_KEY).outgoing_key() == ROUTER_KEY
    assert ROUTER_KEY not in repr(AuthSettings(client_key=ROUTER_KEY))  # a secret, never logged
