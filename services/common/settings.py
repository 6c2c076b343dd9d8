"""Settings: one frozen pydantic-settings object per service; nothing else reads the environment.

Sources, highest priority first: constructor arguments, environment variables ``COSTMESH_<SVC>_<FIELD>`` (nested
fields joined with ``__``), the YAML file named by ``COSTMESH_CONFIG`` (its ``common:`` section, overridden by the
service's own section, e.g. ``budget:``), then the defaults — every default works on one machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from services.common.auth import AuthSettings

CONFIG_ENV = "COSTMESH_CONFIG"

#: Default gRPC ports of the mesh on one machine.
DEFAULT_PORTS: dict[str, int] = {"router": 50051, "cache": 50052, "budget": 50053, "infer": 50054}
#: Default Prometheus /metrics ports.
DEFAULT_METRICS_PORTS: dict[str, int] = {"router": 9464, "cache": 9465, "budget": 9466, "infer": 9467}


class YamlSectionSource(PydanticBaseSettingsSource):
    """Reads ``common:`` then ``<section>:`` of the YAML file named by ``COSTMESH_CONFIG`` (when set)."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        path = os.environ.get(CONFIG_ENV)
        if path:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: top level must be a mapping")
            self._data = {**(raw.get("common") or {}), **(raw.get(section) or {})}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


def service_settings_config(service: str) -> SettingsConfigDict:
    """The ``model_config`` of a service's settings class: env prefix ``COSTMESH_<SERVICE>_``, frozen."""
    return SettingsConfigDict(
        env_prefix=f"COSTMESH_{service.upper()}_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        yaml_section=service.lower(),  # type: ignore[typeddict-unknown-key]
    )


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclasses add their own and set ``model_config``."""

    model_config = service_settings_config("common")

    host: str = Field(
        "127.0.0.1",
        description="Interface the gRPC server binds to ('0.0.0.0' in containers; beyond loopback it needs API keys, "
        "mTLS or allow_insecure: services/common/exposure.py).",
    )
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port; unset = no metrics endpoint."
    )
    grace_period_s: float = Field(5.0, ge=0, description="Seconds in-flight RPCs get to finish on SIGTERM.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = Field("json", description="'console' for humans, 'json' otherwise.")
    otlp_endpoint: str | None = Field(None, description="OTLP/gRPC collector endpoint; unset = no export.")
    trace_sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of new traces sampled (parent-based).")
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest gRPC message received or sent.")
    max_concurrent_rpcs: int | None = Field(None, gt=0, description="Server-wide cap on in-flight RPCs.")
    tls_cert_file: Path | None = Field(None, description="Server certificate (PEM); with key and CA = mTLS.")
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    health_port: int | None = Field(
        None, ge=0, le=65535, description="Extra plaintext port serving only gRPC health (probes beside mTLS)."
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description="API keys (off by default; required beyond loopback unless mTLS: services/common/auth.py).",
    )
    allow_insecure: bool = Field(
        False,
        description="Serve without API keys or mTLS on a non-loopback host (warned at every start); see "
        "services/common/exposure.py.",
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics (plain HTTP, no auth; tenant names and spend) on a non-loopback host, for "
        "Prometheus.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        section = str(settings_cls.model_config.get("yaml_section", "common"))
        return init_settings, env_settings, YamlSectionSource(settings_cls, section)
