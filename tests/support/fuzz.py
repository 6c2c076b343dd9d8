"""Hypothesis strategies of hostile inputs and the oracle helpers shared by ``tests/integration/test_fuzz_*.py``.

The inputs are the ones that break services in practice: empty and oversized strings (just past each documented
limit, and far past it), control characters and odd Unicode, invalid enum numbers, negative and extreme integers,
huge ``max_tokens``, deep message lists, unknown ids, missing attribution, and missing / wrong / under-privileged
credentials. The oracle: every call ends (a deadline bounds it) with a documented status, never INTERNAL or
UNKNOWN, and anything rejected leaves the ledger exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from tests.support.stack import Stack

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
AUTH = frozenset({UNAUTHENTICATED, PERMISSION_DENIED})

#: Modest example counts keep CI fast; FUZZ_EXAMPLES scales them for a longer local hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("COSTMESH_FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies -------------------------------------------------------------------------------------------------

INT64 = st.one_of(
    st.sampled_from([-(2**63), -(10**15) - 1, -1, 0, 1, 10**12, 10**12 + 1, 10**15, 10**15 + 1, 2**53, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
UINT64 = st.one_of(st.sampled_from([0, 1, 10**9, 10**9 + 1, 2**32, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
UINT32 = st.one_of(st.sampled_from([0, 1, 48, 49, 4096, 4097, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
#: Any int32: valid enum numbers, unknown ones, negative ones.
ENUM = st.one_of(st.integers(0, 6), st.sampled_from([-1, 7, 99, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.0000002, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45, 3.4e38]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
_ODD = "\x00\x01\x1f\x7f\u200b\u202e\ufeff\U0001f600é\n\t "


def text(limit: int = 64) -> st.SearchStrategy[str]:
    """Empty, short, around ``limit`` (the documented cap), far past it, and odd characters."""
    return st.one_of(
        st.just(""),
        st.text(max_size=8),
        st.text(alphabet="abcXYZ019._-", min_size=max(0, limit - 1), max_size=limit + 2),
        st.text(alphabet=_ODD, min_size=1, max_size=12),
        st.builds(lambda n, c: c * n, st.integers(limit + 1, 20 * limit + 4_000), st.sampled_from("a€\x00 ")),
    )


TENANT = st.one_of(
    st.sampled_from(["", "fuzz", "fuzz-b", "acme", "x" * 64, "x" * 65, "bad tenant", "tënant", "../x", "a\x00"]),
    text(64),
)


@st.composite
def attribution(draw: st.DrawFn) -> common_pb2.Attribution:
    if draw(st.booleans()):  # missing attribution
        return common_pb2.Attribution()
    a = common_pb2.Attribution(
        tenant=draw(TENANT), team=draw(text(64)), feature=draw(text(64)), end_user=draw(text(128))
    )
    for k, v in draw(st.dictionaries(text(64), text(64), max_size=20)).items():
        a.tags[k] = v
    return a


@st.composite
def messages(draw: st.DrawFn, deep: int = 400) -> list[common_pb2.ChatMessage]:
    """Empty lists, normal ones, deep ones (past the 256-message cap) and ones with hostile fields — sometimes in
    every message, so a validator has thousands of violations to report."""
    count = draw(st.one_of(st.integers(0, 4), st.sampled_from([255, 256, 257]), st.integers(5, deep)))
    every = draw(st.booleans())
    role = draw(ENUM)
    content = draw(text(200))
    msgs = [
        common_pb2.ChatMessage(
            role=role if i == 0 or every else common_pb2.ROLE_USER, content=content if i == 0 or every else "hi"
        )
        for i in range(count)
    ]
    if msgs and draw(st.booleans()):
        msgs[-1].name = draw(text(64))
    return msgs


@st.composite
def sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(max_tokens=draw(UINT32))
    if draw(st.booleans()):
        s.temperature = draw(FLOATS)
    if draw(st.booleans()):
        s.top_p = draw(FLOATS)
    if draw(st.booleans()):
        s.seed = draw(INT64)
    s.stop.extend(draw(st.lists(text(64), max_size=10)))
    return s


VALID_ID = st.from_regex(r"[a-z0-9]{1,24}", fullmatch=True)
VALID_TENANT = st.sampled_from(["fuzz", "fuzz-b"])
VALID_NAME = st.sampled_from(["", "web", "search", "support-summaries"])


@st.composite
def renew_requests(draw: st.DrawFn) -> tuple[bool, budget_pb2.RenewReservationRequest]:
    """(against a live reservation?, the request): RenewReservation with a hostile id (unknown, empty, oversized,
    odd characters), tenant (another one, malformed, missing) or TTL (0 = default, past max_ttl_s: capped). The
    reservation id of a live one (tenant "fuzz") is filled in by the test."""
    bad = draw(corrupted(("reservation_id", "tenant", "ttl")))
    real = "reservation_id" not in bad
    return real, budget_pb2.RenewReservationRequest(
        reservation_id="" if real else draw(st.one_of(text(64), st.just("res_" + "0" * 24), st.just("open_x"))),
        tenant=pick(draw, bad, "tenant", st.just("fuzz"), TENANT),
        ttl_seconds=pick(draw, bad, "ttl", st.integers(0, 3600), UINT32),
    )


def corrupted(fields: tuple[str, ...]) -> st.SearchStrategy[frozenset[str]]:
    """Which fields of a request to make hostile: often none (a valid request), else one to all of them."""
    return st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(fields), min_size=1, max_size=len(fields)))


def pick(
    draw: st.DrawFn, bad: frozenset[str], name: str, valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> Any:
    return draw(hostile if name in bad else valid)


#: Who calls: mostly the admin (so validation, not auth, is what answers), sometimes nobody or a forged key.
def credentials(*roles: str) -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.just("admin"),
        st.just("admin"),
        st.sampled_from([*roles, None, "forged"]),
    )


# ---- calls and oracles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reply: Any = None
    reason: str = ""
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.code == OK


def metadata(stack: Stack, who: str | None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    if who == "forged":
        return (("authorization", "Bearer cm_forged-key-000000000000000000000000000000000000"), *extra)
    return stack.md(who, *extra)


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for d in status.details if status is not None else ():
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return str(info.reason)
    return ""


def unary(fn: Callable[..., Any], request: Any, md: Any, timeout_s: float = 30.0) -> Outcome:
    try:
        return Outcome(OK, fn(request, metadata=md, timeout=timeout_s))
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        return Outcome(code, None, reason_of(err), err.details() or "")  # type: ignore[attr-defined]


def streamed(fn: Callable[..., Any], request: Any, md: Any, timeout_s: float = 60.0) -> Outcome:
    try:
        replies = list(fn(request, metadata=md, timeout=timeout_s))
        return Outcome(OK, replies)
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        return Outcome(code, None, reason_of(err), err.details() or "")  # type: ignore[attr-defined]


def check_documented(out: Outcome, who: str | None, allowed: frozenset[grpc.StatusCode]) -> None:
    """The status is one the API documents for this RPC; credentials decide the auth codes."""
    event(f"{out.code.name} {out.reason}".strip())  # pytest --hypothesis-show-statistics shows the mix
    assert out.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), out
    assert out.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"hung until the deadline: {out}"
    if who in (None, "forged"):
        assert out.code == UNAUTHENTICATED, out
        return
    if who == "admin":
        assert out.code not in AUTH, out
    assert out.code in allowed | AUTH | {OK}, out


# ---- the ledger -------------------------------------------------------------------------------------------------

GLOBAL = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_GLOBAL)


@dataclass(frozen=True)
class Ledger:
    """Money the budget holds: committed totals over every tenant, and every reservation in flight."""

    cost_micros: int
    requests: int
    input_tokens: int
    output_tokens: int
    over_estimate_commits: int
    reserved_micros: int
    late_commits: int = 0
    saved_micros: int = 0
    cache_hits: int = 0


def ledger(stack: Stack, *, savings: bool = False) -> Ledger:
    budget = budget_pb2_grpc.BudgetServiceStub(stack.channel("budget"))
    md = stack.md("admin")
    total = budget.GetUsage(budget_pb2.GetUsageRequest(), metadata=md, timeout=30).total
    headroom = budget.GetBudget(budget_pb2.GetBudgetRequest(scope=GLOBAL), metadata=md, timeout=30).headroom
    assert headroom, "the global scope needs a policy for its reserved total to be visible (see track_all_money)"
    return Ledger(
        cost_micros=total.cost_micros,
        requests=total.requests,
        input_tokens=total.usage.input_tokens,
        output_tokens=total.usage.output_tokens,
        over_estimate_commits=total.over_estimate_commits,
        reserved_micros=sum(h.reserved_micros for h in headroom),
        late_commits=total.late_commits,
        saved_micros=total.saved_micros if savings else 0,
        cache_hits=total.cache_hits if savings else 0,
    )


def track_all_money(stack: Stack) -> None:
    """A global policy with a limit nobody reaches, so GetBudget(GLOBAL) shows every tenant's reserved money."""
    budget = budget_pb2_grpc.BudgetServiceStub(stack.channel("budget"))
    policy = budget_pb2.BudgetPolicy(
        scope=GLOBAL, limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=10**15)]
    )
    budget.SetBudget(budget_pb2.SetBudgetRequest(policy=policy), metadata=stack.md("admin"), timeout=30)


def assert_services_alive(stack: Stack, *names: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name in names:
        assert stack.procs[name].alive(), f"{name} died:\n{stack.log(name)[-3000:]}"
        with grpc.insecure_channel(stack.health_target(name)) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)  # type: ignore[no-untyped-call]
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        assert '"event": "rpc_crashed"' not in stack.log(name), (
            f"{name} crashed on an input:\n{stack.log(name)[-3000:]}"
        )
