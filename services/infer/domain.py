"""Domain types of the inference worker (no gRPC): requests, stream events, summaries."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from services.common.attribution import Attribution
from services.common.pricing import TokenUsage


class QueueClass(StrEnum):
    INTERACTIVE = "interactive"
    ASYNC = "async"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int = 0  # 0 = the worker's default
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation as the domain sees it (from ``Generate`` or from a durable job)."""

    request_id: str
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    queue_class: QueueClass = QueueClass.INTERACTIVE
    attribution: Attribution = field(default_factory=Attribution)
    tier: str = ""  # "" = whatever this worker serves
    # W3C traceparent of the call that submitted a durable job: the job's span links back to it.
    trace_context: str = ""

    def to_json(self) -> str:
        """Serialized for the durable job store."""
        data = asdict(self)
        data["queue_class"] = self.queue_class.value
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> GenerationRequest:
        data: dict[str, Any] = json.loads(raw)
        s = data.get("sampling") or {}
        return cls(
            request_id=str(data["request_id"]),
            messages=tuple(Message(**m) for m in data.get("messages") or ()),
            prompt=str(data.get("prompt") or ""),
            sampling=Sampling(
                max_tokens=int(s.get("max_tokens") or 0),
                temperature=s.get("temperature"),
                top_p=s.get("top_p"),
                stop=tuple(s.get("stop") or ()),
                seed=s.get("seed"),
                ignore_eos=bool(s.get("ignore_eos")),
            ),
            queue_class=QueueClass(data.get("queue_class") or QueueClass.ASYNC.value),
            attribution=Attribution(**(data.get("attribution") or {})),
            tier=str(data.get("tier") or ""),
            trace_context=str(data.get("trace_context") or ""),
        )


@dataclass(frozen=True, slots=True)
class GenerationSummary:
    usage: TokenUsage
    finish_reason: FinishReason
    time_to_first_token_ms: float
    latency_ms: float
    model: str
    tier: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens,
            "cached_input_tokens": self.usage.cached_input_tokens,
            "finish_reason": self.finish_reason.value,
            "time_to_first_token_ms": self.time_to_first_token_ms,
            "latency_ms": self.latency_ms,
            "model": self.model,
            "tier": self.tier,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSummary:
        return cls(
            usage=TokenUsage(
                input_tokens=int(data["input_tokens"]),
                output_tokens=int(data["output_tokens"]),
                cached_input_tokens=int(data["cached_input_tokens"]),
            ),
            finish_reason=FinishReason(data["finish_reason"]),
            time_to_first_token_ms=float(data["time_to_first_token_ms"]),
            latency_ms=float(data["latency_ms"]),
            model=str(data["model"]),
            tier=str(data["tier"]),
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text produced since the previous event."""

    text: str
    token_count: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a generation."""

    text: str  # any text not yet sent
    token_count: int
    summary: GenerationSummary


GenerationEvent = TextDelta | Finished


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What ``ListModels`` reports."""

    name: str
    tier: str
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    cached_input_micros_per_mtok: int
    max_model_len: int
    max_num_seqs: int
    interactive_capacity: int
    async_queue_capacity: int
    interactive_reserve: int
    prefix_caching: bool
    max_output_tokens: int
