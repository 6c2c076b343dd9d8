"""Dashboards and alert rules, checked against what the services really export.

Grafana dashboards (deploy/observability/grafana/dashboards/*.json) must have Grafana's dashboard shape; the
Prometheus rules (deploy/observability/prometheus/rules/*.yml) the rule-group shape; and every PromQL expression in
them (and KEDA's Prometheus trigger) may only name metrics — and match on labels — that the services export. The
exported names come from the instrument definitions themselves, run through the same Prometheus reader the services
serve /metrics with (tests/support/telemetry.py). When ``promtool`` is installed (Debian package ``prometheus``), the
expressions are also parsed by Prometheus itself and the alert rules' unit tests (prometheus/tests/) run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.telemetry import PROMETHEUS_SERIES, TARGET_LABELS, exported_series, selectors

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
DASHBOARDS = sorted((OBS / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((OBS / "prometheus" / "rules").glob("*.yml"))  # what prometheus.yml's rule_files loads
RULE_TESTS = sorted((OBS / "prometheus" / "tests").glob("*_test.yml"))
KEDA = ROOT / "deploy" / "k8s" / "components" / "keda-workers" / "scaledobjects.yaml"
PANEL_TYPES = frozenset({"row", "stat", "timeseries", "table", "bargauge", "gauge", "piechart", "heatmap", "text"})
PROMTOOL = shutil.which("promtool")


@cache
def exported() -> dict[str, frozenset[str]]:
    return {**exported_series(), **PROMETHEUS_SERIES}


def datasource_uids() -> set[str]:
    doc = yaml.safe_load((OBS / "grafana" / "provisioning" / "datasources" / "datasources.yaml").read_text())
    return {d["uid"] for d in doc["datasources"]}


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    return [
        (r.get("alert") or r.get("record"), r["expr"])
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
    ]


def keda_queries() -> list[str]:
    return [
        t["metadata"]["query"]
        for doc in yaml.safe_load_all(KEDA.read_text())
        for t in doc["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]


def unknown_names(expr: str) -> list[str]:
    """Metric names and label matchers in ``expr`` that nothing exports (empty when all are real)."""
    problems = []
    found = selectors(expr)
    if not found:
        problems.append("no metric selector")
    for s in found:
        labels = exported().get(s.metric)
        if labels is None:
            problems.append(f"metric {s.metric}")
            continue
        problems += [f"label {s.metric}{{{name}}}" for name in sorted(s.labels - labels - TARGET_LABELS)]
    return problems


# -- the checker itself --------------------------------------------------------------------------------------------


def test_exported_names_include_what_the_autoscaler_and_the_issue_require() -> None:
    names = exported()
    assert "tier" in names["costmesh_infer_interactive_queue_depth"]  # KEDA's trigger
    for required in (
        "costmesh_cost_micros_total",
        "costmesh_tokens_total",
        "costmesh_requests_total",
        "costmesh_savings_micros_total",
        "costmesh_cache_lookups_total",
        "costmesh_cache_coalesced_waits_total",
        "costmesh_route_decisions_total",
        "costmesh_budget_rejections_total",
        "costmesh_budget_remaining_micros",
        "costmesh_infer_queue_depth",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "rpc_server_duration_milliseconds_count",
    ):
        assert required in names, required
    for name in ("costmesh_cost_micros_total", "costmesh_tokens_total", "costmesh_savings_micros_total"):
        assert {"tenant", "team", "feature", "model", "tier"} <= names[name], name


def test_the_checker_rejects_unknown_metrics_and_labels() -> None:
    assert unknown_names('sum(rate(costmesh_cost_micros_total{feature="x"}[5m]))') == []
    assert unknown_names("sum(rate(costmesh_cost_total[5m]))") == ["metric costmesh_cost_total"]
    assert unknown_names('costmesh_infer_serving{queue="x"}') == ["label costmesh_infer_serving{queue}"]
    assert unknown_names("vector(1)") == ["no metric selector"]
    by_clause = 'sum by (le, tier) (rate(gen_ai_server_time_to_first_token_seconds_bucket{tier=~"$tier"}[5m])) * 1e3'
    assert [s.metric for s in selectors(by_clause)] == ["gen_ai_server_time_to_first_token_seconds_bucket"]
    offset = 'a_total offset 1d / on (tenant) group_left b{x="1"} and c'
    assert [(s.metric, set(s.labels)) for s in selectors(offset)] == [("a_total", set()), ("b", {"x"}), ("c", set())]


# -- dashboards ----------------------------------------------------------------------------------------------------


def test_there_are_dashboards_for_spend_and_for_service_health() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"costmesh-spend", "costmesh-sre"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_has_grafanas_shape(path: Path) -> None:
    d = load(path)
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list), ("templating", dict)):
        assert isinstance(d.get(key), kind), key
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert "id" not in d or d["id"] is None  # provisioned dashboards get their id from Grafana
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    uids = datasource_uids()
    for p in panels(d):
        assert p["type"] in PANEL_TYPES, p["type"]
        assert p.get("title"), p["id"]
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= g.keys() and g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in uids and p["datasource"]["type"] == "prometheus"
        targets = p["targets"]
        assert targets, f"panel {p['title']!r} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids))
        for t in targets:
            assert isinstance(t["expr"], str) and t["expr"].strip()
    for v in d["templating"]["list"]:
        assert v["datasource"]["uid"] in uids
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["query"]["query"])
        assert m is not None, v["query"]
        assert m.group(2) in exported()[m.group(1)], v["query"]


def test_dashboard_uids_are_unique() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_name_only_exported_metrics(path: Path) -> None:
    d = load(path)
    bad = {expr: problems for expr in dashboard_exprs(d) if (problems := unknown_names(expr))}
    assert bad == {}
    variables = {v["name"] for v in d["templating"]["list"]}
    for expr in dashboard_exprs(d):
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__range", "__interval"}
        assert used <= variables, expr


def test_dashboards_cover_what_sres_ask() -> None:
    exprs = " ".join(e for p in DASHBOARDS for e in dashboard_exprs(load(p)))
    for metric in (
        "costmesh_cost_micros_total",  # spend by feature/team/model
        "costmesh_savings_micros_total",  # savings
        "costmesh_budget_remaining_micros",  # headroom
        "costmesh_cache_lookups_total",  # hit rate
        "costmesh_route_decisions_total",  # routing split
        "gen_ai_server_time_to_first_token_seconds_bucket",  # TTFT p99
        "costmesh_infer_queue_depth",  # queue depth
        "rpc_server_duration_milliseconds_count",  # error rates
    ):
        assert metric in exprs, metric
    for label in ("feature", "team", "model"):
        assert f"sum by ({label}" in exprs, label


# -- alert rules ---------------------------------------------------------------------------------------------------


def test_alert_rules_have_the_rule_group_shape() -> None:
    assert RULE_FILES, "no alert rules"
    names = []
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text())
        assert set(doc) == {"groups"}
        group_names = [g["name"] for g in doc["groups"]]
        assert len(group_names) == len(set(group_names))
        for g in doc["groups"]:
            assert set(g) <= {"name", "interval", "limit", "rules"} and g["rules"]
            for r in g["rules"]:
                assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r
                assert isinstance(r["alert"], str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", r["alert"])
                assert isinstance(r["expr"], str) and r["expr"].strip()
                assert re.fullmatch(r"\d+[smhd]", str(r.get("for", "0s")))
                assert r["labels"]["severity"] in {"info", "warning", "critical"}
                assert r["annotations"]["summary"]
                names.append(r["alert"])
    assert len(names) == len(set(names))


def test_alert_rules_cover_burn_rate_hit_rate_queue_saturation_and_workers() -> None:
    exprs = dict(rule_exprs())
    assert "costmesh_budget_committed_micros_total" in exprs["CostmeshBudgetBurnRateHigh"]
    assert "offset 1d" in exprs["CostmeshCacheHitRateDrop"]
    assert "costmesh_infer_queue_capacity" in exprs["CostmeshInferQueueSaturated"]
    assert "up{" in exprs["CostmeshInferWorkerDown"]
    assert "costmesh_infer_serving" in exprs["CostmeshInferWorkerNotServing"]


def test_alert_rules_name_only_exported_metrics() -> None:
    bad = {name: problems for name, expr in rule_exprs() if (problems := unknown_names(expr))}
    assert bad == {}


def test_the_autoscaler_queries_an_exported_metric() -> None:
    queries = keda_queries()
    assert queries
    assert {q: unknown_names(q) for q in queries} == {q: [] for q in queries}


# -- Prometheus itself ---------------------------------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


@needs_promtool
def test_promtool_parses_every_rule_and_dashboard_query(tmp_path: Path) -> None:
    checked = promtool("check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Dashboard queries as recording rules, with Grafana's variables replaced by what Grafana substitutes.
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m"}
    rules = []
    for i, query in enumerate(e for p in DASHBOARDS for e in dashboard_exprs(load(p))):
        expr = query
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": re.sub(r"\$\w+", ".*", expr)})
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_prometheus_loads_its_config_with_every_rule_file(tmp_path: Path) -> None:
    config = yaml.safe_load((OBS / "prometheus" / "prometheus.yml").read_text())
    (mounted,) = config["rule_files"]  # compose mounts prometheus/ at /etc/prometheus
    assert mounted == "/etc/prometheus/rules/*.yml"
    shutil.copytree(OBS / "prometheus" / "rules", tmp_path / "rules")
    config["rule_files"] = [str(tmp_path / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in checked.stdout + checked.stderr


@needs_promtool
def test_alert_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    tested = promtool("test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
