"""``costmesh certs dev|deploy|key|digest``: credentials for running the mesh with mTLS and API keys.

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

``costmesh certs deploy`` writes the API keys a deployment (docker compose, Kubernetes) runs with, under ``--out``
(default ``var/auth``, created ``0700``):

* ``keys.yaml`` — the digest of every key below: the ``auth.keys_file`` every service accepts (no secret in it);
* ``router.key`` — the router's service key (``auth.client_key_file``), which cache, budget and the workers accept.
  Mode ``0644`` inside the ``0700`` directory: compose bind-mounts it into the router container, whose user
  (uid 10001) is not the file's owner;
* ``clients/admin.key`` and ``clients/<tenant>.key`` per ``--tenant`` (``0600``) — give each to its holder; they
  are not mounted anywhere;
* ``costmesh-auth.yaml`` (``0600``) — the Kubernetes Secret ``costmesh-auth`` holding ``keys.yaml`` and
  ``router.key`` (``kubectl apply -n <namespace> -f``), which every Deployment of ``deploy/k8s`` mounts.

``deploy/compose/compose.yaml`` mounts ``deploy/compose/secrets/keys.yaml`` and ``router.key``:
``costmesh certs deploy --out deploy/compose/secrets``.
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

#: What ``costmesh certs deploy`` writes; deploy/ mounts these names (tests/unit/test_deploy_auth.py checks both).
KEYS_FILE = "keys.yaml"
SERVICE_KEY_FILE = "router.key"
AUTH_SECRET = "costmesh-auth"
AUTH_SECRET_FILE = f"{AUTH_SECRET}.yaml"


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


@dataclass(frozen=True)
class MintedKeys:
    """Fresh API keys for an admin, the router (service role) and each tenant, with their settings entries."""

    admin: str
    service: str
    tenants: dict[str, str]

    @classmethod
    def new(cls, tenants: Sequence[str]) -> MintedKeys:
        return cls(new_key(), new_key(), {t: new_key() for t in dict.fromkeys(tenants)})

    def entries(self) -> list[dict[str, str]]:
        """The ``auth.keys`` entries (digests only)."""
        return [
            {"name": "admin", "role": Role.ADMIN.value, "sha256": digest(self.admin)},
            {"name": "router", "role": Role.SERVICE.value, "sha256": digest(self.service)},
            *(
                {"name": t, "role": Role.TENANT.value, "tenant": t, "sha256": digest(k)}
                for t, k in self.tenants.items()
            ),
        ]


@dataclass(frozen=True)
class DeployCredentials:
    """What ``write_deploy_credentials`` produced (the keys themselves included, for tests and the CLI's output)."""

    dir: Path
    keys_file: Path
    service_key_file: Path
    secret_manifest: Path
    keys: MintedKeys

    def client_key_file(self, who: str) -> Path:
        return self.dir / "clients" / f"{who}.key"


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

    minted = MintedKeys.new(tenants)
    admin, service, tenant_keys = minted.admin, minted.service, minted.tenants
    keys_dir = out / "keys"
    _write(keys_dir / "admin.key", admin.encode() + b"\n", private=True)
    _write(keys_dir / "router.key", service.encode() + b"\n", private=True)
    for tenant, key in tenant_keys.items():
        _write(keys_dir / f"{tenant}.key", key.encode() + b"\n", private=True)
    entries = minted.entries()
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


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, so the Secret manifest reads like the files it holds."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str_block)


def write_deploy_credentials(
    out: Path, *, tenants: Sequence[str] = (), namespace: str | None = None, force: bool = False
) -> DeployCredentials:
    """Write the API keys of a deployment under ``out``: digests, the router's key, client keys, the Secret."""
    out = out.resolve()
    keys_file = out / KEYS_FILE
    if keys_file.exists() and not force:
        raise FileExistsError(f"{keys_file} exists; pass --force to replace every key under {out}")
    if not out.exists():
        out.mkdir(mode=0o700, parents=True)
    minted = MintedKeys.new(tenants)
    header = (
        "# costmesh API keys accepted by every service (auth.keys_file): digests only, written by "
        "`costmesh certs deploy`.\n# Add a key: `costmesh certs key --name NAME --tenant TENANT`, append its entry "
        "here, re-create the Secret.\n"
    )
    keys_yaml = header + yaml.safe_dump({"keys": minted.entries()}, sort_keys=False)
    service_key = minted.service + "\n"
    _write(keys_file, keys_yaml.encode(), private=False)
    # Not 0600: compose bind-mounts this file into the router container, whose user (uid 10001) does not own it.
    # The directory (0700 when created here) keeps other local users out.
    _write(out / SERVICE_KEY_FILE, service_key.encode(), private=False)
    (out / "clients").mkdir(mode=0o700, exist_ok=True)
    for who, key in (("admin", minted.admin), *minted.tenants.items()):
        _write(out / "clients" / f"{who}.key", key.encode() + b"\n", private=True)
    metadata: dict[str, object] = {"name": AUTH_SECRET}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/part-of": "costmesh"}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "stringData": {KEYS_FILE: keys_yaml, SERVICE_KEY_FILE: service_key},
    }
    manifest = out / AUTH_SECRET_FILE
    apply = "kubectl apply -f" if namespace else "kubectl apply -n <namespace> -f"
    secret_header = f"# The API keys every costmesh Deployment mounts (deploy/k8s): `{apply} {AUTH_SECRET_FILE}`.\n"
    _write(manifest, (secret_header + yaml.dump(secret, Dumper=_BlockDumper, sort_keys=False)).encode(), private=True)
    return DeployCredentials(
        dir=out, keys_file=keys_file, service_key_file=out / SERVICE_KEY_FILE, secret_manifest=manifest, keys=minted
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
def deploy(
    out: Annotated[Path, typer.Option(help="directory to write into (created 0700)")] = Path("var/auth"),
    tenant: Annotated[list[str] | None, typer.Option(help="tenant to mint an API key for (repeatable)")] = None,
    namespace: Annotated[str | None, typer.Option(help="namespace of the Kubernetes Secret")] = None,
    force: Annotated[bool, typer.Option(help="replace keys already there")] = False,
) -> None:
    """API keys for docker compose and Kubernetes: keys.yaml (digests), router.key, client keys, the Secret."""
    try:
        creds = write_deploy_credentials(out, tenants=tenant or (), namespace=namespace, force=force)
    except FileExistsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"wrote {creds.dir}:")
    typer.echo(f"  {KEYS_FILE}           digests of every key (auth.keys_file of every service)")
    typer.echo(f"  {SERVICE_KEY_FILE}          the router's service key (auth.client_key_file of the router)")
    typer.echo(f"  clients/            admin{''.join(f', {t}' for t in creds.keys.tenants)}: give each to its holder")
    typer.echo(f"  {AUTH_SECRET_FILE}  Kubernetes Secret {AUTH_SECRET} ({KEYS_FILE} + {SERVICE_KEY_FILE})")
    typer.echo(f"kubernetes:  kubectl apply {'' if namespace else '-n <namespace> '}-f {creds.secret_manifest}")
    typer.echo(
        f"compose:     compose.yaml mounts deploy/compose/secrets/{{{KEYS_FILE},{SERVICE_KEY_FILE}}} (--out there)"
    )


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
