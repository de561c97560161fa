"""The credential cache shared through Redis (DESIGN.md §4), between "replicas" that are separate caches, each with its
own Redis connections, in one test process: single-flight across them, sealed values, invalidation everywhere within
0.5 s, and carrying on in process while Redis is down or slow. The exchanger behind the caches counts its calls and
numbers its tokens; real Cross App Access through replicas is in tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from okta_agent_proxy.outbound.base import Credential, CredentialRequest, Subject
from okta_agent_proxy.outbound.cache import CachingProvider
from okta_agent_proxy.outbound.shared_cache import SharedCredentials, cache_keys, entry_name
from okta_agent_proxy.store.redis import RedisLink
from tests.support.processes import LOOPBACK, free_port
from tests.support.redis_servers import own_redis, shared_redis_url

KEY = b"k" * 32


@dataclass
class CountingExchanger:
    """Mints `Bearer <prefix>-<n>` for an hour after `delay` seconds; counts the exchanges."""

    prefix: str
    delay: float = 0.05
    method: str = "okta-cross-app"
    minted: list[str] = field(default_factory=list)
    # Names this exchanger's entries in the shared Redis: unique per test run and test (an `id()` is reused once
    # its object is gone, and a later test would then meet an earlier one's entry, sealed under another key).
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    def request_for(self, caller: Subject | None, headers: Mapping[str, str]) -> CredentialRequest:
        raise NotImplementedError  # the tests call `get` with their own requests

    async def get(self, request: CredentialRequest) -> Credential:
        await asyncio.sleep(self.delay)
        token = f"{self.prefix}-{len(self.minted) + 1}"
        self.minted.append(token)
        return Credential({"Authorization": f"Bearer {token}"}, time.time() + 3600, refreshable=True)

    async def invalidate(self, request: CredentialRequest) -> None:
        return None


@dataclass
class Replica:
    cache: CachingProvider
    link: RedisLink
    errors: list[str]
    listener: asyncio.Task[None]


@asynccontextmanager
async def replicas(
    url: str, count: int, exchanger: CountingExchanger, keys: list[bytes] | None = None
) -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []
    try:
        for _ in range(count):
            errors: list[str] = []
            link = RedisLink(url, on_error=errors.append, retry_after=0.2)
            shared = SharedCredentials(link, cache_keys(keys or [KEY]))
            cache = CachingProvider(exchanger, shared=shared, namespace=f"test-{exchanger.tag}")
            listener = asyncio.ensure_future(shared.listen())
            made.append(Replica(cache, link, errors, listener))
        await asyncio.sleep(0.1)  # subscribed
        yield made
    finally:
        for replica in made:
            replica.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replica.listener
            await replica.link.close()


def request(user: str = "alice") -> CredentialRequest:
    return CredentialRequest("backend", "agent", "https://issuer.test", user, "token", time.time() + 3600)


def bearer(credential: Credential) -> str:
    return credential.headers["Authorization"].removeprefix("Bearer ")


async def test_thirty_first_requests_over_three_replicas_make_one_exchange() -> None:
    exchanger = CountingExchanger("t", delay=0.2)
    async with replicas(shared_redis_url(), 3, exchanger) as three:
        results = await asyncio.gather(*(three[i % 3].cache.get(request()) for i in range(30)))
    assert exchanger.minted == ["t-1"]
    assert {bearer(c) for c in results} == {"t-1"}
    assert [r.errors for r in three] == [[], [], []]


async def test_the_value_in_redis_is_sealed_and_bound_to_its_name() -> None:
    url = shared_redis_url()
    exchanger = CountingExchanger("secret-token")
    async with replicas(url, 2, exchanger) as (first, second):
        await first.cache.get(request())
        name = entry_name(f"test-{exchanger.tag}", ("backend", "agent", "https://issuer.test", "alice"))
        client = aioredis.Redis.from_url(url)
        try:
            value = await client.get(name)
            assert value is not None
            assert b"secret-token" not in value
            assert b"Authorization" not in value
            assert 3500 < await client.ttl(name) <= 3600 - 60  # the entry's own lifetime, minus the skew
            # The same sealed bytes under another user's name do not open: that user gets an exchange of its own.
            other = entry_name(f"test-{exchanger.tag}", ("backend", "agent", "https://issuer.test", "mallory"))
            await client.set(other, value, px=60_000)
            stolen = await second.cache.get(request("mallory"))
        finally:
            await client.aclose()
    assert bearer(stolen) == "secret-token-2"
    assert second.errors == ["open"]


async def test_a_hostile_value_is_ignored_never_served() -> None:
    url = shared_redis_url()
    exchanger = CountingExchanger("real")
    name = entry_name(f"test-{exchanger.tag}", ("backend", "agent", "https://issuer.test", "alice"))
    forged = json.dumps({"h": {"Authorization": "Bearer forged"}, "e": None, "u": time.time() + 999, "j": None})
    client = aioredis.Redis.from_url(url)
    try:
        for value in (forged.encode(), b"", b"\x00" * 12, b"x" * 100_000):
            await client.set(name, value, px=60_000)
            async with replicas(url, 1, exchanger) as (replica,):
                got = await replica.cache.get(request())
            assert bearer(got).startswith("real-")
            assert replica.errors == ["open"]
            await client.delete(name)
    finally:
        await client.aclose()
    assert len(exchanger.minted) == 4


async def test_a_value_sealed_with_a_retired_secret_is_not_served_and_the_previous_one_still_opens() -> None:
    url = shared_redis_url()
    exchanger = CountingExchanger("t")
    old, new = b"o" * 32, b"n" * 32
    async with replicas(url, 1, exchanger, keys=[old]) as (before,):
        await before.cache.get(request())
    async with replicas(url, 1, exchanger, keys=[new, old]) as (rotating,):
        assert bearer(await rotating.cache.get(request())) == "t-1"  # opened with SESSION_SECRET_PREVIOUS's key
    async with replicas(url, 1, exchanger, keys=[new]) as (after,):
        assert bearer(await after.cache.get(request())) == "t-2"  # the old key is gone: not served
    assert after.errors == ["open"]


async def test_a_401_seen_by_one_replica_reaches_every_replica_within_half_a_second() -> None:
    exchanger = CountingExchanger("t")
    async with replicas(shared_redis_url(), 3, exchanger) as three:
        for replica in three:
            assert bearer(await replica.cache.get(request())) == "t-1"  # in every L1 now
        flow_request = request()
        await three[0].cache.invalidate(flow_request)
        fresh = await three[0].cache.get(flow_request)
        assert bearer(fresh) == "t-2"
        started = time.monotonic()
        seen: list[str] = []
        while time.monotonic() - started < 0.5:
            seen = [bearer(await replica.cache.get(request())) for replica in three[1:]]
            if seen == ["t-2", "t-2"]:
                break
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
    assert seen == ["t-2", "t-2"], f"after {elapsed:.3f} s the others still present {seen}"
    assert exchanger.minted == ["t-1", "t-2"]


async def test_a_waiter_goes_on_alone_when_the_lock_holder_leaves_no_value() -> None:
    """A replica that took the lock and died: the lock expires, and the waiter exchanges itself, bounded."""
    url = shared_redis_url()
    exchanger = CountingExchanger("t")
    name = entry_name(f"test-{exchanger.tag}", ("backend", "agent", "https://issuer.test", "alice"))
    client = aioredis.Redis.from_url(url)
    try:
        await client.set("oap:lock:" + name.removeprefix("oap:cred:"), "dead-replica", px=400)
        async with replicas(url, 1, exchanger) as (replica,):
            started = time.monotonic()
            got = await replica.cache.get(request())
            waited = time.monotonic() - started
    finally:
        await client.aclose()
    assert bearer(got) == "t-1"
    assert 0.3 < waited < 2.0


async def test_redis_down_then_back() -> None:
    """Stopped mid-run: every request still gets a credential (each replica on its own), errors are counted and
    nothing waits on Redis for long; started again: shared again, and the L1s are dropped on resubscribing."""
    exchanger = CountingExchanger("t")
    with own_redis() as server:
        async with replicas(server.url, 2, exchanger) as (first, second):
            await first.cache.get(request("before"))
            assert bearer(await second.cache.get(request("before"))) == "t-1"

            server.stop()
            started = time.monotonic()
            down = [await replica.cache.get(request(f"down-{i}")) for i in range(5) for replica in (first, second)]
            elapsed = time.monotonic() - started
            assert len({bearer(c) for c in down}) == 10  # no sharing: each replica exchanged for itself
            assert first.errors and second.errors  # counted (whichever command or the subscription saw it first)
            assert elapsed < 3.0  # a down Redis costs no timeout per request

            server.start()
            await _until_shared(first, second, exchanger)
            # invalidations may have been missed while down: the entry cached before it is gone from the L1
            minted = len(exchanger.minted)
            assert bearer(await first.cache.get(request("before"))) == f"t-{minted + 1}"


async def _until_shared(first: Replica, second: Replica, exchanger: CountingExchanger) -> None:
    deadline = time.monotonic() + 5
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        user = f"after-{attempt}"
        before = len(exchanger.minted)
        await first.cache.get(request(user))
        await second.cache.get(request(user))
        if len(exchanger.minted) == before + 1:
            return
        await asyncio.sleep(0.1)
    pytest.fail("Redis came back but the replicas did not share again within 5 s")


async def test_a_redis_that_does_not_answer_costs_one_timeout_then_nothing() -> None:
    """A server that accepts and never answers (a hung Redis): the first command times out (0.5 s), the following
    requests skip Redis while it is held back."""
    port = free_port()
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hang, LOOPBACK, port)
    exchanger = CountingExchanger("t", delay=0)
    try:
        errors: list[str] = []
        link = RedisLink(f"redis://{LOOPBACK}:{port}/0", on_error=errors.append, retry_after=5)
        cache = CachingProvider(exchanger, shared=SharedCredentials(link, cache_keys([KEY])), namespace="hung")
        started = time.monotonic()
        await cache.get(request("one"))
        first = time.monotonic() - started
        started = time.monotonic()
        for i in range(20):
            await cache.get(request(f"more-{i}"))
        rest = time.monotonic() - started
        await link.close()
    finally:
        server.close()
        for writer in accepted:
            writer.close()
    assert 0.4 < first < 2.0
    assert rest < 0.5
    assert errors == ["get"]
    assert len(exchanger.minted) == 21


async def test_own_redis_serves_the_sharing_test_too() -> None:
    """The stop/start server above is a real Redis: the single-flight holds on it as on the shared one."""
    exchanger = CountingExchanger("t", delay=0.1)
    with own_redis() as server:
        async with replicas(server.url, 2, exchanger) as (first, second):
            results = await asyncio.gather(*(r.cache.get(request()) for r in (first, second) * 5))
    assert {bearer(c) for c in results} == {"t-1"}


async def test_a_401_reaches_the_other_config_generation_of_the_same_process_at_once() -> None:
    """After a reload, the new generation's cache shares names with the old one's; a 401 seen by a request still
    running on the old one must reach the new one too, though the process ignores its own channel messages."""
    exchanger = CountingExchanger("t")
    errors: list[str] = []
    link = RedisLink(shared_redis_url(), on_error=errors.append)
    shared = SharedCredentials(link, cache_keys([KEY]))
    old = CachingProvider(exchanger, shared=shared, namespace=f"gen-{exchanger.tag}")
    new = CachingProvider(exchanger, shared=shared, namespace=f"gen-{exchanger.tag}")
    try:
        assert bearer(await old.get(request())) == "t-1"
        assert bearer(await new.get(request())) == "t-1"  # from Redis
        await old.invalidate(request())
        assert bearer(await new.get(request())) == "t-2"  # dropped at once, exchanged anew
    finally:
        await link.close()
    assert errors == []


async def test_a_holder_held_back_by_a_failure_still_shares_and_unlocks() -> None:
    """A failure seen by the holder (say, of its subscription) during its exchange must not leave the lock with no
    value: the waiter gets the holder's credential, not a wait of `WAIT_SECONDS` and an exchange of its own."""
    exchanger = CountingExchanger("t", delay=0.3)
    async with replicas(shared_redis_url(), 2, exchanger) as (holder, waiter):
        holding = asyncio.ensure_future(holder.cache.get(request()))
        await asyncio.sleep(0.2)  # the holder has the lock, and finishes its exchange within the hold-back (0.2 s)
        holder.link.failed("subscribe", ConnectionError("test: the subscription dropped"))
        started = time.monotonic()
        got = await waiter.cache.get(request())
        waited = time.monotonic() - started
        await holding
    assert bearer(got) == "t-1" and exchanger.minted == ["t-1"]
    assert waited < 1.0


async def test_a_server_that_answers_nonsense_costs_an_error_not_a_request() -> None:
    """A port that speaks garbage instead of RESP: every request still gets its credential, errors are counted."""
    port = free_port()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                writer.write(b":1\r\n$-7\r\n%zz\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, LOOPBACK, port)
    exchanger = CountingExchanger("t", delay=0)
    errors: list[str] = []
    link = RedisLink(f"redis://{LOOPBACK}:{port}/0", on_error=errors.append, retry_after=0.05)
    cache = CachingProvider(exchanger, shared=SharedCredentials(link, cache_keys([KEY])), namespace="garbage")
    try:
        for i in range(5):
            assert bearer(await cache.get(request(f"user-{i}"))) == f"t-{i + 1}"
            await asyncio.sleep(0.06)
    finally:
        await link.close()
        server.close()
    assert errors, "the nonsense was not counted"


async def test_forgetting_works_after_evictions() -> None:
    """The L1 evicts its oldest entry when full; its name map follows, so an invalidation from another replica still
    finds a live entry after evictions (and its next request exchanges anew)."""
    exchanger = CountingExchanger("t", delay=0)
    link = RedisLink(shared_redis_url())
    namespace = f"evict-{exchanger.tag}"
    cache = CachingProvider(
        exchanger, shared=SharedCredentials(link, cache_keys([KEY])), namespace=namespace, max_entries=3
    )
    try:
        for i in range(5):  # u0 and u1 are evicted on the way
            await cache.get(request(f"u{i}"))
        cache.forget(entry_name(namespace, ("backend", "agent", "https://issuer.test", "u4")))
        await link.run(
            "delete",
            lambda client: client.delete(entry_name(namespace, ("backend", "agent", "https://issuer.test", "u4"))),
        )
        assert bearer(await cache.get(request("u4"))) == "t-6"  # forgotten: fetched anew
        assert bearer(await cache.get(request("u3"))) == "t-4"  # still kept
    finally:
        await link.close()
