"""Every error the gateway produces itself, exactly as DESIGN.md §1's table says: status, `error` code and body
shape `{"error", "message", "agent_id"}` (malformed JSON: a JSON-RPC -32700 body with `id: null`). After each one
the same gateway, on the same client connection pool, still serves a normal request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.integration.sse import MCP_ACCEPT
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import RunningGateway, gateway_config, psk_backend, running_gateway
from tests.support.processes import free_port

MAX_BODY = 1024
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@dataclass
class Env:
    backend: RecordingBackend
    gateway: RunningGateway
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return self.gateway.url(path)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with running_backend() as backend:
        config = gateway_config(
            ok=psk_backend(backend.url("/mcp"), "/ok"),
            off=psk_backend(backend.url("/mcp"), "/off", enabled=False),
            down=psk_backend(f"http://127.0.0.1:{free_port()}/mcp", "/down", timeout_seconds=2),
            silent=psk_backend(backend.url("/silent"), "/silent", timeout_seconds=0.3),
            reject=psk_backend(backend.url("/unauthorized"), "/reject"),
        )
        async with (
            running_gateway(config, settings={"MAX_BODY_BYTES": MAX_BODY}) as gateway,
            aiohttp.ClientSession() as http,
        ):
            yield Env(backend, gateway, http)


def _assert_gateway_error(response: aiohttp.ClientResponse, body: bytes, status: int, code: str) -> None:
    assert response.status == status, body
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-ID")
    assert "WWW-Authenticate" not in response.headers
    document = json.loads(body)
    assert set(document) == {"error", "message", "agent_id"}, document
    assert document["error"] == code
    assert isinstance(document["message"], str)
    assert document["message"]
    assert document["agent_id"] is None


async def _still_serves(env: Env) -> None:
    async with env.http.post(env.url("/ok"), json=PING, headers={"Accept": MCP_ACCEPT}) as response:
        assert response.status == 200
        assert await response.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def _post(env: Env, path: str, method: str = "POST", **kwargs: Any) -> tuple[aiohttp.ClientResponse, bytes]:
    kwargs.setdefault("json", PING)
    async with env.http.request(method, env.url(path), **kwargs) as response:
        return response, await response.read()


async def _chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b" " * size


Case = Callable[[Env], Awaitable[tuple[aiohttp.ClientResponse, bytes]]]
CASES: dict[str, tuple[Case, int, str, bool]] = {
    # name: (request, status, error code, whether the backend may have been reached)
    "unknown path": (lambda env: _post(env, "/nowhere/mcp"), 404, "not_found", False),
    "root path": (lambda env: _post(env, "/"), 404, "not_found", False),
    "disabled backend": (lambda env: _post(env, "/off"), 404, "not_found", False),
    "bad host": (lambda env: _post(env, "/ok", headers={"Host": "evil.example"}), 421, "misdirected_request", False),
    "bad host with port": (
        lambda env: _post(env, "/ok", headers={"Host": "evil.example:80"}),
        421,
        "misdirected_request",
        False,
    ),
    "bad origin": (
        lambda env: _post(env, "/ok", headers={"Origin": "http://evil.example"}),
        403,
        "forbidden_origin",
        False,
    ),
    "declared body too large": (
        lambda env: _post(env, "/ok", json=None, data=b"[" + b" " * (MAX_BODY + 10) + b"]"),
        413,
        "payload_too_large",
        False,
    ),
    "chunked body too large": (
        lambda env: _post(env, "/ok", json=None, data=_chunks(8 * MAX_BODY)),
        413,
        "payload_too_large",
        False,
    ),
    "backend unreachable": (lambda env: _post(env, "/down"), 502, "backend_unavailable", False),
    "backend timeout": (lambda env: _post(env, "/silent"), 504, "backend_timeout", True),
    "backend 401": (lambda env: _post(env, "/reject"), 502, "backend_rejected_credential", True),
    "method not allowed": (lambda env: _post(env, "/ok", "PUT"), 405, "method_not_allowed", False),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_gateway_error(env: Env, name: str) -> None:
    make_request, status, code, may_reach_backend = CASES[name]
    response, body = await make_request(env)
    _assert_gateway_error(response, body, status, code)
    if not may_reach_backend:
        assert env.backend.requests == []
    await _still_serves(env)


async def test_method_not_allowed_advertises_the_allowed_methods(env: Env) -> None:
    async with env.http.request("PUT", env.url("/ok"), json=PING) as response:
        assert response.status == 405
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST", "DELETE"}


async def test_backend_401_challenge_and_cookie_are_not_relayed(env: Env) -> None:
    async with env.http.post(env.url("/reject"), json=PING) as response:
        assert response.status == 502
        assert "WWW-Authenticate" not in response.headers
        assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b'{"jsonrpc": "2.0", "id": 1, "method": "ping"', b"\xff\xfe{}"],
    ids=["garbage", "empty", "truncated", "not-utf8"],
)
async def test_malformed_json_is_a_json_rpc_parse_error(env: Env, body: bytes) -> None:
    headers = {"Content-Type": "application/json", "Accept": MCP_ACCEPT}
    async with env.http.post(env.url("/ok"), data=body, headers=headers) as response:
        assert response.status == 400
        assert response.content_type == "application/json"
        document = await response.json()
    assert document["jsonrpc"] == "2.0"
    assert document["id"] is None
    assert document["error"]["code"] == -32700
    assert isinstance(document["error"]["message"], str)
    assert set(document) == {"jsonrpc", "id", "error"}
    assert env.backend.requests == []
    await _still_serves(env)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:1234", "LOCALHOST"])
async def test_allowed_hosts_and_the_gateways_own_origin_pass(env: Env, host: str) -> None:
    headers = {"Host": host, "Origin": env.gateway.base_url, "Accept": MCP_ACCEPT}
    async with env.http.post(env.url("/ok"), json=PING, headers=headers) as response:
        assert response.status == 200
    assert env.backend.requests[-1].headers["Host"] == f"127.0.0.1:{env.backend.port}"
