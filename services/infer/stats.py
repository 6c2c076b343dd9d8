"""Plain counters and gauges of one worker, for autoscaling and dashboards (the telemetry layer exports them).

Queue depth per class, requests in the engine per class, the engine's own running/waiting counts and KV usage,
time-to-first-token histograms and output tokens per second over a sliding window.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.infer.domain import QueueClass
from services.infer.engine import EngineGauges

#: Upper bounds (seconds) of the TTFT histogram buckets; the last bucket is +Inf.
TTFT_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = TTFT_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (inf when it lies beyond the last bound)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")


@dataclass
class RateWindow:
    """Events per second over the last ``window_s`` seconds."""

    window_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _events: deque[tuple[float, int]] = field(default_factory=deque)
    _sum: int = 0

    def add(self, n: int) -> None:
        now = self.clock()
        self._events.append((now, n))
        self._sum += n
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            _, n = self._events.popleft()
            self._sum -= n

    def rate(self) -> float:
        self._trim(self.clock())
        return self._sum / self.window_s


@dataclass
class ClassStats:
    waiting: int = 0  # gauge: waiting for an engine slot in this worker
    in_engine: int = 0  # gauge: admitted to the engine, not finished
    admitted_total: int = 0
    rejected_total: int = 0  # RESOURCE_EXHAUSTED (queue full or waited too long)
    finished_total: int = 0  # ended by the engine (stop sequence, EOS, max_tokens), summary sent
    stopped_total: int = 0  # ended early by a stop signal (summary sent, finish reason ABORT)
    aborted_total: int = 0  # cancelled by the client, its deadline or a lost connection (no summary)
    failed_total: int = 0
    ttft_s: Histogram = field(default_factory=Histogram)


@dataclass
class InferStats:
    classes: dict[QueueClass, ClassStats] = field(default_factory=lambda: {c: ClassStats() for c in QueueClass})
    jobs_queued: int = 0  # gauge: durable jobs waiting in the store (all workers of this queue)
    jobs_running: int = 0  # gauge: durable jobs this worker runs now
    jobs_succeeded_total: int = 0
    jobs_failed_total: int = 0
    jobs_reclaimed_total: int = 0  # claims of a job another worker had started
    jobs_fenced_total: int = 0  # completions refused because another worker owns the job now
    # Every token of every generation, whatever its outcome (finished, stopped, cancelled, failed): every output token
    # the engine produced, the prompt once the request reached the engine (services/infer/service.py _Tally.usage).
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    output_tokens_total: int = 0
    output_tokens: RateWindow = field(default_factory=RateWindow)
    engine: EngineGauges = field(default_factory=EngineGauges)
    serving: bool = False

    def queue_depth(self, cls: QueueClass) -> int:
        """Requests of this class waiting to start (async: waiting streams plus queued durable jobs)."""
        depth = self.classes[cls].waiting
        if cls is QueueClass.ASYNC:
            depth += self.jobs_queued
        return depth

    def snapshot(self) -> dict[str, float]:
        """Flat name → value view (for logs, the benchmark and the metrics exporter)."""
        out: dict[str, float] = {
            "engine_running": self.engine.running,
            "engine_waiting": self.engine.waiting,
            "engine_kv_cache_usage": self.engine.kv_cache_usage,
            "jobs_queued": self.jobs_queued,
            "jobs_running": self.jobs_running,
            "jobs_succeeded_total": self.jobs_succeeded_total,
            "jobs_failed_total": self.jobs_failed_total,
            "jobs_reclaimed_total": self.jobs_reclaimed_total,
            "jobs_fenced_total": self.jobs_fenced_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "cached_prompt_tokens_total": self.cached_prompt_tokens_total,
            "output_tokens_total": self.output_tokens_total,
            "output_tokens_per_s": self.output_tokens.rate(),
            "serving": float(self.serving),
        }
        for cls, s in self.classes.items():
            p = cls.value
            out[f"{p}_queue_depth"] = self.queue_depth(cls)
            out[f"{p}_in_engine"] = s.in_engine
            out[f"{p}_admitted_total"] = s.admitted_total
            out[f"{p}_rejected_total"] = s.rejected_total
            out[f"{p}_finished_total"] = s.finished_total
            out[f"{p}_stopped_total"] = s.stopped_total
            out[f"{p}_aborted_total"] = s.aborted_total
            out[f"{p}_failed_total"] = s.failed_total
            out[f"{p}_ttft_count"] = s.ttft_s.count
            out[f"{p}_ttft_sum_s"] = s.ttft_s.total
        return out
