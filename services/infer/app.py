"""Wiring of one worker from its settings and its dependencies (used by ``__main__`` and by the integration tests)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from opentelemetry import metrics

from services.infer.config import InferSettings
from services.infer.domain import ModelCard, QueueClass
from services.infer.engine import Engine
from services.infer.jobs.runner import JobRunner, RunnerSettings
from services.infer.jobs.store import JobStore
from services.infer.metrics import InferMetrics
from services.infer.scheduler import Admission, AdmissionLimits
from services.infer.server import InferenceServicer
from services.infer.service import InferenceService, ServiceLimits
from services.infer.stats import InferStats


@dataclass
class InferWorker:
    settings: InferSettings
    engine: Engine
    stats: InferStats
    admission: Admission
    service: InferenceService
    store: JobStore
    runner: JobRunner
    servicer: InferenceServicer


def admission_limits(settings: InferSettings) -> AdmissionLimits:
    return AdmissionLimits(
        max_num_seqs=settings.max_num_seqs,
        interactive_slots=settings.interactive_slots,
        interactive_max_waiting=settings.interactive_max_waiting,
        interactive_max_wait_s=settings.interactive_max_wait_s,
        async_slots=settings.async_slots,
        async_concurrency=settings.async_concurrency,
        async_max_waiting=settings.async_queue_capacity,
        async_max_wait_s=settings.async_max_wait_s,
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def build_store(settings: InferSettings) -> JobStore:
    if settings.job_store == "redis":
        from services.infer.jobs.redis import RedisJobStore

        return RedisJobStore.from_url(
            settings.redis_url,
            queue=settings.queue_name,
            lease_s=settings.job_lease_s,
            result_ttl_s=settings.job_result_ttl_s,
        )
    from services.infer.jobs.sqlite import SqliteJobStore

    return SqliteJobStore(settings.sqlite_file, lease_s=settings.job_lease_s, result_ttl_s=settings.job_result_ttl_s)


def build_worker(
    settings: InferSettings, *, engine: Engine, store: JobStore, meter: metrics.Meter | None = None
) -> InferWorker:
    stats = InferStats(engine=engine.gauges)
    worker_metrics = InferMetrics(
        meter,
        stats=stats,
        tier=settings.tier,
        model=settings.model_name,
        capacity={
            QueueClass.INTERACTIVE: settings.interactive_max_waiting,
            QueueClass.ASYNC: settings.async_queue_capacity,
        },
    )
    admission = Admission(admission_limits(settings), stats)
    price = settings.prices.price_for(tier=settings.tier, model=settings.model_name)
    card = ModelCard(
        name=settings.model_name,
        tier=settings.tier,
        input_micros_per_mtok=price.input_micros_per_mtok,
        output_micros_per_mtok=price.output_micros_per_mtok,
        cached_input_micros_per_mtok=price.cached_input_micros_per_mtok,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        interactive_capacity=settings.interactive_slots,
        async_queue_capacity=settings.async_queue_capacity,
        interactive_reserve=settings.interactive_reserve,
        prefix_caching=settings.enable_prefix_caching,
        max_output_tokens=settings.max_output_tokens,
    )
    limits = ServiceLimits(
        tier=settings.tier,
        model=settings.model_name,
        max_model_len=settings.max_model_len,
        max_output_tokens=settings.max_output_tokens,
        default_max_tokens=settings.default_max_tokens,
        max_prompt_chars=settings.max_prompt_chars,
        interactive_priority=settings.interactive_priority,
        async_priority=settings.async_priority,
        prefix_cache_per_tenant=settings.prefix_cache_per_tenant,
    )
    service = InferenceService(
        engine=engine, admission=admission, limits=limits, price=price, card=card, metrics=worker_metrics
    )
    runner = JobRunner(
        store=store,
        service=service,
        settings=RunnerSettings(
            worker_id=settings.worker_id or default_worker_id(),
            max_attempts=settings.job_max_attempts,
            poll_s=settings.job_poll_s,
            queue_capacity=settings.async_queue_capacity,
            max_wait_s=settings.async_max_wait_s,
            max_run_s=settings.job_max_run_s,
        ),
    )
    servicer = InferenceServicer(service=service, jobs=runner)
    return InferWorker(settings, engine, stats, admission, service, store, runner, servicer)
