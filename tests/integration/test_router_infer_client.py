"""The router's worker client (services/router/clients.py GrpcGeneration) against the real InferenceService servicer
on loopback, through the router's own client interceptors. The engine under the servicer is the scripted one of
tests/unit/test_infer_service.py (a unit-test seam: the vLLM path of the same servicer runs in test_infer_engine.py
and the e2e suites); everything between the router and the engine is real: the bidirectional stream, its stop
message, the summary, grpc.aio's intercepted call.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from costmesh.infer.v1 import infer_pb2_grpc
from services.common.attribution import Attribution
from services.common.rpc_telemetry import client_interceptors
from services.infer.jobs.runner import JobRunner, RunnerSettings
from services.infer.jobs.sqlite import SqliteJobStore
from services.infer.server import InferenceServicer
from services.router.classifier.types import Message, Tier
from services.router.clients import GrpcInfer
from services.router.domain import FinishReason, Sampling
from tests.unit.test_infer_service import ScriptedEngine, make_service


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[ScriptedEngine, GrpcInfer, list[dict[str, Any]]]]:
    engine = ScriptedEngine(max_model_len=256, gate=asyncio.Event())
    service = make_service(engine)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    runner = JobRunner(store=store, service=service, settings=RunnerSettings(worker_id="w"))
    server = grpc.aio.server()
    infer_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(service=service, jobs=runner), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors(None))
    try:
        yield engine, GrpcInfer({Tier.CHEAP: channel}, timeout_s=30), errors
    finally:
        await channel.close()
        await server.stop(None)
        await store.close()
        gc.collect()
        await asyncio.sleep(0)
        loop.set_exception_handler(previous)


def start(infer: GrpcInfer, max_tokens: int) -> Any:
    return infer.generate(
        tier=Tier.CHEAP,
        request_id="r1",
        messages=(Message("user", "one two three"),),
        sampling=Sampling(max_tokens=max_tokens),
        attribution=Attribution(tenant="acme"),
    )


async def settle_gc() -> None:
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)


async def test_a_finished_generation_leaves_no_task_behind(
    worker: tuple[ScriptedEngine, GrpcInfer, list[dict[str, Any]]],
) -> None:
    """With client interceptors grpc.aio feeds a bidirectional call's writes through a task of its own; a call left
    half-open left it pending for ever ('Task was destroyed but it is pending', hundreds a minute in the router's
    log)."""
    engine, infer, errors = worker
    assert engine.gate is not None
    engine.gate.set()
    for _ in range(3):
        gen = start(infer, 4)
        chunks = [c async for c in gen]
        assert chunks[-1].usage is not None and chunks[-1].usage.output_tokens == 4
        del gen, chunks
    await settle_gc()
    assert errors == []


async def test_stop_ends_the_stream_with_the_usage_so_far_and_a_cancelled_reader_touches_nothing(
    worker: tuple[ScriptedEngine, GrpcInfer, list[dict[str, Any]]],
) -> None:
    engine, infer, errors = worker
    assert engine.gate is not None
    engine.gate.set()
    engine.step_s = 1.0  # a slow worker: a token a second
    gen = start(infer, 12)
    stream = aiter(gen)
    first = await anext(stream)
    assert first.text
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)
    reader.cancel()  # the consumer goes away while it waits: the worker's call must live on
    with pytest.raises(asyncio.CancelledError):
        await reader
    last = await gen.stop(10)
    assert last is not None and last.usage is not None and last.finish_reason is FinishReason.ABORT
    assert 1 <= last.usage.output_tokens < 12 and last.usage.output_tokens >= gen.output_tokens
    assert last.usage.input_tokens > 0
    del gen, stream
    await settle_gc()
    assert errors == []
