"""OpenAI ⇄ domain conversions for the HTTP front door: the twin of ``protoconv.py`` for the OpenAI API.

Pure functions, no I/O: the request body → :class:`GenerateInput`, pipeline events → ``chat.completion`` objects
and ``chat.completion.chunk`` events, domain errors → OpenAI's error shape and HTTP status. The request path itself
(validation, cache, routing, budget, attribution, traces) is the pipeline's, shared with the gRPC front door.

Two functions own the model names, so the model catalog changes only them: :func:`requested_tier` (what the
pipeline is asked for, given the ``model`` of a request) and :func:`model_list` (``GET /v1/models``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from services.common.attribution import Attribution
from services.common.errors import CostmeshError, FieldViolation, InvalidArgument, NotFound
from services.common.pricing import TokenUsage
from services.router.classifier.types import Message, Tier
from services.router.domain import CacheMode, FinishReason, GenerateInput, GenerateResult, Sampling
from services.router.openai_types import ChatCompletionRequest, ChatMessage, ContentPart, StreamOptions

#: The model name that lets the router choose.
AUTO = "auto"
OWNER = "costmesh"

# ---- models ------------------------------------------------------------------------------------------------------


def requested_tier(model: str, models: Mapping[Tier, str]) -> Tier | None:
    """What the pipeline is asked for when a request names ``model``: ``auto`` pins nothing (the router chooses), a
    tier's model name pins that tier (feature policy still applies). Anything else is ``NotFound``
    (``MODEL_NOT_FOUND``, HTTP 404 as OpenAI answers)."""
    if model == AUTO:
        return None
    for tier, name in models.items():
        if name == model:
            return tier
    shown = model if len(model) <= 64 else model[:63] + "…"
    raise NotFound(f"The model {shown!r} does not exist; GET /v1/models lists them", reason="MODEL_NOT_FOUND")


def model_list(models: Mapping[Tier, str]) -> list[dict[str, Any]]:
    """``GET /v1/models``: ``auto`` first, then each tier's model."""
    return [model_object(name) for name in dict.fromkeys((AUTO, *models.values()))]


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


# ---- request -----------------------------------------------------------------------------------------------------

#: OpenAI's newer name for the system role.
_ROLES = {"developer": "system"}


def _content(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


def messages(msgs: Sequence[ChatMessage]) -> tuple[Message, ...]:
    return tuple(Message(role=_ROLES.get(m.role, m.role), content=_content(m.content)) for m in msgs)


def sampling(req: ChatCompletionRequest) -> Sampling:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return Sampling(max_tokens=max_tokens or 0, temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed)


def unsupported(req: ChatCompletionRequest) -> list[FieldViolation]:
    """Parameters OpenAI defines that costmesh does not serve, set to something other than their neutral value."""
    out: list[FieldViolation] = []

    def refuse(name: str, why: str = "not supported by costmesh") -> None:
        out.append(FieldViolation(name, why, "UNSUPPORTED"))

    if req.n not in (None, 1):
        refuse("n", "only n=1 is supported")
    for name in ("tools", "functions"):
        if getattr(req, name):
            refuse(name, "tool calls are not supported by costmesh")
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none"):
            refuse(name, "tool calls are not supported by costmesh")
    if req.logprobs or req.top_logprobs:
        refuse("logprobs" if req.logprobs else "top_logprobs")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        refuse("response_format", "only {'type': 'text'} is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            refuse(name)
    if req.logit_bias:
        refuse("logit_bias")
    if req.stream_options is not None and not req.stream:
        out.append(FieldViolation("stream_options", "only allowed when stream is true"))
    for i, m in enumerate(req.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if part.type != "text":
                refuse(f"messages[{i}].content[{j}].type", "only text content is supported")
    return out


def to_input(
    req: ChatCompletionRequest,
    *,
    request_id: str,
    attribution: Attribution,
    requested_tier: Tier | None,
    cache_mode: CacheMode = CacheMode.DEFAULT,
) -> GenerateInput:
    """The pipeline's input for a request; ``attribution`` comes from the key and headers, ``user`` is the end user."""
    if req.user:
        attribution = Attribution(attribution.tenant, attribution.team, attribution.feature, req.user)
    return GenerateInput(
        request_id=request_id,
        attribution=attribution,
        messages=messages(req.messages),
        sampling=sampling(req),
        requested_tier=requested_tier,
        cache_mode=cache_mode,
    )


def include_usage(req: ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# ---- field paths -------------------------------------------------------------------------------------------------

#: The pipeline's field paths (shared with the gRPC API) → where an OpenAI client set them.
_PARAMS = {
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop",
    "sampling.seed": "seed",
    "attribution.tenant": "x-costmesh-tenant",
    "attribution.team": "x-costmesh-team",
    "attribution.feature": "x-costmesh-feature",
    "attribution.end_user": "user",
    "request_id": "x-request-id",
}


def openai_param(field: str, req: ChatCompletionRequest | None = None) -> str:
    """The OpenAI parameter (or costmesh header) behind one of the pipeline's field paths."""
    name = _PARAMS.get(field, field)
    if name == "max_tokens" and req is not None and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return name


def openai_violations(err: InvalidArgument, req: ChatCompletionRequest | None) -> InvalidArgument:
    """``err`` with its field paths renamed to the OpenAI parameters."""
    if not err.violations:
        return err
    renamed = [FieldViolation(openai_param(v.field, req), v.description, v.reason) for v in err.violations]
    return InvalidArgument(err.message, violations=renamed, reason=err.reason, metadata=err.metadata)


#: Every field name of the request models; anything else in a pydantic error location is a union member's tag.
_FIELDS = frozenset(
    name for model in (ChatCompletionRequest, ChatMessage, ContentPart, StreamOptions) for name in model.model_fields
)


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out


def from_validation_error(exc: ValidationError) -> InvalidArgument:
    """A body pydantic could not read as a request: malformed JSON, not an object, or wrong types."""
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        detail = str((errors[0].get("ctx") or {}).get("error", ""))
        return InvalidArgument(
            f"We could not parse the JSON body of your request: {detail}".rstrip(": "), reason="INVALID_JSON"
        )
    by_path: dict[str, list[str]] = {}
    for e in errors:
        path = _path(e["loc"])
        msg = "the body must be a JSON object" if e["type"] == "model_type" and not path else str(e["msg"])
        if msg not in by_path.setdefault(path, []):
            by_path[path].append(msg)
    violations = [FieldViolation(path, " or ".join(msgs), "INVALID_TYPE") for path, msgs in by_path.items()]
    return InvalidArgument("invalid request", violations=violations, reason="INVALID_TYPE")


# ---- responses ---------------------------------------------------------------------------------------------------

_FINISH = {
    FinishReason.UNSPECIFIED: "stop",
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",  # as vLLM's OpenAI server reports an aborted generation
    FinishReason.ERROR: "error",
}


def finish_reason(f: FinishReason) -> str:
    return _FINISH[f]


def usage(u: TokenUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
    }


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def completion(r: GenerateResult, *, created: int) -> dict[str, Any]:
    """The ``chat.completion`` object for a result."""
    return {
        "id": completion_id(r.request_id),
        "object": "chat.completion",
        "created": created,
        "model": r.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(r.finish_reason),
            }
        ],
        "usage": usage(r.usage),
        "system_fingerprint": None,
    }


def chunk(
    request_id: str,
    *,
    created: int,
    model: str,
    delta: dict[str, str] | None = None,
    finish: str | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice (``"usage": null`` on every chunk when usage was asked for)."""
    out: dict[str, Any] = {
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(r: GenerateResult, *, created: int) -> dict[str, Any]:
    """The last chunk of a stream that asked for ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": completion_id(r.request_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": r.model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(r.usage),
    }


def extras(r: GenerateResult) -> dict[str, Any]:
    """costmesh's figures of a result: response headers of a completion, the ``costmesh`` object of a stream's last
    chunk (its headers left before they were known)."""
    return {
        "request_id": r.request_id,
        "cost_micros": r.cost_micros,
        "saved_micros": r.saved_micros,
        "cache_hit": r.cache_hit,
        "model_class": r.tier.label,
    }


def result_headers(r: GenerateResult) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-costmesh-request-id", r.request_id.encode()),
        (b"x-costmesh-cost-micros", str(r.cost_micros).encode()),
        (b"x-costmesh-saved-micros", str(r.saved_micros).encode()),
        (b"x-costmesh-cache-hit", b"true" if r.cache_hit else b"false"),
        # The tier for now; the model catalog's class once classes replace tiers.
        (b"x-costmesh-model-class", r.tier.label.encode()),
    ]


# ---- errors ------------------------------------------------------------------------------------------------------

#: gRPC status → HTTP status (Google's API design guide mapping, which AIP-193 follows).
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
#: Reasons whose HTTP status is more specific than their code's.
_STATUS_BY_REASON = {"REQUEST_TOO_LARGE": 413}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
#: 429s that waiting a moment does not cure: a budget hard stop lasts until its window rolls over.
_NO_RETRY_REASONS = frozenset({"BUDGET_EXCEEDED"})


def http_status(err: CostmeshError) -> int:
    return _STATUS_BY_REASON.get(err.reason) or _HTTP_STATUS.get(err.code.name, 500)


def error_body(err: CostmeshError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``. ``code`` is costmesh's stable
    reason in lower case (``budget_exceeded``, ``model_not_found``, ``tenant_rate``, …); ``param`` the first bad
    field."""
    status = http_status(err)
    kind = _TYPES.get(status, "server_error")
    if err.reason == "BUDGET_EXCEEDED":
        kind = "insufficient_quota"
    message = err.message if status < 500 or status in (503, 504) else "internal error"
    param: str | None = None
    if isinstance(err, InvalidArgument) and err.violations:
        param = err.violations[0].field
        message = "; ".join(f"{v.field}: {v.description}" if v.field else v.description for v in err.violations)
    elif err.reason == "MODEL_NOT_FOUND":
        param = "model"
    return {"error": {"message": message, "type": kind, "param": param, "code": err.reason.lower()}}


def error_headers(err: CostmeshError) -> list[tuple[bytes, bytes]]:
    """``Retry-After`` (whole seconds) and ``retry-after-ms`` when the error says when to come back, and
    ``x-should-retry`` where the official SDKs' default retries would be wrong or right."""
    out: list[tuple[bytes, bytes]] = []
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after is not None:
        out.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        out.append((b"retry-after-ms", str(max(0, round(retry_after * 1000))).encode()))
    # The official SDKs retry 408, 409, 429 and every 5xx unless told otherwise; costmesh's rule (AIP-194) is to
    # retry only UNAVAILABLE and rate limits — never a deadline that passed, an internal error or a budget stop.
    status = http_status(err)
    if status in (429, 503) and err.reason not in _NO_RETRY_REASONS:
        out.append((b"x-should-retry", b"true"))
    elif status >= 500 or status in (408, 409, 429):
        out.append((b"x-should-retry", b"false"))
    return out


_TOKEN = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")


def valid_request_id(value: str) -> bool:
    """A client's ``x-request-id`` that may travel as the request id (header-safe, at most 128 characters)."""
    return bool(_TOKEN.match(value))
