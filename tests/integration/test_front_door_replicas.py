"""The front door across replicas (DESIGN.md §8, "Grants across replicas"): two gateways with one public URL,
sharing PostgreSQL and Redis. A login made through one is good on the other (one signing key, made once and kept
sealed in the store); the other serves a refresh of it; a revocation made on one is refused by the other at once
(Redis pub/sub), and a refresh-token reuse detected on one ends the grant on both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import SampleBackends
from tests.integration.test_front_door_flow import claims, sign_in
from tests.support.front_door import FrontDoorStack, browser, front_door_stack, front_door_yaml
from tests.support.gateway import psk_backend
from tests.support.redis_servers import shared_redis_url
from tests.support.stacks import ACCEPT, AuditedGateway, audited_gateway, postgres_database


@pytest.fixture
async def replicas(
    sample_backends: SampleBackends, tmp_path: Path
) -> AsyncIterator[tuple[FrontDoorStack, AuditedGateway]]:
    redis_url = shared_redis_url()
    employees, partners = sample_backends.employees.url("/mcp"), sample_backends.partners.url("/mcp")
    async with postgres_database() as database:
        settings = {
            "DATA_DIR": str(tmp_path / "a"),
            "REDIS_URL": redis_url,
            "SESSION_SECRET": "s" * 40,
            "FRONT_DOOR_REFRESH_GRACE_SECONDS": 1,
        }
        async with front_door_stack(database, employees, partners, settings=settings) as first:
            # the same public URL, Okta app and keys; its own port and data folder
            second_settings = {**first.gateway._settings, "DATA_DIR": str(tmp_path / "b")}
            second_settings.pop("GATEWAY_PORT")
            config = front_door_yaml(employees, partners, psk_backend(partners, "/xaa"))
            async with audited_gateway(config, database, settings=second_settings) as second:
                yield first, second


async def call(port: int, path: str, token: str) -> int:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {**ACCEPT, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2025-06-18"}
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as http, http.post(url, json=message, headers=headers) as response:
        await response.read()
        return response.status


async def post_form(port: int, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as http, http.post(url, data=form) as response:
        return response.status, await response.json()


async def test_one_login_served_by_both_and_revocation_seen_at_once(
    replicas: tuple[FrontDoorStack, AuditedGateway],
) -> None:
    first, second = replicas
    async with browser() as person:
        client_id, tokens, _ = await sign_in(first, person, "/employees")
    assert claims(tokens["access_token"])["iss"] == first.base_url
    assert await call(second.port, "/employees", tokens["access_token"]) == 200  # the other replica's key: the same
    status, refreshed = await post_form(
        second.port,
        "/oauth/token",
        {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id},
    )
    assert status == 200, refreshed
    assert await call(first.gateway.port, "/employees", refreshed["access_token"]) == 200
    assert await call(second.port, "/employees", refreshed["access_token"]) == 200  # its liveness is now cached
    status, _ = await post_form(
        first.gateway.port, "/oauth/revoke", {"token": refreshed["refresh_token"], "client_id": client_id}
    )
    assert status == 200
    for _ in range(50):  # pub/sub reaches the other replica in milliseconds; allow 1 s
        if await call(second.port, "/employees", refreshed["access_token"]) == 401:
            break
        await asyncio.sleep(0.02)
    assert await call(second.port, "/employees", refreshed["access_token"]) == 401


async def test_refresh_token_reuse_on_one_replica_ends_the_grant_on_both(
    replicas: tuple[FrontDoorStack, AuditedGateway],
) -> None:
    first, second = replicas
    async with browser() as person:
        client_id, tokens, _ = await sign_in(first, person, "/employees")
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
    assert (await post_form(first.gateway.port, "/oauth/token", form))[0] == 200
    assert await call(second.port, "/employees", tokens["access_token"]) == 200  # cached as live on the second
    await asyncio.sleep(first.gateway.loaded.settings.FRONT_DOOR_REFRESH_GRACE_SECONDS + 0.5)
    status, body = await post_form(second.port, "/oauth/token", form)  # the rotated token, after the grace
    assert status == 400 and body["error"] == "invalid_grant", body
    for port in (first.gateway.port, second.port):
        assert await call(port, "/employees", tokens["access_token"]) == 401
