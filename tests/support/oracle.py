"""The money oracle of the adversarial tests: the budget's ledger against what the workers say they generated."""

from __future__ import annotations

from costmesh.budget.v1 import budget_pb2
from tests.support.mesh import Mesh
from tests.support.prom import scrape, total
from tests.support.traffic import settled

WORKERS = ("infer-cheap", "infer-full")


def generated(m: Mesh, tenant: str) -> tuple[float, float, float]:
    """(cost, input tokens, output tokens) the workers counted as generated for ``tenant``, at their own prices."""
    cost = inp = out = 0.0
    for name in WORKERS:
        samples = scrape(m.layout.metrics_ports[name])
        cost += total(samples, "costmesh_infer_cost_micros_total", tenant=tenant)
        inp += total(samples, "costmesh_infer_tokens_total", tenant=tenant, type="input")
        out += total(samples, "costmesh_infer_tokens_total", tenant=tenant, type="output")
    return cost, inp, out


async def assert_ledger_is_the_truth(m: Mesh, tenant: str, *, timeout_s: float = 90) -> budget_pb2.UsageRow:
    """Nothing reserved for ``tenant`` (a tracked one: tests.support.traffic.track), and the ledger holds exactly what
    the workers generated for it: every token billed, none twice, no commit late or above its estimate."""
    usage, reserved = await settled(m.layout.target("budget"), tenant, timeout_s=timeout_s)
    assert reserved == 0, f"{reserved} micro-USD still reserved for {tenant}"
    cost, inp, out = generated(m, tenant)
    ledger = (usage.usage.input_tokens, usage.usage.output_tokens, usage.cost_micros)
    assert ledger == (inp, out, cost), f"ledger (input, output, cost) {ledger} != workers' {(inp, out, cost)}"
    assert (usage.late_commits, usage.over_estimate_commits) == (0, 0), (
        usage.late_commits,
        usage.over_estimate_commits,
    )
    return usage
