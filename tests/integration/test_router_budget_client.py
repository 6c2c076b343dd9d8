"""The router's budget client against a starved budget, on a real loopback server.

Found by the soak: under CPU starvation a Reserve sometimes answered after the router's 2 s deadline. The budget had
reserved, the router did not know the reservation's id, and the money stayed held until its TTL while the caller got
DEADLINE_EXCEEDED. Reserve is idempotent on request_id, so the client retries a timed-out Reserve and gets the
reservation the slow attempt made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from services.common import deadline
from services.common.attribution import Attribution
from services.common.errors import DeadlineExceeded, Unavailable
from services.common.pricing import TokenUsage
from services.router.classifier.types import Tier
from services.router.clients import GrpcBudget
from services.router.config import RouterSettings


class SlowBudget(budget_pb2_grpc.BudgetServiceServicer):
    """Reserves at once (idempotently), but answers the first ``slow`` calls only after ``delay_s``."""

    def __init__(self, *, slow: int, delay_s: float) -> None:
        self.slow = slow
        self.delay_s = delay_s
        self.calls = 0
        self.reservations: dict[str, str] = {}

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: Any) -> budget_pb2.ReserveResponse:
        self.calls += 1
        replayed = request.request_id in self.reservations
        rid = self.reservations.setdefault(request.request_id, f"res_{len(self.reservations)}")
        if self.calls <= self.slow:
            await asyncio.sleep(self.delay_s)  # the caller's deadline passes; the reservation exists
        return budget_pb2.ReserveResponse(reservation_id=rid, replayed=replayed)

    async def Commit(self, request: budget_pb2.CommitRequest, context: Any) -> budget_pb2.CommitResponse:
        await asyncio.sleep(self.delay_s)
        return budget_pb2.CommitResponse(charged_micros=request.actual_cost_micros)


@pytest.fixture
async def slow_budget() -> AsyncIterator[tuple[SlowBudget, grpc.aio.Channel]]:
    servicer = SlowBudget(slow=2, delay_s=1.0)
    server = grpc.aio.server()
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, channel
    await channel.close()
    await server.stop(None)


async def reserve(budget: GrpcBudget) -> str:
    res = await budget.reserve(
        request_id="req-1",
        attribution=Attribution(tenant="acme"),
        estimated_cost_micros=100,
        estimated_tokens=10,
        model="m",
        tier=Tier.CHEAP,
    )
    return res.reservation_id


async def test_a_timed_out_reserve_is_retried_and_returns_the_reservation_it_made(
    slow_budget: tuple[SlowBudget, grpc.aio.Channel],
) -> None:
    servicer, channel = slow_budget
    rid = await reserve(GrpcBudget(channel, timeout_s=0.3, ttl_s=300))
    assert rid == "res_0" and servicer.calls == 3  # two timed out, the third got the same reservation
    assert servicer.reservations == {"req-1": "res_0"}  # one reservation, nothing orphaned


async def test_a_budget_that_answers_late_is_waited_for_with_the_default_deadline(
    slow_budget: tuple[SlowBudget, grpc.aio.Channel],
) -> None:
    """Found by the soak on a loaded 2-core machine: a round trip to the budget sometimes took over 2 s, and with
    the old 2 s default three such Reserve attempts failed the request UNAVAILABLE. A budget that answers late is
    alive: the router's default deadline waits for it, in one attempt."""
    servicer, channel = slow_budget
    servicer.slow, servicer.delay_s = 3, 3.0  # every attempt the old default allowed would have timed out
    default_s = RouterSettings.model_fields["budget_timeout_s"].default
    rid = await reserve(GrpcBudget(channel, timeout_s=default_s, ttl_s=300))
    assert rid == "res_0" and servicer.calls == 1


async def test_retries_are_bounded_and_end_unavailable(slow_budget: tuple[SlowBudget, grpc.aio.Channel]) -> None:
    """The router's own deadline on the budget ran out, not the caller's: the budget is unavailable (retryable,
    fail closed) — DEADLINE_EXCEEDED would tell the caller that its own time ran out."""
    servicer, channel = slow_budget
    servicer.slow = 10
    with pytest.raises(Unavailable) as err:
        await reserve(GrpcBudget(channel, timeout_s=0.2, ttl_s=300))
    assert servicer.calls == 3
    assert err.value.reason == "BUDGET_TIMEOUT" and err.value.retry_after_s


async def test_the_callers_own_deadline_stays_deadline_exceeded(
    slow_budget: tuple[SlowBudget, grpc.aio.Channel],
) -> None:
    servicer, channel = slow_budget
    servicer.slow = 10

    async def call() -> str:  # a task of its own: the deadline is recorded in its copy of the context only
        deadline.set_remaining(0.3)  # the caller has less time than the budget's 2 s
        return await reserve(GrpcBudget(channel, timeout_s=2.0, ttl_s=300))

    with pytest.raises(DeadlineExceeded):
        await asyncio.create_task(call())
    assert servicer.calls == 1  # no retry: the caller's time is spent


async def test_a_settlement_that_meets_its_own_deadline_is_unavailable_even_inside_a_short_caller(
    slow_budget: tuple[SlowBudget, grpc.aio.Channel],
) -> None:
    """Found by the soak: a GetAsyncResult whose Commit met the router's own deadline answered DEADLINE_EXCEEDED,
    which clients must not retry. Settlements run on the client's own deadline, never the caller's: running out of it
    is the budget being unavailable (the outbox retries it)."""
    _, channel = slow_budget

    async def call() -> int | None:
        deadline.set_remaining(30.0)  # the caller has plenty of time
        return await GrpcBudget(channel, timeout_s=0.2, ttl_s=300).commit(
            reservation_id="res_0",
            tenant="acme",
            cost_micros=5,
            usage=TokenUsage(1, 1, 0),
            model="m",
            tier=Tier.CHEAP,
            saved_micros=0,
        )

    with pytest.raises(Unavailable) as err:
        await asyncio.create_task(call())
    assert err.value.reason == "BUDGET_TIMEOUT"
