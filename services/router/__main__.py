"""Composition root of the router: ``python -m services.router`` (or ``costmesh serve router``).

Builds the channels to cache, budget and each worker tier, the tokenizers, the classifier and policy, the pipeline,
and its two front doors — the gRPC servicer and the OpenAI-compatible HTTP server (``services/router/http.py``), one
pipeline and one per-tenant limiter behind both — then runs until SIGTERM/SIGINT. On shutdown both doors stop
accepting at once and share the grace period; then background fills and savings records are drained before the
channels close.
"""

from __future__ import annotations

import asyncio

import grpc

from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.auth import Authenticator
from services.common.auth_grpc import bearer_interceptors
from services.common.channels import channel_credentials, create_channel
from services.common.exposure import Listener
from services.common.http_telemetry import HttpMetrics
from services.common.rpc_telemetry import (
    AttributionBaggageInterceptor,
    RpcMetricsInterceptor,
    client_interceptors,
    host_meter,
)
from services.common.server import full_service_name, make_host
from services.router.classifier.types import Tier
from services.router.clients import GrpcBudget, GrpcCache, GrpcInfer
from services.router.config import RouterSettings
from services.router.decider import build_decider
from services.router.http import FrontDoor, HttpFront, build_app
from services.router.limits import TenantLimiter
from services.router.metrics import RouterMetrics
from services.router.pipeline import Pipeline, PipelineLimits
from services.router.savings import SavingsBatcher, SavingsSettings
from services.router.server import RouterServicer
from services.router.tokens import TierTokenizers


async def serve(settings: RouterSettings) -> None:
    rpc_metrics = RpcMetricsInterceptor()
    http = settings.http
    http_host = http.host if http.host is not None else settings.host
    # The HTTP port passes the same bind check as the gRPC one (API keys beyond loopback; it asks no client certs).
    listeners = [Listener(http_host, f"HTTP port {http.port}")] if http.enabled else []
    # Baggage first: tenant/team/feature of each request travel to cache, budget and infer with every call.
    host = make_host(
        "router", settings, interceptors=[AttributionBaggageInterceptor(), rpc_metrics], listeners=listeners
    )
    meter = host_meter(host, "costmesh.router")
    rpc_metrics.bind(meter)
    creds = channel_credentials(
        ca_file=settings.tls_ca_file, cert_file=settings.tls_cert_file, key_file=settings.tls_key_file
    )
    # Every call carries W3C trace context and baggage (tenant/team/feature), traced or not; traced, in a CLIENT span.
    tracing = host.telemetry if host.telemetry and host.telemetry.tracing_enabled else None
    tracer = tracing.tracer("costmesh.rpc") if tracing else None
    interceptors = client_interceptors(tracer)
    interceptors += bearer_interceptors(settings.auth.outgoing_key())  # the router's service key, when set

    def channel(target: str, timeout_s: float) -> grpc.aio.Channel:
        ch = create_channel(
            target,
            timeout_s=timeout_s,
            credentials=creds,
            interceptors=interceptors,
            max_message_bytes=settings.max_message_bytes,
        )
        host.on_stop(ch.close)
        return ch

    tiers = {Tier.parse(name): target for name, target in settings.infer_targets.items()}
    cache = (
        GrpcCache(
            # The service-config timeout caps every call's deadline: leave room for the coalescing wait.
            channel(settings.cache_target, settings.cache_timeout_s + settings.cache_wait_ms / 1000),
            timeout_s=settings.cache_timeout_s,
            wait_ms=settings.cache_wait_ms,
        )
        if settings.cache_target
        else None
    )
    budget = GrpcBudget(
        channel(settings.budget_target, settings.budget_timeout_s),
        timeout_s=settings.budget_timeout_s,
        ttl_s=settings.reservation_ttl_s,
    )
    infer = GrpcInfer(
        # the channel's own cap leaves room for the stop of a generation whose caller's deadline passed
        {tier: channel(target, settings.infer_timeout_s + settings.stop_timeout_s) for tier, target in tiers.items()},
        timeout_s=settings.infer_timeout_s,
        job_timeout_s=settings.job_timeout_s,
        stop_grace_s=settings.stop_timeout_s,
    )
    tokens = await asyncio.to_thread(
        TierTokenizers, {Tier.parse(name): path for name, path in settings.tokenizer_dirs.items()}
    )
    models = {Tier.parse(name): model for name, model in settings.models.items()}
    pipeline = Pipeline(
        decider=build_decider(settings),
        cache=cache,
        budget=budget,
        infer=infer,
        jobs=infer,
        tokens=tokens,
        prices=settings.prices,
        models=models,
        limits=PipelineLimits(
            max_messages=settings.max_messages,
            max_total_chars=settings.max_total_chars,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            fail_open_budget=settings.fail_open_budget,
            reservation_ttl_s=settings.reservation_ttl_s,
            async_reservation_ttl_s=settings.async_reservation_ttl_s,
            async_settle_every_s=settings.async_settle_every_s,
            job_reconcile_delay_s=settings.job_timeout_s + 2.0,
            stop_timeout_s=settings.stop_timeout_s,
        ),
        metrics=RouterMetrics(meter),
        savings=SavingsBatcher(
            budget,
            SavingsSettings(flush_s=settings.savings_flush_s, max_batch=settings.savings_max_batch),
            tracer=tracing.tracer("costmesh.router.savings") if tracing else None,
        ),
    )
    pipeline.start()  # this router's share of settling async jobs from the job stores
    host.on_stop(pipeline.drain)  # registered last: runs first, while the channels are still open
    limiter = TenantLimiter(settings.limits)  # one per process: a tenant's slots count across both doors
    servicer = RouterServicer(pipeline=pipeline, limiter=limiter)
    host.add_service(
        full_service_name(router_pb2, "RouterService"),
        lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
    )
    if http.enabled:
        door = FrontDoor(
            pipeline=pipeline,
            models=models,
            settings=http,
            limiter=limiter,
            authenticator=Authenticator(settings.auth.all_keys()) if settings.auth.enabled else None,
        )
        app = build_app(door, metrics=HttpMetrics(meter), tracer=tracing.tracer("costmesh.http") if tracing else None)
        host.add_server(HttpFront(app, host=http_host, port=http.port))
    await host.run()


def main() -> None:
    asyncio.run(serve(RouterSettings()))


if __name__ == "__main__":
    main()
