"""The inference worker on vLLM's real engine (CPU) with the small local model, over a real gRPC server on loopback.

One ``AsyncLLM`` is started for the module and shared: each test builds its own worker (admission, service,
job runner, servicer) over it with the limits it needs, so engine start-up is paid once. Two tests need a second
worker *process* (one killed mid-job, one whose engine dies): those ``python -m services.infer`` processes are
launched before the shared engine, so the three start-ups overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.health import check
from services.common.server import ServiceHost, full_service_name
from services.infer.app import InferWorker, build_worker
from services.infer.config import InferSettings
from services.infer.domain import QueueClass
from services.infer.engine import VllmEngine
from services.infer.jobs.redis import RedisJobStore
from services.infer.jobs.sqlite import SqliteJobStore
from services.infer.jobs.store import JobState, JobStore
from services.infer.models import CHEAP, TIER_SPECS, build_models, is_built, model_display_name

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "var" / "models"
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 8
RESERVE = 2


def settings(**overrides: Any) -> InferSettings:
    base: dict[str, Any] = {
        "tier": "cheap",
        "model_dir": MODELS / "cheap",
        "port": 0,
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": MAX_NUM_SEQS,
        "interactive_reserve": RESERVE,
        "max_output_tokens": 1000,
        "kv_cache_gib": 1,
        "job_poll_s": 0.05,
        "job_lease_s": 2.0,
        "grace_period_s": 0.5,
    }
    base.update(overrides)
    return InferSettings(**base)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    build_models(MODELS, ("cheap",))  # idempotent: skipped when an identical build is there
    return MODELS


@pytest.fixture(scope="module")
async def engine(models_dir: Path, spare_workers: dict[str, SpareWorker]) -> AsyncIterator[VllmEngine]:
    # spare_workers first: their start-up overlaps with this one.
    eng = VllmEngine(settings())
    await eng.start()
    yield eng
    await eng.shutdown()


@dataclass
class Running:
    worker: InferWorker
    stub: infer_pb2_grpc.InferenceServiceStub
    channel: grpc.aio.Channel
    host: ServiceHost


@contextlib.asynccontextmanager
async def serve(
    engine: VllmEngine, store: JobStore, *, run_jobs: bool = True, meter: Any = None, **overrides: Any
) -> AsyncIterator[Running]:
    s = settings(**overrides)
    worker = build_worker(s, engine=engine, store=store, meter=meter)
    host = ServiceHost(name="infer", settings=s)
    host.add_service(
        full_service_name(infer_pb2, "InferenceService"),
        lambda server: infer_pb2_grpc.add_InferenceServiceServicer_to_server(worker.servicer, server),
    )
    port = await host.start()
    await host.set_serving(True)
    if run_jobs:
        worker.runner.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(worker, infer_pb2_grpc.InferenceServiceStub(channel), channel, host)
    finally:
        await channel.close()
        await worker.runner.stop()
        await host.stop()
        await store.close()
        await wait_until(lambda: engine.unfinished_requests() == 0, 30)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.sqlite3", lease_s=2.0)


async def wait_until(
    cond: Callable[[], bool], timeout_s: float, step_s: float = 0.02, what: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s {what()}")
        await asyncio.sleep(step_s)


def gen_request(rid: str, prompt: str = "The router sends the prompt", *, max_tokens: int = 8, **kw: Any) -> Any:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return infer_pb2.GenerateRequest(request_id=rid, prompt=prompt, sampling=sampling, **kw)


def metric_points(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, str], int]:
    """{(type, outcome): total} of a token counter."""
    out: dict[tuple[str, str], int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        labels = dict(p.attributes or {})
                        key = (str(labels["type"]), str(labels["outcome"]))
                        out[key] = out.get(key, 0) + int(p.value)  # type: ignore[union-attr]
    return out


def detail(err: grpc.aio.AioRpcError, cls: Any) -> Any:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for d in status.details:
        if d.Is(cls.DESCRIPTOR):
            msg = cls()
            d.Unpack(msg)
            return msg
    raise AssertionError(f"no {cls.__name__} in {status}")


async def collect(call: Any) -> list[infer_pb2.GenerateResponse]:
    return [r async for r in call]


def generate(stub: infer_pb2_grpc.InferenceServiceStub, request: Any, **kw: Any) -> Any:
    """A Generate call that sends the request and half-closes (no stop)."""
    return stub.Generate(iter((request,)), **kw)


# --- local models ---


def test_model_build_is_deterministic_and_idempotent(tmp_path: Path, models_dir: Path) -> None:
    first = build_models(tmp_path / "a", ("cheap",))
    second = build_models(tmp_path / "b", ("cheap",))
    assert first[0].built and second[0].built and first[0].parameters == second[0].parameters > 3_000_000
    manifest_a = json.loads((tmp_path / "a/cheap/costmesh-model.json").read_text())
    manifest_b = json.loads((tmp_path / "b/cheap/costmesh-model.json").read_text())
    assert manifest_a["files"] == manifest_b["files"]  # same bytes from the same seed
    assert not build_models(tmp_path / "a", ("cheap",))[0].built  # skipped: already there
    assert is_built(tmp_path / "a/cheap", CHEAP)
    assert not is_built(tmp_path / "a/cheap", TIER_SPECS["full"])
    assert model_display_name(tmp_path / "a/cheap") == "costmesh-cheap"
    cfg = json.loads((tmp_path / "a/cheap/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 4
    tok_cfg = json.loads((tmp_path / "a/cheap/tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] and tok_cfg["eos_token"]
    assert (tmp_path / "a/cheap/chat_template.jinja").is_file() or "chat_template" in tok_cfg
    # A damaged file is noticed and rebuilt.
    (tmp_path / "a/cheap/tokenizer.json").write_text("{}")
    assert not is_built(tmp_path / "a/cheap", CHEAP)
    assert build_models(tmp_path / "a", ("cheap",))[0].built
    with pytest.raises(ValueError):
        build_models(tmp_path / "c", ("medium",))


def test_auto_dtype_is_float32_unless_the_cpu_has_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from services.infer.engine import resolve_dtype

    assert resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_dtype("auto") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") == "auto"  # GPUs: the model's own dtype


# --- Generate ---


async def test_generate_streams_deltas_then_a_summary(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store) as r:
        prompt = "Our budget counts every token before noon."
        replies = await collect(generate(r.stub, gen_request("g1", prompt, max_tokens=24, ignore_eos=True), timeout=60))
        *deltas, last = replies
        assert len(deltas) >= 2, "tokens must stream as produced, not arrive in one message"
        assert all(not d.HasField("summary") and d.token_count >= 1 for d in deltas)
        assert last.HasField("summary")
        s = last.summary
        assert sum(x.token_count for x in replies) == s.usage.output_tokens == 24
        assert s.usage.input_tokens == len(engine.tokenize(prompt))
        assert s.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert 0 < s.time_to_first_token_ms <= s.latency_ms
        assert (s.model, s.tier) == ("costmesh-cheap", common_pb2.TIER_CHEAP)
        text = "".join(x.text for x in replies)
        assert text
        # Greedy decoding on the same engine gives the same text (the stream lost or reordered nothing).
        again = await collect(generate(r.stub, gen_request("g2", prompt, max_tokens=24, ignore_eos=True), timeout=60))
        assert "".join(x.text for x in again) == text
        stats = r.worker.stats
        assert stats.output_tokens_total == 48 and stats.classes[QueueClass.INTERACTIVE].ttft_s.count == 2


async def test_chat_messages_use_the_template(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store) as r:
        req = infer_pb2.GenerateRequest(
            request_id="chat",
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Count three numbers."),
            ],
            sampling=common_pb2.SamplingParams(max_tokens=4),
        )
        last = (await collect(generate(r.stub, req, timeout=60)))[-1]
        from services.infer.domain import Message

        expected = engine.render_chat([Message("system", "Be brief."), Message("user", "Count three numbers.")])
        assert last.summary.usage.input_tokens == len(expected)
        assert last.summary.usage.output_tokens <= 4


async def test_a_shared_system_prompt_is_served_from_the_prefix_cache(
    engine: VllmEngine, sqlite_store: SqliteJobStore
) -> None:
    system = f"Session {uuid.uuid4().hex}. " + "You answer questions about invoices and budgets. " * 40

    def chat(rid: str, question: str, tenant: str) -> Any:
        return infer_pb2.GenerateRequest(
            request_id=rid,
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question),
            ],
            sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0),
            attribution=common_pb2.Attribution(tenant=tenant),
        )

    async with serve(engine, sqlite_store) as r:
        first = (await collect(generate(r.stub, chat("p1", "What is due?", "acme"), timeout=60)))[-1].summary.usage
        second = (await collect(generate(r.stub, chat("p2", "Who pays?", "acme"), timeout=60)))[-1].summary.usage
        other = (await collect(generate(r.stub, chat("p3", "Who pays?", "globex"), timeout=60)))[-1].summary.usage
    assert first.input_tokens > 500
    assert first.cached_input_tokens == 0
    # The second request reuses the KV blocks of everything the two share (whole blocks of 32 tokens).
    assert second.cached_input_tokens >= 0.9 * second.input_tokens
    assert second.cached_input_tokens < second.input_tokens
    # Another tenant never hits acme's cache entries (the cache is salted per tenant).
    assert other.cached_input_tokens == 0


async def test_cancel_aborts_the_engine_request_and_frees_its_slot(
    engine: VllmEngine, sqlite_store: SqliteJobStore
) -> None:
    # One interactive slot and no waiting line: a leaked slot would turn the next call away.
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    async with serve(engine, sqlite_store, interactive_max_concurrency=1, interactive_max_waiting=0, meter=meter) as r:
        aborts = engine.gauges.aborts_total
        call = generate(r.stub, gen_request("long", max_tokens=1000, ignore_eos=True), timeout=120)
        got = 0
        async for reply in call:
            got += reply.token_count
            if got >= 3:
                break
        call.cancel()
        await wait_until(lambda: engine.gauges.aborts_total == aborts + 1, 10)
        await wait_until(lambda: engine.unfinished_requests() == 0, 10)
        await wait_until(lambda: r.worker.admission.in_engine(QueueClass.INTERACTIVE) == 0, 10)
        stats = r.worker.stats
        assert stats.classes[QueueClass.INTERACTIVE].aborted_total == 1
        # No summary went out, but every token the engine produced is counted: at least those the client read.
        assert got <= stats.output_tokens_total < 1000
        assert stats.prompt_tokens_total == len(engine.tokenize("The router sends the prompt"))
        tokens = metric_points(reader, "costmesh.infer.tokens")
        assert tokens[("output", "cancelled")] == stats.output_tokens_total
        assert tokens[("input", "cancelled")] == stats.prompt_tokens_total
        last = (await collect(generate(r.stub, gen_request("next", max_tokens=2), timeout=60)))[-1]
        assert last.summary.usage.output_tokens >= 1


async def test_a_stop_mid_stream_ends_with_the_summary_of_every_token(
    engine: VllmEngine, sqlite_store: SqliteJobStore
) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    async with serve(engine, sqlite_store, meter=meter) as r:
        prompt = "Stop me once a few tokens are out."
        call = r.stub.Generate(timeout=120)
        await call.write(gen_request("stopped", prompt, max_tokens=1000, ignore_eos=True))
        replies = []
        while sum(x.token_count for x in replies) < 3:
            replies.append(await call.read())
        await call.write(infer_pb2.GenerateRequest(stop=True))
        await call.done_writing()
        # read() only: grpc.aio refuses a call read both ways (read() and async for).
        while (reply := await call.read()) is not grpc.aio.EOF:
            replies.append(reply)
        *deltas, last = replies
        assert last.HasField("summary") and not any(d.HasField("summary") for d in deltas)
        s = last.summary
        assert s.finish_reason == common_pb2.FINISH_REASON_ABORT
        assert 3 <= s.usage.output_tokens < 1000
        assert sum(x.token_count for x in replies) == s.usage.output_tokens  # every token billed was streamed
        assert s.usage.input_tokens == len(engine.tokenize(prompt))
        stats = r.worker.stats
        assert (stats.prompt_tokens_total, stats.output_tokens_total) == (s.usage.input_tokens, s.usage.output_tokens)
        assert stats.classes[QueueClass.INTERACTIVE].stopped_total == 1
        tokens = metric_points(reader, "costmesh.infer.tokens")
        assert tokens == {("input", "stopped"): s.usage.input_tokens, ("output", "stopped"): s.usage.output_tokens}
        await wait_until(lambda: engine.unfinished_requests() == 0, 10)
        # Half-closing without a stop changes nothing.
        call = r.stub.Generate(timeout=60)
        await call.write(gen_request("half-closed", max_tokens=6, ignore_eos=True))
        await call.done_writing()
        last = (await collect(call))[-1]
        assert last.summary.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.summary.usage.output_tokens == 6


async def test_a_stop_before_admission_ends_with_no_tokens(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(
        engine, sqlite_store, interactive_max_concurrency=1, interactive_max_waiting=1, interactive_max_wait_s=60
    ) as r:
        holder = generate(r.stub, gen_request("holder", max_tokens=1000, ignore_eos=True), timeout=120)
        await holder.read()  # holds the only interactive slot
        waiter = r.stub.Generate(timeout=120)
        await waiter.write(gen_request("waiter", max_tokens=8))
        adm = r.worker.admission
        await wait_until(lambda: adm.waiting(QueueClass.INTERACTIVE) == 1, 30)
        before = (r.worker.stats.prompt_tokens_total, r.worker.stats.output_tokens_total)
        await waiter.write(infer_pb2.GenerateRequest(stop=True))
        (only,) = await collect(waiter)
        u = only.summary.usage
        assert only.summary.finish_reason == common_pb2.FINISH_REASON_ABORT
        assert (u.input_tokens, u.output_tokens, only.token_count) == (0, 0, 0)
        assert (r.worker.stats.prompt_tokens_total, r.worker.stats.output_tokens_total) == before
        assert adm.waiting(QueueClass.INTERACTIVE) == 0
        holder.cancel()


async def test_the_first_message_must_be_the_request(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store) as r:
        for messages in ([], [infer_pb2.GenerateRequest(stop=True)]):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(r.stub.Generate(iter(messages), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert engine.unfinished_requests() == 0


async def test_a_passed_deadline_aborts_the_engine_request(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store) as r:
        aborts = engine.gauges.aborts_total
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(generate(r.stub, gen_request("slow", max_tokens=1000, ignore_eos=True), timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: engine.gauges.aborts_total == aborts + 1, 10)
        await wait_until(lambda: engine.unfinished_requests() == 0, 10)
        assert r.worker.admission.in_engine(QueueClass.INTERACTIVE) == 0
        # Counted all the same: the prompt reached the engine (counted once output came, as the caller would bill it).
        stats = r.worker.stats
        prompt = len(engine.tokenize("The router sends the prompt"))
        assert stats.prompt_tokens_total == (prompt if stats.output_tokens_total else 0)


# --- validation, models ---


async def test_bad_input_is_invalid_argument_with_the_limits(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store) as r:

        async def bad(req: Any) -> dict[str, str]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(generate(r.stub, req, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return {v.field: v.description for v in detail(err.value, error_details_pb2.BadRequest).field_violations}

        too_long = "budget " * 1500
        fields = await bad(gen_request("b1", too_long))
        assert "prompt" in fields and "max_model_len 1024" in fields["prompt"]
        assert "messages" in await bad(gen_request("b2", ""))
        fields = await bad(gen_request("b3", max_tokens=1001))
        assert "0-1000" in fields["sampling.max_tokens"]
        fields = await bad(gen_request("b4", "word " * 300, max_tokens=900))
        assert "at most" in fields["sampling.max_tokens"]
        fields = await bad(gen_request("b5", tier=common_pb2.TIER_FULL))
        assert "cheap" in fields["tier"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.SubmitJob(infer_pb2.SubmitJobRequest(request_id="j", prompt=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert engine.unfinished_requests() == 0


async def test_list_models_reports_prices_and_limits(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store, async_queue_capacity=50) as r:
        (m,) = (await r.stub.ListModels(infer_pb2.ListModelsRequest(), timeout=10)).models
    assert (m.name, m.tier) == ("costmesh-cheap", common_pb2.TIER_CHEAP)
    assert (m.price.input_micros_per_mtok, m.price.output_micros_per_mtok, m.price.cached_input_micros_per_mtok) == (
        150_000,
        600_000,
        75_000,
    )
    assert (m.max_model_len, m.max_num_seqs, m.interactive_reserve) == (MAX_MODEL_LEN, MAX_NUM_SEQS, RESERVE)
    assert (m.interactive_capacity, m.async_queue_capacity, m.prefix_caching) == (MAX_NUM_SEQS, 50, True)


# --- queues ---


async def test_interactive_is_admitted_ahead_of_a_queued_async_flood(
    engine: VllmEngine, sqlite_store: SqliteJobStore
) -> None:
    async with serve(engine, sqlite_store) as r:
        adm = r.worker.admission
        peak = {"async": 0, "total": 0}
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                a, i = adm.in_engine(QueueClass.ASYNC), adm.in_engine(QueueClass.INTERACTIVE)
                peak["async"] = max(peak["async"], a)
                peak["total"] = max(peak["total"], a + i)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        sampling = common_pb2.SamplingParams(max_tokens=120, temperature=0.0)
        jobs = [
            (
                await r.stub.SubmitJob(
                    infer_pb2.SubmitJobRequest(request_id=f"flood-{i}", prompt=f"Job number {i}", sampling=sampling),
                    timeout=10,
                )
            ).job_id
            for i in range(16)
        ]
        # The flood fills every async slot (max_num_seqs - reserve) and the rest waits in the durable queue.
        await wait_until(lambda: adm.in_engine(QueueClass.ASYNC) == MAX_NUM_SEQS - RESERVE, 30)
        assert await sqlite_store.queued() > 0
        reply = (await collect(generate(r.stub, gen_request("vip", max_tokens=4), timeout=60)))[-1]
        still_queued = await sqlite_store.queued()
        assert reply.summary.usage.output_tokens >= 1
        assert still_queued > 0, "the interactive request must not wait behind queued async jobs"
        for job_id in jobs:
            await wait_until_job(r.stub, job_id, JobState.SUCCEEDED, 120)
        stop.set()
        await watcher
        assert peak["async"] == MAX_NUM_SEQS - RESERVE
        assert peak["total"] <= MAX_NUM_SEQS
        done = (await r.stub.GetJob(infer_pb2.GetJobRequest(job_id=jobs[0]), timeout=10)).job
        assert done.summary.usage.output_tokens == 120 and done.text and done.attempts == 1
        assert done.finished_unix_ms >= done.created_unix_ms
        assert r.worker.stats.jobs_succeeded_total == 16


async def test_submit_job_is_idempotent_and_tenant_scoped(engine: VllmEngine, sqlite_store: SqliteJobStore) -> None:
    async with serve(engine, sqlite_store) as r:
        req = infer_pb2.SubmitJobRequest(
            request_id="same",
            prompt="Summarize the invoice",
            sampling=common_pb2.SamplingParams(max_tokens=5),
            attribution=common_pb2.Attribution(tenant="acme"),
            metadata="reservation=r-9",
        )
        first = await r.stub.SubmitJob(req, timeout=10)
        req.metadata = "reservation=r-10"  # a retry with another reservation: the stored one comes back
        again = await r.stub.SubmitJob(req, timeout=10)
        assert again.job_id == first.job_id and again.replayed and not first.replayed
        assert first.metadata == again.metadata == "reservation=r-9"
        job = await wait_until_job(r.stub, first.job_id, JobState.SUCCEEDED, 60)
        assert job.metadata == "reservation=r-9" and job.summary.usage.output_tokens == 5
        assert (job.request_id, job.tenant, job.settled) == ("same", "acme", False)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.GetJob(infer_pb2.GetJobRequest(job_id=first.job_id, tenant="globex"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_jobs_are_found_by_request_id_listed_and_settled(
    engine: VllmEngine, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    store: JobStore = (
        SqliteJobStore(tmp_path / "jobs.sqlite3", lease_s=2.0)
        if kind == "sqlite"
        else RedisJobStore.from_url(request.getfixturevalue("redis_url"), queue=f"settle-{uuid.uuid4().hex[:6]}")
    )
    async with serve(engine, store, job_store=kind) as r:
        sampling = common_pb2.SamplingParams(max_tokens=3)
        who = common_pb2.Attribution(tenant="acme")
        ids = [
            (
                await r.stub.SubmitJob(
                    infer_pb2.SubmitJobRequest(
                        request_id=f"s{i}", prompt="Bill me", sampling=sampling, attribution=who
                    ),
                    timeout=10,
                )
            ).job_id
            for i in range(3)
        ]
        by_rid = (await r.stub.GetJob(infer_pb2.GetJobRequest(tenant="acme", request_id="s1"), timeout=10)).job
        assert by_rid.job_id == ids[1]
        for bad in (infer_pb2.GetJobRequest(request_id="s1"), infer_pb2.GetJobRequest()):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await r.stub.GetJob(bad, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.GetJob(infer_pb2.GetJobRequest(tenant="globex", request_id="s1"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for job_id in ids:
            await wait_until_job(r.stub, job_id, JobState.SUCCEEDED, 60)
        settle = infer_pb2.MarkJobSettledRequest(job_id=ids[0], tenant="acme")
        assert not (await r.stub.MarkJobSettled(settle, timeout=10)).replayed
        assert (await r.stub.MarkJobSettled(settle, timeout=10)).replayed
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.MarkJobSettled(infer_pb2.MarkJobSettledRequest(job_id=ids[1], tenant="globex"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        page = await r.stub.ListJobs(infer_pb2.ListJobsRequest(unsettled_only=True, page_size=1), timeout=10)
        assert [j.job_id for j in page.jobs] == [ids[1]] and page.next_page_token
        assert page.jobs[0].summary.usage.output_tokens == 3 and page.jobs[0].text  # enough to bill it
        rest = await r.stub.ListJobs(
            infer_pb2.ListJobsRequest(unsettled_only=True, page_token=page.next_page_token), timeout=10
        )
        assert [j.job_id for j in rest.jobs] == [ids[2]] and not rest.next_page_token
        everything = await r.stub.ListJobs(
            infer_pb2.ListJobsRequest(states=[common_pb2.JOB_STATE_SUCCEEDED]), timeout=10
        )
        assert [j.job_id for j in everything.jobs] == ids and everything.jobs[0].settled


async def test_a_job_taken_over_past_its_max_wait_fails(engine: VllmEngine, tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", lease_s=0.3)
    async with serve(engine, store, run_jobs=False, async_max_wait_s=1.0) as r:
        submitted = await r.stub.SubmitJob(
            infer_pb2.SubmitJobRequest(request_id="late", prompt="Too late", sampling=common_pb2.SamplingParams()),
            timeout=10,
        )
        dead = await store.claim("w-dead", max_attempts=3)  # started in time, then its worker died
        assert dead is not None and dead.job_id == submitted.job_id
        await asyncio.sleep(1.5)  # past the lease and past async_max_wait_s
        r.worker.runner.start()
        job = await wait_until_job(r.stub, submitted.job_id, JobState.FAILED, 30)
        assert "expired" in job.error and job.attempts == 2
        assert r.worker.stats.prompt_tokens_total == 0  # it never ran again


async def test_full_queues_push_back_with_retry_info(
    engine: VllmEngine, sqlite_store: SqliteJobStore, tmp_path: Path
) -> None:
    # Durable queue: jobs are not run here (no runner), so they pile up to the capacity.
    async with serve(engine, sqlite_store, run_jobs=False, async_queue_capacity=3) as r:
        sampling = common_pb2.SamplingParams(max_tokens=5)
        for i in range(3):
            await r.stub.SubmitJob(infer_pb2.SubmitJobRequest(request_id=f"q{i}", prompt="x", sampling=sampling))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.SubmitJob(infer_pb2.SubmitJobRequest(request_id="q3", prompt="x", sampling=sampling))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = detail(err.value, error_details_pb2.RetryInfo).retry_delay
        assert retry.seconds + retry.nanos / 1e9 >= 1.0
        assert detail(err.value, error_details_pb2.QuotaFailure).violations[0].subject == "queue:async"
        replay = await r.stub.SubmitJob(infer_pb2.SubmitJobRequest(request_id="q0", prompt="x", sampling=sampling))
        assert replay.replayed

    # Streamed async work: one may run, one may wait, the third is turned away at once.
    store = SqliteJobStore(tmp_path / "other.sqlite3", lease_s=2.0)
    async with serve(engine, store, run_jobs=False, async_max_concurrency=1, async_queue_capacity=1) as r:

        def async_call(rid: str) -> Any:
            req = gen_request(rid, max_tokens=1000, ignore_eos=True, queue_class=common_pb2.QUEUE_CLASS_ASYNC)
            return generate(r.stub, req, timeout=60)

        running = async_call("a1")
        await running.read()
        waiting = async_call("a2")
        adm = r.worker.admission
        await wait_until(lambda: adm.waiting(QueueClass.ASYNC) == 1, 30, what=lambda: f"{adm.stats.classes}")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(async_call("a3"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert detail(err.value, error_details_pb2.ErrorInfo).reason == "QUEUE_FULL"
        assert detail(err.value, error_details_pb2.RetryInfo).retry_delay.seconds >= 1
        # Interactive work still goes straight in while the async class is saturated.
        assert (await collect(generate(r.stub, gen_request("i1", max_tokens=2), timeout=30)))[-1].summary
        running.cancel()
        first_of_waiting = await waiting.read()  # the waiter is admitted once the slot frees
        assert first_of_waiting.token_count >= 1
        waiting.cancel()


async def wait_until_job(stub: Any, job_id: str, state: JobState, timeout_s: float) -> infer_pb2.Job:
    want = common_pb2.JobState.Value(f"JOB_STATE_{state.value}")
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await stub.GetJob(infer_pb2.GetJobRequest(job_id=job_id), timeout=10)).job
        if job.state == want:
            return job  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {common_pb2.JobState.Name(job.state)}, not {state.value}")
        await asyncio.sleep(0.05)


# --- a second worker process: killed mid-job, engine death ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SpareWorker:
    """A worker process (``python -m services.infer``) started at the beginning of the module, so that its slow
    engine start-up overlaps with the shared engine's; ``seen`` records its health statuses until SERVING."""

    proc: subprocess.Popen[bytes]
    target: str
    log: Any
    seen: list[str]
    ready: asyncio.Task[None] | None = None


KILL_TEST = "test_a_job_survives_its_worker_being_killed"
DEATH_TEST = "test_engine_death_turns_the_worker_not_serving_and_unavailable"
KILL_QUEUE = f"kill-{uuid.uuid4().hex[:8]}"
KILL_LEASE_S = 1.5


def launch_worker(log_dir: Path, **env: str) -> SpareWorker:
    port = free_port()
    full_env = {
        **os.environ,
        "COSTMESH_INFER_PORT": str(port),
        "COSTMESH_INFER_MODEL_DIR": str(MODELS / "cheap"),
        "COSTMESH_INFER_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "COSTMESH_INFER_MAX_OUTPUT_TOKENS": "1000",
        "COSTMESH_INFER_MAX_NUM_SEQS": "4",
        "COSTMESH_INFER_INTERACTIVE_RESERVE": "1",
        "COSTMESH_INFER_KV_CACHE_GIB": "1",
        "COSTMESH_INFER_JOB_POLL_S": "0.05",
        "COSTMESH_INFER_LOG_LEVEL": "warning",
        **env,
    }
    log = (log_dir / f"worker-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.infer"],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    return SpareWorker(proc, f"127.0.0.1:{port}", log, [])


async def watch_health(target: str, want: str, timeout_s: float, seen: list[str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as ch:
        while True:
            status = await check(ch, timeout_s=1.0)
            if seen is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} is {status}, not {want}, after {timeout_s}s")
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def spare_workers(
    request: pytest.FixtureRequest, redis_server: Any, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> AsyncIterator[dict[str, SpareWorker]]:
    """Second worker processes for the two tests that need one — started only when those tests are selected."""
    selected = {item.name for item in request.session.items}
    log_dir = tmp_path_factory.mktemp("infer-workers")
    spares: dict[str, SpareWorker] = {}
    if KILL_TEST in selected:
        spares["kill"] = launch_worker(
            log_dir,
            COSTMESH_INFER_JOB_STORE="redis",
            COSTMESH_INFER_REDIS_URL=redis_server.url,
            COSTMESH_INFER_JOB_QUEUE=KILL_QUEUE,
            COSTMESH_INFER_JOB_LEASE_S=str(KILL_LEASE_S),
        )
    if DEATH_TEST in selected:
        spares["death"] = launch_worker(log_dir, COSTMESH_INFER_SQLITE_PATH=str(log_dir / "jobs.sqlite3"))
    for spare in spares.values():
        spare.ready = asyncio.create_task(watch_health(spare.target, "SERVING", 900, spare.seen))
    yield spares
    for spare in spares.values():
        if spare.ready is not None:
            spare.ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, AssertionError):
                await spare.ready
        with contextlib.suppress(ProcessLookupError):
            os.killpg(spare.proc.pid, signal.SIGKILL)
        spare.proc.wait(30)
        spare.log.close()


async def test_a_job_survives_its_worker_being_killed(
    engine: VllmEngine, spare_workers: dict[str, SpareWorker], redis_url: str
) -> None:
    import psutil

    spare = spare_workers["kill"]
    assert spare.ready is not None
    await spare.ready
    assert "NOT_SERVING" in spare.seen, f"health must say NOT_SERVING while the engine warms up (saw {spare.seen})"
    engine_procs = psutil.Process(spare.proc.pid).children(recursive=True)
    assert engine_procs, "vLLM runs its engine core in child processes"
    # The engine is frozen (SIGSTOP) before the job goes in: the worker claims it (RUNNING) and hands it to the
    # engine, but it cannot finish before the kill, however fast the model or however slow this test is to look.
    for p in engine_procs:
        p.suspend()
    try:
        async with grpc.aio.insecure_channel(spare.target) as ch:
            stub = infer_pb2_grpc.InferenceServiceStub(ch)
            sampling = common_pb2.SamplingParams(max_tokens=400, temperature=0.0)
            submitted = await stub.SubmitJob(
                infer_pb2.SubmitJobRequest(request_id="survivor", prompt="Write the long report", sampling=sampling),
                timeout=10,
            )
            await wait_until_job(stub, submitted.job_id, JobState.RUNNING, 60)
        # Only the worker process, as an OOM kill does: its engine core and the core's worker must go down with it
        # (the die_with_parent vLLM plugin registered in pyproject.toml), not live on orphaned with their CPU and
        # memory.
        spare.proc.kill()
        spare.proc.wait(30)
    finally:
        # Whatever the kill left alive runs again, so a process that would outlive the worker shows up below.
        for p in engine_procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert not alive, f"orphaned vLLM processes: {[p.name() for p in alive]}"
    # Another worker on the same queue takes the orphaned job over once its lease runs out, and finishes it.
    store = RedisJobStore.from_url(redis_url, queue=KILL_QUEUE, lease_s=KILL_LEASE_S)
    async with serve(engine, store, job_queue=KILL_QUEUE) as r:
        job = await wait_until_job(r.stub, submitted.job_id, JobState.SUCCEEDED, 120)
        assert job.attempts == 2
        assert job.summary.usage.output_tokens == 400 and job.text
        assert r.worker.stats.jobs_reclaimed_total == 1


async def test_engine_death_turns_the_worker_not_serving_and_unavailable(
    spare_workers: dict[str, SpareWorker],
) -> None:
    import psutil

    spare = spare_workers["death"]
    assert spare.ready is not None
    await spare.ready
    for child in psutil.Process(spare.proc.pid).children(recursive=True):
        child.kill()  # the engine core and its worker die; the gRPC process lives on
    await watch_health(spare.target, "NOT_SERVING", 60)
    async with grpc.aio.insecure_channel(spare.target) as ch:
        stub = infer_pb2_grpc.InferenceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(generate(stub, gen_request("after-death"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert detail(err.value, error_details_pb2.ErrorInfo).reason == "ENGINE_DEAD"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(infer_pb2.SubmitJobRequest(request_id="x", prompt="hello"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    spare.proc.send_signal(signal.SIGTERM)
    assert spare.proc.wait(60) == 0
