"""An inference worker's metrics and span attributes.

Two kinds of instruments, built by the composition root from the process ``MeterProvider``:

* observable gauges and counters that read the worker's :class:`~services.infer.stats.InferStats` at each scrape:
  queue depth and capacity per class (``costmesh.infer.interactive_queue_depth`` is what KEDA scales the workers
  on), requests in the engine, durable jobs, admissions and outcomes, the engine's own gauges, serving or not;
* per generation, recorded by :class:`~services.infer.service.InferenceService` through :meth:`InferMetrics.generation`
  when a generation finishes (interactive streams and durable jobs alike): time to first token, time per output
  token and duration histograms (OpenTelemetry GenAI server metrics), tokens and cost by tenant/team/feature.

Every metric carries ``tier`` and ``model`` labels. :meth:`InferMetrics.generation` also annotates the current span
(the ``Generate`` server span, or a job's span) with the GenAI and ``costmesh.*`` attributes and a
``gen_ai.first_token`` event stamped at the moment the first token came out. Names and units are documented in
docs/telemetry.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import metrics, trace

from services.common import semconv as sc
from services.common.spans import annotate, attribution_attributes, link_to, with_baggage
from services.infer.domain import GenerationRequest, GenerationSummary, QueueClass
from services.infer.jobs.store import Job
from services.infer.stats import InferStats

#: Bucket bounds (seconds) — the GenAI semantic conventions' advisory buckets, extended for CPU engines.
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
TPOT_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
    163.84,
)

Read = Callable[[InferStats], Iterable[tuple[float, dict[str, str]]]]


def _per_class(value: Callable[[InferStats, QueueClass], float]) -> Read:
    def read(stats: InferStats) -> Iterable[tuple[float, dict[str, str]]]:
        return [(value(stats, cls), {"queue_class": cls.value}) for cls in QueueClass]

    return read


def _requests(stats: InferStats) -> Iterable[tuple[float, dict[str, str]]]:
    for cls, s in stats.classes.items():
        for outcome, n in (
            ("admitted", s.admitted_total),
            ("rejected", s.rejected_total),
            ("finished", s.finished_total),
            ("stopped", s.stopped_total),
            ("aborted", s.aborted_total),
            ("failed", s.failed_total),
        ):
            yield n, {"queue_class": cls.value, "outcome": outcome}


class InferMetrics:
    def __init__(
        self,
        meter: metrics.Meter | None = None,
        *,
        stats: InferStats | None = None,
        tier: str = "",
        model: str = "",
        capacity: Mapping[QueueClass, int] | None = None,
    ) -> None:
        meter = meter or metrics.NoOpMeter("costmesh.infer")
        self._base = {"tier": tier, "model": model}
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time from arrival at the worker to the first generated token (queueing included)",
            explicit_bucket_boundaries_advisory=list(TTFT_BUCKETS_S),
        )
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first (decode speed seen by one request)",
            explicit_bucket_boundaries_advisory=list(TPOT_BUCKETS_S),
        )
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Time from arrival at the worker to the last token",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS_S),
        )
        self._tokens = meter.create_counter(
            "costmesh.infer.tokens",
            unit="{token}",
            description="Tokens of every generation (prompt once it reached the engine, every output token), by type "
            "and outcome",
        )
        self._cost = meter.create_counter(
            "costmesh.infer.cost.micros",
            unit="{microUSD}",
            description="Cost of every generation's tokens at this worker's price, micro-USD, by outcome",
        )
        if stats is None:
            return
        caps = dict(capacity or {})
        gauges: list[tuple[str, str, str, Read]] = [
            (
                "costmesh.infer.queue_depth",
                "{request}",
                "Requests waiting to start, per class (async: waiting streams plus queued durable jobs)",
                _per_class(lambda s, c: s.queue_depth(c)),
            ),
            (
                "costmesh.infer.interactive_queue_depth",
                "{request}",
                "Interactive requests waiting for an engine slot (the KEDA scaling signal)",
                lambda s: [(s.queue_depth(QueueClass.INTERACTIVE), {})],
            ),
            (
                "costmesh.infer.queue_capacity",
                "{request}",
                "How many requests of a class may wait before RESOURCE_EXHAUSTED",
                lambda _s: [(caps[c], {"queue_class": c.value}) for c in QueueClass if c in caps],
            ),
            (
                "costmesh.infer.in_engine",
                "{request}",
                "Requests admitted to the engine and not finished, per class",
                _per_class(lambda s, c: s.classes[c].in_engine),
            ),
            (
                "costmesh.infer.jobs",
                "{job}",
                "Durable async jobs queued (all workers of this queue) and running on this worker",
                lambda s: [(s.jobs_queued, {"state": "queued"}), (s.jobs_running, {"state": "running"})],
            ),
            (
                "costmesh.infer.engine.requests",
                "{request}",
                "Requests the vLLM scheduler reports running and waiting",
                lambda s: [(s.engine.running, {"state": "running"}), (s.engine.waiting, {"state": "waiting"})],
            ),
            (
                "costmesh.infer.engine.kv_cache_usage",
                "1",
                "Share of the KV cache in use (0-1)",
                lambda s: [(s.engine.kv_cache_usage, {})],
            ),
            (
                "costmesh.infer.serving",
                "1",
                "1 while the worker serves (engine warm and alive), else 0",
                lambda s: [(float(s.serving), {})],
            ),
        ]
        counters: list[tuple[str, str, str, Read]] = [
            ("costmesh.infer.requests", "{request}", "Requests by class and outcome", _requests),
            (
                "costmesh.infer.job_events",
                "{job}",
                "Durable job outcomes and takeovers on this worker",
                lambda s: [
                    (s.jobs_succeeded_total, {"event": "succeeded"}),
                    (s.jobs_failed_total, {"event": "failed"}),
                    (s.jobs_reclaimed_total, {"event": "reclaimed"}),
                    (s.jobs_fenced_total, {"event": "fenced"}),
                ],
            ),
            (
                "costmesh.infer.prefix_cache.tokens",
                "{token}",
                "Prompt tokens looked up in vLLM's prefix cache, and of those found",
                lambda s: [
                    (s.engine.prefix_cache_queries, {"result": "queried"}),
                    (s.engine.prefix_cache_hits, {"result": "hit"}),
                ],
            ),
        ]
        for name, unit, description, read in gauges:
            meter.create_observable_gauge(
                name, callbacks=[self._callback(stats, read)], unit=unit, description=description
            )
        for name, unit, description, read in counters:
            meter.create_observable_counter(
                name, callbacks=[self._callback(stats, read)], unit=unit, description=description
            )

    def _callback(self, stats: InferStats, read: Read) -> metrics.CallbackT:
        def callback(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            for value, labels in read(stats):
                yield metrics.Observation(value, {**self._base, **labels})

        return callback

    def generation(
        self,
        request: GenerationRequest,
        queue_class: QueueClass,
        *,
        max_tokens: int,
        summary: GenerationSummary,
        cost_micros: int,
        outcome: str = "finished",
    ) -> None:
        """One ended generation, whatever its ``outcome`` (finished, stopped, cancelled, failed): histograms, tokens and
        cost; attributes and the first-token event on the span."""
        operation = "chat" if request.messages else "text_completion"
        dims = {**self._base, "queue_class": queue_class.value}
        timing = {**dims, sc.GEN_AI_OPERATION_NAME: operation, sc.GEN_AI_REQUEST_MODEL: summary.model}
        ttft_s = summary.time_to_first_token_ms / 1000
        decode_s = max(0.0, summary.latency_ms - summary.time_to_first_token_ms) / 1000
        u = summary.usage
        if outcome == "finished":  # timing of whole generations only (a stopped or cancelled one ends early)
            if u.output_tokens > 0:
                self._ttft.record(ttft_s, timing)
            if u.output_tokens > 1:
                self._tpot.record(decode_s / (u.output_tokens - 1), timing)
            self._duration.record(summary.latency_ms / 1000, timing)
        who = with_baggage(request.attribution)
        spend = {**dims, "tenant": who.tenant, "team": who.team, "feature": who.feature, "outcome": outcome}
        for kind, n in (
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cached_input", u.cached_input_tokens),
        ):
            if n:
                self._tokens.add(n, {**spend, "type": kind})
        self._cost.add(cost_micros, spend)
        span = trace.get_current_span()
        if not span.is_recording():
            return
        annotate(
            {
                **attribution_attributes(who),
                sc.REQUEST_ID: request.request_id,
                sc.GEN_AI_OPERATION_NAME: operation,
                sc.GEN_AI_SYSTEM: "vllm",
                sc.GEN_AI_REQUEST_MODEL: summary.model,
                sc.GEN_AI_RESPONSE_MODEL: summary.model,
                sc.GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
                sc.GEN_AI_USAGE_INPUT_TOKENS: u.input_tokens,
                sc.GEN_AI_USAGE_OUTPUT_TOKENS: u.output_tokens,
                sc.CACHED_INPUT_TOKENS: u.cached_input_tokens,
                sc.GEN_AI_RESPONSE_FINISH_REASONS: [summary.finish_reason.value],
                sc.COST_MICROS: cost_micros,
                sc.TIER: summary.tier,
                sc.QUEUE_CLASS: queue_class.value,
            },
            span,
        )
        if u.output_tokens > 0:
            # Recorded now, stamped when the first token came out (the summary measures both from arrival).
            first_token_ns = time.time_ns() - int(decode_s * 1e9)
            span.add_event(sc.EVENT_FIRST_TOKEN, {sc.TTFT_MS: summary.time_to_first_token_ms}, timestamp=first_token_ns)


def annotate_submission(request: GenerationRequest, job_id: str) -> None:
    """Attributes of the ``SubmitJob`` span: which request became which job, and for whom."""
    annotate(
        {
            **attribution_attributes(with_baggage(request.attribution)),
            sc.REQUEST_ID: request.request_id,
            sc.JOB_ID: job_id,
            sc.QUEUE_CLASS: QueueClass.ASYNC.value,
        }
    )


@contextmanager
def job_span(job: Job) -> Iterator[trace.Span]:
    """The span a worker runs one durable job in: a new trace, linked to the call that submitted the job.

    The submitting call's ``traceparent`` travels inside the job's payload (``GenerationRequest.trace_context``);
    a payload without one (or one that does not parse) gives a span without a link.
    """
    try:
        traceparent = str(json.loads(job.payload).get("trace_context") or "")
    except (ValueError, AttributeError):
        traceparent = ""
    tracer = trace.get_tracer("costmesh.infer.jobs")
    with tracer.start_as_current_span(
        "costmesh.infer.job",
        context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: the submitter's trace ended long ago
        kind=trace.SpanKind.CONSUMER,
        links=link_to(traceparent),
        attributes={sc.JOB_ID: job.job_id, sc.JOB_ATTEMPT: job.attempts, sc.TENANT: job.tenant},
    ) as span:
        yield span
