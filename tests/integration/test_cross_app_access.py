"""Okta Cross App Access end to end: caller token → gateway → ID-JAG (emulated Okta org) → backend AS → backend.

The backend here validates what it receives like a real resource server (signature by its AS's published keys,
issuer, audience = its own resource URL), so a 200 proves the gateway obtained a token minted for that backend,
on behalf of that user — and the backend's record proves the caller's own token never reached it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from okta_agent_proxy.devkit.okta_emulator import ORG, User
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.okta_faults import FaultyOktaEmulator
from tests.support.stacks import CURSOR_CLIENT_ID as CURSOR
from tests.support.stacks import EMPLOYEES_AS as BACKEND_AS
from tests.support.stacks import (
    GATEWAY_AS,
    ValidatingBackend,
    ec_agent_key,
    employees_org,
    validating_backend,
)

AUDIENCE = "api://okta-agent-proxy-tests"
ALICE, BOB, GHOST = User("alice@example.com"), User("bob@example.com"), User("ghost@example.com")
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})


@dataclass
class Stack:
    idp: FaultyOktaEmulator
    backend: ValidatingBackend
    gateway: RunningGateway
    http: aiohttp.ClientSession

    def token(self, user: User = ALICE) -> str:
        return self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=CURSOR, scopes=["mcp:read"])

    async def call(self, token: str | None = None) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        headers = {**ACCEPT, "Authorization": f"Bearer {token or self.token()}"}
        async with self.http.post(self.gateway.url("/employees"), data=LIST, headers=headers) as response:
            return response.status, await response.json(), response


@asynccontextmanager
async def stack(
    *, mode: str = "static", register_public_jwk: dict[str, Any] | None = None, subject: str = "access_token"
) -> AsyncIterator[Stack]:
    key, org = employees_org(AUDIENCE, register_public_jwk=register_public_jwk)
    async with (
        FaultyOktaEmulator(users=[ALICE, BOB], **org) as idp,
        validating_backend(idp, BACKEND_AS) as backend,
    ):
        backend.serve_prm = mode == "dynamic"
        auth_config: dict[str, Any] = {"id_jag_mode": mode, "scopes": ["employees:read"]}
        if subject == "id_token":
            auth_config |= {"subject_token": "id_token", "id_token_header": "X-Id-Token"}
        if mode == "static":
            auth_config |= {
                "target_authorization_server": idp.issuer(BACKEND_AS),
                "target_token_endpoint": idp.token_endpoint(BACKEND_AS),
            }
        config = {
            "backends": {
                "employees": {
                    "url": backend.resource,
                    "paths": ["/employees"],
                    "auth_method": "okta-cross-app",
                    "auth_config": auth_config,
                }
            },
            "agents": {
                "cursor": {"client_id": CURSOR, "private_key": key.config_value, "backend_access": ["employees"]}
            },
        }
        settings = {"OKTA_DOMAIN": idp.base_url, "OKTA_ISSUER": idp.issuer(GATEWAY_AS), "OKTA_AUDIENCE": AUDIENCE}
        async with running_gateway(config, settings=settings) as gateway, aiohttp.ClientSession() as http:
            yield Stack(idp, backend, gateway, http)


async def test_first_request_exchanges_then_the_token_is_cached_per_user() -> None:
    async with stack() as s:
        alice_token = s.token()
        status, body, _ = await s.call(alice_token)
        assert status == 200, body
        assert body["result"]["sub"] == ALICE.login
        assert (s.idp.xaa.id_jag_exchanges, s.idp.xaa.jwt_bearer_grants) == (1, 1)
        assert s.backend.accepted[0]["aud"] == s.backend.resource
        assert s.backend.accepted[0]["scp"] == ["employees:read"]
        assert alice_token not in s.backend.tokens_seen
        assert (await s.call(alice_token))[0] == 200
        assert (await s.call())[0] == 200  # another token of the same user: same cache entry
        assert s.idp.xaa.id_jag_exchanges == 1
        status, body, _ = await s.call(s.token(BOB))
        assert status == 200 and body["result"]["sub"] == BOB.login
        assert s.idp.xaa.id_jag_exchanges == 2


async def test_concurrent_first_requests_share_one_exchange() -> None:
    async with stack() as s:
        token = s.token()
        results = await asyncio.gather(*(s.call(token) for _ in range(30)))
        assert [status for status, _, _ in results] == [200] * 30
        assert s.idp.xaa.id_jag_exchanges == 1


async def test_backend_401_re_exchanges_once_and_retries() -> None:
    async with stack() as s:
        assert (await s.call())[0] == 200
        s.backend.reject_next = 1
        status, _, _ = await s.call()
        assert status == 200
        assert s.idp.xaa.id_jag_exchanges == 2


async def test_backend_401_twice_is_502_without_the_backends_challenge() -> None:
    async with stack() as s:
        assert (await s.call())[0] == 200
        s.backend.reject_next = 2
        status, body, response = await s.call()
        assert (status, body["error"]) == (502, "backend_rejected_credential")
        assert "WWW-Authenticate" not in response.headers
        assert s.idp.xaa.id_jag_exchanges == 2


async def test_policy_refusal_is_403_and_the_idps_detail_stays_private() -> None:
    async with stack() as s:
        s.idp.xaa.policies.clear()
        status, body, _ = await s.call()
        assert (status, body["error"], body["agent_id"]) == (403, "token_exchange_failed", "cursor")
        assert s.backend.accepted == []
        status, _, _ = await s.call()  # the refusal is remembered briefly: no second trip to the IdP
        assert status == 403
        assert sum(s.idp.xaa.id_jag_failures.values()) == 1


async def test_idp_rejecting_the_subject_token_is_401_with_a_challenge() -> None:
    async with stack() as s:
        ghost = s.idp.mint_access_token(GATEWAY_AS, user=GHOST, client_id=CURSOR, scopes=["mcp:read"])
        status, body, response = await s.call(ghost)
        assert (status, body["error"]) == (401, "invalid_token")
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        assert s.idp.xaa.id_jag_failures["invalid_grant"] == 1


async def test_invalid_client_is_502() -> None:
    other_public = ec_agent_key("cursor-key-1").public_jwk
    async with stack(register_public_jwk=other_public) as s:
        status, body, _ = await s.call()
        assert (status, body["error"]) == (502, "token_exchange_failed")


async def test_idp_down_is_503_with_retry_after_and_recovers() -> None:
    async with stack() as s:
        s.idp.set_token_endpoint_mode("down", auth_server_id=ORG)
        status, body, response = await s.call()
        assert (status, body["error"]) == (503, "idp_unavailable")
        assert int(response.headers["Retry-After"]) > 0
        s.idp.set_token_endpoint_mode("ok")
        assert (await s.call())[0] == 200


async def test_dynamic_mode_discovers_the_backends_authorization_server() -> None:
    async with stack(mode="dynamic") as s:
        status, body, _ = await s.call()
        assert status == 200, body
        assert s.idp.xaa.jwt_bearer_grants == 1


async def test_id_token_subject_from_the_configured_header() -> None:
    async with stack(subject="id_token") as s:
        headers = {**ACCEPT, "Authorization": f"Bearer {s.token()}"}
        async with s.http.post(s.gateway.url("/employees"), data=LIST, headers=headers) as response:
            assert response.status == 401  # the ID token is required and missing
            assert (await response.json())["error"] == "invalid_token"
        id_token = s.idp.mint_id_token(GATEWAY_AS, user=ALICE, client_id=CURSOR)
        headers["X-Id-Token"] = id_token
        async with s.http.post(s.gateway.url("/employees"), data=LIST, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["result"]["sub"] == ALICE.login
        assert id_token not in s.backend.tokens_seen
