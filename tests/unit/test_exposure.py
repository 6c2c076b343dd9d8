"""Secure by default (services/common/exposure.py): no listener beyond loopback without auth or an explicit opt-out."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.budget.config import BudgetSettings
from services.common.auth import AuthSettings
from services.common.exposure import (
    InsecureBind,
    is_loopback,
    mtls_configured,
    require_public_metrics,
    require_secure_bind,
    require_secure_listeners,
)
from services.router.config import RouterSettings

TLS = {"tls_cert_file": Path("server.pem"), "tls_key_file": Path("server-key.pem"), "tls_ca_file": Path("ca.pem")}


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("COSTMESH_CONFIG", "COSTMESH_ROUTER_HOST", "COSTMESH_BUDGET_HOST"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("", False),
        ("10.0.0.7", False),
        ("192.168.1.2", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1", False),
        ("router", False),  # a hostname: what it resolves to is not known here
        ("localhost.example.com", False),
    ],
)
def test_loopback_is_127_8_and_1_and_localhost_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_stays_open_without_any_setting() -> None:
    settings = RouterSettings(metrics_port=9464)
    assert settings.host == "127.0.0.1" and not settings.auth.enabled and not settings.allow_insecure
    require_secure_listeners(settings)  # the default `costmesh up` path: no keys needed
    require_secure_listeners(RouterSettings(host="::1", metrics_port=9464))


def test_beyond_loopback_without_auth_is_refused_naming_the_settings() -> None:
    with pytest.raises(InsecureBind) as err:
        require_secure_bind("0.0.0.0", RouterSettings(host="0.0.0.0"), what="gRPC port 50051")
    message = str(err.value)
    assert message.startswith("router: refusing to open gRPC port 50051 on 0.0.0.0 without authentication")
    for name in (
        "COSTMESH_ROUTER_AUTH__ENABLED=true",
        "COSTMESH_ROUTER_AUTH__KEYS_FILE",
        "COSTMESH_ROUTER_TLS_CERT_FILE",
        "COSTMESH_ROUTER_TLS_KEY_FILE",
        "COSTMESH_ROUTER_TLS_CA_FILE",
        "COSTMESH_ROUTER_ALLOW_INSECURE=true",
        "COSTMESH_ROUTER_HOST=127.0.0.1",
        "costmesh certs deploy",
        "allow_insecure",
    ):
        assert name in message, name
    # Each service names its own variables.
    with pytest.raises(InsecureBind, match="COSTMESH_BUDGET_ALLOW_INSECURE=true"):
        require_secure_listeners(BudgetSettings(host="10.1.2.3"))


@pytest.mark.parametrize(
    "secured",
    [
        {"auth": AuthSettings(enabled=True)},  # no key at all: every RPC refused, closed
        TLS,
    ],
    ids=["api-keys", "mtls"],
)
def test_api_keys_or_mtls_make_a_public_bind_acceptable(secured: dict[str, object]) -> None:
    settings = RouterSettings(host="0.0.0.0", **secured)  # type: ignore[arg-type]
    with capture_logs() as logs:
        require_secure_bind("0.0.0.0", settings, what="gRPC port 50051")
    assert logs == []


def test_tls_without_a_client_ca_or_keys_without_enabled_are_not_auth() -> None:
    server_tls_only = RouterSettings(host="0.0.0.0", tls_cert_file=Path("s.pem"), tls_key_file=Path("k.pem"))
    assert not mtls_configured(server_tls_only)
    with pytest.raises(InsecureBind, match="without tls_ca_file no client certificate is required"):
        require_secure_listeners(server_tls_only)
    listed = RouterSettings(host="0.0.0.0", auth=AuthSettings(keys_file=Path("keys.yaml")))
    with pytest.raises(InsecureBind, match=r"API keys are listed, but auth\.enabled is false"):
        require_secure_listeners(listed)


def test_a_listener_that_ignores_client_certificates_needs_api_keys() -> None:
    settings = RouterSettings(host="0.0.0.0", **TLS)  # type: ignore[arg-type]
    require_secure_bind("0.0.0.0", settings, what="gRPC port 50051")
    with pytest.raises(InsecureBind) as err:
        require_secure_bind("0.0.0.0", settings, what="HTTP port 8080", mtls=False)
    assert "TLS_CA_FILE" not in str(err.value)  # mTLS would not help this listener: not offered
    require_secure_bind("127.0.0.1", settings, what="HTTP port 8080", mtls=False)


def test_allow_insecure_starts_open_with_a_warning_every_time() -> None:
    settings = RouterSettings(host="0.0.0.0", allow_insecure=True, metrics_port=9464)
    for _start in range(2):
        with capture_logs() as logs:
            require_secure_listeners(settings)
        warned = [e for e in logs if e["event"] == "insecure_listener_allowed"]
        assert [e["listener"] for e in warned] == ["gRPC port 50051", "/metrics port 9464"]
        assert all(e["log_level"] == "warning" and e["setting"] == "COSTMESH_ROUTER_ALLOW_INSECURE" for e in warned)


def test_metrics_beyond_loopback_need_metrics_public() -> None:
    keyed = RouterSettings(host="0.0.0.0", auth=AuthSettings(enabled=True), metrics_port=9464)
    with pytest.raises(InsecureBind) as err:
        require_secure_listeners(keyed)  # API keys do not protect /metrics: plain HTTP, no auth
    message = str(err.value)
    assert message.startswith("router: refusing to open /metrics port 9464 on 0.0.0.0")
    assert "COSTMESH_ROUTER_METRICS_PUBLIC=true" in message and "COSTMESH_ROUTER_METRICS_PORT" in message
    require_secure_listeners(keyed.model_copy(update={"metrics_public": True}))
    require_secure_listeners(keyed.model_copy(update={"metrics_port": None}))
    require_public_metrics("127.0.0.1", RouterSettings(), port=9464)


def test_every_refused_listener_is_named_at_once() -> None:
    with pytest.raises(InsecureBind) as err:
        require_secure_listeners(RouterSettings(host="0.0.0.0", metrics_port=9464))
    message = str(err.value)
    assert "gRPC port 50051" in message and "/metrics port 9464" in message


def test_the_opt_outs_are_settings_of_every_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "costmesh.yaml"
    config.write_text("common:\n  allow_insecure: true\n  metrics_public: true\n", encoding="utf-8")
    monkeypatch.setenv("COSTMESH_CONFIG", str(config))
    monkeypatch.setenv("COSTMESH_BUDGET_ALLOW_INSECURE", "false")
    assert RouterSettings().allow_insecure and RouterSettings().metrics_public
    assert not BudgetSettings().allow_insecure and BudgetSettings().metrics_public
