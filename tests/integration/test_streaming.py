"""Streaming through the gateway: unbuffered SSE, timeouts that bound silence rather than total time, backends
that die mid-stream, clients that go away (the upstream request must be cancelled), and many requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from typing import Any

import aiohttp
import pytest

from okta_agent_proxy.mcp.sessions import NOBODY, SessionSeal, derive_key
from tests.integration.conftest import SampleBackends
from tests.integration.sse import MCP_ACCEPT, SseEvent, iter_sse, read_sse
from tests.support.backends import RecordedRequest, running_backend
from tests.support.gateway import gateway_config, psk_backend, running_gateway

BOUND = 10.0  # seconds: the most any single wait in this module may take
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "streaming-test", "version": "1.0.0"},
}


def _slow_report_call(steps: int, interval_ms: int, *, modern: bool) -> tuple[dict[str, Any], dict[str, str]]:
    meta: dict[str, Any] = {"progressToken": "progress-1", **(MODERN_META if modern else {})}
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "slow_report", "arguments": {"steps": steps, "interval_ms": interval_ms}, "_meta": meta},
    }
    headers = {
        "Accept": MCP_ACCEPT,
        "MCP-Protocol-Version": "2026-07-28" if modern else "2025-11-25",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "slow_report",
    }
    return body, headers


def _progress_and_result(events: list[SseEvent]) -> tuple[list[SseEvent], SseEvent]:
    messages = [(event, event.json()) for event in events if event.data]
    progress = [event for event, message in messages if message.get("method") == "notifications/progress"]
    results = [event for event, message in messages if message.get("id") == 7]
    assert len(results) == 1, [event.data for event in events]
    return progress, results[0]


@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "2026-07-28"])
async def test_progress_events_arrive_as_the_backend_sends_them(sample_backends: SampleBackends, modern: bool) -> None:
    body, headers = _slow_report_call(steps=5, interval_ms=400, modern=modern)
    async with running_gateway(sample_backends.config()) as gw, aiohttp.ClientSession() as http:
        sent = time.monotonic()
        async with asyncio.timeout(BOUND), http.post(gw.url("/employees"), json=body, headers=headers) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            assert response.headers["X-Accel-Buffering"] == "no"
            events = await read_sse(response.content)
    progress, result = _progress_and_result(events)
    assert [event.json()["params"]["progress"] for event in progress] == [1, 2, 3, 4, 5]
    assert result.json()["result"]["content"][0]["text"] == "report ready after 5 steps"
    # Relative, not absolute: had the gateway buffered the stream, every event would arrive together with the
    # result. The first progress event must come in the first half of the call, and the events must be spread.
    total = result.arrived - sent
    assert progress[0].arrived - sent < 0.5 * total, (progress[0].arrived - sent, total)
    assert result.arrived - progress[0].arrived > 0.5 * total
    assert all(a.arrived <= b.arrived for a, b in itertools.pairwise(progress))


async def test_a_talking_stream_outlives_timeout_seconds(sample_backends: SampleBackends) -> None:
    """`timeout_seconds` bounds the wait for the next byte, not the whole response."""
    body, headers = _slow_report_call(steps=5, interval_ms=200, modern=False)
    async with running_gateway(sample_backends.config(timeout_seconds=0.5)) as gw, aiohttp.ClientSession() as http:
        sent = time.monotonic()
        async with asyncio.timeout(BOUND), http.post(gw.url("/employees"), json=body, headers=headers) as response:
            assert response.status == 200
            events = await read_sse(response.content)
    assert all(event.event != "error" for event in events), [event.data for event in events]
    progress, result = _progress_and_result(events)
    assert len(progress) == 5
    assert result.arrived - sent > 0.5  # the stream as a whole lasted longer than timeout_seconds


async def test_idle_get_stream_is_not_cut_but_a_silent_post_times_out() -> None:
    async with running_backend(late_event_after=1.5) as backend:
        config = gateway_config(
            late=psk_backend(backend.url("/late-get"), "/late", timeout_seconds=0.5),
            silent=psk_backend(backend.url("/silent"), "/silent", timeout_seconds=0.5),
        )
        secret = "a-session-secret-for-streaming-tests-0123456789"
        async with running_gateway(config, settings={"SESSION_SECRET": secret}) as gw, aiohttp.ClientSession() as http:
            session = SessionSeal([derive_key(secret)]).seal("late", "s-1", NOBODY)  # a GET stream of session s-1
            get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session}
            async with asyncio.timeout(BOUND), http.get(gw.url("/late"), headers=get_headers) as response:
                assert response.status == 200
                opened = time.monotonic()
                events = await read_sse(response.content)
            assert [(event.event, event.id) for event in events] == [(None, "late-1")]
            assert events[0].json()["method"] == "notifications/late"
            assert events[0].arrived - opened > 2 * 0.5  # it really was idle for longer than timeout_seconds
            assert backend.requests[-1].headers["Mcp-Session-Id"] == "s-1"

            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            async with asyncio.timeout(BOUND), http.post(gw.url("/silent"), json=call) as response:
                assert response.status == 504
                assert (await response.json())["error"] == "backend_timeout"
            record = backend.requests[-1]
            await record.wait_finished(BOUND)
            assert record.peer_closed  # the gateway gave up on the upstream request and closed it


async def test_backend_dying_mid_sse_ends_the_stream_with_an_error_event() -> None:
    async with running_backend() as backend:
        config = gateway_config(dying=psk_backend(backend.url("/die-sse"), "/dying"))
        async with running_gateway(config) as gw, aiohttp.ClientSession() as http:
            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
            async with asyncio.timeout(BOUND), http.post(gw.url("/dying"), json=call) as response:
                assert response.status == 200
                events = await read_sse(response.content)  # ends: the gateway closed the stream
            # The gateway keeps serving.
            async with http.post(gw.url("/dying"), json=call) as again:
                assert again.status == 200
                await again.read()
    assert [event.id for event in events[:-1]] == ["1"]  # what the backend sent before it died
    error = events[-1]
    assert error.event == "error"
    assert error.json()["error"] == "backend_unavailable"
    assert "jsonrpc" not in error.json()  # never a made-up JSON-RPC message


async def test_a_post_stream_silent_for_longer_than_its_idle_timeout_ends_with_an_error_event() -> None:
    async with (
        running_backend() as backend,
        running_gateway(
            gateway_config(stall=psk_backend(backend.url("/hang-sse"), "/stall", stream_idle_timeout_seconds=0.5))
        ) as gw,
        aiohttp.ClientSession() as http,
    ):
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
        async with asyncio.timeout(BOUND), http.post(gw.url("/stall"), json=call) as response:
            assert response.status == 200
            events = await read_sse(response.content)
        record = await backend.last_request()
        await record.wait_finished(BOUND)
        assert record.peer_closed  # the gateway dropped the stalled upstream request
    assert [event.id for event in events[:-1]] == ["1"]
    assert events[-1].event == "error"
    assert events[-1].json()["error"] in {"backend_timeout", "backend_unavailable"}


async def test_a_mid_stream_timeout_is_reported_as_backend_timeout() -> None:
    async with (
        running_backend() as backend,
        running_gateway(
            gateway_config(stall=psk_backend(backend.url("/hang-sse"), "/stall", stream_idle_timeout_seconds=0.3))
        ) as gw,
        aiohttp.ClientSession() as http,
    ):
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
        async with asyncio.timeout(BOUND), http.post(gw.url("/stall"), json=call) as response:
            events = await read_sse(response.content)
    assert events[-1].json()["error"] == "backend_timeout"


async def test_a_json_body_stalled_for_longer_than_timeout_seconds_is_aborted() -> None:
    async with (
        running_backend() as backend,
        running_gateway(
            gateway_config(stall=psk_backend(backend.url("/hang-json"), "/stall", timeout_seconds=0.5))
        ) as gw,
        aiohttp.ClientSession() as http,
    ):
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        async with asyncio.timeout(BOUND), http.post(gw.url("/stall"), json=call) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        record = await backend.last_request()
        await record.wait_finished(BOUND)
        assert record.peer_closed


@pytest.mark.parametrize("behaviour", ["die-json", "die-chunked"])
async def test_backend_dying_mid_json_aborts_the_response(behaviour: str) -> None:
    """A JSON body cut short must not look complete to the client."""
    async with running_backend() as backend:
        config = gateway_config(dying=psk_backend(backend.url(f"/{behaviour}"), "/dying"))
        async with running_gateway(config) as gw, aiohttp.ClientSession() as http:
            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            async with asyncio.timeout(BOUND), http.post(gw.url("/dying"), json=call) as response:
                assert response.status == 200
                if behaviour == "die-json":
                    assert response.content_length is not None
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            async with http.get(gw.url("/healthz")) as health:
                assert health.status == 200


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_client_disconnect_mid_stream_cancels_the_upstream_request(method: str) -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(hang=psk_backend(backend.url("/hang-sse"), "/hang"))) as gw,
        aiohttp.ClientSession() as http,
    ):
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
        body = json.dumps(call) if method == "POST" else None
        headers = {"Accept": MCP_ACCEPT, "Content-Type": "application/json"}
        async with asyncio.timeout(BOUND):
            response = await http.request(method, gw.url("/hang"), data=body, headers=headers)
            async with contextlib.aclosing(iter_sse(response.content)) as events:
                first = await anext(events)
        assert first.id == "1"
        record = await backend.last_request()
        assert not record.finished.is_set()  # the backend is still streaming
        response.close()  # the client goes away mid-stream
        await record.wait_finished(BOUND)  # within the gateway's lifetime: the gateway must cancel it itself
        assert record.peer_closed


async def test_client_disconnect_before_the_answer_cancels_the_upstream_request() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(silent=psk_backend(backend.url("/silent"), "/silent"))) as gw,
        aiohttp.ClientSession() as http,
    ):
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        request = asyncio.create_task(http.post(gw.url("/silent"), json=call))
        record = await backend.last_request(BOUND)
        request.cancel()  # the client gives up while the backend is still thinking
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await record.wait_finished(BOUND)
        assert record.peer_closed


async def test_200_concurrent_requests_with_a_slow_backend_none_lost_none_mixed_up() -> None:
    count = 200
    async with running_backend(delay=0.5) as backend:
        config = gateway_config(
            slow=psk_backend(backend.url("/slow"), "/slow"),
            slow_sse=psk_backend(backend.url("/slow-sse"), "/slow-sse"),
        )
        async with (
            running_gateway(config) as gw,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):

            async def one(n: int) -> tuple[dict[str, Any], dict[str, Any]]:
                route = "/slow-sse" if n % 2 else "/slow"
                params = {"n": n, "nonce": uuid.uuid4().hex}
                call = {"jsonrpc": "2.0", "id": f"req-{n}", "method": "test/echo", "params": params}
                async with http.post(gw.url(route), json=call, headers={"Accept": MCP_ACCEPT}) as response:
                    assert response.status == 200, await response.text()
                    if route == "/slow-sse":
                        (event,) = await read_sse(response.content)
                        answer: dict[str, Any] = event.json()
                    else:
                        answer = await response.json()
                return call, answer

            async with asyncio.timeout(30):
                results = await asyncio.gather(*(one(n) for n in range(count)))

    for call, answer in results:
        assert answer["id"] == call["id"]
        assert answer["result"]["params"] == call["params"]
        assert answer["result"]["method"] == "test/echo"
    assert len(backend.requests) == count
    assert sorted(request.json["id"] for request in backend.requests) == sorted(f"req-{n}" for n in range(count))
    # They really overlapped (the backend held many at once), so a mix-up had every chance to happen.
    assert _max_in_flight(backend.requests) >= count // 4


def _max_in_flight(requests: list[RecordedRequest]) -> int:
    edges = sorted(
        [(request.received_at, 1) for request in requests]
        + [(request.finished_at or request.received_at, -1) for request in requests]
    )
    return max(itertools.accumulate(step for _, step in edges))
