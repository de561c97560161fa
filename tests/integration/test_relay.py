"""What the relay passes back, and how it records it: a client that hangs up once it has its answer was answered
(not a 499); headers a `Connection` header names are hop-by-hop in both directions (RFC 9110 §7.6.1); a backend's
`Location` is rewritten to the gateway's own path for it, or refused (502) when it points anywhere else.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from mcp import Client

from tests.integration.conftest import SampleBackends
from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, psk_backend, running_gateway
from tests.support.stacks import audited_gateway

CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
BOUND = 10.0


async def read_until_answer(response: aiohttp.ClientResponse, request_id: int) -> None:
    """Read SSE events until the JSON-RPC response to `request_id` arrives — then stop, as the SDK client does."""
    async with asyncio.timeout(BOUND):
        while True:
            event = await response.content.readuntil(b"\n\n")
            data = b"\n".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
            if data and json.loads(data).get("id") == request_id:
                return


async def test_a_client_that_hangs_up_once_it_has_its_answer_was_answered(tmp_path: Path) -> None:
    async with (
        running_backend() as backend,
        audited_gateway(
            gateway_config(
                hold=psk_backend(backend.url("/answer-hold"), "/hold"),
                unanswered=psk_backend(backend.url("/hang-sse"), "/unanswered"),
            ),
            f"sqlite:///{tmp_path}/a.db",
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        # The backend sends the answer, then keeps its stream open; the client closes as soon as it has the answer.
        headers = {"X-Request-ID": "answered", "Accept": "application/json, text/event-stream"}
        async with http.post(gateway.url("/hold"), json=CALL, headers=headers) as response:
            assert response.status == 200
            await read_until_answer(response, 7)
            response.close()
        row = await gateway.row("answered")
        assert (row["status"], row["outcome"], row["upstream_status"]) == (200, "ok", 200)
        assert row["bytes_out"] > 0
        # A client that leaves while only a notification has come, before its answer: not answered, 499.
        headers["X-Request-ID"] = "unanswered"
        async with http.post(gateway.url("/unanswered"), json=CALL, headers=headers) as response:
            await response.content.readuntil(b"\n\n")  # a notification, not the answer
            response.close()
        row = await gateway.row("unanswered")
        assert (row["status"], row["outcome"]) == (499, "client_closed")


async def test_sdk_client_calls_are_all_recorded_as_answered(sample_backends: SampleBackends, tmp_path: Path) -> None:
    """The official SDK client closes a POST's SSE stream as soon as the response arrives: none of these delivered
    calls may be recorded as a 499 (before the fix, a few in a hundred were)."""
    async with audited_gateway(sample_backends.config(), f"sqlite:///{tmp_path}/sdk.db") as gateway:
        async with Client(gateway.url("/partners"), mode="legacy") as client:
            for _ in range(60):
                result = await client.call_tool("list_partners", {"tier": "gold"})
                assert not result.is_error
        rows = await gateway.rows()
        calls = [row for row in rows if row["mcp_method"] == "tools/call"]
        assert len(calls) == 60
        assert {(row["status"], row["outcome"]) for row in calls} == {(200, "ok")}


async def test_headers_named_by_connection_are_dropped_both_ways() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(hop=psk_backend(backend.url("/hop-headers"), "/hop"))) as gateway,
        aiohttp.ClientSession() as http,
    ):
        headers = {
            "Connection": "keep-alive, traceparent, Mcp-Name",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "Mcp-Name": "echo",
            "tracestate": "kept=1",
        }
        async with http.post(gateway.url("/hop"), json=CALL, headers=headers) as response:
            assert response.status == 200
            assert "X-Backend-Hop" not in response.headers
            assert response.headers["X-Backend-Kept"] == "kept"
        names = (await backend.last_request()).header_names()
        assert "traceparent" not in names and "mcp-name" not in names
        assert "tracestate" in names


@pytest.mark.parametrize("route", ["/moved-here", "/moved-here/sub"])
async def test_a_redirect_under_the_backend_url_is_rewritten_to_the_gateway(route: str) -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(moved=psk_backend(backend.url("/redirect"), "/moved-here"))) as gateway,
        aiohttp.ClientSession() as http,
        http.post(gateway.url(route), json=CALL, allow_redirects=False) as response,
    ):
        assert response.status == 307
        assert response.headers["Location"] == gateway.url("/moved-here/moved?q=1")


async def test_a_redirect_anywhere_else_is_refused() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(away=psk_backend(backend.url("/redirect-away"), "/away"))) as gateway,
        aiohttp.ClientSession() as http,
        http.post(gateway.url("/away"), json=CALL, allow_redirects=False) as response,
    ):
        assert (response.status, (await response.json())["error"]) == (502, "bad_backend_response")
        assert "Location" not in response.headers
        assert b"internal.example" not in await response.read()
