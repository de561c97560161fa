"""Issue 13: Okta Cross App Access through three `serve` replicas behind nginx (deploy/nginx-replicas.conf), sharing
Redis, PostgreSQL and SESSION_SECRET — the credential cache shared across processes, not just across gateways in one.

- 30 simultaneous first requests of one user and agent, spread by round-robin over the three replicas (the audit rows
  say which served each): exactly one Cross App Access exchange at the Okta emulator (one ID-JAG, one jwt-bearer
  grant), and the backend saw one credential.
- A backend 401 seen by one replica: that replica re-exchanges and retries; the requests that follow, on the other
  replicas, present the new credential, never the refused one (the backend's record of what it received).
The same against the third-party IdP (oidc-provider), and Redis stopped mid-run, are in
tests/integration/test_third_party_cross_app.py and test_replicated_cross_app.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from okta_agent_proxy.devkit.okta_emulator import User
from tests.support.okta_faults import FaultyOktaEmulator
from tests.support.replicas import (
    PUBLIC_HOST,
    REPLICAS,
    ReplicatedGateway,
    replicated_gateway,
    require_balancer,
    require_redis,
)
from tests.support.stacks import CURSOR_CLIENT_ID as CURSOR
from tests.support.stacks import EMPLOYEES_AS as BACKEND_AS
from tests.support.stacks import GATEWAY_AS, employees_org, validating_backend, xaa_backend

pytestmark = pytest.mark.slow

SCOPES = ["employees:read"]
AUDIENCE = "api://okta-agent-proxy-replicas-xaa"
ALICE = User("alice@example.com")
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "Host": PUBLIC_HOST}
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
TIMEOUT = aiohttp.ClientTimeout(total=30)


async def audit_rows(stack: ReplicatedGateway, count: int) -> list[dict[str, Any]]:
    """The backend's audit rows once `count` are written (the replicas write them off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        rows = [row for row in await stack.audit_rows() if row["backend"] == "employees"]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_one_exchange_for_thirty_first_requests_and_a_401_reaches_every_replica() -> None:
    require_balancer("nginx")
    require_redis()
    key, org = employees_org(AUDIENCE)
    async with (
        FaultyOktaEmulator(users=[ALICE], **org) as idp,
        validating_backend(idp, BACKEND_AS) as backend,
    ):
        config = {
            "backends": {
                "employees": xaa_backend(idp, backend.resource, "/employees", auth_server=BACKEND_AS, scopes=SCOPES)
            },
            "agents": {
                "cursor": {"client_id": CURSOR, "private_key": key.config_value, "backend_access": ["employees"]}
            },
        }
        settings = {"OKTA_DOMAIN": idp.base_url, "OKTA_ISSUER": idp.issuer(GATEWAY_AS), "OKTA_AUDIENCE": AUDIENCE}
        token = idp.mint_access_token(GATEWAY_AS, user=ALICE, client_id=CURSOR, scopes=["mcp:read"])
        headers = {**HEADERS, "Authorization": f"Bearer {token}"}
        async with (
            replicated_gateway("nginx", config, settings=settings) as stack,
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
        ):

            async def call() -> int:
                async with http.post(stack.url("/employees"), data=LIST, headers=headers) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(call() for _ in range(30)))
            context = stack.describe()
            assert statuses == [200] * 30, context
            assert (idp.xaa.id_jag_exchanges, idp.xaa.jwt_bearer_grants) == (1, 1), context
            [first] = set(backend.tokens_seen)
            rows = await audit_rows(stack, 30)
            by_replica = Counter(row["replica"] for row in rows)
            assert len(by_replica) == REPLICAS and min(by_replica.values()) >= 5, by_replica  # spread over all
            # Misses only where the one exchange ran (its requests there waited for it); the others took it from Redis.
            assert len({row["replica"] for row in rows if not row["credential_cache_hit"]}) == 1, rows

            backend.reject_next = 1
            assert await call() == 200  # refused once at one replica, re-exchanged there, retried
            refused_at = len(backend.tokens_seen) - 2
            assert backend.tokens_seen[refused_at] == first
            fresh = backend.tokens_seen[-1]
            assert fresh != first
            seen = len(backend.tokens_seen)
            assert [await call() for _ in range(2 * REPLICAS)] == [200] * (2 * REPLICAS)
            after = backend.tokens_seen[seen:]
            assert after == [fresh] * (2 * REPLICAS), "a replica presented the credential another one saw refused"
            assert idp.xaa.id_jag_exchanges == 2
            rows = await audit_rows(stack, 31 + 2 * REPLICAS)
            assert len({row["replica"] for row in rows[-2 * REPLICAS :]}) == REPLICAS
