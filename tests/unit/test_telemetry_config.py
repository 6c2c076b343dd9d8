"""``costmesh up --otlp-endpoint ... --trace-sample-ratio ...`` reaches every service's settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.budget.config import BudgetSettings
from services.cache.config import CacheSettings
from services.cli import main as cli
from services.cli.supervisor import ChildSpec
from services.common.settings import ServiceSettings
from services.infer.config import InferSettings
from services.router.config import RouterSettings

SETTINGS: dict[str, Callable[[], ServiceSettings]] = {
    "budget": BudgetSettings,
    "cache": CacheSettings,
    "infer-cheap": InferSettings,
    "infer-full": InferSettings,
    "router": RouterSettings,
}


def test_up_passes_the_collector_and_sampling_to_every_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[Sequence[ChildSpec]] = []

    class Recorder:
        def __init__(self, children: Sequence[ChildSpec], **_: Any) -> None:
            started.append(children)

        async def run(self) -> None:
            return None

    monkeypatch.setattr(cli, "Supervisor", Recorder)
    monkeypatch.setattr(cli, "_ensure_models", lambda _dir: None)
    result = CliRunner().invoke(
        cli.app,
        [
            "up",
            "--otlp-endpoint",
            "collector.example:4317",
            "--trace-sample-ratio",
            "0.25",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    (children,) = started
    assert {c.name for c in children} == set(SETTINGS)
    for child in children:
        with monkeypatch.context() as env:
            for key, value in child.env.items():
                env.setenv(key, value)
            settings = SETTINGS[child.name]()
        assert settings.otlp_endpoint == "collector.example:4317", child.name
        assert settings.trace_sample_ratio == 0.25, child.name
        assert settings.metrics_port is not None, child.name  # Prometheus /metrics on every service


def test_without_options_nothing_is_exported_and_every_trace_is_sampled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[Sequence[ChildSpec]] = []
    monkeypatch.setattr(cli, "_ensure_models", lambda _dir: None)
    monkeypatch.setattr(
        cli, "Supervisor", type("R", (), {"__init__": lambda s, c, **k: started.append(c), "run": _noop})
    )
    result = CliRunner().invoke(cli.app, ["up", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for child in started[0]:
        assert not any(k.endswith(("_OTLP_ENDPOINT", "_TRACE_SAMPLE_RATIO")) for k in child.env), child.name
        with monkeypatch.context() as env:
            for key, value in child.env.items():
                env.setenv(key, value)
            settings = SETTINGS[child.name]()
        assert settings.otlp_endpoint is None and settings.trace_sample_ratio == 1.0


async def _noop(_self: object) -> None:
    return None
