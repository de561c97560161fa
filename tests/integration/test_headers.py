"""No passthrough (DESIGN.md §2): request headers reach a backend by allow-list only, the backend's credential is
the gateway's, and `Host` is the backend's own. Checked on the wire, on a backend that records every request.
"""

from __future__ import annotations

import base64

import aiohttp
import pytest

from okta_agent_proxy.mcp.sessions import NOBODY, PREFIX, SessionSeal, derive_key
from tests.integration.sse import MCP_ACCEPT
from tests.support.backends import BACKEND_SESSION_ID, RecordedRequest, RecordingBackend, running_backend
from tests.support.gateway import DEFAULT_KEY, basic_backend, gateway_config, psk_backend, running_gateway

# What a hostile or careless client sends that must never reach a backend.
NEVER_FORWARDED = {
    "Authorization": "Bearer caller-access-token",
    "Cookie": "session=caller-cookie",
    "Proxy-Authorization": "Basic Y2FsbGVyOnNlY3JldA==",
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "Forwarded": "for=203.0.113.7",
    "X-Real-IP": "203.0.113.7",
    "X-Unknown-Header": "surprise",
    "X-Other": "not in forward_headers",
}
# The allow-list (DESIGN.md §2), each with a value the backend must see unchanged.
FORWARDED = {
    "Content-Type": "application/json",
    "Accept": MCP_ACCEPT,
    "Accept-Language": "de-CH",
    "User-Agent": "header-test/1.0",
    "Mcp-Session-Id": "client-session-42",
    "MCP-Protocol-Version": "2025-11-25",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "echo",
    "Mcp-Param-Foo": "bar",
    "Last-Event-ID": "event-17",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=value",
    "X-Request-ID": "client-request-id-1",
    "X-Custom": "declared in forward_headers",
}
CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}'
SESSION_SECRET = "a-session-secret-for-the-header-tests-0123456789"
SETTINGS = {"SESSION_SECRET": SESSION_SECRET}


def sealed(backend_id: str, backend: str = "psk") -> str:
    """The id a client holds for `backend_id` (no issuer in these tests: sealed to the backend alone)."""
    return SessionSeal([derive_key(SESSION_SECRET)]).seal(backend, backend_id, NOBODY)


async def _send(backend: RecordingBackend, url: str, method: str) -> tuple[aiohttp.ClientResponse, RecordedRequest]:
    before = len(backend.requests)
    async with aiohttp.ClientSession() as http:
        # The client holds the sealed form of the session id; the backend must see its own.
        headers = {**NEVER_FORWARDED, **FORWARDED, "Mcp-Session-Id": sealed(FORWARDED["Mcp-Session-Id"])}
        async with http.request(method, url, data=CALL if method == "POST" else None, headers=headers) as response:
            await response.read()
    return response, (await backend.wait_for_requests(before + 1))[-1]


def _assert_allow_list(record: RecordedRequest, backend: RecordingBackend) -> None:
    names = record.header_names()
    for name in NEVER_FORWARDED:
        assert name.lower() not in names, f"{name} reached the backend"
    assert "origin" not in names
    for name, value in FORWARDED.items():
        if name == "Content-Type" and record.method != "POST":
            continue
        assert record.headers.getall(name) == [value], name
    assert record.headers.getall("Host") == [f"127.0.0.1:{backend.port}"]


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
async def test_pre_shared_key_backend_sees_only_allowed_headers(method: str) -> None:
    async with running_backend() as backend:
        config = gateway_config(psk=psk_backend(backend.url("/mcp"), "/psk", forward_headers=["X-Custom"]))
        async with running_gateway(config, settings=SETTINGS) as gw:
            response, record = await _send(backend, gw.url("/psk"), method)
    assert response.status == (405 if method == "GET" else 200)  # the backend's own answers, relayed
    _assert_allow_list(record, backend)
    assert record.headers.getall("X-API-Key") == [DEFAULT_KEY]
    assert response.headers["X-Request-ID"] == "client-request-id-1"
    if method == "POST":
        assert record.body == CALL  # the request body is forwarded byte for byte


async def test_custom_header_name_and_service_account_credentials() -> None:
    async with running_backend() as backend:
        config = gateway_config(
            psk=psk_backend(backend.url("/mcp"), "/psk", key="k-2", header_name="X-Backend-Key"),
            basic=basic_backend(backend.url("/mcp"), "/basic", username="svc", password="pa ss"),
        )
        async with running_gateway(config, settings=SETTINGS) as gw:
            _, psk_record = await _send(backend, gw.url("/psk"), "POST")
            headers = {"Content-Type": "application/json", "Accept": MCP_ACCEPT}
            async with aiohttp.ClientSession() as http, http.post(gw.url("/basic"), data=CALL, headers=headers):
                pass
            basic_record = backend.requests[-1]
    assert psk_record.headers.getall("X-Backend-Key") == ["k-2"]
    assert "x-api-key" not in psk_record.header_names()
    assert "x-custom" not in psk_record.header_names()  # not declared for this backend
    assert basic_record.headers.getall("Authorization") == ["Basic " + base64.b64encode(b"svc:pa ss").decode()]


async def test_session_ids_are_sealed_for_the_client_and_opened_for_the_backend() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(psk=psk_backend(backend.url("/mcp"), "/psk"))) as gw,
        aiohttp.ClientSession() as http,
    ):
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}
        async with http.post(gw.url("/psk"), json=init, headers={"Accept": MCP_ACCEPT}) as response:
            assert response.status == 200
            session = response.headers["Mcp-Session-Id"]
            assert session.startswith(PREFIX) and BACKEND_SESSION_ID not in session
            assert response.headers.getall("Mcp-Session-Id") == [session]  # the raw id never reaches the client
            assert (await response.json())["result"]["serverInfo"]["name"] == "recording-backend"
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        headers = {"Accept": MCP_ACCEPT, "Mcp-Session-Id": session}
        async with http.post(gw.url("/psk"), json=note, headers=headers) as response:
            assert response.status == 202
            assert await response.read() == b""
        assert backend.requests[-1].headers["Mcp-Session-Id"] == BACKEND_SESSION_ID
        # The backend names the same session again: the client gets back the id it sent, not a new seal.
        async with http.post(gw.url("/psk"), json=init, headers=headers) as response:
            assert response.headers["Mcp-Session-Id"] == session
        # The id a client could forge or replay from another route does not reach the backend.
        count = len(backend.requests)
        for forged in (BACKEND_SESSION_ID, session[:-4], sealed(BACKEND_SESSION_ID, backend="other")):
            async with http.post(gw.url("/psk"), json=note, headers={**headers, "Mcp-Session-Id": forged}) as bad:
                assert bad.status == 404 and (await bad.json())["error"] == "session_not_found"
        assert len(backend.requests) == count


async def test_a_stateless_era_request_has_its_session_header_dropped() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(psk=psk_backend(backend.url("/mcp"), "/psk"))) as gw,
        aiohttp.ClientSession() as http,
    ):
        meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": meta}}
        headers = {"Accept": MCP_ACCEPT, "Mcp-Session-Id": "anything-at-all", "MCP-Protocol-Version": "2026-07-28"}
        async with http.post(gw.url("/psk"), json=call, headers=headers) as response:
            assert response.status == 200
    assert "mcp-session-id" not in backend.requests[-1].header_names()
