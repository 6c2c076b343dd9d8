"""Caching policy: deterministic requests only by default, TTL per feature, size cap, never partial responses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.cache.keys import Sampling
from services.cache.policy import CachePolicy, FeaturePolicy, FinishReason

POLICY = CachePolicy(
    ttl_s=600,
    max_entry_bytes=1000,
    features={
        "faq": FeaturePolicy(ttl_s=86_400),
        "chat": FeaturePolicy(ttl_s=0),
        "brainstorm": FeaturePolicy(cache_nondeterministic=True),
    },
)


@pytest.mark.parametrize(
    ("sampling", "feature", "ok", "reason"),
    [
        (Sampling(temperature=0.0), "", True, ""),
        (Sampling(temperature=0.8, seed=42), "", True, ""),
        (Sampling(temperature=0.8), "", False, "NONDETERMINISTIC"),
        (Sampling(), "", False, "NONDETERMINISTIC"),  # unset temperature = 1.0
        (Sampling(temperature=0.8), "brainstorm", True, ""),
        (Sampling(temperature=0.0), "chat", False, "FEATURE_NOT_CACHED"),
    ],
)
def test_cacheable(sampling: Sampling, feature: str, ok: bool, reason: str) -> None:
    decision = POLICY.cacheable(sampling, feature)
    assert (decision.ok, decision.reason) == (ok, reason)


def test_namespace_may_cache_sampled_requests_explicitly() -> None:
    assert CachePolicy(cache_nondeterministic=True).cacheable(Sampling(temperature=0.9), "").ok


def test_ttl_per_feature() -> None:
    assert POLICY.ttl_ms("") == 600_000
    assert POLICY.ttl_ms("faq") == 86_400_000
    assert POLICY.ttl_ms("brainstorm") == 600_000
    assert POLICY.ttl_ms("chat") == 0


@pytest.mark.parametrize(
    ("finish", "size", "ok", "reason"),
    [
        (FinishReason.STOP, 1000, True, ""),
        (FinishReason.STOP, 1001, False, "TOO_LARGE"),
        (FinishReason.LENGTH, 10, False, "INCOMPLETE"),
        (FinishReason.ABORT, 10, False, "INCOMPLETE"),
        (FinishReason.UNSPECIFIED, 10, False, "INCOMPLETE"),
        (FinishReason.ERROR, 10, False, "ERROR"),
    ],
)
def test_storable(finish: FinishReason, size: int, ok: bool, reason: str) -> None:
    decision = POLICY.storable(finish, size)
    assert (decision.ok, decision.reason) == (ok, reason)


def test_truncated_responses_only_when_the_policy_says_so() -> None:
    policy = CachePolicy(store_finish_reasons=frozenset({FinishReason.STOP, FinishReason.LENGTH}))
    assert policy.storable(FinishReason.LENGTH, 10).ok
    assert not policy.storable(FinishReason.ERROR, 10).ok


@pytest.mark.parametrize("reason", [FinishReason.ERROR, FinishReason.ABORT, FinishReason.UNSPECIFIED])
def test_errors_and_partial_streams_can_never_be_configured_storable(reason: FinishReason) -> None:
    with pytest.raises(ValidationError, match="never stored"):
        CachePolicy(store_finish_reasons=frozenset({FinishReason.STOP, reason}))
