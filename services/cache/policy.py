"""Caching policy of one namespace: what may be cached, for how long, and which responses may be stored."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.cache.keys import Sampling


class FinishReason(StrEnum):
    """Why a generation ended (the domain twin of ``costmesh.common.v1.FinishReason``)."""

    UNSPECIFIED = "UNSPECIFIED"
    STOP = "STOP"
    LENGTH = "LENGTH"
    ABORT = "ABORT"
    ERROR = "ERROR"


#: Finish reasons that can never be stored, whatever the configuration: the response is partial or failed.
NEVER_STORED = frozenset({FinishReason.UNSPECIFIED, FinishReason.ABORT, FinishReason.ERROR})


class FeaturePolicy(BaseModel):
    """Overrides for one feature of a namespace."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttl_s: float | None = Field(default=None, ge=0, description="Entry lifetime; 0 = never cache this feature.")
    cache_nondeterministic: bool | None = Field(
        default=None, description="Cache sampled requests too (see the namespace)."
    )


class CachePolicy(BaseModel):
    """What a namespace caches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttl_s: float = Field(default=3600.0, gt=0, description="Default entry lifetime in seconds.")
    features: dict[str, FeaturePolicy] = Field(default_factory=dict, description="Per-feature overrides.")
    cache_nondeterministic: bool = Field(
        default=False,
        description="Cache requests that sample (temperature > 0 without a seed). Off: their answers vary by design.",
    )
    max_entry_bytes: int = Field(default=256 * 1024, gt=0, description="Largest response stored, serialized bytes.")
    store_finish_reasons: frozenset[FinishReason] = Field(
        default=frozenset({FinishReason.STOP}),
        description="Finish reasons whose responses are stored. LENGTH (truncated) only if listed; "
        "UNSPECIFIED, ABORT and ERROR never.",
    )

    @field_validator("store_finish_reasons")
    @classmethod
    def _never_partial(cls, value: frozenset[FinishReason]) -> frozenset[FinishReason]:
        bad = value & NEVER_STORED
        if bad:
            raise ValueError(f"responses that ended with {sorted(bad)} are never stored")
        return value

    def ttl_ms(self, feature: str) -> int:
        """Lifetime of an entry stored for ``feature`` in ms; 0 = this feature is not cached."""
        override = self.features.get(feature)
        ttl = override.ttl_s if override is not None and override.ttl_s is not None else self.ttl_s
        return round(ttl * 1000)

    def cacheable(self, sampling: Sampling, feature: str) -> Decision:
        """Whether a request may be served from (and stored in) the cache."""
        if self.ttl_ms(feature) <= 0:
            return Decision(False, "FEATURE_NOT_CACHED")
        override = self.features.get(feature)
        nondeterministic_ok = (
            override.cache_nondeterministic
            if override is not None and override.cache_nondeterministic is not None
            else self.cache_nondeterministic
        )
        if not nondeterministic_ok and not sampling.greedy and sampling.seed is None:
            return Decision(False, "NONDETERMINISTIC")
        return Decision(True, "")

    def storable(self, finish_reason: FinishReason, size_bytes: int) -> Decision:
        """Whether a response may be stored; ``reason`` names the rule that refused it."""
        if finish_reason is FinishReason.ERROR:
            return Decision(False, "ERROR")
        if finish_reason not in self.store_finish_reasons:
            return Decision(False, "INCOMPLETE")
        if size_bytes > self.max_entry_bytes:
            return Decision(False, "TOO_LARGE")
        return Decision(True, "")


@dataclass(frozen=True, slots=True)
class Decision:
    ok: bool
    reason: str
