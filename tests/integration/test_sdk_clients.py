"""The official `mcp` SDK client through the gateway (`okta-agent-proxy serve`, a real subprocess) to the devkit's
real SDK backends, in both protocol generations (PROTOCOL.md §4): legacy (initialize, sessions on the stateful
backend) and 2026-07-28 (no initialize, `_meta` on every request, `Mcp-Method`/`Mcp-Name` headers the backend
checks against the body). `auto` probes `server/discover`; against a legacy-only backend the gateway must pass the
backend's 404 through unchanged so the client falls back to `initialize`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent, TextResourceContents

from tests.integration.conftest import SampleBackends
from tests.integration.sse import MCP_ACCEPT
from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend, running_gateway
from tests.support.processes import ServerProcess

MODERN = "2026-07-28"
LEGACY_VERSIONS = {"2025-03-26", "2025-06-18", "2025-11-25"}


@pytest.fixture(scope="module")
def gateway(sample_backends: SampleBackends) -> Iterator[ServerProcess]:
    with gateway_process(sample_backends.config()) as server:
        yield server


def _text(content: object) -> str:
    assert isinstance(content, TextContent), content
    return content.text


@pytest.mark.parametrize("mode", ["legacy", MODERN, "auto"])
async def test_employees_stateless_pre_shared_key(gateway: ServerProcess, mode: str) -> None:
    async with Client(gateway.url("/employees"), mode=mode) as client:
        if mode == "legacy":
            assert client.protocol_version in LEGACY_VERSIONS
        else:  # the SDK backend speaks 2026-07-28, so `auto` settles on it after server/discover
            assert client.protocol_version == MODERN

        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} >= {"list_employees", "get_employee", "slow_report"}

        result = await client.call_tool("get_employee", {"employee_id": "E002"})
        assert not result.is_error
        assert result.structured_content is not None
        assert result.structured_content["name"] == "Grace Hopper"

        failed = await client.call_tool("get_employee", {"employee_id": "E999"})
        assert failed.is_error  # a tool error is the backend's answer, relayed as such

        resource = await client.read_resource("employees://directory")
        (contents,) = resource.contents
        assert isinstance(contents, TextResourceContents)
        assert "E001: Ada Lovelace" in contents.text

        prompt = await client.get_prompt("introduce", {"employee_id": "E003"})
        assert "E003" in _text(prompt.messages[0].content)


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_partners_stateful_service_account(gateway: ServerProcess, mode: str) -> None:
    async with Client(gateway.url("/partners"), mode=mode) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} >= {"list_partners", "slow_report"}

        result = await client.call_tool("list_partners", {"tier": "gold"})
        assert result.structured_content == {"result": [{"id": "P100", "name": "Acme Logistics", "tier": "gold"}]}

        resource = await client.read_resource("partners://registry")
        (contents,) = resource.contents
        assert isinstance(contents, TextResourceContents)
        assert "P200: Globex Supplies" in contents.text

        prompt = await client.get_prompt("partner_brief", {"partner_id": "P100"})
        assert "P100" in _text(prompt.messages[0].content)


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_progress_notifications_reach_the_sdk_client(gateway: ServerProcess, mode: str) -> None:
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with Client(gateway.url("/employees"), mode=mode) as client:
        result = await client.call_tool("slow_report", {"steps": 3, "interval_ms": 20}, progress_callback=on_progress)
    assert _text(result.content[0]) == "report ready after 3 steps"
    assert seen == [(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)]


async def test_client_credentials_are_replaced_not_forwarded(gateway: ServerProcess) -> None:
    """The partners backend demands HTTP Basic in `Authorization`: the caller's Bearer token must be dropped and
    the service account's credential sent instead, or every call would get 401."""
    headers = {"Authorization": "Bearer caller-token", "Cookie": "session=caller", "X-Unknown": "1"}
    timeout = httpx2.Timeout(30.0, read=60.0)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        Client(streamable_http_client(gateway.url("/partners"), http_client=http), mode="legacy") as client,
    ):
        result = await client.call_tool("list_partners", {})
        assert not result.is_error
        assert result.structured_content is not None
        assert len(result.structured_content["result"]) == 2


async def test_auto_mode_falls_back_through_the_gateway_on_a_legacy_backend() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(legacy=psk_backend(backend.url("/mcp"), "/legacy"))) as gw,
    ):
        # The backend's own 404 for server/discover reaches the client unchanged (not the gateway's not_found).
        probe = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
        async with (
            aiohttp.ClientSession() as http,
            http.post(gw.url("/legacy"), json=probe, headers={"Accept": MCP_ACCEPT}) as response,
        ):
            assert response.status == 404
            assert json.loads(await response.read()) == {
                "jsonrpc": "2.0",
                "id": 1,
                "error": {"code": -32601, "message": "Method not found"},
            }
        backend.requests.clear()

        async with Client(gw.url("/legacy"), mode="auto") as client:
            assert client.protocol_version in LEGACY_VERSIONS
            result = await client.call_tool("echo", {"message": "hi"})
            assert json.loads(_text(result.content[0])) == {"message": "hi"}

    methods = [request.json.get("method") for request in backend.requests if request.method == "POST"]
    assert methods[0] == "server/discover"
    assert "initialize" in methods
    assert "tools/call" in methods
