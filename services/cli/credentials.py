"""Credentials the admin sub-commands (``costmesh budget …``, ``costmesh cache …``) present to a secured service.

Each sub-app registers :func:`credentials_options` as its callback, so these options come before the command::

    costmesh budget --admin-key "$(cat var/certs/keys/admin.key)" set tenant:acme --day-usd 5
    COSTMESH_ADMIN_KEY=... COSTMESH_TLS_CA_FILE=var/certs/ca.pem costmesh cache invalidate --tenant acme

``--admin-key`` (``COSTMESH_ADMIN_KEY``) is sent as ``authorization: Bearer <key>``; the TLS files
(``COSTMESH_TLS_CA_FILE``, ``COSTMESH_TLS_CERT_FILE``, ``COSTMESH_TLS_KEY_FILE``) make the channel (m)TLS.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from services.common.auth_grpc import bearer_interceptors
from services.common.channels import channel_credentials


@dataclass(frozen=True)
class ClientCredentials:
    admin_key: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def channel_args(self) -> dict[str, Any]:
        """Keyword arguments for :func:`services.common.channels.create_channel`."""
        creds: grpc.ChannelCredentials | None = channel_credentials(
            ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file
        )
        return {"credentials": creds, "interceptors": bearer_interceptors(self.admin_key)}


_current: contextvars.ContextVar[ClientCredentials] = contextvars.ContextVar("costmesh_cli_credentials")


def credentials_options(
    admin_key: Annotated[
        str | None,
        typer.Option(envvar="COSTMESH_ADMIN_KEY", help="admin API key (when auth is on)", show_default=False),
    ] = None,
    tls_ca_file: Annotated[
        Path | None, typer.Option(envvar="COSTMESH_TLS_CA_FILE", help="CA of the mesh (TLS)")
    ] = None,
    tls_cert_file: Annotated[
        Path | None, typer.Option(envvar="COSTMESH_TLS_CERT_FILE", help="client certificate (mTLS)")
    ] = None,
    tls_key_file: Annotated[Path | None, typer.Option(envvar="COSTMESH_TLS_KEY_FILE", help="client key (mTLS)")] = None,
) -> None:
    """Credentials for a secured mesh (options, or their environment variables)."""
    # Runs before every sub-command of the app; the command's gRPC calls (inside asyncio.run, which copies the
    # context) read it back with current().
    _current.set(ClientCredentials(admin_key or None, tls_ca_file, tls_cert_file, tls_key_file))


def current() -> ClientCredentials:
    """The credentials given to the running command (none outside a command, e.g. in direct calls from tests)."""
    return _current.get(ClientCredentials())
