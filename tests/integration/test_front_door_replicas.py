"""The front door across replicas (DESIGN.md §8, "Grants across replicas"): two gateways with one public URL,
sharing PostgreSQL and Redis. A login made through one is good on the other (one signing key, made once and kept
sealed in the store); the other serves a refresh of it; a revocation made on one is refused by the other at once
(Redis pub/sub), and a refresh-token reuse detected on one ends the grant on both. The per-address limits of
registration and authorization are one budget for both (Redis)."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from okta_agent_proxy.frontdoor.registration import REGISTRATIONS_PER_MINUTE, limited_as
from okta_agent_proxy.frontdoor.service import AUTHORIZATIONS_PER_MINUTE
from okta_agent_proxy.policy.rate_limits import redis_key
from tests.integration.conftest import SampleBackends
from tests.integration.test_front_door_flow import REDIRECT, claims, sign_in
from tests.support.front_door import FrontDoorStack, browser, front_door_stack, front_door_yaml
from tests.support.gateway import psk_backend
from tests.support.processes import LOOPBACK
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
            "TRUSTED_PROXIES": LOOPBACK,  # the tests' X-Forwarded-For names the client (without it: the peer)
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


def fresh_address() -> str:
    """An address no other test or run uses (they share the Redis server, so they must not share a bucket): in an
    IPv6 /64 of its own, the unit of the per-address limits."""
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (secrets.randbits(32) << 64) | secrets.randbits(64)))


async def test_one_address_has_one_budget_across_replicas(
    replicas: tuple[FrontDoorStack, AuditedGateway],
) -> None:
    """Registrations and authorizations from one address, sent to each replica in turn, are allowed as many times in
    all as one gateway allows them — not that many on each."""
    first, second = replicas
    ports = (first.gateway.port, second.port)
    registering, authorizing = fresh_address(), fresh_address()
    registered: list[tuple[int, str | None, dict[str, Any]]] = []
    authorized: list[tuple[int, str | None]] = []
    async with aiohttp.ClientSession() as http:
        began = time.monotonic()
        for index in range(REGISTRATIONS_PER_MINUTE + 4):
            url = f"http://{LOOPBACK}:{ports[index % 2]}/oauth/register"
            headers = {"X-Forwarded-For": registering}
            async with http.post(url, json={"redirect_uris": [REDIRECT]}, headers=headers) as response:
                registered.append((response.status, response.headers.get("Retry-After"), await response.json()))
        registrations_refilled = int((time.monotonic() - began) * REGISTRATIONS_PER_MINUTE / 60)
        began = time.monotonic()
        for index in range(AUTHORIZATIONS_PER_MINUTE + 4):
            url = f"http://{LOOPBACK}:{ports[index % 2]}/oauth/authorize"  # no parameters: a 400 page when allowed
            async with http.get(url, headers={"X-Forwarded-For": authorizing}) as response:
                authorized.append((response.status, response.headers.get("Retry-After")))
        refilled = int((time.monotonic() - began) * AUTHORIZATIONS_PER_MINUTE / 60)  # a slow machine's extra tokens
    statuses = [status for status, _, _ in registered]
    assert statuses[:REGISTRATIONS_PER_MINUTE] == [201] * REGISTRATIONS_PER_MINUTE
    allowed = statuses.count(201)
    assert REGISTRATIONS_PER_MINUTE <= allowed <= REGISTRATIONS_PER_MINUTE + registrations_refilled < len(statuses)
    for status, retry_after, body in registered[REGISTRATIONS_PER_MINUTE:]:
        if status == 201:  # refilled while the loop ran on a slow machine
            continue
        assert status == 429 and body["error"] == "slow_down" and "client_id" not in body
        assert retry_after is not None and 1 <= int(retry_after) <= 60 // REGISTRATIONS_PER_MINUTE
    # One budget: 30 allowed, and what refilled while the loop ran (0 unless the machine is slow) — each replica on
    # its own budget would allow all 34 (unless the loop took 8 s).
    allowed = [status for status, _ in authorized].count(400)  # the authorize page's 400: allowed
    assert AUTHORIZATIONS_PER_MINUTE <= allowed <= AUTHORIZATIONS_PER_MINUTE + refilled < len(authorized), refilled
    assert [status for status, _ in authorized][:AUTHORIZATIONS_PER_MINUTE] == [400] * AUTHORIZATIONS_PER_MINUTE
    refused = [retry_after for status, retry_after in authorized if status == 429]
    assert refused and all(retry_after is not None and 1 <= int(retry_after) <= 2 for retry_after in refused)
    # In Redis under a digest: the buckets are there, and no key names an address.
    client = redis.asyncio.Redis.from_url(first.gateway.loaded.settings.REDIS_URL or "")
    try:
        assert await client.exists(redis_key(("front_door.register", limited_as(registering)))) == 1
        assert await client.exists(redis_key(("front_door.authorize", limited_as(authorizing)))) == 1
        for address in (registering, authorizing):
            assert [key async for key in client.scan_iter(match=f"*{address}*")] == []
    finally:
        await client.aclose()
