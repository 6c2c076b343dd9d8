"""Log lines carry the trace and span ids of the current span (structlog and standard-library loggers alike)."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from services.common.logging import configure_logging


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The process's log configuration, writing to a buffer instead of stderr."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(service="test", level="info", fmt="json")
    yield out
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:], root.level = handlers, level


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_lines_inside_a_span_carry_its_trace_and_span_ids(logs: io.StringIO) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    log = structlog.get_logger("costmesh.test")
    log.info("before_request")
    with tracer.start_as_current_span("rpc") as outer:
        log.info("budget_reserved", reservation_id="r1")
        with tracer.start_as_current_span("child") as inner:
            logging.getLogger("vllm.engine").warning("stdlib line")
    log.info("after_request")
    before, reserved, stdlib, after = lines(logs)
    assert "trace_id" not in before and "trace_id" not in after
    ctx, inner_ctx = outer.get_span_context(), inner.get_span_context()
    assert reserved["event"] == "budget_reserved" and reserved["service"] == "test"
    assert reserved["trace_id"] == format(ctx.trace_id, "032x")
    assert reserved["span_id"] == format(ctx.span_id, "016x")
    assert stdlib["event"] == "stdlib line"
    assert stdlib["trace_id"] == reserved["trace_id"] and stdlib["span_id"] == format(inner_ctx.span_id, "016x")
    provider.shutdown()
