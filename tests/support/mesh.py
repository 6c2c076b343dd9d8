"""The whole mesh as separate processes for e2e tests: the same layout ``costmesh up`` uses, on free ports."""

from __future__ import annotations

from pathlib import Path

from services.cli.mesh import LocalMesh, MeshLayout
from services.cli.mesh import free_layout as _free_layout
from tests.support.procs import ROOT

MODELS_DIR = ROOT / "var" / "models"


def free_layout(data_dir: Path, *, redis_url: str | None = None, otlp_endpoint: str | None = None) -> MeshLayout:
    return _free_layout(data_dir, models_dir=MODELS_DIR, redis_url=redis_url, otlp_endpoint=otlp_endpoint)


class Mesh(LocalMesh):
    def __init__(self, layout: MeshLayout, extra_env: dict[str, dict[str, str]] | None = None) -> None:
        super().__init__(layout=layout, cwd=ROOT, extra_env=extra_env or {})
