"""The MCP Inspector CLI (`@modelcontextprotocol/inspector`, Node) through the gateway, with custom headers: one
declared in the backend's `forward_headers` reaches the backend, an undeclared one and the caller's
`Authorization` do not. Also against the devkit's real SDK backend in the modern protocol era.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.integration.conftest import SampleBackends
from tests.support.backends import running_backend
from tests.support.gateway import DEFAULT_KEY, gateway_config, psk_backend, running_gateway
from tests.support.node_tools import env_with_node22, require_node_tool

pytestmark = pytest.mark.node

TIMEOUT = 60.0


async def inspector(url: str, *args: str) -> Any:
    """Run `mcp-inspector --cli URL --transport http ARGS --format json -q`; return its parsed JSON output."""
    tool = require_node_tool("mcp-inspector")
    argv = [str(tool), "--cli", url, "--transport", "http", *args, "--format", "json", "-q"]
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env_with_node22(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"{' '.join(argv)}\n{stdout.decode()}\n{stderr.decode()}"
    return json.loads(stdout)


@pytest.mark.parametrize("method", ["tools/list", "tools/call"])
async def test_inspector_with_custom_headers(method: str) -> None:
    async with running_backend() as backend:
        config = gateway_config(recorded=psk_backend(backend.url("/mcp"), "/recorded", forward_headers=["X-Custom"]))
        async with running_gateway(config) as gw:
            call = ["--tool-name", "echo", "--tool-arg", "message=hi"] if method == "tools/call" else []
            output = await inspector(
                gw.url("/recorded"),
                "--method",
                method,
                *call,
                "--header",
                "X-Custom: custom-value",
                "--header",
                "X-Undeclared: nope",
                "--header",
                "Authorization: Bearer inspector-token",
            )
    if method == "tools/list":
        assert [tool["name"] for tool in output["result"]["tools"]] == ["echo"]
    else:
        assert json.loads(output["result"]["content"][0]["text"]) == {"message": "hi"}

    posts = [request for request in backend.requests if request.method == "POST"]
    assert method in [request.json.get("method") for request in posts]
    for request in backend.requests:  # every request the Inspector made, GET streams included
        assert request.headers.getall("X-Custom") == ["custom-value"]
        assert "x-undeclared" not in request.header_names()
        assert request.headers.getall("X-API-Key") == [DEFAULT_KEY]
        assert "authorization" not in request.header_names()


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_inspector_against_the_sdk_backend(sample_backends: SampleBackends, era: str) -> None:
    async with running_gateway(sample_backends.config()) as gw:
        output = await inspector(
            gw.url("/employees"),
            "--method",
            "tools/call",
            "--tool-name",
            "get_employee",
            "--tool-arg",
            "employee_id=E001",
            "--protocol-era",
            era,
        )
    assert output["result"]["structuredContent"]["name"] == "Ada Lovelace"
