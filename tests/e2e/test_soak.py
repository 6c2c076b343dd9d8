"""A short soak of the whole mesh (embedded stores, the ``costmesh up`` layout): steady mixed load for about a
minute, then the invariants that a long run must keep — reserved money returns to zero when traffic stops, the
ledger equals what the workers generated (the answered requests' costs plus what the cancelled streams, on the same
tenant, were billed), nothing failed, every service is alive, and no service's memory ran away. ``bench/soak.py`` is
the same soak for ten minutes and more, with the figures in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from bench.soak import SoakReport, print_report, soak
from tests.support.mesh import Mesh, free_layout, running

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

DURATION_S = float(os.environ.get("COSTMESH_SOAK_S", "75"))
#: Growth of a Python service (router, budget, cache) past warm-up that would mean a leak even in a short run.
MAX_GROWTH_MIB = 64.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running(free_layout(tmp_path_factory.mktemp("mesh-soak")), timeout_s=900) as m:
        yield m


@pytest.fixture(scope="module")
def report(mesh: Mesh) -> SoakReport:
    r = asyncio.run(soak(mesh, duration_s=DURATION_S, concurrency=4, sample_every_s=3.0, warmup_s=DURATION_S / 4))
    print_report(r)
    return r


def test_steady_load_is_served_without_errors(report: SoakReport) -> None:
    assert report.requests_served > 0 and report.errors == {}
    assert set(report.served) >= {"miss", "hit", "stream"}  # the mix really ran
    assert report.cache_hits > 0
    assert all(report.services_alive.values()), report.services_alive


def test_reserved_money_returns_to_zero_when_traffic_stops(report: SoakReport) -> None:
    assert report.reserved_after_micros == 0


def test_the_ledger_holds_every_generated_token(report: SoakReport) -> None:
    assert report.responses_cost_micros > 0
    assert report.ledger_cost_micros == report.workers_cost_micros  # the workers' own count
    assert report.ledger_output_tokens == report.workers_output_tokens
    assert report.ledger_requests == report.charged_requests + report.cancelled_streams
    if report.cancelled_streams:
        assert report.cancelled_billed_micros > 0  # cancelled streams paid for what they got
    assert report.money_lost_micros == 0


def test_no_service_memory_runs_away(report: SoakReport) -> None:
    for name in ("router", "budget", "cache"):
        m = report.memory[name]
        assert m["growth_mib"] < MAX_GROWTH_MIB, (name, m)
    for name in ("infer-cheap", "infer-full"):
        assert report.memory[name]["end_mib"] > 0  # measured (the engine core process included)
