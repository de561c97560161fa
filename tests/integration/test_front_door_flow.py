"""The OAuth front door end to end (DESIGN.md §8): the official MCP SDK's `OAuthClientProvider` finds the gateway's
authorization server from the 401, registers, sends the person through Okta's sign-in (the devkit emulator, over
real loopback HTTP) and the consent page, gets the gateway's own token and calls MCP tools with it; then a refresh,
and Cross App Access from the ID token the gateway holds. What real clients do, and what attackers try, each
against the running stack."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import jwt
import pytest
import yarl
from mcp import Client
from mcp.client.auth import OAuthClientProvider, TokenStorage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from okta_agent_proxy.devkit.okta_emulator import User
from tests.integration.conftest import SampleBackends
from tests.support.front_door import (
    ADA,
    BOB,
    GATEWAY_APP,
    LINKED_AGENT,
    Browser,
    FrontDoorStack,
    Pkce,
    browser,
    front_door_stack,
    front_door_yaml,
)
from tests.support.gateway import psk_backend
from tests.support.stacks import ACCEPT, ec_agent_key

REDIRECT = "http://127.0.0.1:33418/callback"
CLIENT_NAME = "MCP SDK test client"


class MemoryStorage(TokenStorage):
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def sdk_provider(
    server_url: str, person: Browser, storage: MemoryStorage, *, client_name: str = CLIENT_NAME, user: User = ADA
) -> OAuthClientProvider:
    """The SDK's provider, with the person's browser as its redirect handler."""
    answers: list[dict[str, str]] = []

    async def redirect_handler(authorization_url: str) -> None:
        answers.append(await person.authorize(authorization_url, REDIRECT, user))

    async def callback_handler() -> AuthorizationCodeResult:
        params = answers.pop()
        return AuthorizationCodeResult(code=params["code"], state=params.get("state"), iss=params.get("iss"))

    metadata = OAuthClientMetadata(
        client_name=client_name,
        redirect_uris=[REDIRECT],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
    )
    return OAuthClientProvider(server_url, metadata, storage, redirect_handler, callback_handler)


@pytest.fixture
async def stack(sample_backends: SampleBackends, tmp_path: Path) -> AsyncIterator[FrontDoorStack]:
    async with front_door_stack(
        f"sqlite:///{tmp_path}/gateway.db",
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
        settings={"DATA_DIR": str(tmp_path)},
    ) as running:
        yield running


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def test_sdk_client_registers_logs_in_and_calls_tools(stack: FrontDoorStack) -> None:
    storage = MemoryStorage()
    async with browser() as person:
        provider = sdk_provider(stack.url("/employees"), person, storage)
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30) as http,
            Client(streamable_http_client(stack.url("/employees"), http_client=http), mode="legacy") as client,
        ):
            tools = await client.list_tools()
            assert "get_employee" in {tool.name for tool in tools.tools}
            result = await client.call_tool("get_employee", {"employee_id": "E002"})
            assert result.structured_content is not None and result.structured_content["name"] == "Grace Hopper"
        pages = [hop for hop in person.hops if hop.status == 200]
        assert any("Lovelace" in hop.text and 'name="decision"' in hop.text for hop in pages), "no consent page"
    assert storage.tokens is not None and storage.client is not None
    token = claims(storage.tokens.access_token)
    assert token["iss"] == stack.base_url
    assert token["aud"] == stack.url("/employees")
    assert token["sub"] == ADA.uid
    assert token["client_id"] == storage.client.client_id
    assert token["scope"] == "mcp:read"  # what the resource's metadata advertised, which the SDK asks for
    rows = await stack.gateway.rows()
    mcp_rows = [row for row in rows if row["backend"] == "employees" and row["status"] == 200]
    assert mcp_rows and {row["agent"] for row in mcp_rows} == {"claude-code"}  # by client_names
    assert {row["user_sub"] for row in mcp_rows} == {ADA.uid}
    assert {row["client_id"] for row in mcp_rows} == {storage.client.client_id}
    assert {row["agent_evidence"] for row in mcp_rows} == {"client_name"}  # declared, not verified


async def sign_in(
    stack: FrontDoorStack, person: Browser, resource_path: str, *, client_id: str | None = None, user: Any = ADA
) -> tuple[str, dict[str, Any], Pkce]:
    """Register (unless given a client) and run the whole flow by hand; the client id and the token response."""
    http = person.http
    if client_id is None:
        body = {"client_name": CLIENT_NAME, "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        async with http.post(stack.url("/oauth/register"), json=body) as response:
            assert response.status == 201, await response.text()
            client_id = (await response.json())["client_id"]
    pkce = Pkce()
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "state": pkce.state,
        "resource": stack.url(resource_path),
    }
    url = str(yarl.URL(stack.url("/oauth/authorize")).with_query(query))
    params = await person.authorize(url, REDIRECT, user)
    assert params["state"] == pkce.state and params["iss"] == stack.base_url, params
    form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": pkce.verifier,
    }
    async with http.post(stack.url("/oauth/token"), data=form) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        return client_id, await response.json(), pkce


async def mcp_call(stack: FrontDoorStack, path: str, token: str) -> tuple[int, dict[str, Any]]:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {**ACCEPT, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2025-06-18"}
    async with aiohttp.ClientSession() as http, http.post(stack.url(path), json=message, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text.startswith("{") else {"text": text}


@pytest.fixture(params=["static", "dynamic"])
async def xaa_stack(
    request: pytest.FixtureRequest, sample_backends: SampleBackends, tmp_path: Path
) -> AsyncIterator[FrontDoorStack]:
    async with front_door_stack(
        f"sqlite:///{tmp_path}/gateway.db",
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
        settings={"DATA_DIR": str(tmp_path)},
        xaa_mode=request.param,
    ) as running:
        yield running


async def test_refresh_then_cross_app_access_from_the_held_id_token(xaa_stack: FrontDoorStack) -> None:
    stack = xaa_stack
    async with browser() as person:
        client_id, tokens, _ = await sign_in(stack, person, "/xaa")
        form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
        async with person.http.post(stack.url("/oauth/token"), data=form) as response:
            assert response.status == 200
            refreshed = await response.json()
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    status, body = await mcp_call(stack, "/xaa", refreshed["access_token"])
    assert status == 200, body
    accepted = stack.xaa.accepted[-1]
    assert accepted["sub"] == ADA.login  # the user who signed in, as the backend's AS names users
    assert accepted["cid"] == GATEWAY_APP or accepted.get("client_id") == GATEWAY_APP
    assert tokens["access_token"] not in stack.xaa.tokens_seen  # the backend never sees the gateway's token


async def test_token_for_one_backend_is_refused_on_another(stack: FrontDoorStack) -> None:
    async with browser() as person:
        _, tokens, _ = await sign_in(stack, person, "/employees")
    assert (await mcp_call(stack, "/employees", tokens["access_token"]))[0] == 200
    status, body = await mcp_call(stack, "/partners", tokens["access_token"])
    assert status == 401 and body["error"] == "invalid_token", body


async def test_scopes_follow_the_users_okta_groups(stack: FrontDoorStack) -> None:
    async with browser() as person:
        _, tokens, _ = await sign_in(stack, person, "/employees")
    assert tokens["scope"] == "mcp:read mcp:write"  # Ada is in Engineering; nothing asked → all allowed
    async with browser() as person:
        _, tokens, _ = await sign_in(stack, person, "/employees", user=BOB)
    assert tokens["scope"] == "mcp:read"
    assert claims(tokens["access_token"])["sub"] == BOB.uid


async def test_two_refreshes_of_one_token_at_once_both_succeed_then_reuse_revokes(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id, tokens, _ = await sign_in(stack, person, "/employees")
        form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}

        async def refresh() -> tuple[int, dict[str, Any]]:
            async with person.http.post(stack.url("/oauth/token"), data=form) as response:
                return response.status, await response.json()

        first, second = await asyncio.gather(refresh(), refresh())
    assert first[0] == second[0] == 200, (first, second)
    assert first[1]["refresh_token"] == second[1]["refresh_token"]  # the same new pair, within the grace
    assert (await mcp_call(stack, "/employees", first[1]["access_token"]))[0] == 200


async def test_cross_app_access_signed_by_the_linked_ai_agent(sample_backends: SampleBackends, tmp_path: Path) -> None:
    """`FRONT_DOOR_AGENT_*`: an Okta AI agent linked to the gateway's app presents the app's ID token at step 1 and
    authenticates step 2; Okta's policy here allows only the agent, so a call that works proves the agent signed."""
    async with front_door_stack(
        f"sqlite:///{tmp_path}/gateway.db",
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
        settings={"DATA_DIR": str(tmp_path)},
        linked_agent=ec_agent_key("linked-agent-1"),
    ) as stack:
        async with browser() as person:
            _, tokens, _ = await sign_in(stack, person, "/xaa")
        status, body = await mcp_call(stack, "/xaa", tokens["access_token"])
    assert status == 200, body
    accepted = stack.xaa.accepted[-1]
    assert accepted["sub"] == ADA.login
    assert LINKED_AGENT in (accepted.get("cid"), accepted.get("client_id"))


async def test_a_reload_that_moves_a_backend_moves_its_tokens_audience_too(
    stack: FrontDoorStack, sample_backends: SampleBackends
) -> None:
    """A token's `aud` is a URL: after a reload gives `employees` another path, a token for the old URL names no
    backend (the audience's backend is remembered per config, not across reloads)."""
    async with browser() as person:
        _, tokens, _ = await sign_in(stack, person, "/employees")
    assert (await mcp_call(stack, "/employees", tokens["access_token"]))[0] == 200
    config = front_door_yaml(
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
        psk_backend("http://127.0.0.1:9/mcp", "/xaa"),
    )
    config["backends"]["employees"]["paths"] = ["/staff"]
    await stack.gateway.reload(config)
    status, body = await mcp_call(stack, "/staff", tokens["access_token"])
    assert status == 401 and body["error"] == "invalid_token", body
