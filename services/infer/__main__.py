"""Composition root of one inference worker: ``python -m services.infer`` (or ``costmesh serve infer``).

Builds the vLLM engine, the job store, the admission controller, the service and the job runner; reports SERVING only
once the engine has answered a warm-up generation, and NOT_SERVING as soon as the engine dies. vLLM spawns its
engine-core process, which re-imports this module: everything runs under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.rpc_telemetry import AttributionBaggageInterceptor, RpcMetricsInterceptor, host_meter
from services.common.server import full_service_name, make_host
from services.infer.app import build_store, build_worker
from services.infer.config import InferSettings
from services.infer.engine import VllmEngine


async def serve(settings: InferSettings) -> None:
    rpc_metrics = RpcMetricsInterceptor()
    host = make_host("infer", settings, interceptors=[AttributionBaggageInterceptor(), rpc_metrics])
    meter = host_meter(host, "costmesh.infer")
    rpc_metrics.bind(meter)
    background: set[asyncio.Task[None]] = set()

    def engine_died() -> None:
        worker.stats.serving = False
        task = asyncio.get_running_loop().create_task(host.set_serving(False))
        background.add(task)
        task.add_done_callback(background.discard)

    engine = VllmEngine(settings, on_dead=engine_died)
    store = build_store(settings)
    worker = build_worker(settings, engine=engine, store=store, meter=meter)
    host.add_service(
        full_service_name(infer_pb2, "InferenceService"),
        lambda server: infer_pb2_grpc.add_InferenceServiceServicer_to_server(worker.servicer, server),
    )
    # Closers run in reverse order: stop taking jobs (running ones go back to the queue), stop the engine, close the
    # store.
    host.on_stop(store.close)
    host.on_stop(engine.shutdown)
    host.on_stop(worker.runner.stop)

    async def ready() -> None:
        await asyncio.wait_for(engine.start(), timeout=settings.warmup_timeout_s)
        worker.runner.start()
        worker.stats.serving = True

    await host.run(ready=ready)


def load_settings() -> InferSettings:
    """Settings from the environment and the YAML file (every field has a default)."""
    return cast(Callable[[], InferSettings], InferSettings)()


def main() -> None:
    asyncio.run(serve(load_settings()))


if __name__ == "__main__":
    main()
