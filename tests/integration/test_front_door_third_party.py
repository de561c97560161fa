"""The OAuth front door (DESIGN.md §8) against a certified third-party IdP set up as an Okta org.

The emulator-backed tests (`test_front_door_flow.py`) share the gateway's assumptions about Okta; here the org is npm
`oidc-provider` 9.13.3 (`tests/support/oidc_provider.py`, front door mode): issuer the bare base URL, Okta's
`/oauth2/v1/authorize`, `/oauth2/v1/token` and `/oauth2/v1/keys`, a sign-in form that checks passwords, PKCE
required, refresh tokens rotated on every use, ID tokens shaped by oidc-provider (RS256 under a `kid` whose JWK has
no `alg`, `sid` and `auth_time`, the sign-in's `nonce` kept in refreshed ones, `groups` as the claim of the `groups`
scope). The gateway is its own OIDC app there (client_secret_basic).

The official MCP SDK's `OAuthClientProvider` finds the gateway's authorization server from the 401, registers,
sends the person through the org's sign-in and the gateway's consent, and calls tools; then a refresh at
`/oauth/token`; then, in the same browser (the org's session: no second password), a tool call on a Cross App Access
backend. Its step 1 exchanges the ID token the gateway holds — refreshed first at the org with the held refresh
token, because the org's ID tokens here live less than the gateway's refresh-ahead window — for an ID-JAG naming the
gateway's app as client and the user as subject; its step 2 redeems that at a second oidc-provider (the backend's
authorization server), authenticated as the gateway's app. The backend accepts only RFC 9068 tokens minted by that
server for its resource, and reports whom they name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import httpx2
import jwt
import pytest
import yarl
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from okta_agent_proxy.devkit.okta_emulator import User
from tests.integration.conftest import SampleBackends
from tests.integration.test_front_door_flow import CLIENT_NAME, REDIRECT, MemoryStorage, sdk_provider
from tests.support import loopback
from tests.support.front_door import (
    ADA,
    APP_SECRET,
    BOB,
    GATEWAY_APP,
    STATE_KEY,
    Browser,
    Page,
    Pkce,
    browser,
    front_door_yaml,
)
from tests.support.gateway import bound_socket
from tests.support.oidc_provider import (
    CrossApp,
    CrossAppTarget,
    FrontDoor,
    FrontDoorApp,
    IdpUser,
    OidcProvider,
    running_oidc_provider,
)
from tests.support.processes import LOOPBACK
from tests.support.stacks import ACCEPT, AuditedGateway, audited_gateway

pytestmark = pytest.mark.node

TARGET_AS = "aus-backend"
XAA_RESOURCE = "https://xaa.oap.test/mcp"  # the backend's resource identifier at its authorization server
XAA_SCOPE = "backend:read"
ID_TOKEN_TTL = 240  # < the gateway's 300 s refresh-ahead: each use of a held ID token refreshes it at the org first
ID_TOKEN_SUBJECT = "subject_token_type=urn:ietf:params:oauth:token-type:id_token"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)


def idp_user(user: User) -> IdpUser:
    assert user.password is not None
    return IdpUser(user.login, user.uid, user.password, user.display_name, user.groups)


@dataclass
class CrossAppBackend:
    """A stateless MCP server answering JSON, that accepts only RFC 9068 access tokens the target authorization
    server (`issuer`) minted for `XAA_RESOURCE`; its one tool, `whoami`, names the token's user and client."""

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

    async def _claims(self, token: str) -> dict[str, Any] | None:
        keys = await self._jwks()
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ") != "at+jwt":
                return None
            key = next(k for k in keys["keys"] if k["kid"] == header["kid"])
            claims: dict[str, Any] = jwt.decode(
                token, jwt.PyJWK(key, "RS256").key, algorithms=["RS256"], audience=XAA_RESOURCE, issuer=self.issuer
            )
        except (jwt.PyJWTError, KeyError, StopIteration):
            return None
        return claims

    async def mcp(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.tokens_seen.append(token)
        claims = await self._claims(token)
        if claims is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        self.accepted.append(claims)
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)  # a notification
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], **self._answer(message, claims)})

    @staticmethod
    def _answer(message: dict[str, Any], claims: dict[str, Any]) -> dict[str, Any]:
        method, params = message.get("method"), message.get("params") or {}
        if method == "initialize":
            info = {"name": "xaa-backend", "version": "1.0.0"}
            return {
                "result": {
                    "protocolVersion": params["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": info,
                }
            }
        if method == "tools/list":
            tool = {"name": "whoami", "description": "Who the token names", "inputSchema": {"type": "object"}}
            return {"result": {"tools": [tool]}}
        if method == "tools/call" and params.get("name") == "whoami":
            caller = {"sub": claims["sub"], "client_id": claims["client_id"]}
            content = [{"type": "text", "text": json.dumps(caller)}]
            return {"result": {"content": content, "structuredContent": caller, "isError": False}}
        return {"error": {"code": -32601, "message": f"unknown method {method}"}}


@asynccontextmanager
async def serving(backend: CrossAppBackend) -> AsyncIterator[str]:
    """`backend` at `http://127.0.0.1:PORT/mcp`; that URL."""
    app = web.Application()
    app.router.add_post("/mcp", backend.mcp)
    async with loopback.serving(app) as url:
        yield f"{url}/mcp"


@dataclass
class ThirdPartyStack:
    gateway: AuditedGateway
    idp: OidcProvider
    xaa: CrossAppBackend

    @property
    def base_url(self) -> str:
        return self.gateway.base_url

    def url(self, path: str) -> str:
        return self.base_url + path

    def idp_log(self, part: str) -> list[str]:
        return [line for line in self.idp.log() if part in line]


@asynccontextmanager
async def third_party_front_door(
    database: str, employees_url: str, partners_url: str
) -> AsyncIterator[ThirdPartyStack]:
    """The org (oidc-provider, knowing the gateway's app and its callback), the Cross App Access backend, and the
    gateway with `FRONT_DOOR=on` and `OKTA_DOMAIN` = the org. The gateway's socket is bound first: the org must
    know the callback URL before the gateway starts."""
    with bound_socket() as sock:
        callback = f"http://{LOOPBACK}:{sock.getsockname()[1]}/oauth/callback"
        front_door = FrontDoor(
            FrontDoorApp(GATEWAY_APP, APP_SECRET, callback), (idp_user(ADA), idp_user(BOB)), id_token_ttl=ID_TOKEN_TTL
        )
        cross_app = CrossApp((), CrossAppTarget(TARGET_AS, (XAA_RESOURCE,), (XAA_SCOPE,)))
        with running_oidc_provider((), (), cross_app=cross_app, front_door=front_door) as idp:
            async with AsyncExitStack() as stack:
                backend = CrossAppBackend(idp.target_issuer)
                url = await stack.enter_async_context(serving(backend))
                auth_config = {
                    "id_jag_mode": "static",
                    "target_authorization_server": idp.target_issuer,
                    "target_token_endpoint": idp.target_token_endpoint,
                    "resource": XAA_RESOURCE,
                    "scopes": [XAA_SCOPE],
                }
                xaa = {"url": url, "paths": ["/xaa"], "auth_method": "okta-cross-app", "auth_config": auth_config}
                settings = {
                    "FRONT_DOOR": "on",
                    "OKTA_DOMAIN": idp.issuer,
                    "OKTA_CLIENT_ID": GATEWAY_APP,
                    "OKTA_CLIENT_SECRET": APP_SECRET,
                    "STATE_ENCRYPTION_KEY": STATE_KEY,
                }
                config = front_door_yaml(employees_url, partners_url, xaa)
                gateway = await stack.enter_async_context(
                    audited_gateway(config, database, settings=settings, sock=sock)
                )
                yield ThirdPartyStack(gateway, idp, backend)


@pytest.fixture
async def stack(sample_backends: SampleBackends, tmp_path: Path) -> AsyncIterator[ThirdPartyStack]:
    async with third_party_front_door(
        f"sqlite:///{tmp_path}/gateway.db",
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
    ) as running:
        yield running


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def tools_list(stack: ThirdPartyStack, path: str, token: str) -> int:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {**ACCEPT, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2025-06-18"}
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.post(stack.url(path), json=message, headers=headers) as response,
    ):
        return response.status


async def test_sdk_client_signs_in_at_the_org_refreshes_and_reaches_a_cross_app_backend(
    stack: ThirdPartyStack,
) -> None:
    employees, xaa = MemoryStorage(), MemoryStorage()
    async with browser() as person:
        # 1. The SDK: discovery from the 401, registration, the org's sign-in, the gateway's consent, tokens, tools.
        provider = sdk_provider(stack.url("/employees"), person, employees)
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30) as http,
            Client(streamable_http_client(stack.url("/employees"), http_client=http), mode="legacy") as client,
        ):
            result = await client.call_tool("get_employee", {"employee_id": "E002"})
            assert result.structured_content is not None and result.structured_content["name"] == "Grace Hopper"
        assert any(hop.url.startswith(stack.idp.issuer + "/interaction/") for hop in person.hops), "no org sign-in"
        assert any('name="decision"' in hop.text for hop in person.hops if hop.status == 200), "no consent page"
        assert stack.idp_log("sign-in sub=") == [f"oidc-provider: sign-in sub={ADA.uid}"]
        code_grants = stack.idp_log("token issued grant_type=authorization_code")
        assert code_grants == [
            f"oidc-provider: token issued grant_type=authorization_code client_id={GATEWAY_APP} sub={ADA.uid}"
        ]
        assert employees.tokens is not None and employees.client is not None
        token = claims(employees.tokens.access_token)
        assert (token["iss"], token["aud"], token["sub"]) == (stack.base_url, stack.url("/employees"), ADA.uid)

        # 2. A refresh at the gateway: a new pair, and the new access token works.
        form = {
            "grant_type": "refresh_token",
            "refresh_token": str(employees.tokens.refresh_token),
            "client_id": employees.client.client_id,
        }
        async with person.http.post(stack.url("/oauth/token"), data=form) as response:
            assert response.status == 200, await response.text()
            refreshed = await response.json()
        assert refreshed["refresh_token"] != employees.tokens.refresh_token
        assert claims(refreshed["access_token"])["sub"] == ADA.uid
        assert await tools_list(stack, "/employees", refreshed["access_token"]) == 200

        # 3. Cross App Access in the same browser: the org's session signs the person in without a password.
        provider = sdk_provider(stack.url("/xaa"), person, xaa)
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30) as http,
            Client(streamable_http_client(stack.url("/xaa"), http_client=http), mode="legacy") as client,
        ):
            result = await client.call_tool("whoami", {})
    assert result.structured_content == {"sub": ADA.uid, "client_id": GATEWAY_APP}
    assert len(stack.idp_log("sign-in sub=")) == 1  # single sign-on: no second password

    accepted = stack.xaa.accepted[-1]
    assert (accepted["iss"], accepted["aud"], accepted["scope"]) == (stack.idp.target_issuer, XAA_RESOURCE, XAA_SCOPE)
    assert accepted["sub"] == ADA.uid and accepted["client_id"] == GATEWAY_APP
    assert xaa.tokens is not None
    assert xaa.tokens.access_token not in stack.xaa.tokens_seen  # the gateway's own token never reaches a backend
    # The held ID token was refreshed at the org, then exchanged (step 1) as the gateway's app, then redeemed (2).
    refreshes = stack.idp_log("token issued grant_type=refresh_token")
    assert refreshes and all(f"client_id={GATEWAY_APP} sub={ADA.uid}" in line for line in refreshes), refreshes
    [issued] = stack.idp_log("id-jag issued")
    assert f"sub={ADA.uid} client_id={GATEWAY_APP} {ID_TOKEN_SUBJECT}" in issued, issued
    assert f"resource={XAA_RESOURCE}" in issued
    [redeemed] = stack.idp_log("id-jag redeemed")
    assert f"sub={ADA.uid} client_id={GATEWAY_APP}" in redeemed, redeemed
    assert stack.idp_log("grant.error") == []

    rows = await stack.gateway.rows()
    xaa_rows = [row for row in rows if row["backend"] == "xaa" and row["status"] == 200]
    assert xaa_rows and {row["user_sub"] for row in xaa_rows} == {ADA.uid}
    assert {row["agent"] for row in xaa_rows} == {"claude-code"}  # by client_names


async def start_by_hand(stack: ThirdPartyStack, person: Browser) -> tuple[str, str, Pkce]:
    """Register a client; its id, the gateway's authorization URL for /employees (no `scope`), and its PKCE."""
    body = {"client_name": CLIENT_NAME, "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
    async with person.http.post(stack.url("/oauth/register"), json=body) as response:
        assert response.status == 201, await response.text()
        client_id: str = (await response.json())["client_id"]
    pkce = Pkce()
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "state": pkce.state,
        "resource": stack.url("/employees"),
    }
    return client_id, str(yarl.URL(stack.url("/oauth/authorize")).with_query(query)), pkce


async def authorize_by_hand(stack: ThirdPartyStack, person: Browser, user: User) -> dict[str, Any]:
    """Sign in as `user` at the org, approve, redeem the code; the token response."""
    client_id, url, pkce = await start_by_hand(stack, person)
    params = await person.authorize(url, REDIRECT, user)
    assert params["state"] == pkce.state, params
    form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": pkce.verifier,
    }
    async with person.http.post(stack.url("/oauth/token"), data=form) as response:
        assert response.status == 200, await response.text()
        tokens: dict[str, Any] = await response.json()
        return tokens


async def test_scopes_follow_the_groups_claim_of_the_orgs_id_token(stack: ThirdPartyStack) -> None:
    async with browser() as person:
        ada = await authorize_by_hand(stack, person, ADA)
    async with browser() as person:
        bob = await authorize_by_hand(stack, person, BOB)
    assert ada["scope"] == "mcp:read mcp:write"  # Ada is in Engineering (scopes_by_group)
    assert bob["scope"] == "mcp:read"  # Bob is in no group: the default scopes only
    assert claims(bob["access_token"])["sub"] == BOB.uid


async def test_a_wrong_password_at_the_org_gets_no_code_to_the_gateway(stack: ThirdPartyStack) -> None:
    impostor = User(ADA.login, ADA.uid, password="not Ada's password")
    async with browser() as person:
        _, url, _ = await start_by_hand(stack, person)
        hop = await person.sign_in(url, REDIRECT, impostor)
        assert hop.status == 200 and hop.url.startswith(stack.idp.issuer + "/interaction/"), (hop.status, hop.url)
        assert "Sign-in failed" in hop.text
        assert not any(h.url.startswith(stack.url("/oauth/callback")) for h in person.hops)
        assert stack.idp_log("sign-in refused") and not stack.idp_log("token issued")

        # The same form with Ada's password goes on to the gateway's consent page.
        form = Page(hop.text)
        assert form.action is not None
        answer = {**form.fields, "username": ADA.login, "password": str(ADA.password)}
        consent = await person.follow(await person.post(urljoin(hop.url, form.action), answer), REDIRECT)
        assert consent.status == 200 and 'name="decision"' in consent.text, consent.text
        assert stack.idp_log("sign-in sub=") == [f"oidc-provider: sign-in sub={ADA.uid}"]
