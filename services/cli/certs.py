"""``costmesh certs dev|key|digest``: credentials for running the mesh with mTLS and API keys on one machine.

``costmesh certs dev`` writes, under ``--out`` (default ``var/certs``):

* ``ca.pem`` / ``ca-key.pem`` — a private CA (EC P-256) for this mesh only;
* ``server.pem`` / ``server-key.pem`` — the certificate every service serves, valid for ``localhost``,
  ``127.0.0.1``, ``::1``, the service names and any ``--san``; it also allows client auth, because the router
  presents it when calling cache, budget and the workers;
* ``client.pem`` / ``client-key.pem`` — a client certificate for callers, the CLI and tests;
* ``keys/admin.key``, ``keys/router.key`` (the router's service key) and ``keys/<tenant>.key`` per ``--tenant``;
* ``costmesh-secure.yaml`` — a settings file turning on mTLS and API keys for every service (only key digests in
  it), for ``costmesh up --config var/certs/costmesh-secure.yaml``.

Private keys and API keys are written ``0600``. For production, use your own PKI (cert-manager, a mesh CA) and mint
keys with ``costmesh certs key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.auth import Role, digest, new_key

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Certificates and API keys for mTLS and auth.")

SERVICE_NAMES = ("router", "cache", "budget", "infer", "infer-cheap", "infer-full")
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1", *SERVICE_NAMES)
SECURE_CONFIG = "costmesh-secure.yaml"


@dataclass(frozen=True)
class DevCredentials:
    """Paths (and the API keys themselves) that ``write_dev_credentials`` produced."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    config: Path
    admin_key: str
    service_key: str
    tenant_keys: dict[str, str] = field(default_factory=dict)

    @property
    def service_key_file(self) -> Path:
        return self.dir / "keys" / "router.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "costmesh dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(values: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for value in dict.fromkeys(values):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            names.append(x509.DNSName(value))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    *,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    days: int,
    usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[str] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if sans:
        builder = builder.add_extension(_san(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def write_dev_credentials(
    out: Path,
    *,
    days: int = 30,
    sans: Sequence[str] = (),
    tenants: Sequence[str] = ("demo",),
    force: bool = False,
) -> DevCredentials:
    """Write a CA, server and client certificates, API keys and a secure settings file under ``out``."""
    out = out.resolve()
    config = out / SECURE_CONFIG
    if config.exists() and not force:
        raise FileExistsError(f"{config} exists; pass --force to replace every credential under {out}")
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = _name("costmesh dev CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key, client_key = _key(), _key()
    server = _issue(
        subject="costmesh",
        key=server_key,
        ca_key=ca_key,
        ca_name=ca_name,
        days=days,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[*DEFAULT_SANS, *sans],
    )
    client = _issue(
        subject="costmesh-client",
        key=client_key,
        ca_key=ca_key,
        ca_name=ca_name,
        days=days,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    pem = serialization.Encoding.PEM
    _write(out / "ca.pem", ca.public_bytes(pem), private=False)
    _write(out / "ca-key.pem", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server.public_bytes(pem), private=False)
    _write(out / "server-key.pem", _pem_key(server_key), private=True)
    _write(out / "client.pem", client.public_bytes(pem), private=False)
    _write(out / "client-key.pem", _pem_key(client_key), private=True)

    admin, service = new_key(), new_key()
    tenant_keys = {t: new_key() for t in dict.fromkeys(tenants)}
    keys_dir = out / "keys"
    _write(keys_dir / "admin.key", admin.encode() + b"\n", private=True)
    _write(keys_dir / "router.key", service.encode() + b"\n", private=True)
    for tenant, key in tenant_keys.items():
        _write(keys_dir / f"{tenant}.key", key.encode() + b"\n", private=True)
    entries = [
        {"name": "admin", "role": Role.ADMIN.value, "sha256": digest(admin)},
        {"name": "router", "role": Role.SERVICE.value, "sha256": digest(service)},
        *({"name": t, "role": Role.TENANT.value, "tenant": t, "sha256": digest(k)} for t, k in tenant_keys.items()),
    ]
    settings = {
        "common": {
            "tls_cert_file": str(out / "server.pem"),
            "tls_key_file": str(out / "server-key.pem"),
            "tls_ca_file": str(out / "ca.pem"),
            "auth": {"enabled": True, "client_key_file": str(keys_dir / "router.key"), "keys": entries},
        }
    }
    header = "# costmesh dev credentials: mTLS between every service and API keys (digests only).\n"
    _write(config, (header + yaml.safe_dump(settings, sort_keys=False)).encode(), private=False)
    return DevCredentials(
        dir=out,
        ca=out / "ca.pem",
        server_cert=out / "server.pem",
        server_key=out / "server-key.pem",
        client_cert=out / "client.pem",
        client_key=out / "client-key.pem",
        config=config,
        admin_key=admin,
        service_key=service,
        tenant_keys=tenant_keys,
    )


@app.command()
def dev(
    out: Annotated[Path, typer.Option(help="directory to write into")] = Path("var/certs"),
    days: Annotated[int, typer.Option(min=1, max=825, help="validity of the CA and certificates")] = 30,
    san: Annotated[list[str] | None, typer.Option(help="extra DNS name or IP of the server certificate")] = None,
    tenant: Annotated[list[str] | None, typer.Option(help="tenant to mint an API key for (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="replace credentials already there")] = False,
) -> None:
    """A private CA, server and client certificates, API keys and a settings file with mTLS and auth on."""
    try:
        creds = write_dev_credentials(out, days=days, sans=san or (), tenants=tenant or ("demo",), force=force)
    except FileExistsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"wrote {creds.dir}:")
    for path in (creds.ca, creds.server_cert, creds.client_cert, creds.config):
        typer.echo(f"  {path.relative_to(creds.dir)}")
    typer.echo(f"  keys/ (admin, router, {', '.join(creds.tenant_keys)}) — keep them secret")
    typer.echo(f"run the mesh with it:  costmesh up --config {creds.config}")
    typer.echo(f"admin commands:        COSTMESH_ADMIN_KEY=$(cat {creds.dir}/keys/admin.key) \\")
    typer.echo(f"  COSTMESH_TLS_CA_FILE={creds.ca} COSTMESH_TLS_CERT_FILE={creds.client_cert} \\")
    typer.echo(f"  COSTMESH_TLS_KEY_FILE={creds.client_key} costmesh budget usage")


@app.command()
def key(
    name: Annotated[str, typer.Option(help="who holds the key (logs only)")],
    role: Annotated[Role, typer.Option(help="tenant | service | admin")] = Role.TENANT,
    tenant: Annotated[str, typer.Option(help="the tenant a tenant key acts for")] = "",
) -> None:
    """Mint an API key: the key on stdout (give it to its holder), the settings entry (digest only) on stderr."""
    from services.common.auth import ApiKey

    value = new_key()
    entry = ApiKey(name=name, role=role, tenant=tenant, sha256=digest(value))  # validates role/tenant
    typer.echo(value)
    snippet = yaml.safe_dump([entry.model_dump(mode="json", exclude_defaults=False)], sort_keys=False)
    typer.echo("# add under auth.keys:\n" + snippet, err=True)


@app.command("digest")
def digest_command() -> None:
    """The ``sha256`` settings value of a key read from stdin."""
    value = sys.stdin.readline().strip()
    if not value:
        typer.echo("error: no key on stdin", err=True)
        raise typer.Exit(1)
    typer.echo(digest(value))
