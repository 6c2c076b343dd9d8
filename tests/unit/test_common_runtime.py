"""Unit tests of the shared runtime: settings, pricing, error mapping, channels, attribution."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from pydantic import ValidationError

from services.common.attribution import Attribution, from_metadata
from services.common.channels import normalize_target, service_config
from services.common.errors import (
    CostmeshError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
    Validator,
)
from services.common.interceptors import to_rpc_status
from services.common.pricing import CHEAP_DEFAULT, FULL_DEFAULT, Price, PriceTable, TokenUsage
from services.common.settings import ServiceSettings, service_settings_config


class DemoSettings(ServiceSettings):
    model_config = service_settings_config("demo")
    answer: int = 1


def test_settings_defaults_work_on_one_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTMESH_CONFIG", raising=False)
    s = DemoSettings()
    assert s.host == "127.0.0.1" and s.grace_period_s == 5.0 and s.answer == 1 and s.otlp_endpoint is None


def test_settings_precedence_env_over_yaml_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "costmesh.yaml"
    cfg.write_text("common:\n  log_level: debug\n  answer: 2\ndemo:\n  answer: 3\n  port: 7000\nother:\n  answer: 9\n")
    monkeypatch.setenv("COSTMESH_CONFIG", str(cfg))
    s = DemoSettings()
    assert (s.log_level, s.answer, s.port) == ("debug", 3, 7000)  # service section beats common
    monkeypatch.setenv("COSTMESH_DEMO_PORT", "7001")
    assert DemoSettings().port == 7001  # env beats YAML
    assert DemoSettings(port=7002).port == 7002  # explicit beats env


def test_settings_are_frozen_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTMESH_CONFIG", raising=False)
    s = DemoSettings()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    monkeypatch.setenv("COSTMESH_DEMO_PORT", "70000")
    with pytest.raises(ValidationError):
        DemoSettings()
    monkeypatch.setenv("COSTMESH_DEMO_PORT", "1")
    monkeypatch.setenv("COSTMESH_DEMO_TRACE_SAMPLE_RATIO", "1.5")
    with pytest.raises(ValidationError):
        DemoSettings()


def test_prices_default_to_public_list_prices() -> None:
    table = PriceTable()
    assert table.price_for(tier="cheap") == CHEAP_DEFAULT
    assert (FULL_DEFAULT.input_micros_per_mtok, FULL_DEFAULT.output_micros_per_mtok) == (2_500_000, 10_000_000)
    # 1M input + 1M output tokens on the full tier = 12.50 USD
    assert FULL_DEFAULT.cost_micros(TokenUsage(1_000_000, 1_000_000)) == 12_500_000
    # cached prompt tokens are charged at the cached-input price
    assert FULL_DEFAULT.cost_micros(TokenUsage(1_000_000, 0, cached_input_tokens=1_000_000)) == 1_250_000
    assert CHEAP_DEFAULT.cost_micros(TokenUsage(1000, 100, cached_input_tokens=400)) == 600 * 150 // 1000 + 30 + 60


def test_cost_rounds_up_and_never_counts_more_cached_than_input() -> None:
    one_token = TokenUsage(input_tokens=1)
    assert CHEAP_DEFAULT.cost_micros(one_token) == 1  # 0.15 micro-USD rounds up to 1
    assert CHEAP_DEFAULT.cost_micros(TokenUsage()) == 0
    odd = TokenUsage(input_tokens=10, cached_input_tokens=50)
    assert CHEAP_DEFAULT.cost_micros(odd) == CHEAP_DEFAULT.cost_micros(TokenUsage(10, 0, 10))
    assert FULL_DEFAULT.estimate_micros(100, 50) == FULL_DEFAULT.cost_micros(TokenUsage(100, 50))


def test_price_table_model_override_and_unknown_tier() -> None:
    special = Price(input_micros_per_mtok=1, output_micros_per_mtok=2, cached_input_micros_per_mtok=0)
    table = PriceTable(models={"special": special})
    assert table.price_for(tier="full", model="special") == special
    assert table.price_for(tier="full", model="other") == FULL_DEFAULT
    with pytest.raises(KeyError, match="no price for tier"):
        table.price_for(tier="medium")
    with pytest.raises(ValidationError):
        Price(input_micros_per_mtok=-1, output_micros_per_mtok=0, cached_input_micros_per_mtok=0)


def _details(status_proto: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for any_msg in status_proto.details:  # type: ignore[attr-defined]
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[cls.__name__] = msg
    return out


def test_invalid_argument_maps_to_bad_request_and_error_info() -> None:
    v = Validator()
    v.require(False, "attribution.tenant", "required")
    v.require(True, "messages", "never added")
    v.add("sampling.temperature", "must be in [0, 2]")
    with pytest.raises(InvalidArgument) as info:
        v.raise_if_any("invalid request")
    status = to_rpc_status(info.value, "costmesh.budget")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    d = _details(status)
    assert d["ErrorInfo"].reason == "INVALID_ARGUMENT" and d["ErrorInfo"].domain == "costmesh.budget"  # type: ignore[attr-defined]
    fields = [f.field for f in d["BadRequest"].field_violations]  # type: ignore[attr-defined]
    assert fields == ["attribution.tenant", "sampling.temperature"]


def test_resource_exhausted_carries_quota_failure_and_retry_info() -> None:
    err = ResourceExhausted(
        "budget exhausted",
        violations=[QuotaViolation("tenant:acme/day", "limit 100, spent 90, reserved 20")],
        retry_after_s=12.25,
        reason="BUDGET_EXCEEDED",
        metadata={"scope": "tenant:acme"},
    )
    status = to_rpc_status(err, "costmesh.budget")
    d = _details(status)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert d["ErrorInfo"].reason == "BUDGET_EXCEEDED" and d["ErrorInfo"].metadata["scope"] == "tenant:acme"  # type: ignore[attr-defined]
    assert d["QuotaFailure"].violations[0].subject == "tenant:acme/day"  # type: ignore[attr-defined]
    delay = d["RetryInfo"].retry_delay  # type: ignore[attr-defined]
    assert (delay.seconds, delay.nanos) == (12, 250_000_000)


def test_other_errors_map_to_their_codes_without_extra_details() -> None:
    for err, code in (
        (NotFound("no such reservation"), grpc.StatusCode.NOT_FOUND),
        (Unavailable("store down"), grpc.StatusCode.UNAVAILABLE),
        (CostmeshError("boom"), grpc.StatusCode.INTERNAL),
    ):
        status = to_rpc_status(err, "costmesh.x")
        assert status.code == code.value[0]
        assert set(_details(status)) == {"ErrorInfo"}
    assert FieldViolation("a", "b").reason == ""


def test_service_config_retries_only_unavailable_and_sets_a_deadline() -> None:
    cfg = json.loads(service_config(timeout_s=2.5))
    method = cfg["methodConfig"][0]
    assert method["timeout"] == "2.500s"
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "retryPolicy" not in json.loads(service_config(timeout_s=1, max_attempts=1))["methodConfig"][0]


def test_target_lists_become_static_resolver_targets() -> None:
    assert normalize_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert normalize_target("dns:///infer-cheap:50054") == "dns:///infer-cheap:50054"
    assert normalize_target("127.0.0.1:1") == "127.0.0.1:1"


def test_attribution_from_metadata_fills_only_empty_fields() -> None:
    md = [("x-costmesh-tenant", "acme"), ("X-Costmesh-Feature", "search"), ("other", "x"), ("x-costmesh-team", b"b")]
    from_md = from_metadata(md)
    assert from_md == Attribution(tenant="acme", feature="search")
    merged = Attribution(tenant="explicit").merged_with(from_md)
    assert merged == Attribution(tenant="explicit", feature="search")
    assert merged.to_metadata() == [("x-costmesh-tenant", "explicit"), ("x-costmesh-feature", "search")]
