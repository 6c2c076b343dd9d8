"""The inference worker's domain: validate, tokenize, admit, stream from the engine, account (no gRPC here).

``InferenceService.generate`` is the one path every generation takes — interactive ``Generate`` calls, async
``Generate`` calls and durable jobs alike — so validation, usage (with prefix-cache hits), TTFT and the abort on an
early stop are the same for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import structlog

from services.common.errors import FieldViolation, InvalidArgument, Unavailable, Validator
from services.common.pricing import Price, TokenUsage
from services.infer.domain import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    GenerationSummary,
    ModelCard,
    QueueClass,
    TextDelta,
)
from services.infer.engine import Engine, EngineDead, EngineRejected, EngineRequest
from services.infer.scheduler import Admission, Slot

if TYPE_CHECKING:
    from services.infer.metrics import InferMetrics

log = structlog.get_logger("costmesh.infer")

ROLES = frozenset({"system", "user", "assistant", "tool"})
_TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64
#: Prompts longer than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 8_000


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    tier: str
    model: str
    max_model_len: int
    max_output_tokens: int
    default_max_tokens: int
    max_prompt_chars: int
    interactive_priority: int = 0
    async_priority: int = 1
    prefix_cache_per_tenant: bool = True


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request with its prompt tokens and the max_tokens it will run with."""

    request: GenerationRequest
    prompt_token_ids: list[int]
    max_tokens: int


class InferenceService:
    def __init__(
        self,
        *,
        engine: Engine,
        admission: Admission,
        limits: ServiceLimits,
        price: Price,
        card: ModelCard,
        clock: Callable[[], float] = time.monotonic,
        metrics: InferMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._admission = admission
        self._limits = limits
        self._price = price
        self._card = card
        self._clock = clock
        self.stats = admission.stats
        self._metrics = metrics

    @property
    def limits(self) -> ServiceLimits:
        return self._limits

    @property
    def admission(self) -> Admission:
        return self._admission

    def model_card(self) -> ModelCard:
        return self._card

    def cost_micros(self, usage: TokenUsage) -> int:
        return self._price.cost_micros(usage)

    @property
    def engine_dead(self) -> bool:
        return self._engine.is_dead

    def ensure_alive(self) -> None:
        if self._engine.is_dead:
            raise Unavailable("the inference engine is not running", reason="ENGINE_DEAD", retry_after_s=1.0)
        if not self._engine.is_ready:
            raise Unavailable("the inference engine is still starting", reason="ENGINE_STARTING", retry_after_s=5.0)

    # --- validation ---

    def validate(self, req: GenerationRequest) -> None:
        """Everything that can be checked before tokenizing; raises InvalidArgument listing every bad field."""
        lim = self._limits
        v = Validator()
        v.require(1 <= len(req.request_id) <= 128, "request_id", "must be 1-128 characters")
        if req.tier and req.tier != lim.tier:
            v.add("tier", f"this worker serves tier '{lim.tier}', not '{req.tier}'", "WRONG_TIER")
        if req.messages and req.prompt:
            v.add("prompt", "set either messages or prompt, not both")
        elif not req.messages and not req.prompt.strip():
            v.add("messages" if not req.prompt else "prompt", "a non-empty prompt or messages is required", "EMPTY")
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                v.add(f"messages[{i}].role", f"must be one of {sorted(ROLES)}")
            if m.role == "user" and not m.content.strip():
                v.add(f"messages[{i}].content", "user turns need content", "EMPTY")
        chars = len(req.prompt) + sum(len(m.content) for m in req.messages)
        if chars > lim.max_prompt_chars:
            v.add("prompt", f"{chars} characters; at most {lim.max_prompt_chars}", "PROMPT_TOO_LONG")
        s = req.sampling
        if s.max_tokens < 0 or s.max_tokens > lim.max_output_tokens:
            v.add(
                "sampling.max_tokens", f"must be 0-{lim.max_output_tokens} (max_output_tokens)", "MAX_TOKENS_TOO_LARGE"
            )
        if s.temperature is not None and not 0.0 <= s.temperature <= 2.0:
            v.add("sampling.temperature", "must be in [0, 2]")
        if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
            v.add("sampling.top_p", "must be in (0, 1]")
        if len(s.stop) > MAX_STOP_SEQUENCES or any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
            v.add(
                "sampling.stop", f"at most {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_CHARS} chars"
            )
        tenant = req.attribution.tenant
        if tenant and not _TENANT_RE.match(tenant):
            v.add("attribution.tenant", "1-64 characters of [A-Za-z0-9._-]")
        v.raise_if_any("invalid generation request")

    def _tokenize(self, req: GenerationRequest) -> list[int]:
        if req.messages:
            return self._engine.render_chat(req.messages)
        return self._engine.tokenize(req.prompt)

    async def prepare(self, req: GenerationRequest) -> Prepared:
        """Validate, tokenize (off the loop when long) and check the token limits."""
        self.validate(req)
        chars = len(req.prompt) + sum(len(m.content) for m in req.messages)
        ids = self._tokenize(req) if chars <= _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(self._tokenize, req)
        lim = self._limits
        field_name = "messages" if req.messages else "prompt"
        room = lim.max_model_len - len(ids)
        if room < 1:
            raise InvalidArgument(
                "prompt too long",
                violations=[
                    FieldViolation(
                        field_name,
                        f"{len(ids)} tokens; the model takes at most {lim.max_model_len - 1} prompt tokens "
                        f"(max_model_len {lim.max_model_len})",
                        "PROMPT_TOO_LONG",
                    )
                ],
            )
        wanted = req.sampling.max_tokens
        if wanted == 0:
            max_tokens = min(lim.default_max_tokens, room)
        elif wanted > room:
            raise InvalidArgument(
                "prompt + max_tokens exceed the model length",
                violations=[
                    FieldViolation(
                        "sampling.max_tokens",
                        f"{wanted} + {len(ids)} prompt tokens > max_model_len {lim.max_model_len}; "
                        f"at most {room} for this prompt",
                        "MAX_TOKENS_TOO_LARGE",
                    )
                ],
            )
        else:
            max_tokens = wanted
        return Prepared(req, ids, max_tokens)

    # --- generation ---

    async def generate(
        self,
        req: GenerationRequest,
        *,
        slot: Slot | None = None,
        stream: bool = True,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream one generation. Without ``slot`` it waits for admission in its class first.

        ``stream=False`` asks the engine for the final output only (one event with all the text, then the summary).

        ``stop`` set: the generation ends now and still yields its ``Finished`` event, finish reason ABORT, with the
        usage so far — the prompt's tokens once the request reached the engine (none while it waited for admission)
        and every output token generated. Stopping without a summary (``aclose()``, a cancelled task, a passed
        deadline) aborts the request in the engine at once and frees its slot. Every path counts its tokens in
        ``stats`` and the metrics (see :meth:`_account`).
        """
        arrival = self._clock()
        try:
            self.ensure_alive()
            prepared = await self.prepare(req)
            if slot is None:
                slot = await self._admit(req.queue_class, stop)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        if slot is None:  # stopped while waiting for admission: nothing reached the engine
            yield self._stopped_before_engine(prepared, arrival, req.queue_class)
            return
        try:
            # aclosing: an early stop of this generator must close the inner one now (it aborts the engine request),
            # not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self._run(prepared, arrival, slot.queue_class, stream, stop)) as events:
                async for event in events:
                    yield event
        finally:
            slot.release()

    async def _admit(self, cls: QueueClass, stop: asyncio.Event | None) -> Slot | None:
        """A slot of class ``cls``, or None when ``stop`` is set first."""
        if stop is None or (self._admission.can_admit_now(cls) and not stop.is_set()):
            return await self._admission.acquire(cls)
        if stop.is_set():
            return None
        acquiring = asyncio.ensure_future(self._admission.acquire(cls))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not acquiring.done():
                acquiring.cancel()  # the admission hands back a slot granted meanwhile
                with contextlib.suppress(asyncio.CancelledError):
                    await acquiring
        if acquiring.cancelled():
            return None
        slot = acquiring.result()  # ResourceExhausted (full line, waited too long) propagates
        if stop.is_set():
            slot.release()
            return None
        return slot

    def _stopped_before_engine(self, p: Prepared, arrival: float, cls: QueueClass) -> Finished:
        tally = _Tally(reached_engine=False, outcome=Outcome.STOPPED)
        return Finished("", 0, self._account(p, arrival, cls, tally))

    async def _run(
        self, p: Prepared, arrival: float, cls: QueueClass, stream: bool, stop: asyncio.Event | None
    ) -> AsyncGenerator[GenerationEvent, None]:
        lim = self._limits
        req = p.request
        if stop is not None and stop.is_set():
            yield self._stopped_before_engine(p, arrival, cls)
            return
        stats = self.stats.classes[cls]
        salt = req.attribution.tenant if lim.prefix_cache_per_tenant and req.attribution.tenant else None
        engine_req = EngineRequest(
            request_id=req.request_id,
            prompt_token_ids=p.prompt_token_ids,
            sampling=req.sampling,
            max_tokens=p.max_tokens,
            priority=lim.interactive_priority if cls is QueueClass.INTERACTIVE else lim.async_priority,
            cache_salt=salt,
            stream=stream,
        )
        # From here on the request has reached the engine: its prompt tokens count (see _Tally.usage).
        t = _Tally(reached_engine=True)
        submitted = self._clock()
        outputs = self._engine.generate(engine_req, stop=stop)
        try:
            try:
                async with contextlib.aclosing(outputs):
                    async for out in outputs:
                        if out.num_cached_tokens is not None:
                            t.cached = out.num_cached_tokens
                        if out.token_count and t.first_at is None:
                            # Streaming: the first output is the first token. Final-only: the engine measured it.
                            now = self._clock()
                            latency = out.first_token_latency_s
                            t.first_at = now if stream or latency is None else min(now, submitted + latency)
                            stats.ttft_s.observe(t.first_at - arrival)
                        t.output_tokens += out.token_count
                        self.stats.output_tokens.add(out.token_count)
                        if out.finished:
                            t.reason = out.finish_reason or FinishReason.STOP
                            t.outcome = Outcome.STOPPED if t.reason is FinishReason.ABORT else Outcome.FINISHED
                            t.tail_text, t.tail_tokens = out.text, out.token_count
                            break
                        if out.text or out.token_count:
                            yield TextDelta(out.text, out.token_count)
            except EngineDead as err:
                t.outcome, t.reason = Outcome.FAILED, FinishReason.ERROR
                raise Unavailable(
                    "the inference engine died",
                    reason="ENGINE_DEAD",
                    retry_after_s=1.0,
                    metadata=usage_metadata(t.usage(p)),
                ) from err
            except EngineRejected as err:
                # vLLM refused it before processing it: nothing to count.
                t.outcome, t.reason, t.reached_engine = Outcome.FAILED, FinishReason.ERROR, False
                raise InvalidArgument(f"rejected by the engine: {err}", reason="ENGINE_REJECTED") from err
        finally:
            summary = self._account(p, arrival, cls, t)
        yield Finished(t.tail_text, t.tail_tokens, summary)

    def _account(self, p: Prepared, arrival: float, cls: QueueClass, t: _Tally) -> GenerationSummary:
        """Count one generation's tokens in the stats and the metrics, whatever its outcome; its summary.

        Runs once per generation on every path (finished, stopped, cancelled, failed), so the worker's token counters
        hold every token it reported or would have reported: every output token the engine produced, and the prompt
        once the request reached the engine (without a summary, only when output was produced: ``_Tally.usage``).
        """
        lim = self._limits
        req = p.request
        stats = self.stats.classes[cls]
        end = self._clock()
        usage = t.usage(p)
        if t.outcome is Outcome.FINISHED:
            stats.finished_total += 1
        elif t.outcome is Outcome.STOPPED:
            stats.stopped_total += 1
        elif t.outcome is Outcome.FAILED:
            stats.failed_total += 1
        else:
            stats.aborted_total += 1
            log.info("generation_aborted", request_id=req.request_id, queue_class=cls.value, tokens=t.output_tokens)
        self.stats.prompt_tokens_total += usage.input_tokens
        self.stats.cached_prompt_tokens_total += usage.cached_input_tokens
        self.stats.output_tokens_total += usage.output_tokens
        summary = GenerationSummary(
            usage=usage,
            finish_reason=t.reason,
            time_to_first_token_ms=round(((t.first_at if t.first_at is not None else end) - arrival) * 1000, 3),
            latency_ms=round((end - arrival) * 1000, 3),
            model=lim.model,
            tier=lim.tier,
        )
        if self._metrics is not None:
            self._metrics.generation(
                req,
                cls,
                max_tokens=p.max_tokens,
                summary=summary,
                cost_micros=self.cost_micros(usage),
                outcome=t.outcome.value,
            )
        return summary

    async def complete(
        self, req: GenerationRequest, *, slot: Slot | None = None, stop: asyncio.Event | None = None
    ) -> tuple[str, GenerationSummary]:
        """Run a generation to its end and return its whole text and summary (durable jobs: nothing is streamed).

        ``stop`` set: it ends early with the text and usage so far (finish reason ABORT)."""
        parts: list[str] = []
        gen = self.generate(req, slot=slot, stream=False, stop=stop)
        async with contextlib.aclosing(gen):
            async for event in gen:
                parts.append(event.text)
                if isinstance(event, Finished):
                    return "".join(parts), event.summary
        raise RuntimeError("generation ended without a summary")


class Outcome(StrEnum):
    """How a generation ended (the ``outcome`` label of the token metrics)."""

    FINISHED = "finished"  # the engine finished it (stop sequence, EOS, max_tokens): summary sent
    STOPPED = "stopped"  # a stop signal ended it early: summary sent, finish reason ABORT
    CANCELLED = "cancelled"  # the caller went away (cancel, deadline, connection loss): no summary
    FAILED = "failed"  # the engine died (usage in the error's metadata) or refused it


@dataclass(slots=True)
class _Tally:
    """What one generation produced so far."""

    reached_engine: bool
    outcome: Outcome = Outcome.CANCELLED
    reason: FinishReason = FinishReason.ABORT
    output_tokens: int = 0
    cached: int = 0
    first_at: float | None = None
    tail_text: str = ""
    tail_tokens: int = 0

    def usage(self, p: Prepared) -> TokenUsage:
        """The prompt counts once the request reached the engine — but a generation that ends without a summary
        (cancelled, failed) counts it only when it produced output: its caller, who never got a summary, bills the
        prompt plus the tokens it received, and nothing when it received none."""
        summarized = self.outcome in (Outcome.FINISHED, Outcome.STOPPED)
        counts = self.reached_engine and (summarized or self.output_tokens > 0)
        prompt = len(p.prompt_token_ids) if counts else 0
        return TokenUsage(
            input_tokens=prompt, output_tokens=self.output_tokens, cached_input_tokens=min(self.cached, prompt)
        )


def usage_metadata(usage: TokenUsage) -> dict[str, str]:
    """The usage of a failed generation, for the ``ErrorInfo.metadata`` of its error (the caller bills it)."""
    return {
        "input_tokens": str(usage.input_tokens),
        "output_tokens": str(usage.output_tokens),
        "cached_input_tokens": str(usage.cached_input_tokens),
    }
