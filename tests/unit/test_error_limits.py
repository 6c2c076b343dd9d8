"""Rich error statuses stay small whatever the request held (services/common/interceptors.py).

A status travels in the trailers twice (grpc-message percent-encoded, grpc-status-details-bin base64); clients
refuse trailers over 8 KiB, which turns the intended status into RESOURCE_EXHAUSTED. Fuzzing found it with a
GetJob for a 930-character id quoted back in a NOT_FOUND message.
"""

from __future__ import annotations

import base64
import urllib.parse

from services.common.errors import FieldViolation, InvalidArgument, NotFound, QuotaViolation, ResourceExhausted
from services.common.interceptors import MAX_MESSAGE_CHARS, to_rpc_status

TRAILER_LIMIT = 8 * 1024


def trailer_bytes(error: Exception) -> int:
    status = to_rpc_status(error, "costmesh.test")  # type: ignore[arg-type]
    grpc_message = urllib.parse.quote(status.message, safe=" ")
    return len(grpc_message) + len(base64.b64encode(status.SerializeToString()))


def test_a_long_quoted_id_is_clipped() -> None:
    err = NotFound(f"no job {'€' * 5000!r}", reason="JOB_NOT_FOUND")
    status = to_rpc_status(err, "costmesh.infer")
    assert len(status.message) == MAX_MESSAGE_CHARS and status.message.endswith("…")
    assert status.message.startswith("no job '€€")
    assert trailer_bytes(err) < TRAILER_LIMIT // 2


def test_thousands_of_violations_keep_the_first_ones_and_fit() -> None:
    many = [FieldViolation(f"messages[{i}].role", "must be system, user, assistant or tool") for i in range(10_000)]
    err = InvalidArgument("invalid request", violations=many)
    assert trailer_bytes(err) < TRAILER_LIMIT
    huge = [FieldViolation("€" * 10_000, "€" * 10_000) for _ in range(100)]
    assert trailer_bytes(InvalidArgument("x" * 100_000, violations=huge)) < TRAILER_LIMIT
    quotas = [QuotaViolation(f"tenant:t{i}", "x" * 500) for i in range(1000)]
    assert trailer_bytes(ResourceExhausted("over", violations=quotas, retry_after_s=1)) < TRAILER_LIMIT


def test_short_statuses_are_untouched() -> None:
    err = InvalidArgument("invalid request", violations=[FieldViolation("sampling.max_tokens", "0..4096")])
    status = to_rpc_status(err, "costmesh.router")
    assert status.message == "invalid request" and len(status.details) == 2
