"""The whole mesh as separate processes for e2e tests: the same layout ``costmesh up`` uses, on free ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from services.cli.mesh import LocalMesh, MeshLayout
from services.cli.mesh import free_layout as _free_layout
from services.infer.models import ensure_local_models
from tests.support.procs import ROOT

MODELS_DIR = ROOT / "var" / "models"


def free_layout(data_dir: Path, *, redis_url: str | None = None, otlp_endpoint: str | None = None) -> MeshLayout:
    return _free_layout(data_dir, models_dir=MODELS_DIR, redis_url=redis_url, otlp_endpoint=otlp_endpoint)


class Mesh(LocalMesh):
    def __init__(self, layout: MeshLayout, extra_env: dict[str, dict[str, str]] | None = None) -> None:
        super().__init__(layout=layout, cwd=ROOT, extra_env=extra_env or {})


def _start(layout: MeshLayout, extra_env: dict[str, dict[str, str]] | None) -> Mesh:
    ensure_local_models(MODELS_DIR)
    mesh = Mesh(layout, extra_env)
    mesh.start()
    return mesh


def _did_not_start(mesh: Mesh) -> NoReturn:
    logs = "\n".join(f"--- {n}\n{mesh.log(n)[-3000:]}" for n in mesh.procs)
    mesh.stop()
    pytest.fail(f"mesh did not start:\n{logs}")


@contextlib.contextmanager
def running(
    layout: MeshLayout, extra_env: dict[str, dict[str, str]] | None = None, *, timeout_s: float = 600
) -> Iterator[Mesh]:
    """The whole mesh started and SERVING (the test fails with every service's log tail if it is not within
    ``timeout_s``), stopped on exit. For synchronous fixtures."""
    mesh = _start(layout, extra_env)
    try:
        asyncio.run(mesh.wait_serving(timeout_s=timeout_s))
    except TimeoutError:
        _did_not_start(mesh)
    try:
        yield mesh
    finally:
        mesh.stop()


@contextlib.asynccontextmanager
async def running_async(
    layout: MeshLayout, extra_env: dict[str, dict[str, str]] | None = None, *, timeout_s: float = 600
) -> AsyncIterator[Mesh]:
    """:func:`running` for fixtures that run in the event loop."""
    mesh = _start(layout, extra_env)
    try:
        await mesh.wait_serving(timeout_s=timeout_s)
    except TimeoutError:
        _did_not_start(mesh)
    try:
        yield mesh
    finally:
        mesh.stop()
