"""Hostile requests against every RPC of the real router (the secured stack: router, budget, cache and one cheap
vLLM worker as processes, tests/support/stack.py).

Every call ends with a documented status (never INTERNAL, never a hang); a rejected request leaves the ledger —
committed money, tokens and requests over every tenant, and every reservation in flight — exactly as it was; an
answered one moves it by exactly the cost it reports; an async job's reservation is settled when the job ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from tests.support.fuzz import (
    ENUM,
    FUZZ,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    VALID_ID,
    VALID_NAME,
    VALID_TENANT,
    Ledger,
    Outcome,
    assert_services_alive,
    attribution,
    check_documented,
    corrupted,
    credentials,
    ledger,
    messages,
    metadata,
    pick,
    sampling,
    streamed,
    text,
    track_all_money,
    unary,
)
from tests.support.stack import MAX_TOKENS_LIMIT, Stack, shared_stack

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore:Generating overly large repr")]

ALLOWED = frozenset({INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE})
TIERS = (common_pb2.TIER_UNSPECIFIED, common_pb2.TIER_CHEAP)
#: Async jobs already settled: a resubmission with the same request_id is the same job, paid once.
SEEN_JOBS: set[str] = set()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with shared_stack() as s:
        yield s


@pytest.fixture(scope="module")
def router(stack: Stack) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    stack.ensure_worker()
    track_all_money(stack)
    yield router_pb2_grpc.RouterServiceStub(stack.channel("router"))
    assert_services_alive(stack, "router", "budget", "cache", "infer")
    assert settled(stack).reserved_micros == 0, "fuzzing left money reserved"


def settled(stack: Stack, timeout_s: float = 30.0) -> Ledger:
    """The ledger once reservations of finished work are gone (async settlement runs in the background)."""
    deadline = time.monotonic() + timeout_s
    now = ledger(stack)
    while now.reserved_micros and time.monotonic() < deadline:
        time.sleep(0.2)
        now = ledger(stack)
    return now


@st.composite
def valid_attribution(draw: st.DrawFn) -> common_pb2.Attribution:
    return common_pb2.Attribution(tenant=draw(VALID_TENANT), team=draw(VALID_NAME), feature=draw(VALID_NAME))


@st.composite
def valid_messages(draw: st.DrawFn) -> list[common_pb2.ChatMessage]:
    system = draw(st.booleans())
    words = draw(
        st.lists(st.sampled_from(["Name", "a", "primary", "colour", "prime", "number", "please", "."]), min_size=1)
    )
    msgs = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=" ".join(words))]
    if system:
        msgs.insert(0, common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."))
    return msgs


@st.composite
def valid_sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(max_tokens=draw(st.integers(0, MAX_TOKENS_LIMIT)))
    if draw(st.booleans()):
        s.temperature = draw(st.sampled_from([0.0, 0.7, 1.5]))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 1000))
    return s


FIELDS = ("request_id", "attribution", "messages", "sampling", "tier", "cache_mode")


@st.composite
def generate_fields(draw: st.DrawFn) -> dict[str, object]:
    bad = draw(corrupted(FIELDS))
    return {
        "request_id": pick(draw, bad, "request_id", st.one_of(st.just(""), VALID_ID), text(128)),
        "attribution": pick(draw, bad, "attribution", valid_attribution(), attribution()),
        "messages": pick(draw, bad, "messages", valid_messages(), messages()),
        "sampling": pick(draw, bad, "sampling", valid_sampling(), sampling()),
        "tier": pick(draw, bad, "tier", st.sampled_from(TIERS), ENUM),
        "cache_mode": pick(draw, bad, "cache_mode", st.sampled_from([0, 1, 2]), ENUM),
    }


def check_money(before: Ledger, after: Ledger, out: Outcome, result: router_pb2.GenerateResult | None) -> None:
    if not out.ok:
        assert after == before, out  # rejected: not a micro-USD, token or reservation moved
        return
    assert result is not None
    assert after.cost_micros - before.cost_micros == result.cost_micros
    assert after.requests - before.requests == (0 if result.cache_hit else 1)
    assert after.reserved_micros == before.reserved_micros
    assert result.tier == common_pb2.TIER_CHEAP and result.usage.input_tokens > 0
    assert result.cache_hit or (result.cost_micros > 0 and result.usage.output_tokens > 0)


def check_unavailable(out: Outcome, tier: int) -> None:
    """UNAVAILABLE only where documented here: a request pinned to the full tier, which this stack lacks."""
    if out.code == UNAVAILABLE:
        assert tier == common_pb2.TIER_FULL and out.reason in ("TIER_NOT_CONFIGURED", "UNAVAILABLE"), out
        assert "full" in out.details, out


@given(who=credentials("router", "fuzz"), fields=generate_fields())
@FUZZ
def test_generate(
    stack: Stack, router: router_pb2_grpc.RouterServiceStub, who: str | None, fields: dict[str, object]
) -> None:
    request = router_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    before = settled(stack)
    out = unary(router.Generate, request, metadata(stack, who), timeout_s=120)
    check_documented(out, who, ALLOWED)
    check_unavailable(out, request.tier)
    check_money(before, ledger(stack), out, out.reply.result if out.ok else None)


@given(who=credentials("router", "fuzz"), fields=generate_fields())
@FUZZ
def test_generate_stream(
    stack: Stack, router: router_pb2_grpc.RouterServiceStub, who: str | None, fields: dict[str, object]
) -> None:
    request = router_pb2.GenerateStreamRequest(**fields)  # type: ignore[arg-type]
    before = settled(stack)
    out = streamed(router.GenerateStream, request, metadata(stack, who), timeout_s=120)
    check_documented(out, who, ALLOWED)
    check_unavailable(out, request.tier)
    result = None
    if out.ok:
        *deltas, last = out.reply
        assert last.HasField("result") and not any(d.HasField("result") for d in deltas)
        result = last.result
        assert "".join(d.text for d in deltas) + last.text == result.text
    check_money(before, ledger(stack), out, result)


@given(
    who=credentials("router", "fuzz"),
    a=st.one_of(valid_attribution(), attribution()),
    msgs=st.one_of(valid_messages(), messages()),
    s=st.one_of(valid_sampling(), sampling()),
)
@FUZZ
def test_classify(
    stack: Stack,
    router: router_pb2_grpc.RouterServiceStub,
    who: str | None,
    a: common_pb2.Attribution,
    msgs: list[common_pb2.ChatMessage],
    s: common_pb2.SamplingParams,
) -> None:
    before = ledger(stack)
    out = unary(
        router.Classify, router_pb2.ClassifyRequest(attribution=a, messages=msgs, sampling=s), metadata(stack, who)
    )
    check_documented(out, who, frozenset({INVALID_ARGUMENT}))
    if out.ok:
        d = out.reply.decision
        assert d.tier in (common_pb2.TIER_CHEAP, common_pb2.TIER_FULL) and 0.0 <= d.score <= 1.0
    assert ledger(stack) == before  # classifying costs nothing


def wait_job(
    stack: Stack, router: router_pb2_grpc.RouterServiceStub, job_id: str, who: str, tenant: str
) -> router_pb2.GetAsyncResultResponse:
    request = router_pb2.GetAsyncResultRequest(job_id=job_id, attribution=common_pb2.Attribution(tenant=tenant))
    deadline = time.monotonic() + 180
    while True:
        reply = router.GetAsyncResult(request, metadata=metadata(stack, who), timeout=30)
        if reply.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED):
            return reply
        assert time.monotonic() < deadline, f"async job {job_id} never finished"
        time.sleep(0.2)


@given(who=credentials("router", "fuzz"), fields=generate_fields())
@FUZZ
def test_submit_async(
    stack: Stack, router: router_pb2_grpc.RouterServiceStub, who: str | None, fields: dict[str, object]
) -> None:
    request = router_pb2.SubmitAsyncRequest(**fields)  # type: ignore[arg-type]
    before = settled(stack)
    out = unary(router.SubmitAsync, request, metadata(stack, who), timeout_s=60)
    check_documented(out, who, ALLOWED)
    check_unavailable(out, request.tier)
    if not out.ok:
        assert ledger(stack) == before, out
        return
    assert who is not None
    tenant = request.attribution.tenant or "fuzz"  # a tenant key's empty tenant is its own
    reply = out.reply
    if reply.state == common_pb2.JOB_STATE_SUCCEEDED:  # a cache hit, answered at once
        assert reply.result.cache_hit and reply.result.cost_micros == 0
        assert ledger(stack) == before
        return
    assert reply.state == common_pb2.JOB_STATE_QUEUED and reply.job_id
    done = wait_job(stack, router, reply.job_id, who, tenant)
    after = settled(stack)
    assert after.reserved_micros == before.reserved_micros  # settled: committed or released
    replay = reply.job_id in SEEN_JOBS
    SEEN_JOBS.add(reply.job_id)
    charged = done.result.cost_micros if done.state == common_pb2.JOB_STATE_SUCCEEDED and not replay else 0
    assert after.cost_micros - before.cost_micros == charged
    # Another tenant cannot read the job.
    other = "fuzz-b" if tenant != "fuzz-b" else "fuzz"
    peek = unary(
        router.GetAsyncResult,
        router_pb2.GetAsyncResultRequest(job_id=reply.job_id, attribution=common_pb2.Attribution(tenant=other)),
        stack.md("router"),
    )
    assert peek.code == NOT_FOUND, peek


@given(
    who=credentials("router", "fuzz"),
    job_id=st.one_of(
        st.builds(lambda p, x: f"{p}.{x}", st.sampled_from(["cheap", "full", "hit", "medium", ""]), text(64)),
        text(200),
    ),
    a=st.one_of(valid_attribution(), attribution()),
)
@FUZZ
def test_get_async_result(
    stack: Stack, router: router_pb2_grpc.RouterServiceStub, who: str | None, job_id: str, a: common_pb2.Attribution
) -> None:
    before = ledger(stack)
    out = unary(
        router.GetAsyncResult, router_pb2.GetAsyncResultRequest(job_id=job_id, attribution=a), metadata(stack, who)
    )
    check_documented(out, who, frozenset({INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE}))
    assert not out.ok, out  # no fuzzed id names a real job
    if out.code == UNAVAILABLE:
        assert job_id.startswith("full.") and out.reason == "TIER_NOT_CONFIGURED", out
    assert ledger(stack) == before


def test_a_deadline_shorter_than_the_generation_ends_it_and_releases_the_money(
    stack: Stack, router: router_pb2_grpc.RouterServiceStub
) -> None:
    """Deadlines everywhere: the router gives the worker no more time than its caller gave it."""
    before = settled(stack)
    request = router_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Tell a long story.")],
        attribution=common_pb2.Attribution(tenant="fuzz"),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS_LIMIT, temperature=1.0),
        cache_mode=router_pb2.CACHE_MODE_BYPASS,
    )
    out = unary(router.Generate, request, stack.md("router"), timeout_s=0.05)
    assert out.code.name in ("DEADLINE_EXCEEDED", "OK"), out
    after = settled(stack)
    assert after.reserved_micros == before.reserved_micros
    # Released, or (when the answer was already being settled as the deadline hit) charged exactly once.
    assert (after.requests - before.requests, after.cost_micros > before.cost_micros) in ((0, False), (1, True))
