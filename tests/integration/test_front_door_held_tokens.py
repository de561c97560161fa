"""The Okta ID token the front door holds for each login (DESIGN.md §8, "Backend credentials for front-door
callers"): refreshed with the Okta refresh token shortly before it expires, once per grant however many requests
need it at once; Okta's `invalid_grant` ends the login (401 with the challenge, the grant revoked); Okta down with
an expired ID token → 503. Driven through the running gateway against the emulator, with the grant's expiry moved
in the store to make "shortly before it expires" now."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from sqlalchemy import update

from okta_agent_proxy.app import GATEWAY
from okta_agent_proxy.devkit.okta_emulator_oauth import OAuthError, TokenRequest
from okta_agent_proxy.store.frontdoor import EventKind, FrontDoorStore, SecurityEventQuery
from okta_agent_proxy.store.models import oauth_grants
from tests.integration.conftest import SampleBackends
from tests.integration.test_front_door_flow import claims, mcp_call, sign_in
from tests.support.front_door import FrontDoorStack, browser, front_door_stack


@pytest.fixture
async def stack(sample_backends: SampleBackends, tmp_path: Path) -> AsyncIterator[FrontDoorStack]:
    async with front_door_stack(
        f"sqlite:///{tmp_path}/gateway.db",
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
        settings={"DATA_DIR": str(tmp_path)},
    ) as running:
        yield running


async def logged_in(stack: FrontDoorStack) -> tuple[str, str]:
    """A login for /xaa: (the gateway's access token, its grant id)."""
    async with browser() as person:
        _, tokens, _ = await sign_in(stack, person, "/xaa")
    return tokens["access_token"], claims(tokens["access_token"])["grant"]


async def expire_soon(stack: FrontDoorStack, grant_id: str, seconds: float) -> None:
    """Move the held ID token's expiry to `seconds` from now (negative: already expired)."""
    async with stack.gateway.store.engine.begin() as connection:
        await connection.execute(
            update(oauth_grants)
            .where(oauth_grants.c.grant_id == grant_id)
            .values(okta_id_token_expires_at=datetime.now(UTC) + timedelta(seconds=seconds))
        )


def front_door_store(stack: FrontDoorStack) -> FrontDoorStore:
    return FrontDoorStore(stack.gateway.store.engine)


async def test_id_token_refreshed_ahead_of_expiry_once_for_many_requests(stack: FrontDoorStack) -> None:
    token, grant_id = await logged_in(stack)
    before = await front_door_store(stack).get_grant(grant_id)
    assert before is not None
    await expire_soon(stack, grant_id, 60)  # within the 5 minutes ahead of expiry
    held = stack.gateway.app[GATEWAY].front_door.held  # type: ignore[union-attr]
    with structlog.testing.capture_logs() as logs:
        tokens = await asyncio.gather(*(held.id_token(grant_id) for _ in range(8)))
    refreshes = [
        e for e in logs if e.get("event") == "okta_emulator_token_issued" and e.get("grant_type") == "refresh_token"
    ]
    assert len(refreshes) == 1, refreshes  # one call to Okta for the grant, whoever asked
    assert len(set(tokens)) == 1
    after = await front_door_store(stack).get_grant(grant_id)
    assert after is not None and after.version == before.version + 1
    assert after.okta_id_token_expires_at is not None
    assert after.okta_id_token_expires_at > datetime.now(UTC) + timedelta(minutes=30)
    events = await front_door_store(stack).list_events(SecurityEventQuery(kind=EventKind.OKTA_REFRESH))
    assert [event.grant_id for event in events] == [grant_id]
    status, body = await mcp_call(stack, "/xaa", token)  # the exchange uses the refreshed ID token
    assert status == 200, body
    assert stack.xaa.accepted[-1]["sub"] == "ada@example.com"


async def test_okta_invalid_grant_on_refresh_ends_the_login(stack: FrontDoorStack) -> None:
    token, grant_id = await logged_in(stack)
    await expire_soon(stack, grant_id, 60)

    async def refused(request: TokenRequest) -> dict[str, Any]:
        raise OAuthError("invalid_grant", "The refresh token is invalid or expired.")

    stack.idp.register_grant("refresh_token", refused, kind="org")
    status, body = await mcp_call(stack, "/xaa", token)
    assert status == 401 and body["error"] == "invalid_token", body
    grant = await front_door_store(stack).get_grant(grant_id)
    assert grant is not None and grant.revoked_at is not None and grant.okta_refresh_token is None
    status, body = await mcp_call(stack, "/employees", token)  # the login is over everywhere, not just for /xaa
    assert status == 401, body


async def test_okta_down_with_an_expired_id_token_is_503_and_with_a_valid_one_is_served(
    stack: FrontDoorStack,
) -> None:
    token, grant_id = await logged_in(stack)

    async def broken(request: TokenRequest) -> dict[str, Any]:
        raise OAuthError("temporarily_unavailable", "down", status=503)

    stack.idp.register_grant("refresh_token", broken, kind="org")
    await expire_soon(stack, grant_id, 60)  # refresh due, fails, but the held token is still valid
    status, body = await mcp_call(stack, "/xaa", token)
    assert status == 200, body
    stack.gateway.app[GATEWAY].current.pipeline.upstreams["xaa"].provider.forget_all()  # type: ignore[attr-defined]
    await expire_soon(stack, grant_id, -10)  # expired, and Okta cannot refresh it
    status, body = await mcp_call(stack, "/xaa", token)
    assert status == 503 and body["error"] == "idp_unavailable", body
    grant = await front_door_store(stack).get_grant(grant_id)
    assert grant is not None and grant.revoked_at is None  # an outage never ends a login


async def test_a_login_without_an_okta_refresh_token_ends_when_its_id_token_does(stack: FrontDoorStack) -> None:
    """An IdP that grants no `offline_access` (OIDC Core §11 without prompt=consent) gives no refresh token: once
    the ID token expires the grant is revoked, so the client's own refresh fails too and it signs in again."""
    async with browser() as person:
        client_id, tokens, _ = await sign_in(stack, person, "/xaa")
    grant_id = claims(tokens["access_token"])["grant"]
    async with stack.gateway.store.engine.begin() as connection:
        await connection.execute(
            update(oauth_grants).where(oauth_grants.c.grant_id == grant_id).values(okta_refresh_token=None)
        )
    await expire_soon(stack, grant_id, 60)
    assert (await mcp_call(stack, "/xaa", tokens["access_token"]))[0] == 200  # still valid: used as it is
    stack.gateway.app[GATEWAY].current.pipeline.upstreams["xaa"].provider.forget_all()  # type: ignore[attr-defined]
    await expire_soon(stack, grant_id, -10)
    status, body = await mcp_call(stack, "/xaa", tokens["access_token"])
    assert status == 401 and body["error"] == "invalid_token", body
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
    async with browser() as person, person.http.post(stack.url("/oauth/token"), data=form) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_grant"


async def test_a_user_ended_at_okta_loses_the_grant_at_the_next_refresh(stack: FrontDoorStack) -> None:
    """No Cross App Access backend involved: a gateway refresh itself renews the held ID token at Okta when it is
    due, so Okta's `invalid_grant` (user deactivated, sessions revoked) ends the grant there too."""
    async with browser() as person:
        client_id, tokens, _ = await sign_in(stack, person, "/employees")
    grant_id = claims(tokens["access_token"])["grant"]

    async def refused(request: TokenRequest) -> dict[str, Any]:
        raise OAuthError("invalid_grant", "The refresh token is invalid or expired.")

    stack.idp.register_grant("refresh_token", refused, kind="org")
    await expire_soon(stack, grant_id, 60)
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
    async with browser() as person, person.http.post(stack.url("/oauth/token"), data=form) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_grant"
    status, body = await mcp_call(stack, "/employees", tokens["access_token"])
    assert status == 401 and body["error"] == "invalid_token", body
