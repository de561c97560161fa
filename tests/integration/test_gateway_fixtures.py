"""The gateway launchers in `tests/support/gateway.py` that other suites reuse (conformance through the gateway,
benchmarks): each flavour serves a real request end to end, and settings overrides take effect."""

from __future__ import annotations

import http.client
import json

import aiohttp

from tests.integration.conftest import SampleBackends
from tests.integration.sse import MCP_ACCEPT
from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend, running_gateway, threaded_gateway

LIST_TOOLS = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
HEADERS = {"Content-Type": "application/json", "Accept": MCP_ACCEPT, "MCP-Protocol-Version": "2025-11-25"}


def _post(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=LIST_TOOLS, headers={**HEADERS, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_threaded_gateway_serves_sync_callers(sample_backends: SampleBackends) -> None:
    with threaded_gateway(sample_backends.config()) as gw:
        status, body = _post(gw.port, "/employees")
        assert status == 200, body
        assert b"get_employee" in body


def test_gateway_process_takes_settings_from_the_environment(sample_backends: SampleBackends) -> None:
    with gateway_process(sample_backends.config(), settings={"MAX_BODY_BYTES": 16}) as gw:
        status, body = _post(gw.port, "/employees")
        assert status == 413, gw.describe()
        assert json.loads(body)["error"] == "payload_too_large"
        # The default allowed origin is the address actually served.
        status, _ = _post(gw.port, "/nowhere", headers={"Origin": gw.base_url})
        assert status == 404


async def test_running_gateway_applies_settings_overrides() -> None:
    async with (
        running_backend() as backend,
        running_gateway(
            gateway_config(b=psk_backend(backend.url("/mcp"), "/b")),
            settings={"ALLOWED_HOSTS": "gateway.test", "ALLOWED_ORIGINS": "https://app.test"},
        ) as gw,
        aiohttp.ClientSession() as http,
    ):
        headers = {"Host": "gateway.test", "Origin": "https://app.test", "Accept": MCP_ACCEPT}
        async with http.post(gw.url("/b"), data=LIST_TOOLS, headers=headers) as response:
            assert response.status == 200
        async with http.post(gw.url("/b"), data=LIST_TOOLS, headers={"Accept": MCP_ACCEPT}) as response:
            assert response.status == 421  # 127.0.0.1 is no longer an allowed host
