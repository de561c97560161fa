"""Streams cannot starve calls (DESIGN.md §9, "Timeouts and streams"): open SSE streams are capped per (user, agent)
and per backend (429 `rate_limited`, `Retry-After: 5`), GET streams have connections of their own, and every wait on
a backend — for a connection, its headers, or the next bytes of a stream — is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, OktaEmulator, User
from tests.integration.sse import read_sse
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import RunningGateway, psk_backend, running_gateway

AS_ID = "aus-gateway"
AUDIENCE = "api://stream-tests"
ALICE, BOB, CAROL = User("alice@example.com", "00ualice"), User("bob@example.com"), User("carol@example.com")
CURSOR = "0oa_cursor_app"
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
STREAM = {"Accept": "text/event-stream"}
BOUND = 10.0


@dataclass
class Stack:
    idp: OktaEmulator
    backend: RecordingBackend
    gateway: RunningGateway
    http: aiohttp.ClientSession

    def auth(self, user: User = ALICE) -> dict[str, str]:
        token = self.idp.mint_access_token(AS_ID, user=user, client_id=CURSOR, scopes=["mcp:read"])
        return {"Authorization": f"Bearer {token}"}

    async def open_stream(self, user: User = ALICE, path: str = "/streams") -> aiohttp.ClientResponse:
        response = await self.http.get(self.gateway.url(path), headers={**STREAM, **self.auth(user)})
        if response.status == 200:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            await response.content.readuntil(b"\n\n")  # the first event: the stream is open end to end
        return response

    async def call(self, user: User = ALICE, path: str = "/calls") -> tuple[int, float]:
        started = time.monotonic()
        headers = {"Content-Type": "application/json", **self.auth(user)}
        async with self.http.post(self.gateway.url(path), data=LIST, headers=headers) as response:
            await response.read()
            return response.status, time.monotonic() - started


@contextlib.asynccontextmanager
async def stack(streams: dict[str, int] | None = None, **backend: Any) -> AsyncIterator[Stack]:
    async with (
        OktaEmulator(auth_servers=(AuthorizationServer(AS_ID, AUDIENCE),), users=(ALICE, BOB, CAROL)) as idp,
        running_backend() as recording,
    ):
        # One backend, two routes: GET streams that stay open (hang-sse) and ordinary calls.
        streams_url, calls_url = recording.url("/hang-sse"), recording.url("/mcp")
        config: dict[str, Any] = {
            "backends": {
                "hanging": psk_backend(streams_url, "/streams", **backend),
                "calls": psk_backend(calls_url, "/calls", **backend),
            },
            "agents": {"cursor": {"client_id": CURSOR, "backend_access": ["hanging", "calls"]}},
        }
        if streams is not None:
            config["rate_limits"] = {"streams": streams}
        settings = {"OKTA_ISSUER": idp.issuer(AS_ID), "OKTA_AUDIENCE": AUDIENCE}
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            running_gateway(config, settings=settings) as gateway,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            yield Stack(idp, recording, gateway, http)


async def test_streams_over_the_per_user_cap_get_429_and_calls_still_answer() -> None:
    async with stack({"per_user_agent": 3, "per_backend": 5}) as s:
        alice = [await s.open_stream(ALICE) for _ in range(3)]
        assert [r.status for r in alice] == [200, 200, 200]
        refused = await s.open_stream(ALICE)
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "5"
        assert (await refused.json())["error"] == "rate_limited"
        # The backend never saw the refused one.
        assert len([r for r in s.backend.requests if r.method == "GET"]) == 3
        # Another user has room of their own, until the backend's cap.
        bob = [await s.open_stream(BOB) for _ in range(2)]
        assert [r.status for r in bob] == [200, 200]
        carol = await s.open_stream(CAROL)
        assert carol.status == 429  # 5 open to this backend
        carol.close()
        # Calls are never refused for streams, and answer at once.
        status, seconds = await s.call(ALICE)
        assert status == 200 and seconds < 1.0
        # A closed stream frees its place (the gateway notices the client left).
        alice[0].close()
        deadline = time.monotonic() + BOUND
        while (again := await s.open_stream(CAROL)).status != 200:
            again.close()
            assert time.monotonic() < deadline, "the closed stream's place was never freed"
            await asyncio.sleep(0.05)
        for response in [*alice[1:], *bob, again]:
            response.close()


async def test_the_default_caps_apply_without_a_rate_limits_section() -> None:
    async with stack() as s:
        opened = await asyncio.gather(*(s.open_stream(ALICE) for _ in range(100)))
        assert {r.status for r in opened} == {200}
        refused, bob = await s.open_stream(ALICE), await s.open_stream(BOB)
        assert (refused.status, bob.status) == (429, 200)  # per_user_agent: 100; another user has room
        for response in [*opened, refused, bob]:
            response.close()


@pytest.mark.slow
async def test_a_thousand_open_get_streams_do_not_delay_a_call() -> None:
    """The reported attack: 1,100 GET streams from one token filled the shared pool (1,024 connections) and a plain
    POST then never answered. Streams have a pool of their own now."""
    async with stack({"per_user_agent": 2000, "per_backend": 2000}) as s:
        opened = await asyncio.gather(*(s.open_stream(ALICE) for _ in range(1100)))
        assert {r.status for r in opened} == {200}
        async with asyncio.timeout(BOUND):
            status, seconds = await s.call(ALICE)
        assert status == 200 and seconds < 2.0
        for response in opened:
            response.close()


async def test_a_get_stream_silent_for_longer_than_its_idle_timeout_ends_with_an_error_event() -> None:
    async with stack(stream_idle_timeout_seconds=0.5) as s:
        headers = {**STREAM, **s.auth()}
        async with asyncio.timeout(BOUND), s.http.get(s.gateway.url("/streams"), headers=headers) as response:
            assert response.status == 200
            events = await read_sse(response.content)
        assert events[-1].event == "error" and events[-1].json()["error"] == "backend_timeout"
        record = await s.backend.last_request()
        await record.wait_finished(BOUND)
        assert record.peer_closed


async def test_a_post_stream_may_pause_longer_than_timeout_seconds_within_its_idle_timeout() -> None:
    async with (
        running_backend(delay=1.0) as backend,
        running_gateway(
            {
                "backends": {
                    "gappy": psk_backend(
                        backend.url("/gap-sse"), "/gappy", timeout_seconds=0.4, stream_idle_timeout_seconds=5
                    )
                }
            }
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        async with asyncio.timeout(BOUND), http.post(gateway.url("/gappy"), data=LIST) as response:
            events = await read_sse(response.content)
        assert [event.id for event in events] == ["1", "2"]
        assert events[-1].json()["id"] == 1


async def test_timeout_seconds_bounds_the_wait_for_headers_of_get_and_post_alike() -> None:
    async with (
        running_backend() as backend,
        running_gateway(
            {"backends": {"silent": psk_backend(backend.url("/silent"), "/silent", timeout_seconds=0.5)}}
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        for method in ("GET", "POST", "DELETE"):
            started = time.monotonic()
            async with asyncio.timeout(BOUND), http.request(method, gateway.url("/silent"), data=LIST) as response:
                assert (response.status, (await response.json())["error"]) == (504, "backend_timeout"), method
            assert time.monotonic() - started < 2.0


async def test_a_post_answered_as_a_stream_counts_but_is_never_refused() -> None:
    async with stack({"per_user_agent": 2, "per_backend": 10}) as s:
        headers = {"Content-Type": "application/json", **STREAM, **s.auth()}
        posts = []
        for _ in range(3):  # over the cap: a POST's stream is counted, never cut (the backend already works on it)
            response = await s.http.post(s.gateway.url("/streams"), data=LIST, headers=headers)
            assert response.status == 200
            await response.content.readuntil(b"\n\n")
            posts.append(response)
        refused = await s.open_stream(ALICE)
        assert refused.status == 429  # the POST streams took the caller's places
        refused.close()
        for response in posts:
            response.close()
        deadline = time.monotonic() + BOUND
        while (opened := await s.open_stream(ALICE)).status != 200:
            opened.close()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        opened.close()


async def test_timeout_seconds_bounds_the_whole_wait_for_headers_even_when_they_trickle() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def trickling_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # one header byte every 0.3 s: never a gap of timeout_seconds
                await asyncio.sleep(0.3)
                writer.write(b"a")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(trickling_backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            running_gateway(
                {"backends": {"trickle": psk_backend(f"http://127.0.0.1:{port}/mcp", "/trickle", timeout_seconds=1)}}
            ) as gateway,
            aiohttp.ClientSession() as http,
        ):
            started = time.monotonic()
            async with asyncio.timeout(BOUND), http.post(gateway.url("/trickle"), data=LIST) as response:
                assert (response.status, (await response.json())["error"]) == (504, "backend_timeout")
            assert time.monotonic() - started < 2.0
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
