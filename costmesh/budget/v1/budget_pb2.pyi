from costmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScopeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_KIND_UNSPECIFIED: _ClassVar[ScopeKind]
    SCOPE_KIND_GLOBAL: _ClassVar[ScopeKind]
    SCOPE_KIND_TENANT: _ClassVar[ScopeKind]
    SCOPE_KIND_TEAM: _ClassVar[ScopeKind]
    SCOPE_KIND_FEATURE: _ClassVar[ScopeKind]
    SCOPE_KIND_END_USER: _ClassVar[ScopeKind]

class Window(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WINDOW_UNSPECIFIED: _ClassVar[Window]
    WINDOW_HOUR: _ClassVar[Window]
    WINDOW_DAY: _ClassVar[Window]
    WINDOW_MONTH: _ClassVar[Window]
    WINDOW_LIFETIME: _ClassVar[Window]

class SavingsReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAVINGS_REASON_UNSPECIFIED: _ClassVar[SavingsReason]
    SAVINGS_REASON_CACHE_HIT: _ClassVar[SavingsReason]
    SAVINGS_REASON_ROUTING: _ClassVar[SavingsReason]

class GroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_BY_UNSPECIFIED: _ClassVar[GroupBy]
    GROUP_BY_TENANT: _ClassVar[GroupBy]
    GROUP_BY_TEAM: _ClassVar[GroupBy]
    GROUP_BY_FEATURE: _ClassVar[GroupBy]
    GROUP_BY_MODEL: _ClassVar[GroupBy]
    GROUP_BY_TIER: _ClassVar[GroupBy]
    GROUP_BY_END_USER: _ClassVar[GroupBy]
SCOPE_KIND_UNSPECIFIED: ScopeKind
SCOPE_KIND_GLOBAL: ScopeKind
SCOPE_KIND_TENANT: ScopeKind
SCOPE_KIND_TEAM: ScopeKind
SCOPE_KIND_FEATURE: ScopeKind
SCOPE_KIND_END_USER: ScopeKind
WINDOW_UNSPECIFIED: Window
WINDOW_HOUR: Window
WINDOW_DAY: Window
WINDOW_MONTH: Window
WINDOW_LIFETIME: Window
SAVINGS_REASON_UNSPECIFIED: SavingsReason
SAVINGS_REASON_CACHE_HIT: SavingsReason
SAVINGS_REASON_ROUTING: SavingsReason
GROUP_BY_UNSPECIFIED: GroupBy
GROUP_BY_TENANT: GroupBy
GROUP_BY_TEAM: GroupBy
GROUP_BY_FEATURE: GroupBy
GROUP_BY_MODEL: GroupBy
GROUP_BY_TIER: GroupBy
GROUP_BY_END_USER: GroupBy

class Scope(_message.Message):
    __slots__ = ("kind", "tenant", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: ScopeKind
    tenant: str
    name: str
    def __init__(self, kind: _Optional[_Union[ScopeKind, str]] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Limit(_message.Message):
    __slots__ = ("window", "cost_micros", "tokens")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    window: Window
    cost_micros: int
    tokens: int
    def __init__(self, window: _Optional[_Union[Window, str]] = ..., cost_micros: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class BudgetPolicy(_message.Message):
    __slots__ = ("scope", "limits", "soft_threshold", "requests_per_minute", "tokens_per_minute", "max_tokens_per_request")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SOFT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    limits: _containers.RepeatedCompositeFieldContainer[Limit]
    soft_threshold: float
    requests_per_minute: int
    tokens_per_minute: int
    max_tokens_per_request: int
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[Limit, _Mapping]]] = ..., soft_threshold: _Optional[float] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ...) -> None: ...

class ScopeHeadroom(_message.Message):
    __slots__ = ("scope", "window", "limit_micros", "spent_micros", "reserved_micros", "remaining_micros", "limit_tokens", "used_tokens", "soft_exceeded", "resets_unix_ms")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MICROS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOFT_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    RESETS_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    window: Window
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    remaining_micros: int
    limit_tokens: int
    used_tokens: int
    soft_exceeded: bool
    resets_unix_ms: int
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ..., window: _Optional[_Union[Window, str]] = ..., limit_micros: _Optional[int] = ..., spent_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., remaining_micros: _Optional[int] = ..., limit_tokens: _Optional[int] = ..., used_tokens: _Optional[int] = ..., soft_exceeded: _Optional[bool] = ..., resets_unix_ms: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "attribution", "estimated_cost_micros", "estimated_tokens", "ttl_seconds", "model", "tier")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attribution: _common_pb2.Attribution
    estimated_cost_micros: int
    estimated_tokens: int
    ttl_seconds: int
    model: str
    tier: _common_pb2.Tier
    def __init__(self, request_id: _Optional[str] = ..., attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., estimated_cost_micros: _Optional[int] = ..., estimated_tokens: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "expires_unix_ms", "headroom", "soft_limit_exceeded", "replayed", "max_tokens_cap", "remaining_micros")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_CAP_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MICROS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    expires_unix_ms: int
    headroom: _containers.RepeatedCompositeFieldContainer[ScopeHeadroom]
    soft_limit_exceeded: bool
    replayed: bool
    max_tokens_cap: int
    remaining_micros: int
    def __init__(self, reservation_id: _Optional[str] = ..., expires_unix_ms: _Optional[int] = ..., headroom: _Optional[_Iterable[_Union[ScopeHeadroom, _Mapping]]] = ..., soft_limit_exceeded: _Optional[bool] = ..., replayed: _Optional[bool] = ..., max_tokens_cap: _Optional[int] = ..., remaining_micros: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "actual_cost_micros", "usage", "model", "tier", "saved_micros", "tenant")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SAVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    actual_cost_micros: int
    usage: _common_pb2.Usage
    model: str
    tier: _common_pb2.Tier
    saved_micros: int
    tenant: str
    def __init__(self, reservation_id: _Optional[str] = ..., actual_cost_micros: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., saved_micros: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("charged_micros", "over_estimate", "replayed", "remaining_micros")
    CHARGED_MICROS_FIELD_NUMBER: _ClassVar[int]
    OVER_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MICROS_FIELD_NUMBER: _ClassVar[int]
    charged_micros: int
    over_estimate: bool
    replayed: bool
    remaining_micros: int
    def __init__(self, charged_micros: _Optional[int] = ..., over_estimate: _Optional[bool] = ..., replayed: _Optional[bool] = ..., remaining_micros: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id", "tenant")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    tenant: str
    def __init__(self, reservation_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released_micros", "replayed")
    RELEASED_MICROS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    released_micros: int
    replayed: bool
    def __init__(self, released_micros: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RecordSavingsRequest(_message.Message):
    __slots__ = ("request_id", "attribution", "saved_micros", "reason", "model", "tier", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SAVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attribution: _common_pb2.Attribution
    saved_micros: int
    reason: SavingsReason
    model: str
    tier: _common_pb2.Tier
    usage: _common_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., attribution: _Optional[_Union[_common_pb2.Attribution, _Mapping]] = ..., saved_micros: _Optional[int] = ..., reason: _Optional[_Union[SavingsReason, str]] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class RecordSavingsResponse(_message.Message):
    __slots__ = ("replayed",)
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    replayed: bool
    def __init__(self, replayed: _Optional[bool] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: BudgetPolicy
    def __init__(self, policy: _Optional[_Union[BudgetPolicy, _Mapping]] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: BudgetPolicy
    def __init__(self, policy: _Optional[_Union[BudgetPolicy, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("policy", "headroom")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FIELD_NUMBER: _ClassVar[int]
    policy: BudgetPolicy
    headroom: _containers.RepeatedCompositeFieldContainer[ScopeHeadroom]
    def __init__(self, policy: _Optional[_Union[BudgetPolicy, _Mapping]] = ..., headroom: _Optional[_Iterable[_Union[ScopeHeadroom, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "start_unix_ms", "end_unix_ms", "window", "group_by")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    start_unix_ms: int
    end_unix_ms: int
    window: Window
    group_by: _containers.RepeatedScalarFieldContainer[GroupBy]
    def __init__(self, tenant: _Optional[str] = ..., start_unix_ms: _Optional[int] = ..., end_unix_ms: _Optional[int] = ..., window: _Optional[_Union[Window, str]] = ..., group_by: _Optional[_Iterable[_Union[GroupBy, str]]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant", "team", "feature", "model", "tier", "end_user", "cost_micros", "usage", "requests", "saved_micros", "cache_hits", "over_estimate_commits")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    END_USER_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SAVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    OVER_ESTIMATE_COMMITS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    team: str
    feature: str
    model: str
    tier: _common_pb2.Tier
    end_user: str
    cost_micros: int
    usage: _common_pb2.Usage
    requests: int
    saved_micros: int
    cache_hits: int
    over_estimate_commits: int
    def __init__(self, tenant: _Optional[str] = ..., team: _Optional[str] = ..., feature: _Optional[str] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., end_user: _Optional[str] = ..., cost_micros: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., requests: _Optional[int] = ..., saved_micros: _Optional[int] = ..., cache_hits: _Optional[int] = ..., over_estimate_commits: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "total")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total: UsageRow
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total: _Optional[_Union[UsageRow, _Mapping]] = ...) -> None: ...
