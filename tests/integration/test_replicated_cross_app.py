"""Okta Cross App Access across three gateways that share Redis (DESIGN.md §4): each is the real app with its own
Redis connections and its own in-process cache, the same YAML and the same SESSION_SECRET, in front of the Okta
emulator and a backend that validates what it receives. The same against the third-party IdP is in
test_third_party_cross_app.py; three `serve` processes behind nginx in tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from okta_agent_proxy.devkit.okta_emulator import User
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.okta_faults import FaultyOktaEmulator
from tests.support.redis_servers import own_redis, shared_redis_url
from tests.support.stacks import CURSOR_CLIENT_ID as CURSOR
from tests.support.stacks import EMPLOYEES_AS as BACKEND_AS
from tests.support.stacks import (
    GATEWAY_AS,
    ValidatingBackend,
    employees_org,
    sample_values,
    validating_backend,
    xaa_backend,
)

SCOPES = ["employees:read"]
AUDIENCE = "api://okta-agent-proxy-tests"
ALICE, BOB = User("alice@example.com"), User("bob@example.com")
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
SECRET = "replicas-share-this-session-secret-0123456789"


@dataclass
class Replicas:
    idp: FaultyOktaEmulator
    backend: ValidatingBackend
    gateways: list[RunningGateway]
    http: aiohttp.ClientSession

    def token(self, user: User = ALICE) -> str:
        return self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=CURSOR, scopes=["mcp:read"])

    async def call(self, replica: int, token: str) -> int:
        headers = {**ACCEPT, "Authorization": f"Bearer {token}"}
        url = self.gateways[replica].url("/employees")
        async with self.http.post(url, data=LIST, headers=headers) as response:
            await response.read()
            return response.status

    async def get(self, replica: int, path: str) -> tuple[int, Any]:
        async with self.http.get(self.gateways[replica].url(path)) as response:
            body = await response.json() if path == "/readyz" else await response.text()
            return response.status, body


@asynccontextmanager
async def replicas(redis_url: str, count: int = 3) -> AsyncIterator[Replicas]:
    key, org = employees_org(AUDIENCE)
    async with AsyncExitStack() as stack:
        idp = await stack.enter_async_context(FaultyOktaEmulator(users=[ALICE, BOB], **org))
        backend = await stack.enter_async_context(validating_backend(idp, BACKEND_AS))
        config = {
            "backends": {
                "employees": xaa_backend(idp, backend.resource, "/employees", auth_server=BACKEND_AS, scopes=SCOPES)
            },
            "agents": {
                "cursor": {"client_id": CURSOR, "private_key": key.config_value, "backend_access": ["employees"]}
            },
        }
        settings = {
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
            "OKTA_AUDIENCE": AUDIENCE,
            "REDIS_URL": redis_url,
            "SESSION_SECRET": SECRET,
        }
        gateways = [await stack.enter_async_context(running_gateway(config, settings=settings)) for _ in range(count)]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        await asyncio.sleep(0.1)  # every gateway subscribed to invalidations
        yield Replicas(idp, backend, gateways, http)


async def test_thirty_simultaneous_first_requests_over_three_replicas_make_one_exchange() -> None:
    async with replicas(shared_redis_url()) as r:
        token = r.token()
        statuses = await asyncio.gather(*(r.call(i % 3, token) for i in range(30)))
        assert statuses == [200] * 30
        assert (r.idp.xaa.id_jag_exchanges, r.idp.xaa.jwt_bearer_grants) == (1, 1)
        assert len(set(r.backend.tokens_seen)) == 1


async def test_a_401_at_one_replica_means_the_others_present_the_new_credential() -> None:
    async with replicas(shared_redis_url()) as r:
        token = r.token()
        assert [await r.call(i, token) for i in range(3)] == [200, 200, 200]
        [refused] = set(r.backend.tokens_seen)
        r.backend.reject_next = 1
        assert await r.call(0, token) == 200  # refused once, re-exchanged, retried
        fresh = r.backend.tokens_seen[-1]
        assert fresh != refused
        seen_before = len(r.backend.tokens_seen)
        assert [await r.call(i, token) for i in (1, 2, 1, 2)] == [200] * 4  # at once: within the 0.5 s
        after = r.backend.tokens_seen[seen_before:]
        assert after == [fresh] * 4, "a replica presented the credential another one saw refused"
        assert r.idp.xaa.id_jag_exchanges == 2  # the others took the new one from Redis, no exchange of their own


async def test_redis_down_requests_succeed_readyz_degraded_errors_counted_then_shared_again() -> None:
    with own_redis() as server:
        async with replicas(server.url, 2) as r:
            token = r.token()
            assert (await r.get(0, "/readyz"))[1]["checks"]["redis"] == "reachable"
            assert [await r.call(i, token) for i in (0, 1)] == [200, 200]
            assert r.idp.xaa.id_jag_exchanges == 1

            server.stop()
            status, body = await r.get(0, "/readyz")
            assert (status, body["status"], body["checks"]["redis"]) == (200, "degraded", "degraded")
            r.backend.reject_next = 1  # a 401 while Redis is away: replica 0 carries on in process
            started = time.monotonic()
            assert [await r.call(i, token) for i in (0, 1, 0, 1)] == [200] * 4
            assert time.monotonic() - started < 3
            _, metrics = await r.get(0, "/metrics")
            errors = sample_values(metrics, "oap_redis_errors_total")
            assert sum(errors.values()) >= 1, metrics

            server.start()
            deadline = time.monotonic() + 5
            while (await r.get(0, "/readyz"))[1]["status"] != "ready" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.2)  # past the hold-back after the last failure; both resubscribed
            exchanges = r.idp.xaa.id_jag_exchanges
            bob = r.token(BOB)
            assert [await r.call(i, bob) for i in (0, 1)] == [200, 200]
            assert r.idp.xaa.id_jag_exchanges == exchanges + 1  # one exchange between the two: shared again


async def test_a_hostile_value_in_redis_is_never_served() -> None:
    url = shared_redis_url()
    async with replicas(url, 2) as r:
        token = r.token()
        assert await r.call(0, token) == 200
        client = aioredis.Redis.from_url(url)
        try:
            namespace_names = [name async for name in client.scan_iter("oap:cred:*")]
            forged = json.dumps({"h": {"Authorization": "Bearer forged"}, "e": None, "u": time.time() + 600, "j": None})
            for name in namespace_names:
                await client.set(name, forged, px=60_000)
        finally:
            await client.aclose()
        assert await r.call(1, token) == 200  # replica 1's L1 is empty: it looks in Redis and must not use that
        assert "forged" not in r.backend.tokens_seen
        assert r.idp.xaa.id_jag_exchanges == 2
