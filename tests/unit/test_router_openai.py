"""The HTTP front door's pure OpenAI ⇄ domain conversions (services/router/openaiconv.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from services.common.attribution import Attribution
from services.common.errors import (
    CostmeshError,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.pricing import TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.domain import CacheMode, Decision, FinishReason, GenerateResult, Sampling
from services.router.openai_types import ChatCompletionRequest
from services.router.openaiconv import (
    chunk,
    completion,
    error_body,
    error_headers,
    extras,
    from_validation_error,
    http_status,
    model_list,
    openai_violations,
    requested_tier,
    result_headers,
    to_input,
    unsupported,
    usage_chunk,
    valid_request_id,
)

MODELS = {Tier.CHEAP: "costmesh-cheap", Tier.FULL: "costmesh-full"}


def parse(body: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def refused(body: bytes) -> InvalidArgument:
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate_json(body)
    return from_validation_error(err.value)


def result(**kw: object) -> GenerateResult:
    fields: dict[str, object] = {
        "request_id": "r1",
        "text": "hello",
        "usage": TokenUsage(12, 5, 8),
        "cost_micros": 42,
        "tier": Tier.CHEAP,
        "model": "costmesh-cheap",
        "decision": Decision(Tier.CHEAP, 0.1, 0.5, False, (), Tier.CHEAP),
        "cache_hit": False,
        "saved_micros": 100,
        "budget_remaining_micros": None,
        "finish_reason": FinishReason.LENGTH,
        "ttft_ms": 1.0,
        "escalated": False,
    }
    fields.update(kw)
    return GenerateResult(**fields)  # type: ignore[arg-type]


# ---- models ------------------------------------------------------------------------------------------------------


def test_auto_pins_nothing_a_tier_model_pins_its_tier_and_anything_else_is_not_found() -> None:
    assert requested_tier("auto", MODELS) is None
    assert requested_tier("costmesh-cheap", MODELS) is Tier.CHEAP
    assert requested_tier("costmesh-full", MODELS) is Tier.FULL
    with pytest.raises(NotFound) as err:
        requested_tier("gpt-4o", MODELS)
    assert err.value.reason == "MODEL_NOT_FOUND" and http_status(err.value) == 404
    assert error_body(err.value)["error"]["param"] == "model"
    assert error_body(err.value)["error"]["code"] == "model_not_found"
    with pytest.raises(NotFound) as long:
        requested_tier("x" * 10_000, MODELS)
    assert len(long.value.message) < 200  # the name is quoted, clipped


def test_the_model_list_names_auto_then_every_tier_model_once() -> None:
    ids = [m["id"] for m in model_list(MODELS)]
    assert ids == ["auto", "costmesh-cheap", "costmesh-full"]
    assert all(m["object"] == "model" and m["owned_by"] == "costmesh" for m in model_list(MODELS))
    assert [m["id"] for m in model_list({Tier.CHEAP: "same", Tier.FULL: "same"})] == ["auto", "same"]


# ---- request -----------------------------------------------------------------------------------------------------


def test_a_request_becomes_the_pipelines_input() -> None:
    req = parse(
        {
            "model": "costmesh-full",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 0,
            "top_p": 0.5,
            "stop": "END",
            "seed": 7,
            "user": "u-1",
            "some_vendor_field": True,  # unknown fields are ignored
        }
    )
    inp = to_input(
        req,
        request_id="rid",
        attribution=Attribution("acme", "search", "faq", "header-user"),
        requested_tier=Tier.FULL,
        cache_mode=CacheMode.BYPASS,
    )
    assert inp.messages == (Message("system", "be brief"), Message("user", "hi there"), Message("assistant", ""))
    assert inp.sampling == Sampling(max_tokens=20, temperature=0.0, top_p=0.5, stop=("END",), seed=7)
    assert inp.attribution == Attribution("acme", "search", "faq", "u-1")  # the body's user wins
    assert inp.requested_tier is Tier.FULL and inp.cache_mode is CacheMode.BYPASS and inp.request_id == "rid"
    plain = to_input(
        parse({"model": "auto", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"]}),
        request_id="r",
        attribution=Attribution("acme"),
        requested_tier=None,
    )
    assert plain.sampling == Sampling(max_tokens=0, stop=("a", "b"))  # 0: the router's default max_tokens


def test_parameters_costmesh_does_not_serve_are_refused_by_name() -> None:
    req = parse(
        {
            "model": "auto",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "n": 2,
            "tools": [{"type": "function"}],
            "tool_choice": "auto",
            "logprobs": True,
            "response_format": {"type": "json_object"},
            "presence_penalty": 0.5,
            "logit_bias": {"1": 2},
            "stream_options": {"include_usage": True},
        }
    )
    fields = [v.field for v in unsupported(req)]
    assert fields == [
        "n",
        "tools",
        "tool_choice",
        "logprobs",
        "response_format",
        "presence_penalty",
        "logit_bias",
        "stream_options",
        "messages[0].content[0].type",
    ]
    neutral = parse(
        {
            "model": "auto",
            "messages": [{"role": "user", "content": "x"}],
            "n": 1,
            "tool_choice": "none",
            "logprobs": False,
            "response_format": {"type": "text"},
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert unsupported(neutral) == []


def test_malformed_json_and_non_objects_are_400_with_openai_wording() -> None:
    bad = refused(b'{"model": ')
    assert bad.reason == "INVALID_JSON" and "could not parse the JSON body" in bad.message
    assert http_status(bad) == 400 and error_body(bad)["error"]["type"] == "invalid_request_error"
    assert error_body(bad)["error"]["param"] is None
    array = refused(b"[1, 2]")
    assert [v.description for v in array.violations] == ["the body must be a JSON object"]


def test_wrong_types_name_the_parameter_once_without_union_tags() -> None:
    err = refused(
        json.dumps(
            {
                "model": 1,
                "messages": [{"role": "user", "content": 5}],
                "temperature": "hot",
                "stream": "true",
                "stop": [1],
            }
        ).encode()
    )
    by_field = {v.field: v.description for v in err.violations}
    assert set(by_field) == {"model", "messages[0].content", "temperature", "stream", "stop", "stop[0]"}
    assert "or" in by_field["messages[0].content"]  # a string, or an array of parts
    body = error_body(err)["error"]
    assert body["param"] == "model" and body["code"] == "invalid_type" and "temperature:" in body["message"]
    missing = refused(b'{"model": "auto"}')
    assert [v.field for v in missing.violations] == ["messages"]


def test_the_pipelines_field_paths_become_openai_parameters() -> None:
    err = InvalidArgument(
        "invalid request",
        violations=[
            FieldViolation("sampling.max_tokens", "0..4096"),
            FieldViolation("attribution.tenant", "required"),
            FieldViolation("attribution.end_user", "at most 128 characters"),
            FieldViolation("messages[0].role", "must be system, user, assistant or tool"),
        ],
    )
    plain = parse({"model": "auto", "messages": [], "max_tokens": 5})
    assert [v.field for v in openai_violations(err, plain).violations] == [
        "max_tokens",
        "x-costmesh-tenant",
        "user",
        "messages[0].role",
    ]
    newer = parse({"model": "auto", "messages": [], "max_completion_tokens": 5})
    assert openai_violations(err, newer).violations[0].field == "max_completion_tokens"
    body = error_body(openai_violations(err, None))["error"]
    assert body["param"] == "max_tokens" and body["message"].startswith("max_tokens: 0..4096; x-costmesh-tenant:")


def test_request_ids_must_be_header_safe_and_short() -> None:
    assert valid_request_id("3f1c-req_1.2~x")
    assert not valid_request_id("") and not valid_request_id("a b") and not valid_request_id("x" * 129)


# ---- responses ---------------------------------------------------------------------------------------------------


def test_a_result_is_a_chat_completion_with_cached_tokens_and_costmesh_headers() -> None:
    r = result()
    body = completion(r, created=1700)
    assert body["id"] == "chatcmpl-r1" and body["object"] == "chat.completion" and body["created"] == 1700
    assert body["model"] == "costmesh-cheap"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    assert dict(result_headers(r)) == {
        b"x-costmesh-request-id": b"r1",
        b"x-costmesh-cost-micros": b"42",
        b"x-costmesh-saved-micros": b"100",
        b"x-costmesh-cache-hit": b"false",
        b"x-costmesh-model-class": b"cheap",
    }
    hit = result(cache_hit=True, cost_micros=0, tier=Tier.FULL)
    assert dict(result_headers(hit))[b"x-costmesh-cache-hit"] == b"true"
    assert extras(hit) == {
        "request_id": "r1",
        "cost_micros": 0,
        "saved_micros": 100,
        "cache_hit": True,
        "model_class": "full",
    }
    reasons = {f: completion(result(finish_reason=f), created=0)["choices"][0]["finish_reason"] for f in FinishReason}
    assert reasons == {
        FinishReason.UNSPECIFIED: "stop",
        FinishReason.STOP: "stop",
        FinishReason.LENGTH: "length",
        FinishReason.ABORT: "abort",
        FinishReason.ERROR: "error",
    }


def test_stream_chunks_have_openais_shape() -> None:
    c = chunk("r1", created=5, model="auto", delta={"role": "assistant", "content": "hi"})
    assert c == {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "auto",
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert chunk("r1", created=5, model="m", finish="stop", with_usage=True)["usage"] is None
    last = usage_chunk(result(), created=5)
    assert last["choices"] == [] and last["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}


# ---- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "status", "kind", "retry"),
    [
        (InvalidArgument("bad"), 400, "invalid_request_error", None),
        (InvalidArgument("big", reason="REQUEST_TOO_LARGE"), 413, "invalid_request_error", None),
        (Unauthenticated("no key", reason="NO_KEY"), 401, "authentication_error", None),
        (PermissionDenied("other tenant", reason="TENANT_MISMATCH"), 403, "permission_error", None),
        (NotFound("no model", reason="MODEL_NOT_FOUND"), 404, "invalid_request_error", None),
        (
            ResourceExhausted("hard stop", reason="BUDGET_EXCEEDED", retry_after_s=3600),
            429,
            "insufficient_quota",
            b"false",
        ),
        (ResourceExhausted("slow down", reason="TENANT_RATE", retry_after_s=0.25), 429, "rate_limit_error", b"true"),
        (Unavailable("worker down", reason="TIER_UNAVAILABLE"), 503, "server_error", b"true"),
        (DeadlineExceeded("too slow"), 504, "server_error", b"false"),
        (CostmeshError("secret detail"), 500, "server_error", b"false"),
    ],
)
def test_errors_have_openais_shape_status_and_retry_advice(
    err: CostmeshError, status: int, kind: str, retry: bytes | None
) -> None:
    assert http_status(err) == status
    body = error_body(err)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind and body["error"]["code"] == err.reason.lower()
    assert dict(error_headers(err)).get(b"x-should-retry") == retry
    if status == 500:
        assert body["error"]["message"] == "internal error"  # never the internal message


def test_retry_after_is_whole_seconds_and_milliseconds() -> None:
    stop = dict(error_headers(ResourceExhausted("x", reason="TENANT_RATE", retry_after_s=0.25)))
    assert stop[b"retry-after"] == b"1" and stop[b"retry-after-ms"] == b"250"
    later = dict(error_headers(ResourceExhausted("x", reason="BUDGET_EXCEEDED", retry_after_s=90.5)))
    assert later[b"retry-after"] == b"91" and later[b"retry-after-ms"] == b"90500"
    assert b"retry-after" not in dict(error_headers(Unavailable("x")))
