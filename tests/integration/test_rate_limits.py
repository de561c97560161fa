"""Request budgets through the gateway (DESIGN.md §9, issue 16): per user, per agent, per (user, backend) and a
backend's own budget; a refusal is 429 `rate_limited` with the seconds to the next token in `Retry-After`, never
reaches the backend, is audited as `rate_limited` and counted in `oap_rate_limited_total{backend,agent}`. Three
gateways sharing Redis share one budget; with Redis unreachable each has its own, and none is unlimited.

The stack: the devkit Okta emulator signing real caller tokens, a recording backend behind two routes, and the
gateway as `serve` assembles it (a SQLite audit store) on loopback. The replica tests run three gateways in this
event loop, each with its own limiter and Redis connection, as three processes would have. Users are fresh Okta ids
for every test, so runs sharing the Redis server never share a bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, OktaEmulator, User
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import RunningGateway, psk_backend, running_gateway
from tests.support.processes import LOOPBACK, free_port
from tests.support.redis_servers import shared_redis_url
from tests.support.stacks import AUDIENCE, GATEWAY_AS, Answer, AuditedGateway, audited_gateway, sample_values, send

CURSOR, CLAUDE = "0oa_cursor_app", "0oa_claude_app"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
SESSION_SECRET = "rate-limit-tests-session-secret-0123456789abcdef"


def users(count: int) -> list[User]:
    return [User(f"user{index}@example.com") for index in range(count)]  # each a fresh uid: the user's key


@dataclass
class Stack:
    idp: OktaEmulator
    backend: RecordingBackend
    gateway: AuditedGateway
    http: aiohttp.ClientSession

    def token(self, user: User, client_id: str = CURSOR) -> str:
        return self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=client_id, scopes=["mcp:read"])

    async def call(self, user: User, path: str = "/employees", client_id: str = CURSOR) -> Answer:
        return await send(self.http, self.gateway.url(path), token=self.token(user, client_id), body=LIST)

    async def refused_count(self) -> dict[tuple[str, ...], int]:
        async with self.http.get(self.gateway.url("/metrics")) as response:
            return dict(sample_values(await response.text(), "oap_rate_limited_total", "backend", "agent"))


def gateway_yaml(backend: RecordingBackend, rate_limits: dict[str, Any] | None) -> dict[str, Any]:
    both = ["employees", "ledger"]
    config: dict[str, Any] = {
        "backends": {
            "employees": psk_backend(backend.url("/mcp"), "/employees"),
            "ledger": psk_backend(backend.url("/mcp"), "/ledger"),
        },
        "agents": {
            "cursor": {"client_id": CURSOR, "backend_access": both},
            "claude": {"client_id": CLAUDE, "backend_access": both},
        },
    }
    if rate_limits is not None:
        config["rate_limits"] = rate_limits
    return config


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, rate_limits: dict[str, Any] | None, people: list[User]) -> AsyncIterator[Stack]:
    async with (
        OktaEmulator(auth_servers=(AuthorizationServer(GATEWAY_AS, AUDIENCE),), users=people) as idp,
        running_backend() as backend,
    ):
        settings = {"OKTA_ISSUER": idp.issuer(GATEWAY_AS), "OKTA_AUDIENCE": AUDIENCE}
        database = f"sqlite:///{tmp_path / 'audit.db'}"
        async with (
            audited_gateway(gateway_yaml(backend, rate_limits), database, settings=settings) as gateway,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        ):
            yield Stack(idp, backend, gateway, http)


def statuses(answers: list[Answer]) -> list[int]:
    return [answer.status for answer in answers]


async def test_each_user_has_a_budget_and_the_refusal_is_429_audited_and_counted(tmp_path: Path) -> None:
    alice, bob = people = users(2)
    async with stack(tmp_path, {"per_user": {"requests_per_minute": 1, "burst": 3}}, people) as s:
        before = await s.refused_count()
        answers = [await s.call(alice) for _ in range(3)]
        refused = await s.call(alice, "/ledger", CLAUDE)  # the user's budget, whatever the backend and agent
        assert statuses(answers) == [200, 200, 200]
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "60"  # one a minute: the next token in a minute, rounded up
        assert refused.json == {"error": "rate_limited", "message": refused.json["message"], "agent_id": "claude"}
        assert len(s.backend.requests) == 3  # the refused request never reached the backend
        assert (await s.call(bob)).status == 200  # another user has a budget of their own
        row = await s.gateway.row(refused.request_id)
        assert (row["outcome"], row["status"], row["agent"], row["backend"]) == (
            "rate_limited",
            429,
            "claude",
            "ledger",
        )
        after = await s.refused_count()
        assert after.get(("ledger", "claude"), 0) - before.get(("ledger", "claude"), 0) == 1
        assert after.get(("employees", "cursor"), 0) == before.get(("employees", "cursor"), 0)


async def test_each_agent_has_a_budget_shared_by_its_users(tmp_path: Path) -> None:
    alice, bob = people = users(2)
    async with stack(tmp_path, {"per_agent": {"requests_per_minute": 1, "burst": 2}}, people) as s:
        through_cursor = [await s.call(user) for user in (alice, bob, alice, bob)]
        assert statuses(through_cursor) == [200, 200, 429, 429]
        assert through_cursor[2].json["agent_id"] == "cursor"
        assert (await s.call(alice, client_id=CLAUDE)).status == 200  # another agent: a budget of its own


async def test_each_user_has_a_budget_per_backend_and_a_backend_may_have_its_own(tmp_path: Path) -> None:
    alice, bob = people = users(2)
    rate_limits = {
        "per_user_backend": {"requests_per_minute": 1, "burst": 2},
        "backends": {"ledger": {"requests_per_minute": 7, "burst": 1}},
    }
    async with stack(tmp_path, rate_limits, people) as s:
        assert statuses([await s.call(alice, "/employees") for _ in range(3)]) == [200, 200, 429]
        ledger = [await s.call(alice, "/ledger") for _ in range(2)]  # its own budget, not per_user_backend's
        assert statuses(ledger) == [200, 429]
        assert ledger[1].headers["Retry-After"] == "9"  # 7 a minute: 8.57 s to the next token, rounded up
        assert statuses([await s.call(bob, "/ledger"), await s.call(bob, "/employees")]) == [200, 200]


async def test_a_reload_resizes_the_budgets_without_refilling_them(tmp_path: Path) -> None:
    (alice,) = people = users(1)
    async with stack(tmp_path, {"per_user": {"requests_per_minute": 1, "burst": 2}}, people) as s:
        assert statuses([await s.call(alice) for _ in range(3)]) == [200, 200, 429]
        await s.gateway.reload(gateway_yaml(s.backend, {"per_user": {"requests_per_minute": 1, "burst": 5}}))
        assert (await s.call(alice)).status == 429  # a bigger bucket, as empty as before
        await s.gateway.reload(gateway_yaml(s.backend, None))
        assert (await s.call(alice)).status == 200  # no budget: no limit


async def test_without_an_inbound_identity_no_budget_applies() -> None:
    async with running_backend() as backend, aiohttp.ClientSession() as http:
        config = gateway_yaml(backend, {"per_user_backend": {"requests_per_minute": 1}})
        del config["agents"]
        async with running_gateway(config) as gateway:  # no OKTA_ISSUER: no user, no agent
            answers = [await send(http, gateway.url("/employees"), body=LIST) for _ in range(5)]
    assert statuses(answers) == [200] * 5


# ---------------------------------------------------------------- replicas


@contextlib.asynccontextmanager
async def replicas(redis_url: str, rate_limits: dict[str, Any], people: list[User]) -> AsyncIterator[Replicas]:
    async with (
        OktaEmulator(auth_servers=(AuthorizationServer(GATEWAY_AS, AUDIENCE),), users=people) as idp,
        running_backend() as backend,
        contextlib.AsyncExitStack() as running,
    ):
        settings = {
            "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
            "OKTA_AUDIENCE": AUDIENCE,
            "REDIS_URL": redis_url,
            "SESSION_SECRET": SESSION_SECRET,
        }
        config = gateway_yaml(backend, rate_limits)
        gateways = [await running.enter_async_context(running_gateway(config, settings=settings)) for _ in range(3)]
        http = await running.enter_async_context(aiohttp.ClientSession())
        yield Replicas(idp, backend, gateways, http)


@dataclass
class Replicas:
    idp: OktaEmulator
    backend: RecordingBackend
    gateways: list[RunningGateway]
    http: aiohttp.ClientSession

    async def round_robin(self, user: User, count: int) -> list[int]:
        """`count` requests of `user`, to each gateway in turn."""
        token = self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=CURSOR, scopes=["mcp:read"])
        found = []
        for index in range(count):
            gateway = self.gateways[index % len(self.gateways)]
            answer = await send(self.http, gateway.url("/employees"), token=token, body=LIST)
            found.append(answer.status)
        return found


async def test_replicas_sharing_redis_share_one_budget() -> None:
    (alice,) = people = users(1)
    async with replicas(shared_redis_url(), {"per_user": {"requests_per_minute": 1, "burst": 10}}, people) as r:
        found = await r.round_robin(alice, 30)
    assert found.count(200) == 10 and found.count(429) == 20
    assert found[:10] == [200] * 10  # the first ten, whichever replica served them


async def test_replicas_without_redis_each_keep_their_own_budget() -> None:
    (alice,) = people = users(1)
    unreachable = f"redis://{LOOPBACK}:{free_port()}/0"
    async with replicas(unreachable, {"per_user": {"requests_per_minute": 1, "burst": 2}}, people) as r:
        found = await r.round_robin(alice, 30)
    assert found.count(200) == 6  # two per replica: local limits, not none
    assert set(found[6:]) == {429}
