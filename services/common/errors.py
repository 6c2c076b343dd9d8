"""The domain error tree shared by every service.

Domain modules raise these (they know nothing of gRPC); one server interceptor
(:mod:`services.common.interceptors`) turns them into ``google.rpc.Status`` with ``ErrorInfo(reason,
domain="costmesh.<svc>")`` plus ``BadRequest`` / ``QuotaFailure`` / ``RetryInfo`` details. Reasons are stable
UPPER_SNAKE strings that clients may branch on; messages are for humans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field (AIP-193 ``BadRequest.FieldViolation``)."""

    field: str
    description: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One limit that stopped a request (``QuotaFailure.Violation``)."""

    subject: str
    description: str


class CostmeshError(Exception):
    """Base of every domain error: a status code, a stable reason and a human message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(CostmeshError):
    """The request is malformed; ``violations`` name the fields (sent as ``BadRequest``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: tuple[FieldViolation, ...] = tuple(violations)


class NotFound(CostmeshError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(CostmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(CostmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(CostmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(CostmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(CostmeshError):
    """A hard limit, rate cap or full queue. Sent with ``QuotaFailure`` and, when known, ``RetryInfo``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[QuotaViolation] = (),
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: tuple[QuotaViolation, ...] = tuple(violations)
        self.retry_after_s = retry_after_s


class Unavailable(CostmeshError):
    """A dependency (store, engine, worker tier) cannot serve now; safe to retry, maybe after ``retry_after_s``."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s


class Aborted(CostmeshError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class DeadlineExceeded(CostmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


#: Errors after which an idempotent call is worth retrying: the dependency may answer later, and the call may not
#: have happened.
TRANSIENT: tuple[type[CostmeshError], ...] = (Unavailable, DeadlineExceeded)


class Unimplemented(CostmeshError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


@dataclass(slots=True)
class Validator:
    """Collects field violations so a request reports every bad field at once.

    >>> v = Validator()
    >>> v.require(bool(tenant), "attribution.tenant", "required")
    >>> v.raise_if_any("invalid GenerateRequest")
    """

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str, reason: str = "") -> None:
        self.violations.append(FieldViolation(field_path, description, reason))

    def require(self, ok: bool, field_path: str, description: str, reason: str = "") -> None:
        if not ok:
            self.add(field_path, description, reason)

    def raise_if_any(self, message: str) -> None:
        if self.violations:
            raise InvalidArgument(message, violations=self.violations)
