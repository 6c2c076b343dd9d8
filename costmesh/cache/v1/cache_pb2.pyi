from costmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOOKUP_OUTCOME_UNSPECIFIED: _ClassVar[LookupOutcome]
    LOOKUP_OUTCOME_HIT: _ClassVar[LookupOutcome]
    LOOKUP_OUTCOME_MISS: _ClassVar[LookupOutcome]
    LOOKUP_OUTCOME_UNCACHEABLE: _ClassVar[LookupOutcome]
    LOOKUP_OUTCOME_WAIT_TIMEOUT: _ClassVar[LookupOutcome]
    LOOKUP_OUTCOME_UNAVAILABLE: _ClassVar[LookupOutcome]
LOOKUP_OUTCOME_UNSPECIFIED: LookupOutcome
LOOKUP_OUTCOME_HIT: LookupOutcome
LOOKUP_OUTCOME_MISS: LookupOutcome
LOOKUP_OUTCOME_UNCACHEABLE: LookupOutcome
LOOKUP_OUTCOME_WAIT_TIMEOUT: LookupOutcome
LOOKUP_OUTCOME_UNAVAILABLE: LookupOutcome

class CachedResponse(_message.Message):
    __slots__ = ("text", "usage", "cost_micros", "model", "tier", "finish_reason", "created_unix_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    usage: _common_pb2.Usage
    cost_micros: int
    model: str
    tier: _common_pb2.Tier
    finish_reason: _common_pb2.FinishReason
    created_unix_ms: int
    def __init__(self, text: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "key", "expires_unix_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    key: str
    expires_unix_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., key: _Optional[str] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("attribution", "model", "messages", "sampling", "wait_ms", "peek")
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PEEK_FIELD_NUMBER: _ClassVar[int]
    attribution: _common_pb2.Attribution
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    wait_ms: int
    peek: bool
    def __init__(self, attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., wait_ms: _Optional[int] = ..., peek: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("outcome", "key", "response", "lease", "coalesced")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    COALESCED_FIELD_NUMBER: _ClassVar[int]
    outcome: LookupOutcome
    key: str
    response: CachedResponse
    lease: Lease
    coalesced: bool
    def __init__(self, outcome: _Optional[_Union[LookupOutcome, str]] = ..., key: _Optional[str] = ..., response: _Optional[_Union[CachedResponse, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., coalesced: _Optional[bool] = ...) -> None: ...

class FillRequest(_message.Message):
    __slots__ = ("attribution", "key", "lease_id", "response", "abandon")
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    attribution: _common_pb2.Attribution
    key: str
    lease_id: str
    response: CachedResponse
    abandon: bool
    def __init__(self, attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., key: _Optional[str] = ..., lease_id: _Optional[str] = ..., response: _Optional[_Union[CachedResponse, _Mapping]] = ..., abandon: _Optional[bool] = ...) -> None: ...

class FillResponse(_message.Message):
    __slots__ = ("stored", "reason")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    reason: str
    def __init__(self, stored: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("tenant", "feature", "key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    feature: str
    key: str
    def __init__(self, tenant: _Optional[str] = ..., feature: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("hits", "misses", "coalesced_waits", "uncacheable", "fills", "evictions", "saved_micros", "store_errors")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    COALESCED_WAITS_FIELD_NUMBER: _ClassVar[int]
    UNCACHEABLE_FIELD_NUMBER: _ClassVar[int]
    FILLS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    SAVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    STORE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    coalesced_waits: int
    uncacheable: int
    fills: int
    evictions: int
    saved_micros: int
    store_errors: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., coalesced_waits: _Optional[int] = ..., uncacheable: _Optional[int] = ..., fills: _Optional[int] = ..., evictions: _Optional[int] = ..., saved_micros: _Optional[int] = ..., store_errors: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class StatsGroup(_message.Message):
    __slots__ = ("tenant", "feature", "stats")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    feature: str
    stats: CacheStats
    def __init__(self, tenant: _Optional[str] = ..., feature: _Optional[str] = ..., stats: _Optional[_Union[CacheStats, _Mapping]] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("total", "groups", "entries", "bytes")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    total: CacheStats
    groups: _containers.RepeatedCompositeFieldContainer[StatsGroup]
    entries: int
    bytes: int
    def __init__(self, total: _Optional[_Union[CacheStats, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[StatsGroup, _Mapping]]] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
