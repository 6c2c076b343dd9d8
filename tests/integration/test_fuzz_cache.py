"""Hostile requests against every RPC of the real cache service (the secured stack, tests/support/stack.py).

Every call ends with a documented status (never INTERNAL, never a hang); a rejected call changes neither the
entries nor the counters; a fill under another tenant's name, or with a stale lease, stores nothing; no fuzzed
lookup leaves a lease behind that would make a later identical request wait.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.common.v1 import common_pb2
from tests.support.fuzz import (
    ENUM,
    FUZZ,
    INT64,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    PERMISSION_DENIED,
    TENANT,
    UINT32,
    VALID_NAME,
    VALID_TENANT,
    Outcome,
    assert_services_alive,
    attribution,
    check_documented,
    corrupted,
    credentials,
    messages,
    metadata,
    pick,
    sampling,
    text,
    unary,
)
from tests.support.stack import Stack, shared_stack

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
ALLOWED = frozenset({INVALID_ARGUMENT, NOT_FOUND})
MODEL = "costmesh-cheap"
KEY_CHARS = "0123456789abcdef"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with shared_stack() as s:
        yield s


@pytest.fixture(scope="module")
def cache(stack: Stack) -> Iterator[cache_pb2_grpc.CacheServiceStub]:
    yield cache_pb2_grpc.CacheServiceStub(stack.channel("cache"))
    assert_services_alive(stack, "cache")


def snapshot(stack: Stack) -> tuple[int, int, cache_pb2.CacheStats]:
    """Entries, bytes and every counter, over every tenant."""
    stub = cache_pb2_grpc.CacheServiceStub(stack.channel("cache"))
    reply = stub.GetStats(cache_pb2.GetStatsRequest(), metadata=stack.md("admin"), timeout=10)
    return reply.entries, reply.bytes, reply.total


@st.composite
def valid_attribution(draw: st.DrawFn) -> common_pb2.Attribution:
    return common_pb2.Attribution(tenant=draw(VALID_TENANT), feature=draw(VALID_NAME))


@st.composite
def valid_messages(draw: st.DrawFn) -> list[common_pb2.ChatMessage]:
    words = draw(
        st.lists(st.sampled_from(["What", "is", "the", "capital", "of", "France", "?", "2026-11-27"]), min_size=1)
    )
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=" ".join(words))]


def valid_sampling() -> st.SearchStrategy[common_pb2.SamplingParams]:
    return st.builds(lambda n: common_pb2.SamplingParams(max_tokens=n, temperature=0.0), st.integers(0, 64))


@st.composite
def lookups(draw: st.DrawFn) -> cache_pb2.LookupRequest:
    bad = draw(corrupted(("attribution", "model", "messages", "sampling", "wait_ms")))
    return cache_pb2.LookupRequest(
        attribution=pick(draw, bad, "attribution", valid_attribution(), attribution()),
        model=pick(draw, bad, "model", st.just(MODEL), text(128)),
        messages=pick(draw, bad, "messages", valid_messages(), messages()),
        sampling=pick(draw, bad, "sampling", valid_sampling(), sampling()),
        wait_ms=pick(draw, bad, "wait_ms", st.integers(0, 200), UINT32),
        peek=draw(st.booleans()),
    )


def give_back(stack: Stack, request: cache_pb2.LookupRequest, out: Outcome, who: str | None = None) -> None:
    """Abandon a lease a lookup took, so no later example waits on it."""
    if out.ok and out.reply.outcome == cache_pb2.LOOKUP_OUTCOME_MISS and out.reply.lease.lease_id:
        stub = cache_pb2_grpc.CacheServiceStub(stack.channel("cache"))
        attribution = common_pb2.Attribution()
        attribution.CopyFrom(request.attribution)
        if not attribution.tenant and who == "fuzz":  # the tenant key's own tenant was filled in by the server
            attribution.tenant = "fuzz"
        fill = cache_pb2.FillRequest(
            attribution=attribution, key=out.reply.lease.key, lease_id=out.reply.lease.lease_id, abandon=True
        )
        stub.Fill(fill, metadata=stack.md("router"), timeout=10)


@given(who=credentials("router", "fuzz"), request=lookups())
@FUZZ
def test_lookup(
    stack: Stack, cache: cache_pb2_grpc.CacheServiceStub, who: str | None, request: cache_pb2.LookupRequest
) -> None:
    before = snapshot(stack)
    out = unary(cache.Lookup, request, metadata(stack, who), timeout_s=30)
    give_back(stack, request, out, who)
    check_documented(out, who, ALLOWED)
    if not out.ok:
        assert snapshot(stack) == before, out
        return
    r = out.reply
    assert r.outcome in (
        cache_pb2.LOOKUP_OUTCOME_HIT,
        cache_pb2.LOOKUP_OUTCOME_MISS,
        cache_pb2.LOOKUP_OUTCOME_UNCACHEABLE,
    ), r  # no lease was held elsewhere, and the store is up: never a wait timeout or UNAVAILABLE
    if r.outcome == cache_pb2.LOOKUP_OUTCOME_MISS:  # a lease, unless it was only a peek
        assert len(r.key) == 64 and bool(r.lease.lease_id) is not request.peek
    assert snapshot(stack)[:2] == before[:2]  # a lookup never stores


@st.composite
def fills(draw: st.DrawFn) -> tuple[str, cache_pb2.FillRequest]:
    """(how the lease is obtained, the fill): a live lease of tenant "fuzz" is taken by the test itself."""
    bad = draw(corrupted(("lease", "attribution", "response", "key")))
    mode = "live" if "lease" not in bad else draw(st.sampled_from(["unknown", "stale"]))
    response = cache_pb2.CachedResponse(
        text=pick(draw, bad, "response", st.just("Paris."), text(200)),
        usage=common_pb2.Usage(input_tokens=7, output_tokens=pick(draw, bad, "response", st.integers(0, 64), UINT32)),
        cost_micros=pick(draw, bad, "response", st.integers(0, 10**6), INT64),
        model=pick(draw, bad, "response", st.just(MODEL), text(128)),
        tier=pick(draw, bad, "response", st.sampled_from([1, 2]), ENUM),
        finish_reason=pick(draw, bad, "response", st.sampled_from([1, 2]), ENUM),
        created_unix_ms=pick(draw, bad, "response", st.just(0), INT64),
    )
    request = cache_pb2.FillRequest(
        attribution=pick(draw, bad, "attribution", st.just(common_pb2.Attribution(tenant="fuzz")), attribution()),
        key=pick(draw, bad, "key", st.just(""), st.one_of(text(64), st.text(KEY_CHARS, min_size=64, max_size=64))),
        lease_id=draw(text(64)) if mode == "unknown" else "",
        response=response,
        abandon=draw(st.booleans()) if "response" in bad else False,
    )
    return mode, request


@given(who=credentials("router", "fuzz"), case=fills(), nonce=st.integers(0, 2**64))
@FUZZ
def test_fill(
    stack: Stack,
    cache: cache_pb2_grpc.CacheServiceStub,
    who: str | None,
    case: tuple[str, cache_pb2.FillRequest],
    nonce: int,
) -> None:
    mode, request = case
    lease_request = cache_pb2.LookupRequest(
        attribution=common_pb2.Attribution(tenant="fuzz"),
        model=MODEL,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"fill fuzz {nonce}")],
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    lease = None
    if mode in ("live", "stale"):
        got = cache.Lookup(lease_request, metadata=stack.md("router"), timeout=10)
        if got.outcome == cache_pb2.LOOKUP_OUTCOME_MISS:
            lease = got.lease
            if not request.key:
                request.key = lease.key
            request.lease_id = lease.lease_id
            if mode == "stale":  # used up before the fuzzed fill
                stale = cache_pb2.FillRequest(
                    attribution=lease_request.attribution, key=lease.key, lease_id=lease.lease_id, abandon=True
                )
                cache.Fill(stale, metadata=stack.md("router"), timeout=10)
    before = snapshot(stack)
    out = unary(cache.Fill, request, metadata(stack, who))
    if lease is not None and mode == "live":  # whatever happened, give the lease up (NOT_FOUND if already used)
        unary(
            cache.Fill,
            cache_pb2.FillRequest(
                attribution=lease_request.attribution, key=lease.key, lease_id=lease.lease_id, abandon=True
            ),
            stack.md("router"),
        )
    check_documented(out, who, ALLOWED)
    after = snapshot(stack)
    stored = out.ok and out.reply.stored
    if not stored:
        assert after[:2] == before[:2], out  # nothing stored
    if stored:
        # Only the lease holder's tenant, with its own live lease, for the lease's key, stores.
        assert mode == "live" and request.attribution.tenant == "fuzz" and lease is not None
        assert request.key == lease.key and after[0] == before[0] + 1
    if mode in ("unknown", "stale") and out.code == OK:
        assert not out.reply.stored


@given(
    who=credentials("router", "fuzz"),
    tenant=st.one_of(VALID_TENANT, TENANT),
    feature=st.one_of(VALID_NAME, text(64)),
    key=st.one_of(st.just(""), st.text(KEY_CHARS, min_size=64, max_size=64), text(64)),
)
@FUZZ
def test_invalidate(
    stack: Stack, cache: cache_pb2_grpc.CacheServiceStub, who: str | None, tenant: str, feature: str, key: str
) -> None:
    before = snapshot(stack)
    request = cache_pb2.InvalidateRequest(tenant=tenant, feature=feature, key=key)
    out = unary(cache.Invalidate, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    if who in ("router", "fuzz"):
        assert out.code == PERMISSION_DENIED  # admin only
    after = snapshot(stack)
    if not out.ok:
        assert after[:2] == before[:2], out
    else:
        assert after[0] == before[0] - out.reply.removed


@given(who=credentials("router", "fuzz"), tenant=st.one_of(VALID_TENANT, TENANT))
@FUZZ
def test_get_stats(stack: Stack, cache: cache_pb2_grpc.CacheServiceStub, who: str | None, tenant: str) -> None:
    out = unary(cache.GetStats, cache_pb2.GetStatsRequest(tenant=tenant), metadata(stack, who))
    check_documented(out, who, ALLOWED)
    if out.ok and tenant:
        assert all(g.tenant == tenant for g in out.reply.groups)  # one tenant's counters hold only it


def test_a_tenant_cannot_fill_another_tenants_lease(stack: Stack, cache: cache_pb2_grpc.CacheServiceStub) -> None:
    """A fixed case of the property above: the lease is fuzz's, the fill names fuzz-b."""
    request = cache_pb2.LookupRequest(
        attribution=common_pb2.Attribution(tenant="fuzz"),
        model=MODEL,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="cross-tenant fill")],
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    got = cache.Lookup(request, metadata=stack.md("router"), timeout=10)
    assert got.outcome == cache_pb2.LOOKUP_OUTCOME_MISS
    before = snapshot(stack)
    forged = cache_pb2.FillRequest(
        attribution=common_pb2.Attribution(tenant="fuzz-b"),
        key=got.lease.key,
        lease_id=got.lease.lease_id,
        response=cache_pb2.CachedResponse(text="poisoned", finish_reason=common_pb2.FINISH_REASON_STOP),
    )
    out = unary(cache.Fill, forged, stack.md("router"))
    assert out.code == NOT_FOUND and snapshot(stack)[:2] == before[:2]
    give_back(stack, request, Outcome(OK, got))
