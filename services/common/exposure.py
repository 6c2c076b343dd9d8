"""Secure by default: a listener beyond loopback needs authentication, or an explicit opt-out warned at every start.

On loopback (``127.0.0.0/8``, ``::1``, ``localhost``; every default) only local processes can call a service, so the
embedded ``costmesh up`` stays open. Anywhere else (``0.0.0.0`` in a container, a LAN address, a hostname) any
caller that reaches the port could name any tenant, spend its budget and read its cached answers. So the shared
bootstrap (:func:`services.common.server.make_host`) refuses to start such a service, exit code 78 (``EX_CONFIG``)
and a message naming the settings, unless one of these holds:

* **API keys**: ``auth.enabled`` (``COSTMESH_<SVC>_AUTH__ENABLED=true``, keys in ``auth.keys_file`` or
  ``auth.keys``; ``costmesh certs deploy`` writes them). Enabled with no key at all, every RPC is refused: closed,
  so it counts.
* **mTLS**: ``tls_cert_file``, ``tls_key_file`` and ``tls_ca_file``. Without the CA the server does not ask for
  client certificates, so TLS alone authenticates nobody and does not count.
* **``allow_insecure: true``**: serve open anyway, for a network that authenticates callers by itself. Logged as a
  warning (``insecure_listener_allowed``) at every start.

The Prometheus ``/metrics`` port is plain HTTP with no authentication (``prometheus_client`` offers none that
Prometheus could present, short of TLS client certificates). Its series name tenants, teams and features with their
request counts, tokens and spend; never keys, prompts or answers, and nothing on it changes state. Beyond loopback it
needs ``metrics_public: true``. The deployment files set it, and there only Prometheus can reach the port
(NetworkPolicies; compose publishes no metrics port). ``allow_insecure`` covers it as well.

The plaintext ``health_port`` answers only gRPC health (SERVING or not) and is not checked.

Each listener calls :func:`require_secure_bind` (or :func:`require_public_metrics`) with its own host, so a
listener added later (an HTTP front door on the router) gets the same rule with one call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from services.common.settings import ServiceSettings

log = structlog.get_logger("costmesh.exposure")

#: Exit status of a service that refuses its settings (sysexits.h ``EX_CONFIG``).
EX_CONFIG = 78


class InsecureBind(Exception):
    """A listener would accept anyone beyond loopback; the message names the settings that fix it."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a listener on this machine: ``localhost``, ``127.0.0.0/8`` or ``::1``.

    Anything else is treated as reachable: ``0.0.0.0``/``::``/empty (every interface), other addresses, and other
    hostnames (what they resolve to is not known here)."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def mtls_configured(settings: ServiceSettings) -> bool:
    """Certificate, key and CA: the server requires client certificates (``server.server_credentials``)."""
    return None not in (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def _env(settings: ServiceSettings, name: str) -> str:
    return f"{settings.model_config.get('env_prefix', 'COSTMESH_')}{name}"


def _service(settings: ServiceSettings) -> str:
    return str(settings.model_config.get("yaml_section", "service"))


def require_secure_bind(host: str, settings: ServiceSettings, *, what: str, mtls: bool = True) -> None:
    """Refuse (``InsecureBind``) a listener for ``what`` on ``host`` that anyone beyond loopback could call freely.

    A listener that applies the service's API keys passes with ``auth.enabled``; with ``mtls`` (it asks for the
    client certificates of ``tls_*``) also with mTLS. ``allow_insecure`` lets it through with a warning."""
    if is_loopback(host) or settings.auth.enabled or (mtls and mtls_configured(settings)):
        return
    if settings.allow_insecure:
        log.warning(
            "insecure_listener_allowed",
            listener=what,
            host=host,
            setting=_env(settings, "ALLOW_INSECURE"),
            note="no API keys or mTLS: any caller that reaches it may act for any tenant",
        )
        return
    hints = []
    if settings.auth.keys or settings.auth.keys_file is not None:
        hints.append("API keys are listed, but auth.enabled is false")
    if mtls and settings.tls_cert_file is not None and settings.tls_ca_file is None:
        hints.append("TLS is set, but without tls_ca_file no client certificate is required")
    options = [
        f"API keys: {_env(settings, 'AUTH__ENABLED')}=true with {_env(settings, 'AUTH__KEYS_FILE')}=<keys.yaml> "
        "(`costmesh certs deploy` writes one)"
    ]
    if mtls:
        names = ", ".join(_env(settings, f"TLS_{part}_FILE") for part in ("CERT", "KEY"))
        options.append(f"mTLS: {names} and {_env(settings, 'TLS_CA_FILE')}")
    options.append(f"or {_env(settings, 'ALLOW_INSECURE')}=true to leave it open anyway (warned at every start)")
    note = f" Note: {'; '.join(hints)}." if hints else ""
    raise InsecureBind(
        f"{_service(settings)}: refusing to open {what} on {host} without authentication: any caller that reaches "
        f"it could name any tenant, spend its budget and read its cached answers. Set one of: {'; '.join(options)}. "
        f"Or bind loopback: {_env(settings, 'HOST')}=127.0.0.1. In a settings file: auth.enabled, auth.keys_file, "
        f"tls_cert_file/tls_key_file/tls_ca_file, allow_insecure, host.{note}"
    )


def require_public_metrics(host: str, settings: ServiceSettings, *, port: int) -> None:
    """Refuse (``InsecureBind``) a Prometheus ``/metrics`` port beyond loopback unless ``metrics_public`` (or
    ``allow_insecure``, with a warning) says it may be read by anyone who reaches it."""
    if is_loopback(host) or settings.metrics_public:
        return
    what = f"/metrics port {port}"
    if settings.allow_insecure:
        log.warning("insecure_listener_allowed", listener=what, host=host, setting=_env(settings, "ALLOW_INSECURE"))
        return
    raise InsecureBind(
        f"{_service(settings)}: refusing to open {what} on {host}: it is plain HTTP without authentication and "
        "names tenants, teams and features with their traffic and spend. Set "
        f"{_env(settings, 'METRICS_PUBLIC')}=true (settings file: metrics_public) if only your Prometheus can reach "
        f"it, or unset {_env(settings, 'METRICS_PORT')}, or bind loopback: {_env(settings, 'HOST')}=127.0.0.1."
    )


@dataclass(frozen=True, slots=True)
class Listener:
    """A listener a service opens beside its gRPC port (the router's HTTP front door), for the same check.

    ``mtls``: whether it asks for the client certificates of ``tls_*`` (a plain HTTP listener does not, so only API
    keys make it safe beyond loopback)."""

    host: str
    what: str
    mtls: bool = False


def require_secure_listeners(settings: ServiceSettings, extra: Sequence[Listener] = ()) -> None:
    """Every listener the shared bootstrap opens from ``settings`` — the gRPC port and the ``/metrics`` port — and
    the service's ``extra`` ones (one ``InsecureBind`` naming every refusal, so one restart is enough to fix them
    all)."""
    refused: list[str] = []
    try:
        require_secure_bind(settings.host, settings, what=f"gRPC port {settings.port}")
    except InsecureBind as err:
        refused.append(str(err))
    for listener in extra:
        try:
            require_secure_bind(listener.host, settings, what=listener.what, mtls=listener.mtls)
        except InsecureBind as err:
            refused.append(str(err))
    if settings.metrics_port is not None:
        try:
            require_public_metrics(settings.host, settings, port=settings.metrics_port)
        except InsecureBind as err:
            refused.append(str(err))
    if refused:
        raise InsecureBind(" ".join(refused))
