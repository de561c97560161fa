"""outbound/cache.py: TTL bounded by both expiries, single-flight, brief denial memory, invalidate."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from okta_agent_proxy.errors import IdpUnavailable, TokenExchangeFailed
from okta_agent_proxy.outbound.base import Credential, CredentialRequest, Subject
from okta_agent_proxy.outbound.cache import CachingProvider


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingProvider:
    """A stand-in for the exchange: counts calls, can be made slow or failing. (The seam, not the code under test.)"""

    method = "okta-cross-app"

    def __init__(self, clock: Clock, lifetime: float = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None

    async def get(self, request: CredentialRequest) -> Credential:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        token = f"token-{self.calls}"
        return Credential({"Authorization": f"Bearer {token}"}, self.clock() + self.lifetime, refreshable=True)

    async def invalidate(self, request: CredentialRequest) -> None:
        return None

    def request_for(self, caller: Subject | None, headers: Mapping[str, str]) -> CredentialRequest:
        return request()


def request(subject: str = "alice", expires_at: float | None = None) -> CredentialRequest:
    return CredentialRequest("employees", "cursor", "https://idp/oauth2/x", subject, "t", expires_at)


async def test_hit_until_expiry_minus_skew() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    cache = CachingProvider(inner, skew=60, clock=clock)
    first = await cache.get(request())
    assert first.cache_hit is False
    second = await cache.get(request())
    assert second.cache_hit is True and second.headers == first.headers
    clock.now += 3600 - 61
    assert (await cache.get(request())).cache_hit is True
    clock.now += 2
    assert (await cache.get(request())).cache_hit is False
    assert inner.calls == 2


async def test_subject_token_expiry_bounds_the_entry() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    cache = CachingProvider(inner, skew=60, clock=clock)
    await cache.get(request(expires_at=clock.now + 600))
    clock.now += 600 - 59
    assert (await cache.get(request(expires_at=clock.now + 1000))).cache_hit is False


async def test_keyed_per_user() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    cache = CachingProvider(inner, clock=clock)
    a, b = await cache.get(request("alice")), await cache.get(request("bob"))
    assert a.headers != b.headers and inner.calls == 2


async def test_single_flight() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    inner.gate = asyncio.Event()
    cache = CachingProvider(inner, clock=clock)
    waiters = [asyncio.ensure_future(cache.get(request())) for _ in range(50)]
    await asyncio.sleep(0)
    inner.gate.set()
    results = await asyncio.gather(*waiters)
    assert inner.calls == 1
    assert len({tuple(r.headers.items()) for r in results}) == 1


async def test_single_flight_failure_reaches_every_waiter_and_is_not_cached_when_idp_down() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    inner.gate = asyncio.Event()
    inner.failure = IdpUnavailable("down")
    cache = CachingProvider(inner, clock=clock)
    waiters = [asyncio.ensure_future(cache.get(request())) for _ in range(5)]
    await asyncio.sleep(0)
    inner.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, IdpUnavailable) for r in results) and inner.calls == 1
    inner.failure = None
    assert (await cache.get(request())).cache_hit is False
    assert inner.calls == 2


async def test_denials_remembered_briefly() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    inner.failure = TokenExchangeFailed("refused")
    cache = CachingProvider(inner, denial_ttl=10, clock=clock)
    for _ in range(3):
        with pytest.raises(TokenExchangeFailed):
            await cache.get(request())
    assert inner.calls == 1
    clock.now += 11
    inner.failure = None
    assert (await cache.get(request())).cache_hit is False


async def test_invalidate_forces_a_fresh_exchange() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    cache = CachingProvider(inner, clock=clock)
    first = await cache.get(request())
    await cache.invalidate(request())
    second = await cache.get(request())
    assert second.cache_hit is False and second.headers != first.headers


async def test_waiter_cancelled_does_not_cancel_the_exchange() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    inner.gate = asyncio.Event()
    cache = CachingProvider(inner, clock=clock)
    leaver = asyncio.ensure_future(cache.get(request()))
    stayer = asyncio.ensure_future(cache.get(request()))
    await asyncio.sleep(0)
    leaver.cancel()
    inner.gate.set()
    assert (await stayer).cache_hit is False
    assert inner.calls == 1


async def test_auth_flow_gives_no_retry_after_an_accepted_credential() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    flow = CachingProvider(inner, clock=clock).auth_flow(None, {})
    first = await flow.credential()
    assert first.cache_hit is False and inner.calls == 1
    assert await flow.retry(200) is None and inner.calls == 1


async def test_auth_flow_after_a_401_drops_the_credential_and_gives_one_fresh_one() -> None:
    clock = Clock()
    inner = CountingProvider(clock)
    cache = CachingProvider(inner, clock=clock)
    await cache.get(request())  # cached: the flow's first credential is a hit
    flow = cache.auth_flow(None, {})
    rejected = await flow.credential()
    assert rejected.cache_hit is True
    fresh = await flow.retry(401)
    assert fresh is not None and fresh.cache_hit is False and fresh.headers != rejected.headers and inner.calls == 2
    assert await flow.retry(401) is None  # one retry only: a second 401 ends the flow
    assert (await cache.get(request())).headers == fresh.headers  # the fresh one is what is cached now


async def test_static_flow_never_retries() -> None:
    from okta_agent_proxy.config.models import PreSharedKeyAuth
    from okta_agent_proxy.outbound.static import pre_shared_key

    provider = pre_shared_key(PreSharedKeyAuth.model_validate({"key": "k-123", "header_name": "X-Key"}))
    flow = provider.auth_flow(None, {})
    assert dict((await flow.credential()).headers) == {"X-Key": "k-123"}
    assert await flow.retry(401) is None
