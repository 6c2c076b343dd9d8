"""Per-tenant concurrency and rate limits of the router (services/router/limits.py), on a fake clock."""

from __future__ import annotations

import pytest

from services.common.errors import ResourceExhausted
from services.router.limits import LimitSettings, TenantLimit, TenantLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **tenants: TenantLimit) -> TenantLimiter:
    return TenantLimiter(LimitSettings(default=TenantLimit(max_concurrent=0), tenants=tenants), clock=clock)


def test_concurrency_is_per_tenant_and_slots_return_on_every_exit() -> None:
    lim = limiter(Clock(), acme=TenantLimit(max_concurrent=2))
    lim.acquire("acme")
    with lim.admit("acme"):
        with pytest.raises(ResourceExhausted) as err:
            lim.acquire("acme")
        assert err.value.reason == "TENANT_CONCURRENCY" and err.value.retry_after_s == 1.0
        assert err.value.violations[0].subject == "tenant:acme"
        for _ in range(50):  # other tenants are not affected (default: no limit)
            lim.acquire("globex")
    assert lim.in_flight("acme") == 1
    with pytest.raises(RuntimeError), lim.admit("acme"):
        raise RuntimeError("handler failed")
    assert lim.in_flight("acme") == 1  # the failed call gave its slot back
    lim.release("acme")
    lim.release("acme")  # an extra release never goes below zero
    assert lim.in_flight("acme") == 0


def test_rate_is_a_token_bucket_with_burst_and_retry_hint() -> None:
    clock = Clock()
    lim = limiter(clock, acme=TenantLimit(max_concurrent=0, requests_per_s=2, burst=3))
    for _ in range(3):
        with lim.admit("acme"):
            pass
    with pytest.raises(ResourceExhausted) as err:
        lim.acquire("acme")
    assert err.value.reason == "TENANT_RATE"
    assert err.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5  # one token back at 2/s
    with lim.admit("acme"):
        pass
    with pytest.raises(ResourceExhausted):
        lim.acquire("acme")
    clock.now += 100  # refills only up to the burst
    for _ in range(3):
        lim.acquire("acme")
    with pytest.raises(ResourceExhausted):
        lim.acquire("acme")


def test_a_rejected_request_takes_no_slot_and_no_token() -> None:
    clock = Clock()
    lim = limiter(clock, acme=TenantLimit(max_concurrent=1, requests_per_s=1, burst=2))
    lim.acquire("acme")
    with pytest.raises(ResourceExhausted, match="in flight"):
        lim.acquire("acme")  # concurrency: no token spent
    lim.release("acme")
    lim.acquire("acme")  # the second token is still there
    lim.release("acme")
    with pytest.raises(ResourceExhausted, match="requests/s"):
        lim.acquire("acme")
    assert lim.in_flight("acme") == 0


def test_burst_defaults_to_one_second_of_rate() -> None:
    assert TenantLimit(requests_per_s=5).capacity == 5
    assert TenantLimit(requests_per_s=0.2).capacity == 1
    assert TenantLimit(requests_per_s=5, burst=12).capacity == 12


def test_idle_tenants_are_forgotten_so_made_up_names_cannot_grow_memory() -> None:
    clock = Clock()
    lim = TenantLimiter(LimitSettings(default=TenantLimit(requests_per_s=10), max_tracked_tenants=100), clock=clock)
    lim.acquire("busy")  # in flight: never forgotten
    for i in range(5_000):
        with lim.admit(f"t{i}"):
            pass
        clock.now += 1.0  # buckets refill, so earlier tenants become idle
    assert len(lim) <= 101 and lim.in_flight("busy") == 1


def test_defaults_cap_concurrency_and_leave_rate_to_configuration() -> None:
    settings = LimitSettings()
    assert settings.default.max_concurrent == 128 and settings.default.requests_per_s == 0
    lim = TenantLimiter(settings)
    for _ in range(128):
        lim.acquire("acme")
    with pytest.raises(ResourceExhausted):
        lim.acquire("acme")
