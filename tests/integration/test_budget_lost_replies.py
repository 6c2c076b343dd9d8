"""Lost replies between the budget and Redis: the global hold and the tenant reservation stay consistent.

In Redis Cluster mode a Reserve is two scripts — hold the estimate on the global slot, then admit on the tenant
slot — and the second one's outcome decides whether the first is undone. A reply lost after the tenant script ran
(connection cut: redis-py re-sends, or the store sees the error) must not undo the global hold of a reservation
that exists, and a request lost before it ran must never leave a tenant reservation without its global hold. A
real redis-server sits behind a proxy that loses exactly the tenant step's messages (tests/support/tcp_faults.py);
the store runs in cluster mode on it (the two slots are two scripts there too) and in standalone mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.budget.ledger import (
    BudgetLedger,
    CommitInput,
    LedgerSettings,
    LimitInput,
    PolicyInput,
    ReserveInput,
    ScopeInput,
)
from services.budget.model import ScopeKind, Window
from services.budget.redis_store import RedisBudgetStore
from services.common.attribution import Attribution
from services.common.errors import Unavailable
from tests.support.redis_server import RedisServer
from tests.support.tcp_faults import FaultyProxy, Lose

pytestmark = pytest.mark.redis

ACME = Attribution("acme", "search")
GLOBAL = ScopeInput(int(ScopeKind.GLOBAL))
TENANT = ScopeInput(int(ScopeKind.TENANT), "acme")
#: Only the tenant step of a Reserve names the tenant's request-id key.
TENANT_STEP = b"{t:acme}:req"
EST = 5_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_774_909_800_000

    def __call__(self) -> int:
        return self.now


@dataclass
class Env:
    ledger: BudgetLedger
    proxy: FaultyProxy
    clock: Clock

    async def held(self) -> tuple[int, int]:
        """(global reserved, tenant reserved)."""
        out = []
        for scope in (GLOBAL, TENANT):
            (row,) = (await self.ledger.get_budget(scope)).headroom
            out.append(row.reserved_micros)
        return out[0], out[1]

    async def spent(self) -> tuple[int, int]:
        out = []
        for scope in (GLOBAL, TENANT):
            (row,) = (await self.ledger.get_budget(scope)).headroom
            out.append(row.spent_micros)
        return out[0], out[1]


async def make_env(server: RedisServer, *, cluster: bool, redis_retries: int) -> AsyncIterator[Env]:
    server.flush()
    proxy = FaultyProxy("127.0.0.1", server.port)
    port = await proxy.start()
    # As the composition root builds it (services/budget/__main__.py), with `redis_retries` immediate re-sends.
    retry = Retry(NoBackoff(), redis_retries, supported_errors=(RedisConnectionError,))
    client = Redis(host="127.0.0.1", port=port, retry=retry, socket_timeout=5, socket_connect_timeout=5)
    store = RedisBudgetStore(client=client, cluster=cluster)
    clock = Clock()
    ledger = BudgetLedger(store=store, settings=LedgerSettings(default_ttl_s=60), clock=clock)
    for scope in (GLOBAL, TENANT):
        await ledger.set_budget(PolicyInput(scope, [LimitInput(int(Window.LIFETIME), 100_000)]))
    # Every script loaded, so no NOSCRIPT round trip is what loses its reply.
    for op in ("release", "commit"):
        warm = await ledger.reserve(ReserveInput(f"warm-up-{op}", ACME, 0, 0))
        await ledger.renew("acme", warm.reservation_id)
        if op == "release":
            await ledger.release("acme", warm.reservation_id)
        else:
            await ledger.commit(CommitInput("acme", warm.reservation_id, 0))
    try:
        yield Env(ledger, proxy, clock)
    finally:
        await store.close()
        await proxy.stop()


@pytest.fixture(params=["cluster-mode", "standalone"])
def cluster(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "cluster-mode")


@pytest.fixture
async def resend(redis_server: RedisServer, cluster: bool) -> AsyncIterator[Env]:
    """redis-py re-sends a command once after a broken connection (production's setting)."""
    async for env in make_env(redis_server, cluster=cluster, redis_retries=1):
        yield env


@pytest.fixture
async def no_resend(redis_server: RedisServer, cluster: bool) -> AsyncIterator[Env]:
    """redis-py gives up at once: the store itself sees the broken connection."""
    async for env in make_env(redis_server, cluster=cluster, redis_retries=0):
        yield env


async def settle_and_check(env: Env, reservation_id: str) -> None:
    """Committing the reservation charges both scopes once and leaves nothing held."""
    await env.ledger.commit(CommitInput("acme", reservation_id, 4_000))
    assert await env.held() == (0, 0)
    assert await env.spent() == (4_000, 4_000)


async def test_a_reply_lost_after_the_tenant_step_ran_and_re_sent_keeps_the_global_hold(resend: Env) -> None:
    resend.proxy.arm(TENANT_STEP, lose="reply")
    r = await resend.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
    assert resend.proxy.lost == 1  # the script ran; redis-py re-sent it and it answered with this call's own id
    assert not r.replayed  # this call's admission, not a replay of an earlier one
    assert await resend.held() == (EST, EST)
    await settle_and_check(resend, r.reservation_id)


async def test_a_reply_lost_after_the_tenant_step_ran_is_asked_again_by_the_store(
    no_resend: Env, cluster: bool
) -> None:
    env = no_resend
    env.proxy.arm(TENANT_STEP, lose="reply")
    if cluster:  # the store asks the tenant slot again before it decides anything about the global hold
        r = await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
        assert not r.replayed
    else:  # one atomic step: nothing to decide; the caller's retry replays it
        with pytest.raises(Unavailable):
            await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
        r = await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
        assert r.replayed
    assert env.proxy.lost == 1
    assert await env.held() == (EST, EST)
    await settle_and_check(env, r.reservation_id)


async def test_when_no_reply_ever_comes_the_global_hold_stays_with_the_tenant_reservation(
    no_resend: Env, cluster: bool
) -> None:
    env = no_resend
    env.proxy.arm(TENANT_STEP, times=10, lose="reply")
    with pytest.raises(Unavailable):
        await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
    env.proxy.disarm()
    # The tenant script ran (a reservation exists) and its global hold was not undone.
    assert await env.held() == (EST, EST)
    # The caller retries with the same request id: a replay of that reservation, and nothing more is held.
    again = await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
    assert again.replayed
    assert await env.held() == (EST, EST)
    await settle_and_check(env, again.reservation_id)


async def test_a_request_lost_before_the_tenant_step_ran_holds_globally_until_its_ttl(no_resend: Env) -> None:
    env = no_resend
    env.proxy.arm(TENANT_STEP, times=10, lose="request")
    with pytest.raises(Unavailable):
        await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10, ttl_seconds=30))
    env.proxy.disarm()
    global_held, tenant_held = await env.held()
    assert tenant_held == 0  # nothing was admitted
    assert global_held in (0, EST)  # cluster mode: an orphan global hold (too much held, never too little)
    env.clock.now += 30_000
    assert await env.held() == (0, 0)  # it goes with its TTL
    r = await env.ledger.reserve(ReserveInput("req-1", ACME, EST, 10))
    assert not r.replayed
    assert await env.held() == (EST, EST)
    await settle_and_check(env, r.reservation_id)


@pytest.mark.parametrize("lose", ["request", "reply"])
async def test_a_lost_renewal_never_lets_the_global_hold_expire_first(no_resend: Env, lose: Lose) -> None:
    """Cluster mode renews the global hold first: when the tenant step is lost (before or after it ran), the global
    hold lasts at least as long as the tenant's, and a retried renewal (idempotent) lines them up again."""
    env = no_resend
    r = await env.ledger.reserve(ReserveInput("long", ACME, EST, 10, ttl_seconds=60))
    env.proxy.arm(b"{t:acme}:st", lose=lose)  # the tenant step of the renewal (the global step names only {g})
    with pytest.raises(Unavailable):
        await env.ledger.renew("acme", r.reservation_id, 600)
    env.clock.now += 60_000  # past the first TTL
    global_held, tenant_held = await env.held()
    assert global_held >= tenant_held  # never a tenant reservation without its global hold
    if tenant_held:
        renewed = await env.ledger.renew("acme", r.reservation_id, 600)
        assert renewed.expires_unix_ms == env.clock.now + 600_000
        env.clock.now += 500_000
        assert await env.held() == (EST, EST)
        await settle_and_check(env, r.reservation_id)
