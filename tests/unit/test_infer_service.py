"""The worker's domain over a scripted engine: validation with limits, streaming order, usage, abort on early stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from services.common.attribution import Attribution
from services.common.errors import InvalidArgument, Unavailable
from services.common.pricing import CHEAP_DEFAULT
from services.infer.domain import (
    Finished,
    FinishReason,
    GenerationRequest,
    Message,
    ModelCard,
    QueueClass,
    Sampling,
    TextDelta,
)
from services.infer.engine import EngineDead, EngineGauges, EngineOutput, EngineRequest
from services.infer.metrics import InferMetrics
from services.infer.scheduler import Admission, AdmissionLimits
from services.infer.service import InferenceService, ServiceLimits


@dataclass
class ScriptedEngine:
    """Engine double: one 'word' token per step; ``gate`` lets a test hold generation between steps."""

    max_model_len: int = 64
    cached: int = 0
    dead: bool = False
    gate: asyncio.Event | None = None
    step_s: float = 0.0  # time per token
    die_after: int | None = None  # the engine dies after producing this many tokens of a streamed request
    requests: list[EngineRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    gauges: EngineGauges = field(default_factory=EngineGauges)

    @property
    def is_dead(self) -> bool:
        return self.dead

    @property
    def is_ready(self) -> bool:
        return not self.dead

    def tokenize(self, prompt: str) -> list[int]:
        return [len(w) for w in prompt.split()]

    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [0, *self.tokenize(m.content)]
        return ids

    async def _step(self, stop: asyncio.Event | None) -> bool:
        """Wait for the gate (if any); True when ``stop`` is set first."""
        if stop is not None and stop.is_set():
            return True
        if self.gate is not None and not self.gate.is_set():
            waits = {asyncio.ensure_future(self.gate.wait())}
            if stop is not None:
                waits.add(asyncio.ensure_future(stop.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        await asyncio.sleep(self.step_s)
        return stop is not None and stop.is_set()

    async def generate(
        self, request: EngineRequest, *, stop: asyncio.Event | None = None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Like vLLM: a set ``stop`` aborts the request and ends the stream with a final ABORT output carrying the
        tokens generated so far (all of them when nothing streams)."""
        self.requests.append(request)
        finished = False
        if not request.stream:  # final output only, as vLLM's FINAL_ONLY output kind
            produced = 0
            try:
                while produced < request.max_tokens:
                    if await self._step(stop):
                        break
                    if self.dead:
                        raise EngineDead("boom")
                    produced += 1
            except BaseException:
                self.aborted.append(request.request_id)
                raise
            if produced < request.max_tokens:
                self.aborted.append(request.request_id)
            finished = True
            yield EngineOutput(
                text="".join(f"w{i} " for i in range(produced)),
                token_count=produced,
                finished=True,
                finish_reason=FinishReason.LENGTH if produced == request.max_tokens else FinishReason.ABORT,
                num_cached_tokens=self.cached,
                first_token_latency_s=0.0005,
            )
            return
        try:
            for i in range(request.max_tokens):
                if await self._step(stop):
                    self.aborted.append(request.request_id)
                    finished = True
                    yield EngineOutput(
                        text="",
                        token_count=0,
                        finished=True,
                        finish_reason=FinishReason.ABORT,
                        num_cached_tokens=self.cached,
                    )
                    return
                if self.dead or (self.die_after is not None and i >= self.die_after):
                    raise EngineDead("boom")
                last = i == request.max_tokens - 1
                finished = last
                yield EngineOutput(
                    text=f"w{i} ",
                    token_count=1,
                    finished=last,
                    finish_reason=FinishReason.LENGTH if last else None,
                    num_cached_tokens=self.cached,
                )
        finally:
            if not finished:
                self.aborted.append(request.request_id)


def make_service(engine: ScriptedEngine, *, metrics: InferMetrics | None = None, **adm: int) -> InferenceService:
    lim = AdmissionLimits(
        max_num_seqs=adm.get("max_num_seqs", 4),
        interactive_slots=adm.get("interactive_slots", 4),
        interactive_max_waiting=adm.get("interactive_max_waiting", 0),
        interactive_max_wait_s=adm.get("interactive_max_wait_s", 1),
        async_slots=adm.get("async_slots", 3),
        async_concurrency=adm.get("async_slots", 3),
        async_max_waiting=4,
        async_max_wait_s=1.0,
    )
    card = ModelCard("m", "cheap", 150_000, 600_000, 75_000, engine.max_model_len, 4, 4, 10, 1, True, 16)
    return InferenceService(
        engine=engine,
        admission=Admission(lim),
        limits=ServiceLimits(
            tier="cheap",
            model="m",
            max_model_len=engine.max_model_len,
            max_output_tokens=16,
            default_max_tokens=4,
            max_prompt_chars=200,
        ),
        price=CHEAP_DEFAULT,
        card=card,
        metrics=metrics,
    )


def req(**kw: object) -> GenerationRequest:
    base: dict[str, object] = {"request_id": "r1", "prompt": "one two three"}
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


async def collect(svc: InferenceService, r: GenerationRequest) -> list[TextDelta | Finished]:
    return [e async for e in svc.generate(r)]


async def test_streams_deltas_in_order_then_a_summary_with_usage() -> None:
    engine = ScriptedEngine(cached=2)
    svc = make_service(engine)
    events = await collect(svc, req(sampling=Sampling(max_tokens=5)))
    assert [e.text for e in events] == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 "]
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    last = events[-1]
    assert isinstance(last, Finished)
    s = last.summary
    assert (s.usage.input_tokens, s.usage.output_tokens, s.usage.cached_input_tokens) == (3, 5, 2)
    assert s.finish_reason is FinishReason.LENGTH
    assert 0 <= s.time_to_first_token_ms <= s.latency_ms
    assert (s.model, s.tier) == ("m", "cheap")
    assert svc.stats.cached_prompt_tokens_total == 2 and svc.stats.output_tokens_total == 5
    assert svc.stats.classes[QueueClass.INTERACTIVE].ttft_s.count == 1
    assert engine.requests[0].priority == 0


async def test_default_max_tokens_and_priority_per_class() -> None:
    engine = ScriptedEngine()
    svc = make_service(engine)
    await collect(svc, req(queue_class=QueueClass.ASYNC))
    assert engine.requests[0].max_tokens == 4  # default_max_tokens
    assert engine.requests[0].priority == 1  # async runs after interactive in the engine


async def test_default_max_tokens_shrinks_to_fit_the_model() -> None:
    engine = ScriptedEngine(max_model_len=5)
    svc = make_service(engine)
    await collect(svc, req())  # 3 prompt tokens, room for 2
    assert engine.requests[0].max_tokens == 2


async def test_tenant_salts_the_prefix_cache() -> None:
    engine = ScriptedEngine()
    svc = make_service(engine)
    await collect(svc, req(attribution=Attribution(tenant="acme")))
    await collect(svc, req(request_id="r2"))
    assert engine.requests[0].cache_salt == "acme"
    assert engine.requests[1].cache_salt is None


@pytest.mark.parametrize(
    ("request_kw", "field_name", "reason"),
    [
        ({"prompt": "   "}, "prompt", "EMPTY"),
        ({"prompt": ""}, "messages", "EMPTY"),
        ({"prompt": "x", "messages": (Message("user", "y"),)}, "prompt", ""),
        ({"prompt": "", "messages": (Message("user", " "),)}, "messages[0].content", "EMPTY"),
        ({"prompt": "", "messages": (Message("", "hi"),)}, "messages[0].role", ""),
        ({"tier": "full"}, "tier", "WRONG_TIER"),
        ({"sampling": Sampling(max_tokens=17)}, "sampling.max_tokens", "MAX_TOKENS_TOO_LARGE"),
        ({"sampling": Sampling(temperature=2.5)}, "sampling.temperature", ""),
        ({"sampling": Sampling(top_p=0.0)}, "sampling.top_p", ""),
        ({"request_id": ""}, "request_id", ""),
        ({"prompt": "x" * 201}, "prompt", "PROMPT_TOO_LONG"),
        ({"attribution": Attribution(tenant="a b")}, "attribution.tenant", ""),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    request_kw: dict[str, object], field_name: str, reason: str
) -> None:
    engine = ScriptedEngine()
    svc = make_service(engine)
    with pytest.raises(InvalidArgument) as err:
        await collect(svc, req(**request_kw))
    fields = {v.field: v for v in err.value.violations}
    assert field_name in fields, fields
    assert fields[field_name].reason == reason
    assert engine.requests == []
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 0


async def test_prompt_longer_than_the_model_names_the_limit() -> None:
    svc = make_service(ScriptedEngine(max_model_len=8))
    with pytest.raises(InvalidArgument) as err:
        await collect(svc, req(prompt="a " * 8))
    v = err.value.violations[0]
    assert (v.field, v.reason) == ("prompt", "PROMPT_TOO_LONG")
    assert "at most 7 prompt tokens" in v.description and "max_model_len 8" in v.description


async def test_max_tokens_beyond_the_room_left_names_the_limit() -> None:
    svc = make_service(ScriptedEngine(max_model_len=8))
    with pytest.raises(InvalidArgument) as err:
        await collect(svc, req(sampling=Sampling(max_tokens=6)))  # 3 prompt tokens + 6 > 8
    v = err.value.violations[0]
    assert (v.field, v.reason) == ("sampling.max_tokens", "MAX_TOKENS_TOO_LARGE")
    assert "at most 5 for this prompt" in v.description


async def test_stopping_early_aborts_in_the_engine_and_frees_the_slot() -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    svc = make_service(engine, interactive_slots=1)
    engine.gate.set()  # type: ignore[union-attr]
    gen = svc.generate(req(sampling=Sampling(max_tokens=10)))
    first = await gen.__anext__()
    assert isinstance(first, TextDelta)
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 1
    await gen.aclose()
    assert engine.aborted == ["r1"]
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 0
    assert svc.stats.classes[QueueClass.INTERACTIVE].aborted_total == 1
    # The single interactive slot is free again: the next request gets in without waiting.
    events = await collect(svc, req(request_id="r2", sampling=Sampling(max_tokens=2)))
    assert isinstance(events[-1], Finished)


async def test_cancelled_task_aborts_in_the_engine() -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    svc = make_service(engine)
    started = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(svc.generate(req(sampling=Sampling(max_tokens=10)))) as gen:
            async for _ in gen:
                started.set()

    engine.gate.set()  # type: ignore[union-attr]
    task = asyncio.create_task(consume())
    await started.wait()
    engine.gate.clear()  # type: ignore[union-attr]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == ["r1"]
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 0


async def test_dead_engine_is_unavailable_before_and_during_a_request() -> None:
    engine = ScriptedEngine()
    svc = make_service(engine)
    gen = svc.generate(req(sampling=Sampling(max_tokens=5)))
    await gen.__anext__()
    engine.dead = True
    with pytest.raises(Unavailable) as err:
        await gen.__anext__()
    assert err.value.reason == "ENGINE_DEAD"
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 0
    with pytest.raises(Unavailable):
        await collect(svc, req(request_id="r2"))


async def test_complete_returns_the_whole_text_without_streaming() -> None:
    engine = ScriptedEngine(cached=1)
    svc = make_service(engine)
    text, summary = await svc.complete(req(sampling=Sampling(max_tokens=3)))
    assert text == "w0 w1 w2 "
    assert engine.requests[0].stream is False
    assert (summary.usage.output_tokens, summary.usage.cached_input_tokens) == (3, 1)
    # TTFT comes from the engine's own measurement when nothing streams.
    assert summary.time_to_first_token_ms <= summary.latency_ms


# --- stop signal and token accounting on every path ---


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not met")


def counted(svc: InferenceService) -> tuple[int, int, int]:
    return svc.stats.prompt_tokens_total, svc.stats.output_tokens_total, svc.stats.cached_prompt_tokens_total


async def test_a_stop_mid_stream_ends_with_the_summary_so_far() -> None:
    from tests.unit.test_telemetry_metrics import Telemetry, total

    tel = Telemetry()
    engine = ScriptedEngine(gate=asyncio.Event(), cached=1)
    svc = make_service(engine, metrics=InferMetrics(tel.meter()))
    stop = asyncio.Event()
    engine.gate.set()  # type: ignore[union-attr]
    gen = svc.generate(req(sampling=Sampling(max_tokens=10)), stop=stop)
    got = [await gen.__anext__(), await gen.__anext__(), await gen.__anext__()]
    engine.gate.clear()  # type: ignore[union-attr]
    stop.set()
    rest = [e async for e in gen]
    last = rest[-1]
    assert isinstance(last, Finished) and all(isinstance(e, TextDelta) for e in got + rest[:-1])
    u = last.summary.usage
    assert last.summary.finish_reason is FinishReason.ABORT
    assert 0 < u.output_tokens < 10 and u.output_tokens == sum(e.token_count for e in got + rest)
    assert (u.input_tokens, u.cached_input_tokens) == (3, 1)
    assert counted(svc) == (u.input_tokens, u.output_tokens, u.cached_input_tokens)
    assert engine.aborted == ["r1"]
    cls = svc.stats.classes[QueueClass.INTERACTIVE]
    assert (cls.stopped_total, cls.finished_total, cls.aborted_total) == (1, 0, 0)
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 0
    tokens = tel.points()["costmesh.infer.tokens"]
    assert total(tokens, type="input", outcome="stopped") == u.input_tokens
    assert total(tokens, type="output", outcome="stopped") == u.output_tokens
    assert total(tokens, type="output") == u.output_tokens  # nothing counted twice, nothing under another outcome
    tel.meter_provider.shutdown()


async def test_a_stop_before_admission_counts_nothing() -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    svc = make_service(engine, interactive_slots=1, interactive_max_waiting=1, interactive_max_wait_s=30)
    holder = svc.generate(req(sampling=Sampling(max_tokens=10)))
    engine.gate.set()  # type: ignore[union-attr]
    await holder.__anext__()  # holds the only interactive slot
    engine.gate.clear()  # type: ignore[union-attr]
    stop = asyncio.Event()
    waiting = asyncio.ensure_future(collect_with(svc, req(request_id="r2", sampling=Sampling(max_tokens=5)), stop))
    await until(lambda: svc.admission.waiting(QueueClass.INTERACTIVE) == 1)
    before = counted(svc)
    stop.set()
    (last,) = await waiting
    assert isinstance(last, Finished) and last.summary.finish_reason is FinishReason.ABORT
    assert (last.summary.usage.input_tokens, last.summary.usage.output_tokens) == (0, 0)
    assert counted(svc) == before
    assert [r.request_id for r in engine.requests] == ["r1"]  # r2 never reached the engine
    assert svc.admission.waiting(QueueClass.INTERACTIVE) == 0
    assert svc.stats.classes[QueueClass.INTERACTIVE].stopped_total == 1
    await holder.aclose()
    assert svc.admission.in_engine(QueueClass.INTERACTIVE) == 0


async def collect_with(svc: InferenceService, r: GenerationRequest, stop: asyncio.Event) -> list[TextDelta | Finished]:
    return [e async for e in svc.generate(r, stop=stop)]


async def test_a_stop_signal_never_set_changes_nothing() -> None:
    svc = make_service(ScriptedEngine())
    events = await collect_with(svc, req(sampling=Sampling(max_tokens=4)), asyncio.Event())
    last = events[-1]
    assert isinstance(last, Finished) and last.summary.finish_reason is FinishReason.LENGTH
    assert last.summary.usage.output_tokens == 4


async def test_a_cancelled_stream_still_counts_its_tokens() -> None:
    from tests.unit.test_telemetry_metrics import Telemetry, total

    tel = Telemetry()
    engine = ScriptedEngine(gate=asyncio.Event())
    svc = make_service(engine, metrics=InferMetrics(tel.meter()))
    received = 0
    three = asyncio.Event()

    async def consume() -> None:
        nonlocal received
        async with contextlib.aclosing(svc.generate(req(sampling=Sampling(max_tokens=10)))) as gen:
            async for e in gen:
                received += e.token_count
                if received == 3:
                    engine.gate.clear()  # type: ignore[union-attr]
                    three.set()

    engine.gate.set()  # type: ignore[union-attr]
    task = asyncio.create_task(consume())
    await three.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counted(svc) == (3, 3, 0)  # the prompt (it reached the engine) and every token generated
    assert svc.stats.classes[QueueClass.INTERACTIVE].aborted_total == 1
    tokens = tel.points()["costmesh.infer.tokens"]
    assert total(tokens, type="output", outcome="cancelled") == 3
    assert total(tokens, type="input", outcome="cancelled") == 3
    tel.meter_provider.shutdown()


async def test_a_stream_cancelled_before_its_first_token_counts_nothing() -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    svc = make_service(engine)
    task = asyncio.create_task(collect(svc, req(sampling=Sampling(max_tokens=10))))
    await until(lambda: bool(engine.requests))  # in the engine, no token yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # No summary and nothing streamed: its caller bills nothing, so nothing is counted.
    assert counted(svc) == (0, 0, 0)
    assert svc.stats.classes[QueueClass.INTERACTIVE].aborted_total == 1


async def test_engine_death_before_the_first_token_counts_nothing() -> None:
    svc = make_service(ScriptedEngine(die_after=0))
    with pytest.raises(Unavailable) as err:
        await collect(svc, req(sampling=Sampling(max_tokens=5)))
    assert err.value.metadata == {"input_tokens": "0", "output_tokens": "0", "cached_input_tokens": "0"}
    assert counted(svc) == (0, 0, 0)


async def test_engine_death_counts_the_tokens_and_reports_them_in_the_error() -> None:
    engine = ScriptedEngine()
    svc = make_service(engine)
    gen = svc.generate(req(sampling=Sampling(max_tokens=5)))
    await gen.__anext__()
    await gen.__anext__()
    engine.dead = True
    with pytest.raises(Unavailable) as err:
        await gen.__anext__()
    assert err.value.metadata == {"input_tokens": "3", "output_tokens": "2", "cached_input_tokens": "0"}
    assert counted(svc) == (3, 2, 0)
    assert svc.stats.classes[QueueClass.INTERACTIVE].failed_total == 1


async def test_a_stopped_job_run_keeps_the_text_so_far() -> None:
    engine = ScriptedEngine(gate=asyncio.Event())
    svc = make_service(engine)
    stop = asyncio.Event()
    engine.gate.set()  # type: ignore[union-attr]
    run = asyncio.ensure_future(svc.complete(req(sampling=Sampling(max_tokens=16)), stop=stop))
    await until(lambda: bool(engine.requests))
    await asyncio.sleep(0)
    engine.gate.clear()  # type: ignore[union-attr]
    stop.set()
    text, summary = await run
    assert summary.finish_reason is FinishReason.ABORT and 0 < summary.usage.output_tokens < 16
    assert text == "".join(f"w{i} " for i in range(summary.usage.output_tokens))
    assert counted(svc)[1] == summary.usage.output_tokens
