"""`@modelcontextprotocol/server-everything` (the reference stateful server, Node) through the gateway: a legacy
session (`Mcp-Session-Id` round trip), the standalone GET stream, a POST stream resumed with `Last-Event-ID`
after the client dropped it, and DELETE ending the session. Raw HTTP, so every header and status is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.integration.sse import MCP_ACCEPT, SseEvent, iter_sse, read_sse
from tests.support.gateway import gateway_config, psk_backend, running_gateway
from tests.support.node_tools import server_everything
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.node

VERSION = "2025-11-25"
BOUND = 10.0


@pytest.fixture(scope="module")
def everything() -> Iterator[ServerProcess]:
    with server_everything() as server:
        yield server


@dataclass
class Session:
    url: str
    http: aiohttp.ClientSession
    session_id: str = ""
    next_id: int = 1

    def headers(self, accept: str = MCP_ACCEPT) -> dict[str, str]:
        headers = {"Accept": accept, "MCP-Protocol-Version": VERSION}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        return {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request; return its JSON-RPC response (from a JSON body or the SSE stream)."""
        message = self.request(method, params)
        async with asyncio.timeout(BOUND), self.http.post(self.url, json=message, headers=self.headers()) as response:
            assert response.status == 200, await response.text()
            if response.content_type == "text/event-stream":
                assert response.headers["X-Accel-Buffering"] == "no"
                answers = [event.json() for event in await read_sse(response.content) if event.data]
            else:
                answers = [await response.json()]
        (answer,) = [a for a in answers if a.get("id") == message["id"]]
        assert "result" in answer, answer
        result: dict[str, Any] = answer["result"]
        return result


@pytest.fixture
async def session(everything: ServerProcess) -> AsyncIterator[Session]:
    async with (
        running_gateway(gateway_config(everything=psk_backend(everything.url("/mcp"), "/everything"))) as gw,
        aiohttp.ClientSession() as http,
    ):
        yield Session(gw.url("/everything"), http)


async def _initialize(session: Session) -> None:
    params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "gateway-test", "version": "1"}}
    message = session.request("initialize", params)
    async with session.http.post(session.url, json=message, headers=session.headers()) as response:
        assert response.status == 200
        session.session_id = response.headers["Mcp-Session-Id"]
        events = await read_sse(response.content)
    (result,) = [event.json()["result"] for event in events if event.data]
    assert result["serverInfo"]["name"] == "mcp-servers/everything"
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with session.http.post(session.url, json=note, headers=session.headers()) as response:
        assert response.status == 202


async def test_session_round_trip_and_delete(session: Session) -> None:
    async with session.http.post(session.url, json=session.request("tools/list"), headers=session.headers()) as r:
        assert r.status == 400  # no session yet: the backend's own answer, relayed
    await _initialize(session)
    assert session.session_id

    tools = await session.call("tools/list")
    assert {"echo", "trigger-long-running-operation"} <= {tool["name"] for tool in tools["tools"]}
    echoed = await session.call("tools/call", {"name": "echo", "arguments": {"message": "through the gateway"}})
    assert "through the gateway" in echoed["content"][0]["text"]

    async with session.http.delete(session.url, headers=session.headers()) as response:
        assert response.status == 200
    async with session.http.post(session.url, json=session.request("tools/list"), headers=session.headers()) as r:
        assert r.status in (400, 404)  # the session is gone (server-everything says 400 for unknown sessions)


async def test_get_stream_carries_server_initiated_messages(session: Session) -> None:
    await _initialize(session)
    async with session.http.get(session.url, headers=session.headers("text/event-stream")) as stream:
        assert stream.status == 200
        assert stream.content_type == "text/event-stream"
        assert stream.headers["X-Accel-Buffering"] == "no"
        # The tool starts a log feed for this session that is not tied to any request: it goes on the GET stream.
        await session.call("tools/call", {"name": "toggle-simulated-logging", "arguments": {}})
        async with asyncio.timeout(BOUND), contextlib.aclosing(iter_sse(stream.content)) as events:
            async for event in events:
                if event.data and event.json().get("method") == "notifications/message":
                    break
        await session.call("tools/call", {"name": "toggle-simulated-logging", "arguments": {}})


async def test_dropped_post_stream_resumes_with_last_event_id(session: Session) -> None:
    await _initialize(session)
    call = session.request(
        "tools/call",
        {
            "name": "trigger-long-running-operation",
            "arguments": {"duration": 0.6, "steps": 3},
            "_meta": {"progressToken": "resume-test"},
        },
    )
    seen: list[SseEvent] = []
    async with asyncio.timeout(BOUND), session.http.post(session.url, json=call, headers=session.headers()) as r:
        assert r.status == 200
        async with contextlib.aclosing(iter_sse(r.content)) as events:
            async for event in events:
                seen.append(event)
                if event.data and event.json().get("method") == "notifications/progress":
                    break
        # Leaving the block drops the connection mid-stream, before the result.
    last_event_id = seen[-1].id
    assert last_event_id, "the backend's event ids must pass through"

    # Resume. The backend replays what it stored after `last_event_id`; the operation may still be running,
    # and server-everything's example store only replays what is stored, so poll until the result is there.
    resumed: list[SseEvent] = []
    headers = {**session.headers("text/event-stream"), "Last-Event-ID": last_event_id}
    deadline = time.monotonic() + BOUND
    while not resumed and time.monotonic() < deadline:
        async with session.http.get(session.url, headers=headers) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5), contextlib.aclosing(iter_sse(response.content)) as events:
                    batch: list[SseEvent] = []
                    async for event in events:
                        batch.append(event)
                        if event.data and event.json().get("id") == call["id"]:
                            resumed = batch
                            break
    assert resumed, "the resumed stream never delivered the result"
    result = resumed[-1].json()["result"]
    assert "Long running operation completed" in result["content"][0]["text"]
    assert all(event.id for event in resumed)  # replayed events keep their ids
    assert last_event_id not in {event.id for event in resumed}  # nothing before the resume point is repeated
    progress = [event.json()["params"]["progress"] for event in resumed if event.json().get("method")]
    assert progress == sorted(progress)
    assert 1 not in progress  # the first progress event was delivered before the drop
