"""Hostile requests against every RPC of a real inference worker: vLLM's engine on CPU with the small cheap model,
one worker process shared by the session (the secured stack, tests/support/stack.py).

Every call ends with a documented status (never INTERNAL, never a hang, the engine stays up); an answered
generation accounts for exactly the tokens it streamed and never more than it was allowed, also when a stop message
ends it early; every job a fuzzed SubmitJob accepted finishes (no job is lost), and only its own tenant can read it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from costmesh.common.v1 import common_pb2
from costmesh.infer.v1 import infer_pb2, infer_pb2_grpc
from tests.support.fuzz import (
    ENUM,
    FUZZ,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    RESOURCE_EXHAUSTED,
    VALID_ID,
    VALID_TENANT,
    assert_services_alive,
    attribution,
    check_documented,
    corrupted,
    credentials,
    messages,
    metadata,
    pick,
    sampling,
    streamed,
    text,
    unary,
)
from tests.support.stack import MAX_TOKENS_LIMIT, Stack, shared_stack

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore:Generating overly large repr")]

ALLOWED = frozenset({INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND})
TERMINAL = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED)
#: Jobs the fuzzed SubmitJob calls accepted: (job id, tenant); every one must finish.
ACCEPTED: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with shared_stack() as s:
        yield s


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[infer_pb2_grpc.InferenceServiceStub]:
    stack.ensure_worker()
    stub = infer_pb2_grpc.InferenceServiceStub(stack.channel("infer"))
    yield stub
    deadline = time.monotonic() + 300
    for job_id, tenant in ACCEPTED:
        while True:
            job = stub.GetJob(infer_pb2.GetJobRequest(job_id=job_id, tenant=tenant), metadata=stack.md("router")).job
            if job.state in TERMINAL:
                assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job  # valid jobs succeed: none lost
                assert job.summary.usage.output_tokens > 0
                break
            assert time.monotonic() < deadline, f"job {job_id} never finished"
            time.sleep(0.2)
    assert_services_alive(stack, "infer")


@st.composite
def valid_sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(max_tokens=draw(st.integers(0, MAX_TOKENS_LIMIT)))
    if draw(st.booleans()):
        s.temperature = draw(st.sampled_from([0.0, 0.5, 2.0]))
    if draw(st.booleans()):
        s.top_p = draw(st.sampled_from([0.1, 1.0]))
    if draw(st.booleans()):
        s.seed = draw(st.integers(-(2**63), 2**63 - 1))
    s.stop.extend(draw(st.lists(st.sampled_from(["\n", "the", "."]), max_size=3)))
    return s


@st.composite
def prompt_or_messages(draw: st.DrawFn, bad: frozenset[str]) -> dict[str, object]:
    if "prompt" in bad:
        both = draw(st.sampled_from(["prompt", "messages", "both", "neither"]))
        out: dict[str, object] = {}
        if both in ("prompt", "both"):
            out["prompt"] = draw(text(4000))
        if both in ("messages", "both"):
            out["messages"] = draw(messages())
        return out
    if draw(st.booleans()):
        return {"prompt": draw(st.sampled_from(["The router sends", "Once upon a time", "2 + 2 ="]))}
    return {"messages": [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say something.")]}


@st.composite
def generate_requests(draw: st.DrawFn) -> infer_pb2.GenerateRequest:
    bad = draw(corrupted(("request_id", "tier", "prompt", "sampling", "queue_class", "attribution")))
    return infer_pb2.GenerateRequest(
        request_id=pick(draw, bad, "request_id", VALID_ID, text(128)),
        tier=pick(draw, bad, "tier", st.sampled_from([0, 1]), ENUM),
        sampling=pick(draw, bad, "sampling", valid_sampling(), sampling()),
        queue_class=pick(draw, bad, "queue_class", st.sampled_from([0, 1, 2]), ENUM),
        attribution=pick(
            draw, bad, "attribution", st.builds(lambda t: common_pb2.Attribution(tenant=t), VALID_TENANT), attribution()
        ),
        ignore_eos=draw(st.booleans()),
        **draw(prompt_or_messages(bad)),
    )


#: How a fuzzed Generate call uses its request stream (mostly the plain request).
SHAPES = st.sampled_from(["request"] * 5 + ["request+stop", "stop-first", "empty", "request+request"])
STOP = infer_pb2.GenerateRequest(stop=True)


def request_stream(shape: str, request: infer_pb2.GenerateRequest) -> list[infer_pb2.GenerateRequest]:
    return {
        "request": [request],
        "request+stop": [request, STOP],  # the stop may land before admission, or after any token
        "stop-first": [STOP],  # alone: a client still writing after the server's status can race it
        "empty": [],
        "request+request": [request, request],  # a later message without stop is ignored
    }[shape]


@given(who=credentials("router", "fuzz"), request=generate_requests(), shape=SHAPES)
@FUZZ
def test_generate(
    stack: Stack,
    worker: infer_pb2_grpc.InferenceServiceStub,
    who: str | None,
    request: infer_pb2.GenerateRequest,
    shape: str,
) -> None:
    messages = request_stream(shape, request)
    out = streamed(lambda _r, **kw: worker.Generate(iter(messages), **kw), request, metadata(stack, who), 120)
    check_documented(out, who, ALLOWED - {NOT_FOUND})
    if shape in ("stop-first", "empty"):
        assert not out.ok, out  # the first message must be the request
        return
    if not out.ok:
        return
    *deltas, last = out.reply
    assert last.HasField("summary") and not any(d.HasField("summary") for d in deltas)
    s = last.summary
    allowed = request.sampling.max_tokens or 8  # the worker's default_max_tokens in this stack
    assert sum(d.token_count for d in out.reply) == s.usage.output_tokens <= allowed
    assert s.usage.cached_input_tokens <= s.usage.input_tokens
    assert (s.model, s.tier) == ("costmesh-cheap", common_pb2.TIER_CHEAP)
    if s.finish_reason == common_pb2.FINISH_REASON_ABORT:  # stopped: whatever it had generated, maybe nothing
        assert shape == "request+stop"
        assert s.usage.input_tokens > 0 or s.usage.output_tokens == 0  # no tokens before reaching the engine
        return
    assert s.usage.output_tokens > 0 and s.usage.input_tokens > 0
    assert s.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    if request.ignore_eos and not request.sampling.stop:
        assert s.usage.output_tokens == allowed and s.finish_reason == common_pb2.FINISH_REASON_LENGTH


@st.composite
def submit_requests(draw: st.DrawFn) -> infer_pb2.SubmitJobRequest:
    bad = draw(corrupted(("request_id", "prompt", "sampling", "attribution", "metadata")))
    return infer_pb2.SubmitJobRequest(
        request_id=pick(draw, bad, "request_id", VALID_ID, text(128)),
        sampling=pick(draw, bad, "sampling", valid_sampling(), sampling()),
        attribution=pick(
            draw, bad, "attribution", st.builds(lambda t: common_pb2.Attribution(tenant=t), VALID_TENANT), attribution()
        ),
        metadata=pick(draw, bad, "metadata", st.sampled_from(["", '{"reservation_id": "r"}']), text(4096)),
        **draw(prompt_or_messages(bad)),
    )


@given(who=credentials("router", "fuzz"), request=submit_requests())
@FUZZ
def test_submit_job(
    stack: Stack, worker: infer_pb2_grpc.InferenceServiceStub, who: str | None, request: infer_pb2.SubmitJobRequest
) -> None:
    out = unary(worker.SubmitJob, request, metadata(stack, who))
    check_documented(out, who, ALLOWED - {NOT_FOUND})
    if not out.ok:
        return
    r = out.reply
    assert r.job_id and r.state in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING, *TERMINAL)
    tenant = request.attribution.tenant
    if not r.replayed:
        ACCEPTED.append((r.job_id, tenant))
    # Only the submitting tenant (or the internal, tenant-less read) sees it.
    for reader, code in (("", OK), (tenant, OK), ("fuzz-other", NOT_FOUND)):
        got = unary(worker.GetJob, infer_pb2.GetJobRequest(job_id=r.job_id, tenant=reader), stack.md("router"))
        assert got.code == code, (reader, got)
        if got.ok:
            job = got.reply.job
            assert job.job_id == r.job_id and job.metadata == r.metadata and job.tenant == tenant
            if not r.replayed:
                assert r.metadata == request.metadata
    if tenant:  # the same job by (tenant, request_id)
        got = unary(
            worker.GetJob,
            infer_pb2.GetJobRequest(tenant=tenant, request_id=request.request_id),
            stack.md("router"),
        )
        assert got.ok and got.reply.job.job_id == r.job_id, got


@given(
    who=credentials("router", "fuzz"), job_id=st.one_of(VALID_ID, text(200)), tenant=st.one_of(VALID_TENANT, text(64))
)
@FUZZ
def test_get_job(
    stack: Stack, worker: infer_pb2_grpc.InferenceServiceStub, who: str | None, job_id: str, tenant: str
) -> None:
    out = unary(worker.GetJob, infer_pb2.GetJobRequest(job_id=job_id, tenant=tenant), metadata(stack, who))
    check_documented(out, who, frozenset({INVALID_ARGUMENT, NOT_FOUND}))
    assert not out.ok, out  # no fuzzed id names a real job


@given(
    who=credentials("router", "fuzz"),
    request_id=st.one_of(VALID_ID, text(200)),
    tenant=st.one_of(st.just(""), VALID_TENANT, text(64)),
)
@FUZZ
def test_get_job_by_request_id(
    stack: Stack, worker: infer_pb2_grpc.InferenceServiceStub, who: str | None, request_id: str, tenant: str
) -> None:
    out = unary(worker.GetJob, infer_pb2.GetJobRequest(request_id=request_id, tenant=tenant), metadata(stack, who))
    check_documented(out, who, frozenset({INVALID_ARGUMENT, NOT_FOUND}))
    assert not out.ok, out  # no fuzzed request id names a real job (or it lacks the tenant)


@given(
    who=credentials("router", "fuzz"), job_id=st.one_of(VALID_ID, text(200)), tenant=st.one_of(VALID_TENANT, text(64))
)
@FUZZ
def test_mark_job_settled(
    stack: Stack, worker: infer_pb2_grpc.InferenceServiceStub, who: str | None, job_id: str, tenant: str
) -> None:
    request = infer_pb2.MarkJobSettledRequest(job_id=job_id, tenant=tenant)
    out = unary(worker.MarkJobSettled, request, metadata(stack, who))
    check_documented(out, who, frozenset({INVALID_ARGUMENT, NOT_FOUND}))
    assert not out.ok, out


@given(
    who=credentials("router", "fuzz"),
    unsettled_only=st.booleans(),
    states=st.lists(st.one_of(st.sampled_from([1, 2, 3, 4, 5]), ENUM), max_size=4),
    page_size=st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1)),
    page_token=st.one_of(st.just(""), text(100)),
)
@FUZZ
def test_list_jobs(
    stack: Stack,
    worker: infer_pb2_grpc.InferenceServiceStub,
    who: str | None,
    unsettled_only: bool,
    states: list[int],
    page_size: int,
    page_token: str,
) -> None:
    request = infer_pb2.ListJobsRequest(
        unsettled_only=unsettled_only, states=states, page_size=page_size, page_token=page_token
    )
    out = unary(worker.ListJobs, request, metadata(stack, who))
    check_documented(out, who, frozenset({INVALID_ARGUMENT}))
    if out.ok:
        jobs = out.reply.jobs
        assert len(jobs) <= (page_size or 100)
        assert all(j.job_id and (not unsettled_only or not j.settled) for j in jobs)
        assert all(not states or j.state in states for j in jobs)
        created = [j.created_unix_ms for j in jobs]
        assert created == sorted(created)  # oldest first


@given(who=credentials("router", "fuzz"))
@FUZZ
def test_list_models(stack: Stack, worker: infer_pb2_grpc.InferenceServiceStub, who: str | None) -> None:
    out = unary(worker.ListModels, infer_pb2.ListModelsRequest(), metadata(stack, who))
    check_documented(out, who, frozenset())
    if out.ok:
        (model,) = out.reply.models
        assert model.name == "costmesh-cheap" and model.tier == common_pb2.TIER_CHEAP
