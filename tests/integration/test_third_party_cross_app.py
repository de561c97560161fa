"""Cross App Access with the default subject (`subject_token: access_token`) against a certified third-party IdP.

The Okta emulator skips the subject token's audience check; here the IdP is npm `oidc-provider` 9.13.3
(`tests/support/oidc_provider.py`, `tests/node/oidc_provider_xaa.mjs`), which does not share the gateway's code or
assumptions. It issues the caller's JWT access token (client_credentials, RFC 8707 resource), and plays Okta's org
authorization server for step 1 (RFC 8693 at `/oauth2/v1/token`, `subject_token_type=…:access_token`,
`requested_token_type=…:id-jag`, the agent authenticated by oidc-provider with private_key_jwt): it verifies the
subject token with its own keys — issuer, expiry and `aud` = the agent's resource, as Okta's delegation mode requires
(PROTOCOL.md §2.3) — checks the token's client delegates to the agent, and mints the ID-JAG. A second oidc-provider
(`/oauth2/aus-employees`, own key) is the backend's authorization server and redeems it (step 2, RFC 7523).

The backend validates like a resource server (signature with its authorization server's published keys, `iss`, `aud`
= its resource, `typ: at+jwt`), so a 200 proves the gateway obtained a token minted for that backend, for that
caller; its record proves the caller's own token never reached it. Refusals map as DESIGN.md §1 says: a subject token
the IdP rejects (`invalid_grant` at step 1, here a token for another audience the gateway itself accepts) → 401
`invalid_token` with a challenge; a client without a delegation link (`access_denied`) → 403 `token_exchange_failed`.

Addresses: the agent's resource (the gateway's public resource, `AGENT_RESOURCE`) and the backend's resource
identifier (`EMPLOYEES_RESOURCE`, the gateway's `auth_config.resource`) are fixed names, so one IdP serves the
module while each test has its own backend and gateway on loopback ports.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from tests.support.gateway import RunningGateway, running_gateway
from tests.support.oidc_provider import (
    CrossApp,
    CrossAppAgent,
    CrossAppTarget,
    OidcClient,
    OidcProvider,
    running_oidc_provider,
)
from tests.support.processes import LOOPBACK
from tests.support.redis_servers import shared_redis_url
from tests.support.stacks import ec_agent_key

pytestmark = pytest.mark.node

AGENT_ID = "wlp_xaa_agent"
AGENT_KEY = ec_agent_key("xaa-agent-key-1")
CALLER = OidcClient("caller-app", "secret-caller-app-0123456789")  # delegates to the agent
STRANGER = OidcClient("stranger-app", "secret-stranger-app-0123456789")  # identifies the agent, no delegation link
AGENT_RESOURCE = "https://gateway.oap.test/employees"  # the agent's resource: caller tokens must be for it
OTHER_RESOURCE = "https://other-api.oap.test"  # another audience the gateway accepts, not the agent's
EMPLOYEES_RESOURCE = "https://employees.oap.test/mcp"  # the backend's resource identifier at its AS
EMPLOYEES_SCOPE = "employees:read"
ID_JAG_FOR_ACCESS_TOKEN = "subject_token_type=urn:ietf:params:oauth:token-type:access_token"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProvider]:
    agent = CrossAppAgent(AGENT_ID, AGENT_KEY.public_jwk, AGENT_RESOURCE, delegating_client_ids=(CALLER.client_id,))
    target = CrossAppTarget("aus-employees", (EMPLOYEES_RESOURCE,), (EMPLOYEES_SCOPE,))
    with running_oidc_provider(
        [AGENT_RESOURCE, OTHER_RESOURCE], [CALLER, STRANGER], cross_app=CrossApp((agent,), target)
    ) as server:
        yield server


@dataclass
class ResourceServer:
    """An MCP endpoint accepting only JWT access tokens its authorization server minted for `EMPLOYEES_RESOURCE`."""

    issuer: str
    tokens_seen: list[str] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    _keys: dict[str, Any] | None = None

    async def _jwks(self) -> dict[str, Any]:
        if self._keys is None:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
                async with http.get(self.issuer + "/.well-known/openid-configuration") as response:
                    jwks_uri = (await response.json())["jwks_uri"]
                async with http.get(jwks_uri) as response:
                    self._keys = await response.json()
        return self._keys

    async def mcp(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.tokens_seen.append(token)
        keys = await self._jwks()
        try:
            header = jwt.get_unverified_header(token)
            key = next(k for k in keys["keys"] if k["kid"] == header["kid"])
            claims = jwt.decode(
                token,
                jwt.PyJWK(key, "RS256").key,
                algorithms=["RS256"],
                audience=EMPLOYEES_RESOURCE,
                issuer=self.issuer,
            )
            if header.get("typ") != "at+jwt":
                raise jwt.InvalidTokenError("not an RFC 9068 access token")
        except (jwt.PyJWTError, KeyError, StopIteration):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        self.accepted.append(claims)
        body = await request.json()
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": {"sub": claims["sub"]}})


@dataclass
class Stack:
    idp: OidcProvider
    backend: ResourceServer
    gateways: list[RunningGateway]
    http: aiohttp.ClientSession
    log_start: int

    def new_log(self) -> list[str]:
        """The IdP's lines written during this test."""
        return self.idp.log()[self.log_start :]

    async def call(self, token: str, replica: int = 0) -> tuple[int, dict[str, Any], str | None]:
        headers = {**ACCEPT, "Authorization": f"Bearer {token}"}
        url = self.gateways[replica].url("/employees")
        async with self.http.post(url, data=json.dumps(LIST), headers=headers) as response:
            return response.status, await response.json(), response.headers.get("WWW-Authenticate")


@asynccontextmanager
async def stack(idp: OidcProvider, replicas: int = 1, redis_url: str | None = None) -> AsyncIterator[Stack]:
    """A validating backend and a gateway whose `employees` backend uses Cross App Access through `idp` — or several
    such gateways sharing `redis_url` (and a SESSION_SECRET), as replicas do."""
    backend = ResourceServer(idp.target_issuer)
    app = web.Application()
    app.router.add_post("/mcp", backend.mcp)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        auth_config = {
            "id_jag_mode": "static",
            "target_authorization_server": idp.target_issuer,
            "target_token_endpoint": idp.target_token_endpoint,
            "resource": EMPLOYEES_RESOURCE,
            "scopes": [EMPLOYEES_SCOPE],
        }  # subject_token: access_token, the default
        url = f"http://{LOOPBACK}:{runner.addresses[0][1]}/mcp"
        employees = {"url": url, "paths": ["/employees"], "auth_method": "okta-cross-app", "auth_config": auth_config}
        agent = {
            "client_id": AGENT_ID,
            "inbound_client_ids": [CALLER.client_id, STRANGER.client_id],
            "private_key": AGENT_KEY.config_value,
            "backend_access": ["employees"],
        }
        config = {"backends": {"employees": employees}, "agents": {"xaa-agent": agent}}
        settings = {
            "OKTA_DOMAIN": idp.issuer,
            "OKTA_ISSUER": idp.issuer,
            "OKTA_AUDIENCE": f"{AGENT_RESOURCE},{OTHER_RESOURCE}",
        }
        if redis_url is not None:
            settings |= {"REDIS_URL": redis_url, "SESSION_SECRET": "replicas-share-this-session-secret-0123456789"}
        async with AsyncExitStack() as running:
            gateways = [
                await running.enter_async_context(running_gateway(config, settings=settings)) for _ in range(replicas)
            ]
            http = await running.enter_async_context(aiohttp.ClientSession(timeout=HTTP_TIMEOUT))
            yield Stack(idp, backend, gateways, http, len(idp.log()))
    finally:
        await runner.cleanup()


async def test_access_token_subject_is_exchanged_at_the_third_party_idp(idp: OidcProvider) -> None:
    async with stack(idp) as s:
        caller_token = await idp.token(CALLER.client_id, AGENT_RESOURCE, scope="mcp:read")

        status, body, _ = await s.call(caller_token)
        assert status == 200, (body, s.new_log())
        assert body["result"]["sub"] == CALLER.client_id  # client_credentials: oidc-provider's `sub` is the client

        [claims] = s.backend.accepted
        assert claims["iss"] == idp.target_issuer
        assert claims["aud"] == EMPLOYEES_RESOURCE
        assert claims["client_id"] == AGENT_ID
        assert claims["scope"] == EMPLOYEES_SCOPE
        assert caller_token not in s.backend.tokens_seen
        issued = [line for line in s.new_log() if "id-jag issued" in line]
        assert len(issued) == 1 and ID_JAG_FOR_ACCESS_TOKEN in issued[0], s.new_log()
        assert f"resource={EMPLOYEES_RESOURCE}" in issued[0]
        assert sum("id-jag redeemed" in line for line in s.new_log()) == 1

        assert (await s.call(caller_token))[0] == 200  # the backend token is reused: no second exchange
        assert sum("id-jag issued" in line for line in s.new_log()) == 1


async def test_subject_token_for_another_audience_is_refused_at_step_1(idp: OidcProvider) -> None:
    async with stack(idp) as s:
        elsewhere = await idp.token(CALLER.client_id, OTHER_RESOURCE, scope="mcp:read")
        assert jwt.decode(elsewhere, options={"verify_signature": False})["aud"] == OTHER_RESOURCE

        status, body, challenge = await s.call(elsewhere)  # the gateway accepts the token; the IdP refuses it

        assert (status, body.get("error")) == (401, "invalid_token"), body
        assert challenge is not None and 'error="invalid_token"' in challenge
        assert s.backend.tokens_seen == []
        refusals = [line for line in s.new_log() if "grant.error" in line]
        assert len(refusals) == 1 and "invalid_grant" in refusals[0] and "aud" in refusals[0], s.new_log()
        assert not any("id-jag issued" in line for line in s.new_log())

        # The same caller with a token for the agent's resource gets through: the audience alone was refused.
        status, body, _ = await s.call(await idp.token(CALLER.client_id, AGENT_RESOURCE, scope="mcp:read"))
        assert status == 200, body


async def test_client_without_a_delegation_link_is_refused_by_policy(idp: OidcProvider) -> None:
    async with stack(idp) as s:
        token = await idp.token(STRANGER.client_id, AGENT_RESOURCE, scope="mcp:read")

        status, body, _ = await s.call(token)

        assert (status, body.get("error")) == (403, "token_exchange_failed"), body
        assert s.backend.tokens_seen == []
        assert any("grant.error: access_denied" in line for line in s.new_log()), s.new_log()


async def test_thirty_simultaneous_first_requests_over_three_replicas_make_one_exchange(idp: OidcProvider) -> None:
    """Three gateways sharing Redis: one ID-JAG issued and redeemed at the third-party IdP, whichever replica each of
    30 simultaneous first requests of one caller reaches."""
    async with stack(idp, replicas=3, redis_url=shared_redis_url()) as s:
        caller_token = await idp.token(CALLER.client_id, AGENT_RESOURCE, scope="mcp:read")
        results = await asyncio.gather(*(s.call(caller_token, replica=i % 3) for i in range(30)))
        assert [status for status, _, _ in results] == [200] * 30, s.new_log()
        assert sum("id-jag issued" in line for line in s.new_log()) == 1, s.new_log()
        assert sum("id-jag redeemed" in line for line in s.new_log()) == 1
        assert len(set(s.backend.tokens_seen)) == 1
