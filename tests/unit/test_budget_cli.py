"""The pure parts of ``costmesh budget``: scope syntax and exact USD <-> micro-USD conversion."""

from __future__ import annotations

import pytest
import typer

from costmesh.budget.v1 import budget_pb2
from services.budget.cli import micros_to_usd, parse_scope, scope_label, usd_to_micros


@pytest.mark.parametrize(
    ("text", "kind", "tenant", "name"),
    [
        ("global", budget_pb2.SCOPE_KIND_GLOBAL, "", ""),
        ("tenant:acme", budget_pb2.SCOPE_KIND_TENANT, "acme", ""),
        ("tenant:acme/team:search", budget_pb2.SCOPE_KIND_TEAM, "acme", "search"),
        ("tenant:acme/feature:faq:v2", budget_pb2.SCOPE_KIND_FEATURE, "acme", "faq:v2"),
        ("tenant:acme/end_user:u/1", budget_pb2.SCOPE_KIND_END_USER, "acme", "u/1"),
    ],
)
def test_scope_syntax_round_trips(text: str, kind: int, tenant: str, name: str) -> None:
    scope = parse_scope(text)
    assert (scope.kind, scope.tenant, scope.name) == (kind, tenant, name)
    assert scope_label(scope) == text


@pytest.mark.parametrize("text", ["", "acme", "tenant:", "tenant:acme/", "tenant:acme/group:x", "tenant:acme/team:"])
def test_bad_scopes_are_refused(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_scope(text)


def test_usd_converts_exactly() -> None:
    assert usd_to_micros("12.5") == 12_500_000
    assert usd_to_micros("0.000001") == 1
    assert usd_to_micros("1e3") == 1_000_000_000
    assert usd_to_micros("0.1") + usd_to_micros("0.2") == usd_to_micros("0.3")  # no float drift
    for bad in ("0.0000005", "ten", "1,5"):
        with pytest.raises(typer.BadParameter):
            usd_to_micros(bad)
    assert micros_to_usd(12_500_000) == "12.500000"
    assert micros_to_usd(-1_000) == "-0.001000"
    assert micros_to_usd(0) == "0.000000"
