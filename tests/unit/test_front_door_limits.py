"""The front door's per-address limits (DESIGN.md §8): registration and authorization, each a token bucket per client
address in the gateway's `RateLimiter` beside the request budgets (DESIGN.md §9), on an injected clock. Through
HTTP, across replicas and under a flood of addresses: tests/integration/test_front_door_attacks.py and
test_front_door_replicas.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from okta_agent_proxy.config.limits import RateLimits
from okta_agent_proxy.errors import RateLimited
from okta_agent_proxy.frontdoor.registration import REGISTRATIONS_PER_MINUTE, AddressLimit
from okta_agent_proxy.frontdoor.service import AUTHORIZATIONS_PER_MINUTE
from okta_agent_proxy.policy.rate_limits import RateLimiter, RequestLimits

ADDRESS = "198.51.100.7"


@dataclass
class Clock:
    now: float = 1_000_000.0  # seconds

    def __call__(self) -> float:
        return self.now


async def takes(limit: AddressLimit, count: int, address: str = ADDRESS) -> list[int]:
    return [await limit.take(address) for _ in range(count)]


async def test_an_address_has_its_burst_then_waits_for_the_next_token_rounded_up() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    register = AddressLimit("register", REGISTRATIONS_PER_MINUTE, limiter)
    assert await takes(register, REGISTRATIONS_PER_MINUTE + 1) == [0] * REGISTRATIONS_PER_MINUTE + [6]
    clock.now += 0.25
    assert await register.take(ADDRESS) == 6  # 5.75 s, rounded up
    clock.now += 5.5
    assert await register.take(ADDRESS) == 1  # 0.25 s: at least one second
    clock.now += 0.25
    assert await register.take(ADDRESS) == 0  # a token every 6 s
    assert await register.take("198.51.100.8") == 0  # another address: a budget of its own
    authorize = AddressLimit("authorize", 7, limiter)
    assert await takes(authorize, 8) == [0] * 7 + [9]  # 8.57 s
    assert await authorize.take("198.51.100.8") == 0


async def test_one_budget_per_ipv4_address_per_ipv6_64_however_written() -> None:
    limiter = RateLimiter(clock=Clock())
    register = AddressLimit("register", 2, limiter)
    # One IPv6 /64, written three ways and from three hosts in it: one budget of 2.
    assert [await register.take(a) for a in ("2001:db8:0:1::1", "2001:DB8:0:1::2", "2001:db8:0:1:ffff::9")] == [
        0,
        0,
        30,
    ]
    assert await register.take("2001:db8:0:2::1") == 0  # the next /64: its own
    # An IPv4 address, and the same as an IPv4-mapped IPv6 address (a dual-stack listener's peer): one budget.
    assert [await register.take(a) for a in ("203.0.113.9", "::ffff:203.0.113.9", "::FFFF:cb00:7109")] == [0, 0, 30]
    assert await register.take("203.0.113.10") == 0  # IPv4: one budget per address
    assert await register.take("unknown") == 0  # no address at all: one budget for those


def limits(**yaml: object) -> RateLimits:
    return RateLimits.model_validate(yaml)


@pytest.mark.parametrize("addresses_first", [True, False])
async def test_an_address_never_shares_a_bucket_with_a_request_budget_or_the_other_limit(
    addresses_first: bool,
) -> None:
    """One limiter holds all of them: a user, an agent and a backend named like the address have buckets of their
    own, and an address's registrations and authorizations are two budgets."""
    limiter = RateLimiter(clock=Clock())
    one = {"requests_per_minute": 1}
    budgets = RequestLimits(limits(per_user=one, per_agent=one, per_user_backend=one), limiter)
    register = AddressLimit("register", REGISTRATIONS_PER_MINUTE, limiter)
    authorize = AddressLimit("authorize", AUTHORIZATIONS_PER_MINUTE, limiter)

    async def spend_addresses() -> None:
        assert await takes(register, REGISTRATIONS_PER_MINUTE + 1) == [0] * REGISTRATIONS_PER_MINUTE + [6]
        assert await takes(authorize, AUTHORIZATIONS_PER_MINUTE + 1) == [0] * AUTHORIZATIONS_PER_MINUTE + [2]

    if addresses_first:
        await spend_addresses()
    assert budgets.take(ADDRESS, ADDRESS, ADDRESS) is None  # in process: decided at once
    with pytest.raises(RateLimited):
        budgets.take(ADDRESS, ADDRESS, ADDRESS)
    if not addresses_first:
        await spend_addresses()
