"""``costmesh models ...`` (local model builder) and ``costmesh infer ...`` (worker admin) sub-commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Local models for the inference tiers.")
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Inference worker admin.")


@models_app.callback()
def _models() -> None:
    """Local models for the inference tiers (no download)."""


@app.callback()
def _infer() -> None:
    """Inference worker admin."""


@models_app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Directory that gets <out>/cheap and <out>/full")] = Path("var/models"),
    tier: Annotated[list[str] | None, typer.Option(help="Only these tiers (cheap, full); default both")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when an identical build is there")] = False,
) -> None:
    """Build small Llama-architecture models with a local tokenizer and seeded random weights (no download).

    Their text is meaningless; they exercise every engine path. Point COSTMESH_INFER_MODEL_DIR at a real Hugging
    Face model directory to serve a real model instead.
    """
    from services.infer.models import build_models

    results = build_models(out, tuple(tier) if tier else ("cheap", "full"), force=force)
    for r in results:
        verb = "built" if r.built else "up to date"
        typer.echo(f"{r.tier:<6} {r.path}  {r.parameters / 1e6:.1f}M parameters  {verb}")


@app.command("list-models")
def list_models(
    target: Annotated[str, typer.Option(help="Worker address host:port")] = "127.0.0.1:50054",
    timeout_s: Annotated[float, typer.Option(help="Deadline")] = 5.0,
) -> None:
    """What a worker serves: model, tier, prices and limits."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc

    async def run() -> dict[str, object]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = infer_pb2_grpc.InferenceServiceStub(channel)
            reply = await stub.ListModels(infer_pb2.ListModelsRequest(), timeout=timeout_s)
            return MessageToDict(reply)

    typer.echo(json.dumps(asyncio.run(run()), indent=2))


@app.command("get-job")
def get_job(
    job_id: Annotated[str, typer.Argument(help="Job id from SubmitJob")],
    target: Annotated[str, typer.Option(help="Worker address host:port")] = "127.0.0.1:50054",
    timeout_s: Annotated[float, typer.Option(help="Deadline")] = 5.0,
) -> None:
    """Status and result of an async job."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc

    async def run() -> dict[str, object]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = infer_pb2_grpc.InferenceServiceStub(channel)
            reply = await stub.GetJob(infer_pb2.GetJobRequest(job_id=job_id), timeout=timeout_s)
            return MessageToDict(reply.job)

    typer.echo(json.dumps(asyncio.run(run()), indent=2))
