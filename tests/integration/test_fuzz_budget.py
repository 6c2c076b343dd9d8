"""Hostile requests against every RPC of the real budget service (the secured stack, tests/support/stack.py).

Every call ends with a documented status (never INTERNAL, never a hang); a rejected call leaves the ledger —
committed totals over every tenant and every reservation in flight — exactly as it was; an accepted commit moves
it by exactly what it charged; nothing fuzzed leaves money reserved.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from tests.support.fuzz import (
    ENUM,
    FAILED_PRECONDITION,
    FLOATS,
    FUZZ,
    GLOBAL,
    INT64,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    TENANT,
    UINT32,
    UINT64,
    VALID_ID,
    VALID_NAME,
    VALID_TENANT,
    assert_services_alive,
    attribution,
    check_documented,
    corrupted,
    credentials,
    ledger,
    metadata,
    pick,
    renew_requests,
    text,
    track_all_money,
    unary,
)
from tests.support.stack import Stack, shared_stack

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
ALLOWED = frozenset({INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION})


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with shared_stack() as s:
        yield s


@pytest.fixture(scope="module")
def budget(stack: Stack) -> Iterator[budget_pb2_grpc.BudgetServiceStub]:
    track_all_money(stack)
    yield budget_pb2_grpc.BudgetServiceStub(stack.channel("budget"))
    assert_services_alive(stack, "budget")
    assert ledger(stack).reserved_micros == 0, "fuzzing left money reserved"


def reserve(stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, tenant: str = "fuzz") -> str:
    reply = budget.Reserve(
        budget_pb2.ReserveRequest(
            request_id=uuid.uuid4().hex,
            attribution=common_pb2.Attribution(tenant=tenant),
            estimated_cost_micros=5_000,
            estimated_tokens=100,
            tier=common_pb2.TIER_CHEAP,
        ),
        metadata=stack.md("router"),
        timeout=10,
    )
    return str(reply.reservation_id)


def release(stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, reservation_id: str, tenant: str) -> None:
    budget.Release(
        budget_pb2.ReleaseRequest(reservation_id=reservation_id, tenant=tenant), metadata=stack.md("admin"), timeout=10
    )


@st.composite
def valid_attribution(draw: st.DrawFn) -> common_pb2.Attribution:
    return common_pb2.Attribution(tenant=draw(VALID_TENANT), team=draw(VALID_NAME), feature=draw(VALID_NAME))


@st.composite
def reserve_requests(draw: st.DrawFn) -> budget_pb2.ReserveRequest:
    bad = draw(corrupted(("request_id", "attribution", "cost", "tokens", "ttl", "model", "tier")))
    return budget_pb2.ReserveRequest(
        request_id=pick(draw, bad, "request_id", VALID_ID, text(128)),
        attribution=pick(draw, bad, "attribution", valid_attribution(), attribution()),
        estimated_cost_micros=pick(draw, bad, "cost", st.integers(0, 10**6), INT64),
        estimated_tokens=pick(draw, bad, "tokens", st.integers(0, 10**6), UINT64),
        ttl_seconds=pick(draw, bad, "ttl", st.integers(0, 3600), UINT32),
        model=pick(draw, bad, "model", st.sampled_from(["", "costmesh-cheap"]), text(128)),
        tier=pick(draw, bad, "tier", st.sampled_from([0, 1, 2]), ENUM),
    )


@given(who=credentials("router", "fuzz"), request=reserve_requests())
@FUZZ
def test_reserve(
    stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, who: str | None, request: budget_pb2.ReserveRequest
) -> None:
    before = ledger(stack)
    out = unary(budget.Reserve, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    if not out.ok:
        assert ledger(stack) == before, out
        return
    # Accepted: the money is reserved (a replay of an earlier request id reserves nothing new) — then returned.
    cost, a = request.estimated_cost_micros, request.attribution
    assert 0 <= cost <= 10**12 and a.tenant and request.ttl_seconds <= 3600 and 0 < len(request.request_id) <= 128
    assert ledger(stack).reserved_micros - before.reserved_micros in ((0, cost) if out.reply.replayed else (cost,))
    release(stack, budget, out.reply.reservation_id, a.tenant)
    assert ledger(stack).reserved_micros <= before.reserved_micros


@st.composite
def commit_requests(draw: st.DrawFn) -> tuple[bool, budget_pb2.CommitRequest]:
    """(against a live reservation?, the request): a live one of tenant "fuzz" is made by the test."""
    bad = draw(corrupted(("reservation_id", "tenant", "cost", "saved", "usage", "model", "tier")))
    real = "reservation_id" not in bad
    inp = pick(draw, bad, "usage", st.integers(0, 1000), UINT64)
    usage = common_pb2.Usage(
        input_tokens=inp,
        output_tokens=pick(draw, bad, "usage", st.integers(0, 1000), UINT64),
        cached_input_tokens=pick(draw, bad, "usage", st.integers(0, inp), UINT64),
    )
    return real, budget_pb2.CommitRequest(
        reservation_id=draw(st.one_of(text(64), st.just("res_" + "0" * 24))) if not real else "",
        tenant=pick(draw, bad, "tenant", st.just("fuzz"), TENANT),
        actual_cost_micros=pick(draw, bad, "cost", st.integers(0, 10**6), INT64),
        usage=usage,
        model=pick(draw, bad, "model", st.sampled_from(["", "costmesh-cheap"]), text(128)),
        tier=pick(draw, bad, "tier", st.sampled_from([0, 1, 2]), ENUM),
        saved_micros=pick(draw, bad, "saved", st.integers(0, 10**6), INT64),
    )


@given(who=credentials("router", "fuzz"), case=commit_requests())
@FUZZ
def test_commit(
    stack: Stack,
    budget: budget_pb2_grpc.BudgetServiceStub,
    who: str | None,
    case: tuple[bool, budget_pb2.CommitRequest],
) -> None:
    real, request = case
    if real:  # a live reservation of tenant "fuzz", committed with fuzzed fields (and maybe the wrong tenant)
        request.reservation_id = reserve(stack, budget)
    before = ledger(stack)
    out = unary(budget.Commit, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    if out.ok:
        cost = request.actual_cost_micros
        assert real and request.tenant == "fuzz" and 0 <= cost <= 10**12
        after = ledger(stack)
        assert after.cost_micros - before.cost_micros == out.reply.charged_micros == cost
        assert after.requests - before.requests == 1
        assert after.reserved_micros == before.reserved_micros - 5_000
        return
    assert ledger(stack) == before, out
    if not real:
        assert out.code in (INVALID_ARGUMENT, NOT_FOUND) or who not in ("admin", "router"), out
    else:
        release(stack, budget, request.reservation_id, "fuzz")


@given(
    who=credentials("router", "fuzz"),
    reservation_id=st.one_of(st.just("res_" + "0" * 24), text(64)),
    tenant=st.one_of(VALID_TENANT, TENANT),
)
@FUZZ
def test_release(
    stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, who: str | None, reservation_id: str, tenant: str
) -> None:
    before = ledger(stack)
    out = unary(
        budget.Release, budget_pb2.ReleaseRequest(reservation_id=reservation_id, tenant=tenant), metadata(stack, who)
    )
    check_documented(out, who, ALLOWED)
    assert not out.ok or out.reply.released_micros == 0  # unknown ids release nothing
    assert ledger(stack) == before


@given(who=credentials("router", "fuzz"), case=renew_requests())
@FUZZ
def test_renew_reservation(
    stack: Stack,
    budget: budget_pb2_grpc.BudgetServiceStub,
    who: str | None,
    case: tuple[bool, budget_pb2.RenewReservationRequest],
) -> None:
    real, request = case
    if real:  # a live reservation of tenant "fuzz", renewed with fuzzed fields (and maybe the wrong tenant)
        request.reservation_id = reserve(stack, budget)
    before = ledger(stack)
    started_ms = time.time() * 1000
    out = unary(budget.RenewReservation, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    assert ledger(stack) == before  # renewing moves no money, accepted or not
    if out.ok:
        assert (real and request.tenant == "fuzz") or request.reservation_id == "open_x", out
        # Never past max_ttl_s (3600) from now, whatever the TTL asked for.
        assert started_ms < out.reply.expires_unix_ms <= time.time() * 1000 + 3_600_000
    elif not real:
        assert out.code in (INVALID_ARGUMENT, NOT_FOUND) or who not in ("admin", "router"), out
    if real:
        release(stack, budget, request.reservation_id, "fuzz")


@st.composite
def savings_requests(draw: st.DrawFn) -> budget_pb2.RecordSavingsRequest:
    bad = draw(corrupted(("request_id", "attribution", "saved", "reason", "model", "tier")))
    return budget_pb2.RecordSavingsRequest(
        request_id=pick(draw, bad, "request_id", VALID_ID, text(128)),
        attribution=pick(draw, bad, "attribution", valid_attribution(), attribution()),
        saved_micros=pick(draw, bad, "saved", st.integers(0, 10**6), INT64),
        reason=pick(draw, bad, "reason", st.sampled_from([1, 2]), ENUM),
        model=pick(draw, bad, "model", st.sampled_from(["", "costmesh-full"]), text(128)),
        tier=pick(draw, bad, "tier", st.sampled_from([0, 1, 2]), ENUM),
    )


@given(who=credentials("router", "fuzz"), request=savings_requests())
@FUZZ
def test_record_savings(
    stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, who: str | None, request: budget_pb2.RecordSavingsRequest
) -> None:
    before = ledger(stack, savings=True)
    out = unary(budget.RecordSavings, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    after = ledger(stack, savings=True)
    if not out.ok:
        assert after == before, out
    else:  # savings move, money does not
        saved = request.saved_micros
        assert (after.cost_micros, after.reserved_micros) == (before.cost_micros, before.reserved_micros)
        assert after.saved_micros - before.saved_micros in ((0, saved) if out.reply.replayed else (saved,))


@st.composite
def savings_batches(draw: st.DrawFn) -> budget_pb2.RecordSavingsBatchRequest:
    """A batch of valid records (request ids fresh or already seen, tenant empty or the batch's) with, when
    corrupted: a hostile batch tenant, no records or more than 1000, hostile records, or a record of another
    tenant; or (valid all the same) a request id twice, whose second record replays the first."""
    bad = draw(corrupted(("tenant", "count", "records", "duplicate", "foreign")))
    tenant = pick(draw, bad, "tenant", VALID_TENANT, TENANT)
    count = pick(draw, bad, "count", st.one_of(st.integers(1, 8), st.just(1000)), st.sampled_from([0, 1001, 1500]))
    # At most 8 drawn records; a larger batch repeats them under numbered ids (drawing 1000 would overrun hypothesis).
    drawn = [
        budget_pb2.RecordSavingsRequest(
            request_id=rid,
            attribution=common_pb2.Attribution(tenant=draw(st.sampled_from(["", tenant])), team=draw(VALID_NAME)),
            saved_micros=draw(st.integers(0, 10**6)),
            reason=draw(st.sampled_from([1, 2])),  # type: ignore[arg-type]
            tier=draw(st.sampled_from([0, 1, 2])),  # type: ignore[arg-type]
        )
        for rid in draw(st.lists(VALID_ID, min_size=min(count, 8), max_size=min(count, 8), unique=True))
    ]
    records = drawn if count <= 8 else []
    for i in range(len(records), count):
        records.append(budget_pb2.RecordSavingsRequest())
        records[i].CopyFrom(drawn[i % len(drawn)])
        records[i].request_id += f"n{i}"
    if records:
        if "records" in bad:
            for _ in range(draw(st.integers(1, 3))):
                records[draw(st.integers(0, count - 1))] = draw(savings_requests())
        if "duplicate" in bad and count > 1:
            i = draw(st.integers(0, count - 2))
            j = draw(st.integers(i + 1, count - 1))
            records[j].request_id = records[i].request_id
        if "foreign" in bad:
            records[draw(st.integers(0, count - 1))].attribution.tenant = draw(TENANT.filter(lambda t: t != tenant))
    return budget_pb2.RecordSavingsBatchRequest(tenant=tenant, records=records)


@given(who=credentials("router", "fuzz"), request=savings_batches())
@FUZZ
def test_record_savings_batch(
    stack: Stack,
    budget: budget_pb2_grpc.BudgetServiceStub,
    who: str | None,
    request: budget_pb2.RecordSavingsBatchRequest,
) -> None:
    before = ledger(stack, savings=True)
    out = unary(budget.RecordSavingsBatch, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    after = ledger(stack, savings=True)
    if not out.ok:  # all or nothing
        assert after == before, out
        return
    records = request.records
    assert 1 <= len(records) <= 1000 and len(out.reply.replayed) == len(records)
    assert all(r.attribution.tenant in ("", request.tenant) for r in records)
    first = {r.request_id: i for i, r in reversed(list(enumerate(records)))}
    assert all(out.reply.replayed[i] for i, r in enumerate(records) if first[r.request_id] != i)  # counted once
    new = [r for r, replayed in zip(records, out.reply.replayed, strict=True) if not replayed]
    assert (after.cost_micros, after.reserved_micros) == (before.cost_micros, before.reserved_micros)
    assert after.saved_micros - before.saved_micros == sum(r.saved_micros for r in new)
    assert after.cache_hits - before.cache_hits == sum(r.reason == budget_pb2.SAVINGS_REASON_CACHE_HIT for r in new)


@st.composite
def policies(draw: st.DrawFn) -> budget_pb2.BudgetPolicy:
    bad = draw(corrupted(("scope", "rates", "limits", "soft")))
    if "scope" in bad:
        scope = budget_pb2.Scope(kind=draw(ENUM), tenant=draw(TENANT), name=draw(text(128)))  # type: ignore[arg-type]
    else:
        kind = draw(st.sampled_from([2, 3, 4]))
        scope = budget_pb2.Scope(kind=kind, tenant="fuzz-policy", name="" if kind == 2 else draw(VALID_ID))  # type: ignore[arg-type]
    p = budget_pb2.BudgetPolicy(
        scope=scope,
        requests_per_minute=pick(draw, bad, "rates", st.integers(0, 1000), UINT32),
        tokens_per_minute=pick(draw, bad, "rates", st.integers(0, 10**6), UINT64),
        max_tokens_per_request=pick(draw, bad, "rates", st.integers(0, 4096), UINT32),
    )
    windows = draw(
        st.lists(ENUM, max_size=6) if "limits" in bad else st.lists(st.sampled_from([1, 2, 3, 4]), unique=True)
    )
    for window in windows:
        limit = p.limits.add(window=window)  # type: ignore[arg-type]
        if "limits" in bad:
            if draw(st.booleans()):
                limit.cost_micros = draw(INT64)
            if draw(st.booleans()):
                limit.tokens = draw(UINT64)
        else:
            limit.cost_micros = draw(st.integers(0, 10**9))
    if "soft" in bad:
        p.soft_threshold = draw(FLOATS.map(float))
    elif draw(st.booleans()):
        p.soft_threshold = draw(st.floats(0.01, 1.0))
    return p


@given(who=credentials("router", "fuzz"), policy=policies())
@FUZZ
def test_set_budget(
    stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, who: str | None, policy: budget_pb2.BudgetPolicy
) -> None:
    before = ledger(stack)
    out = unary(budget.SetBudget, budget_pb2.SetBudgetRequest(policy=policy), metadata(stack, who))
    check_documented(out, who, ALLOWED)
    if who not in ("admin", None, "forged"):
        assert out.code == PERMISSION_DENIED  # SetBudget is admin only
    if out.ok:
        stored = out.reply.policy
        assert all(0 <= lim.cost_micros <= 10**15 for lim in stored.limits)
        assert 0 < stored.soft_threshold <= 1 and not math.isnan(stored.soft_threshold)
        if policy.scope.kind == budget_pb2.SCOPE_KIND_GLOBAL:
            track_all_money(stack)  # the shared stack's global policy stays unreachable
    assert ledger(stack) == before


@given(
    who=credentials("router", "fuzz"),
    kind=st.one_of(st.sampled_from([1, 2, 3]), ENUM),
    tenant=st.one_of(VALID_TENANT, TENANT),
    name=st.one_of(st.just(""), VALID_ID, text(128)),
)
@FUZZ
def test_get_budget(
    stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub, who: str | None, kind: int, tenant: str, name: str
) -> None:
    request = budget_pb2.GetBudgetRequest(scope=budget_pb2.Scope(kind=kind, tenant=tenant, name=name))  # type: ignore[arg-type]
    before = ledger(stack)
    out = unary(budget.GetBudget, request, metadata(stack, who))
    check_documented(out, who, ALLOWED)
    assert ledger(stack) == before


@given(
    who=credentials("router", "fuzz"),
    tenant=st.one_of(VALID_TENANT, TENANT),
    start=st.one_of(st.just(0), INT64),
    end=st.one_of(st.just(0), INT64),
    window=st.one_of(st.sampled_from([0, 1, 2, 3, 4]), ENUM),
    group_by=st.one_of(
        st.lists(st.sampled_from([1, 2, 3, 4, 5, 6]), max_size=3, unique=True), st.lists(ENUM, max_size=12)
    ),
)
@FUZZ
def test_get_usage(
    stack: Stack,
    budget: budget_pb2_grpc.BudgetServiceStub,
    who: str | None,
    tenant: str,
    start: int,
    end: int,
    window: int,
    group_by: list[int],
) -> None:
    request = budget_pb2.GetUsageRequest(
        tenant=tenant,
        start_unix_ms=start,
        end_unix_ms=end,
        window=window,
        group_by=group_by,  # type: ignore[arg-type]
    )
    before = ledger(stack)
    out = unary(budget.GetUsage, request, metadata(stack, who), timeout_s=60)
    check_documented(out, who, ALLOWED)
    if out.ok and tenant:
        assert all(row.tenant in ("", tenant) for row in out.reply.rows)  # one tenant's report holds only it
    assert ledger(stack) == before


def test_the_global_scope_is_tracked(stack: Stack, budget: budget_pb2_grpc.BudgetServiceStub) -> None:
    """The oracle itself: a reservation anywhere shows in the global reserved total, and its release removes it."""
    before = ledger(stack)
    rid = reserve(stack, budget, tenant="fuzz-oracle")
    assert ledger(stack).reserved_micros == before.reserved_micros + 5_000
    release(stack, budget, rid, "fuzz-oracle")
    assert ledger(stack) == before
    assert budget.GetBudget(budget_pb2.GetBudgetRequest(scope=GLOBAL), metadata=stack.md("admin")).policy.limits
