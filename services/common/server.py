"""Server bootstrap shared by every service: grpc.aio with health, reflection, interceptors, graceful shutdown.

A composition root builds its dependencies, then::

    host = ServiceHost(name="budget", settings=settings, telemetry=telemetry)
    host.add_service(budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
                     lambda server: budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server))
    host.on_stop(store.close)          # closed in reverse order of registration, after the server stopped
    await host.run(ready=warm_up)      # SERVING only after `ready` returned; returns after SIGTERM/SIGINT

Health ("" and every registered service) and reflection are always registered. On SIGTERM/SIGINT health flips to
NOT_SERVING, the server stops accepting and gives in-flight RPCs ``grace_period_s``, then dependencies close. A
second server in the same process (the router's HTTP front door) joins with ``host.add_server(server)``: it starts
once the gRPC port is bound and stops together with the gRPC server, within the same grace period, before any
dependency closes.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import structlog
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth_grpc import server_interceptors
from services.common.exposure import EX_CONFIG, InsecureBind, Listener, require_secure_listeners
from services.common.interceptors import ErrorInterceptor, LogContextInterceptor
from services.common.rpc_telemetry import ServerSpanInterceptor
from services.common.settings import ServiceSettings
from services.common.telemetry import Telemetry

log = structlog.get_logger("costmesh.server")

Closer = Callable[[], Awaitable[None] | None]


class AuxServer(Protocol):
    """A second server in the same process and event loop (the router's HTTP front door): bound right after the gRPC
    server, and stopped with it — both stop accepting at once and share the grace period."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """mTLS credentials when a certificate, key and CA are configured (client certificates required)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    ca = settings.tls_ca_file.read_bytes() if settings.tls_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class ServiceHost:
    """One gRPC server process: the services it hosts, its health, and its orderly shutdown."""

    def __init__(
        self,
        *,
        name: str,
        settings: ServiceSettings,
        telemetry: Telemetry | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.settings = settings
        self.telemetry = telemetry
        chain: list[grpc.aio.ServerInterceptor] = []
        if telemetry is not None and telemetry.tracing_enabled:
            chain.append(ServerSpanInterceptor(telemetry.tracer("costmesh.rpc")))
        auth = server_interceptors(settings.auth, domain=f"costmesh.{name}")
        chain += [LogContextInterceptor(), *auth, *interceptors, ErrorInterceptor(domain=f"costmesh.{name}")]
        self.server = grpc.aio.server(
            interceptors=chain,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._closers: list[Closer] = []
        self._aux: list[AuxServer] = []
        self._stop = asyncio.Event()
        self.port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None

    def add_service(self, full_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Register a servicer (``register(server)``) under its full proto name for health and reflection."""
        register(self.server)
        self._service_names.append(full_name)

    def add_server(self, server: AuxServer) -> None:
        """Run ``server`` beside the gRPC server: started after it binds, stopped with it (same grace period),
        before any closer runs."""
        self._aux.append(server)

    def on_stop(self, closer: Closer) -> None:
        """Run ``closer`` at shutdown, after the server stopped; closers run in reverse registration order."""
        self._closers.append(closer)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *self._service_names):
            await self.health.set(service, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> int:
        """Bind and start serving RPCs (health reports NOT_SERVING until ``set_serving(True)``)."""
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        await self.set_serving(False)
        address = f"{self.settings.host}:{self.settings.port}"
        creds = server_credentials(self.settings)
        port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"could not bind {address}")
        self.port = port
        await self.server.start()
        for aux in self._aux:
            await aux.start()
        if self.settings.health_port is not None:  # plaintext, health only: kubelet probes beside mTLS
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            health_address = f"{self.settings.host}:{self.settings.health_port}"
            self.health_port = self._health_server.add_insecure_port(health_address)
            await self._health_server.start()
        log.info("server_started", host=self.settings.host, port=port, services=self._service_names, tls=bool(creds))
        return port

    async def stop(self) -> None:
        await self.set_serving(False)
        await self.health.enter_graceful_shutdown()
        log.info("server_stopping", grace_period_s=self.settings.grace_period_s)
        grace = self.settings.grace_period_s
        await asyncio.gather(self.server.stop(grace), *(aux.stop(grace) for aux in self._aux))
        if self._health_server is not None:
            await self._health_server.stop(None)
        for closer in reversed(self._closers):
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # keep closing the rest
                log.exception("close_failed", closer=getattr(closer, "__qualname__", repr(closer)))
        if self.telemetry is not None:
            self.telemetry.shutdown()
        log.info("server_stopped")

    async def run(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start, become SERVING once ``ready`` returns, and stop cleanly on SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            if ready is not None:
                readiness = asyncio.ensure_future(ready())
                stop_wait = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({readiness, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                if not readiness.done():
                    readiness.cancel()
                else:
                    readiness.result()
            if not self._stop.is_set():
                await self.set_serving(True)
                log.info("serving")
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


def full_service_name(descriptor_module: Any, service: str) -> str:
    """``costmesh.budget.v1.BudgetService`` from a ``*_pb2`` module and a service name."""
    return str(descriptor_module.DESCRIPTOR.services_by_name[service].full_name)


def make_host(
    name: str,
    settings: ServiceSettings,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    listeners: Sequence[Listener] = (),
) -> ServiceHost:
    """Configure logging and telemetry for this process and return its ``ServiceHost``.

    Call once, from a service's composition root (``services/<svc>/__main__.py``). Before anything binds, every
    listener of ``settings`` — and the service's other ``listeners`` (the router's HTTP port) — must pass
    :mod:`services.common.exposure` (no open port beyond loopback): otherwise the process logs
    ``insecure_listener_refused`` naming the settings to set, and exits with status 78 (``EX_CONFIG``).
    """
    from services.common.logging import configure_logging
    from services.common.telemetry import setup_telemetry

    configure_logging(service=name, level=settings.log_level, fmt=settings.log_format)
    try:
        require_secure_listeners(settings, listeners)
    except InsecureBind as err:
        log.error("insecure_listener_refused", error=str(err))
        raise SystemExit(EX_CONFIG) from None
    telemetry = setup_telemetry(
        service=name,
        otlp_endpoint=settings.otlp_endpoint,
        sample_ratio=settings.trace_sample_ratio,
        metrics_port=settings.metrics_port,
        metrics_host=settings.host,
    )
    return ServiceHost(name=name, settings=settings, telemetry=telemetry, interceptors=interceptors)
