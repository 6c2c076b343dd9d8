from costmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_MODE_UNSPECIFIED: _ClassVar[CacheMode]
    CACHE_MODE_BYPASS: _ClassVar[CacheMode]
    CACHE_MODE_REFRESH: _ClassVar[CacheMode]
CACHE_MODE_UNSPECIFIED: CacheMode
CACHE_MODE_BYPASS: CacheMode
CACHE_MODE_REFRESH: CacheMode

class RouteDecision(_message.Message):
    __slots__ = ("tier", "score", "threshold", "uncertain", "reasons", "classifier_tier", "policy")
    TIER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_TIER_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    tier: _common_pb2.Tier
    score: float
    threshold: float
    uncertain: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    classifier_tier: _common_pb2.Tier
    policy: str
    def __init__(self, tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., uncertain: _Optional[bool] = ..., reasons: _Optional[_Iterable[str]] = ..., classifier_tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., policy: _Optional[str] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("request_id", "text", "usage", "cost_micros", "tier", "model", "route", "cache_hit", "saved_micros", "budget_remaining_micros", "finish_reason", "time_to_first_token_ms", "escalated")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SAVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_REMAINING_MICROS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    usage: _common_pb2.Usage
    cost_micros: int
    tier: _common_pb2.Tier
    model: str
    route: RouteDecision
    cache_hit: bool
    saved_micros: int
    budget_remaining_micros: int
    finish_reason: _common_pb2.FinishReason
    time_to_first_token_ms: float
    escalated: bool
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., model: _Optional[str] = ..., route: _Optional[_Union[RouteDecision, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., saved_micros: _Optional[int] = ..., budget_remaining_micros: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., time_to_first_token_ms: _Optional[float] = ..., escalated: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "attribution", "messages", "sampling", "tier", "cache_mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attribution: _common_pb2.Attribution
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    tier: _common_pb2.Tier
    cache_mode: CacheMode
    def __init__(self, request_id: _Optional[str] = ..., attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., cache_mode: _Optional[_Union[CacheMode, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: GenerateResult
    def __init__(self, result: _Optional[_Union[GenerateResult, _Mapping]] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("request_id", "attribution", "messages", "sampling", "tier", "cache_mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attribution: _common_pb2.Attribution
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    tier: _common_pb2.Tier
    cache_mode: CacheMode
    def __init__(self, request_id: _Optional[str] = ..., attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., cache_mode: _Optional[_Union[CacheMode, str]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "result")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    text: str
    result: GenerateResult
    def __init__(self, text: _Optional[str] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("attribution", "messages", "sampling")
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    attribution: _common_pb2.Attribution
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    def __init__(self, attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("decision",)
    DECISION_FIELD_NUMBER: _ClassVar[int]
    decision: RouteDecision
    def __init__(self, decision: _Optional[_Union[RouteDecision, _Mapping]] = ...) -> None: ...

class SubmitAsyncRequest(_message.Message):
    __slots__ = ("request_id", "attribution", "messages", "sampling", "tier", "cache_mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attribution: _common_pb2.Attribution
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    tier: _common_pb2.Tier
    cache_mode: CacheMode
    def __init__(self, request_id: _Optional[str] = ..., attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., cache_mode: _Optional[_Union[CacheMode, str]] = ...) -> None: ...

class SubmitAsyncResponse(_message.Message):
    __slots__ = ("job_id", "state", "route")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.JobState
    route: RouteDecision
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., route: _Optional[_Union[RouteDecision, _Mapping]] = ...) -> None: ...

class GetAsyncResultRequest(_message.Message):
    __slots__ = ("job_id", "attribution")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attribution: _common_pb2.Attribution
    def __init__(self, job_id: _Optional[str] = ..., attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ...) -> None: ...

class GetAsyncResultResponse(_message.Message):
    __slots__ = ("job_id", "state", "result", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.JobState
    result: GenerateResult
    error: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...
