"""Background load through the router for fault-injection tests, and the budget reads that judge it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from costmesh.budget.v1 import budget_pb2, budget_pb2_grpc
from costmesh.common.v1 import common_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


@dataclass
class Traffic:
    """``concurrency`` clients sending unique cheap requests for one tenant until stopped."""

    target: str
    tenant: str
    concurrency: int = 4
    max_tokens: int = 8
    #: (sent, answered, result) of every answered request, monotonic seconds.
    ok: list[tuple[float, float, router_pb2.GenerateResult]] = field(default_factory=list)
    errors: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.concurrency)]

    async def _client(self, i: int) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            while not self._stop.is_set():
                request = router_pb2.GenerateRequest(
                    attribution=common_pb2.Attribution(tenant=self.tenant, feature="faults"),
                    messages=user(f"Give one fact about item {uuid.uuid4().hex[:8]}."),
                    sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0.0),
                    tier=common_pb2.TIER_CHEAP,
                )
                sent = time.monotonic()
                try:
                    reply = await stub.Generate(request, timeout=120)
                    self.ok.append((sent, time.monotonic(), reply.result))
                except grpc.aio.AioRpcError as err:
                    self.errors.append((time.monotonic(), err.code(), err.details() or ""))
                    await asyncio.sleep(0.1)

    async def until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"traffic: condition not met in {timeout_s}s (ok={len(self.ok)}, errors={self.errors[-3:]})"
                )
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def served_after(self, t: float) -> int:
        return sum(1 for _, at, _ in self.ok if at > t)

    def admitted_between(self, start: float, end: float) -> int:
        """Requests sent after ``start`` and answered before ``end``."""
        return sum(1 for sent, at, _ in self.ok if sent > start and at < end)

    def codes(self) -> Counter[str]:
        return Counter(code.name for _, code, _ in self.errors)


async def track(budget_target: str, tenant: str) -> None:
    """A lifetime limit nobody reaches, so the tenant's reserved money is visible in GetBudget."""
    policy = budget_pb2.BudgetPolicy(
        scope=budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant),
        limits=[budget_pb2.Limit(window=budget_pb2.WINDOW_LIFETIME, cost_micros=10**13)],
    )
    async with grpc.aio.insecure_channel(budget_target) as ch:
        await budget_pb2_grpc.BudgetServiceStub(ch).SetBudget(budget_pb2.SetBudgetRequest(policy=policy), timeout=30)


async def money(budget_target: str, tenant: str) -> tuple[budget_pb2.UsageRow, int]:
    """(usage total, reserved micro-USD) of a tracked tenant.

    Reserved is read first: a commit settles a held reservation, so once nothing is reserved the usage read after it
    is final. Read the other way round, a commit landing between the two reads (a generation whose caller went away is
    settled in the background, moments after the caller returned) gave "nothing reserved" with the usage before it.
    """
    async with grpc.aio.insecure_channel(budget_target) as ch:
        stub = budget_pb2_grpc.BudgetServiceStub(ch)
        scope = budget_pb2.Scope(kind=budget_pb2.SCOPE_KIND_TENANT, tenant=tenant)
        reply = await stub.GetBudget(budget_pb2.GetBudgetRequest(scope=scope), timeout=30)
        usage = await stub.GetUsage(budget_pb2.GetUsageRequest(tenant=tenant), timeout=30)
    return usage.total, sum(h.reserved_micros for h in reply.headroom)


async def settled(budget_target: str, tenant: str, timeout_s: float = 30.0) -> tuple[budget_pb2.UsageRow, int]:
    """The tenant's money once nothing is reserved (or what it is after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            usage, reserved = await money(budget_target, tenant)
        except grpc.aio.AioRpcError:
            usage, reserved = budget_pb2.UsageRow(), -1  # the budget is not answering (yet)
        if reserved == 0 or time.monotonic() > deadline:
            return usage, reserved
        await asyncio.sleep(0.25)
