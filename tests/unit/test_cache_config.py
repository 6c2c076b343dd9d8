"""Cache settings: environment variables and the YAML file reach the namespace rules and policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.cache.__main__ import build_cache, load_settings
from services.cache.config import CacheSettings
from services.cache.memory_store import MemoryStore
from services.cache.policy import FinishReason


def test_defaults_work_on_one_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTMESH_CONFIG", raising=False)
    settings = load_settings()
    assert (settings.port, settings.store) == (50052, "memory")
    assert settings.policy.store_finish_reasons == frozenset({FinishReason.STOP})
    assert not settings.normalizer.casefold and settings.normalizer.scrub_timestamps


def test_environment_reaches_nested_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTMESH_CONFIG", raising=False)
    monkeypatch.setenv("COSTMESH_CACHE_STORE", "redis")
    monkeypatch.setenv("COSTMESH_CACHE_POLICY__TTL_S", "60")
    monkeypatch.setenv("COSTMESH_CACHE_NORMALIZER__SCRUB_DATES", "true")
    monkeypatch.setenv("COSTMESH_CACHE_TENANTS", '{"a": {"share_as": "docs"}, "b": {"share_as": "docs"}}')
    settings = load_settings()
    assert settings.store == "redis"
    assert settings.policy.ttl_ms("") == 60_000
    cache = build_cache(settings, MemoryStore(max_bytes=1024))
    assert cache.namespaces.resolve("a").name == cache.namespaces.resolve("b").name == "@docs"
    assert cache.namespaces.resolve("c").normalizer.config.scrub_dates


def test_yaml_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "costmesh.yaml"
    config.write_text(
        "cache:\n"
        "  lease_ttl_ms: 5000\n"
        "  policy: {features: {chat: {ttl_s: 0}}, store_finish_reasons: [STOP, LENGTH]}\n"
        "  tenants:\n"
        "    acme: {normalizer: {casefold: true, patterns: {ticket: 'TCK-\\d+'}}}\n"
    )
    monkeypatch.setenv("COSTMESH_CONFIG", str(config))
    settings = load_settings()
    assert settings.lease_ttl_ms == 5000
    assert settings.policy.ttl_ms("chat") == 0
    assert FinishReason.LENGTH in settings.policy.store_finish_reasons
    acme = build_cache(settings, MemoryStore(max_bytes=1024)).namespaces.resolve("acme")
    assert acme.normalizer.normalize("About TCK-42") == "about <ticket>"


@pytest.mark.parametrize(
    "bad",
    [
        {"default_wait_ms": 10, "max_wait_ms": 5},
        {"policy": {"store_finish_reasons": ["ERROR"]}},
        {"normalizer": {"patterns": {"x": "("}}},
        {"tenants": {"acme": {"share_as": "no spaces allowed"}}},
        {"tenants": {"bad tenant": {}}},
        {"store": "sqlite"},
    ],
)
def test_bad_settings_fail_at_start(bad: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTMESH_CONFIG", raising=False)
    with pytest.raises(ValidationError):
        CacheSettings(**bad)  # type: ignore[arg-type]
