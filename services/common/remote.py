"""Turning a failed call to another costmesh service back into the domain error it carried.

The rich details survive the hop: a budget hard stop reaches the router's caller as RESOURCE_EXHAUSTED with the
budget's own ``QuotaFailure``, ``RetryInfo`` and ``ErrorInfo.reason``; a worker's ``BadRequest`` stays a
``BadRequest``. Transport failures (connection refused, deadline) become ``Unavailable`` / ``DeadlineExceeded``.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.errors import (
    CostmeshError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)


def _unpack(status: Any, cls: Any) -> Any:
    for d in status.details:
        if d.Is(cls.DESCRIPTOR):
            msg = cls()
            d.Unpack(msg)
            return msg
    return None


def error_from_rpc(err: grpc.aio.AioRpcError, *, peer: str) -> CostmeshError:
    """The domain error for a failed call to ``peer`` (a service name used in messages)."""
    code = err.code()
    message = err.details() or code.name
    status = None
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:  # inconsistent trailers: keep the plain status
        status = None
    reason: str | None = None
    metadata: dict[str, str] = {}
    if status is not None:
        info = _unpack(status, error_details_pb2.ErrorInfo)
        if info is not None:
            reason, metadata = info.reason, dict(info.metadata)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        quota = _unpack(status, error_details_pb2.QuotaFailure) if status is not None else None
        retry = _unpack(status, error_details_pb2.RetryInfo) if status is not None else None
        return ResourceExhausted(
            message,
            violations=[QuotaViolation(v.subject, v.description) for v in quota.violations] if quota else (),
            retry_after_s=(retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9) if retry else None,
            reason=reason,
            metadata=metadata,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = _unpack(status, error_details_pb2.BadRequest) if status is not None else None
        violations = [FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations] if bad else ()
        return InvalidArgument(message, violations=violations, reason=reason, metadata=metadata)
    simple: dict[grpc.StatusCode, type[CostmeshError]] = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    }
    if code in simple:
        return simple[code](message, reason=reason, metadata=metadata)
    # UNAVAILABLE, INTERNAL, UNKNOWN, UNIMPLEMENTED…: the peer cannot serve this now.
    return Unavailable(f"{peer}: {message}", reason=reason or f"{peer.upper()}_UNAVAILABLE", metadata=metadata)
