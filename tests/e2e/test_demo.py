"""`okta-agent-proxy demo` as a user runs it: the commands it prints work exactly as printed.

The demo is started as a subprocess; the `export` lines and commands are taken from its own output and run with
bash, so the test fails if the printed text drifts from what the gateway does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from okta_agent_proxy.devkit.okta_emulator import User
from tests.integration.test_front_door_flow import MemoryStorage, sdk_provider
from tests.support.front_door import browser
from tests.support.node_tools import env_with_node22, require_node_tool, services_required
from tests.support.processes import ServerProcess, start_server

pytestmark = pytest.mark.slow
OKTA_AGENT_PROXY = Path(sys.executable).with_name("okta-agent-proxy")
AUDIT_PREFIX = "The audit log of this run: "


def without_this_venv_on_path() -> dict[str, str]:
    """The environment of a shell after `./run demo`: this venv's bin folder is not on PATH."""
    venv_bin = Path(sys.executable).parent.resolve()
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if Path(entry).resolve() != venv_bin]
    return {**os.environ, "PATH": os.pathsep.join(path)}


@dataclass(frozen=True)
class Demo:
    process: ServerProcess
    exports: str
    commands: list[str]
    inspector: str
    audit: str  # the printed `… audit --database-url …` command

    def run(self, command: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            ["bash", "-c", f"{self.exports}\n{command}"], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    if shutil.which("curl") is None:
        if services_required():
            pytest.fail("curl is needed to run the demo's printed commands")
        pytest.skip("curl is not installed")
    with start_server(
        lambda port: [str(OKTA_AGENT_PROXY), "demo", "--port", str(port)], http_path="/healthz", name="demo"
    ) as process:
        deadline = time.monotonic() + 30
        while "Press Ctrl-C" not in process.output() and time.monotonic() < deadline:
            assert process.alive(), process.describe()
            time.sleep(0.05)
        text = process.output()
        assert "Press Ctrl-C" in text, process.describe()
        exports = "\n".join(line.strip() for line in text.splitlines() if line.strip().startswith("export "))
        commands = [
            re.sub(r"\s+#.*$", "", line.strip()) for line in text.splitlines() if line.strip().startswith("curl ")
        ]
        inspector_start = text.index("npx -y @modelcontextprotocol/inspector")
        inspector = re.sub(r"\s+#.*$", "", " ".join(text[inspector_start:].split("\n", 2)[:2]).replace("\\", " "))
        audit = text.split(AUDIT_PREFIX, 1)[1].split("\n", 1)[0].strip()
        yield Demo(process, exports, commands, inspector, audit)


def test_printed_curl_commands_work(demo: Demo) -> None:
    outputs = [demo.run(command) for command in demo.commands]
    assert len(outputs) == 7
    partners, employee, slow, claude_tools, denied, challenge, metadata = outputs
    assert "list_partners" in partners
    assert "Grace Hopper" in employee
    assert slow.count("notifications/progress") == 5 and "report ready" in slow
    assert '"error":"authorization_denied"' in denied and '"agent_id":"intern-bot"' in denied
    # the demo's tool policy: claude-code's list lacks get_salary, which cursor's has
    assert '"get_employee"' in claude_tools and '"get_salary"' not in claude_tools
    cursor_tools = demo.run(demo.commands[0].replace("/partners ", "/employees ", 1))
    assert '"get_salary"' in cursor_tools
    salary_call = demo.commands[1].replace("get_employee", "get_salary")
    assert '"salary"' in demo.run(salary_call)  # cursor may call it
    hidden = demo.run(salary_call.replace("$CURSOR_TOKEN", "$CLAUDE_TOKEN"))
    assert '"code":-32602' in hidden and "Unknown tool: get_salary" in hidden, hidden  # claude-code may not
    assert challenge.startswith("HTTP/1.1 401") and 'resource_metadata="' in challenge
    assert '"authorization_servers"' in metadata
    # employees is reached through Cross App Access: the exchange shows in the demo's log, once (then cached).
    assert len(re.findall(r"token_exchange_completed\s+agent=cursor", demo.process.output())) == 1


@pytest.mark.node
def test_printed_inspector_command_works(demo: Demo) -> None:
    inspector = require_node_tool("mcp-inspector")
    command = demo.inspector.replace("npx -y @modelcontextprotocol/inspector@2.12.0", str(inspector))
    output = demo.run(command, env=env_with_node22())
    assert "list_partners" in output


def test_printed_audit_command_runs_as_printed_and_shows_rows(demo: Demo) -> None:
    demo.run(demo.commands[0])  # a call to partners, so there is a row to show
    env = without_this_venv_on_path()
    deadline = time.monotonic() + 15
    while True:
        rows = demo.run(demo.audit, env=env).splitlines()[1:]  # after the header
        if any("partners" in row.split() for row in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def test_printed_claude_code_line_logs_in_through_the_front_door(demo: Demo) -> None:
    """The server URL the demo prints for Claude Code, used by the MCP SDK's OAuth client as Claude Code would
    (registering as "Claude Code (employees)"): the browser walk signs in with the printed password, and the
    agent the client maps to reaches employees — through Cross App Access from the user's held ID token."""
    text = demo.process.output()
    url = next(line for line in text.splitlines() if line.strip().startswith("claude mcp add")).split()[-1]
    found = re.search(r"Sign in as (\S+) with password (\S+) ", text)
    assert found is not None, text
    user = User(found.group(1), password=found.group(2))

    async def session() -> str:
        storage = MemoryStorage()
        async with browser() as person:
            provider = sdk_provider(url, person, storage, client_name="Claude Code (employees)", user=user)
            async with (
                httpx2.AsyncClient(auth=provider, timeout=30) as http,
                Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
            ):
                result = await client.call_tool("get_employee", {"employee_id": "E002"})
                return json.dumps(result.structured_content)

    assert "Grace Hopper" in asyncio.run(session())
    assert re.search(r"token_exchange_completed\s+agent=claude-code", demo.process.output())


def test_an_edited_demo_config_is_applied(demo: Demo) -> None:
    """Last in this module: it changes the demo's config. Its secrets exist only in the demo process's memory, so
    a reload must resolve them from the environment taken at start."""
    database = re.search(r"sqlite:///(\S+?)'?$", demo.audit)
    assert database is not None, demo.audit
    config = Path(database.group(1)).parent / "config.yaml"
    config.write_text(config.read_text().replace("paths: [/partners]", "paths: [/partners, /partners2]"))
    command = demo.commands[0].replace("/partners ", "/partners2 ", 1)
    assert command != demo.commands[0]
    deadline = time.monotonic() + 20
    while "list_partners" not in demo.run(command):
        assert "config_reload_rejected" not in demo.process.output(), demo.process.describe()
        assert time.monotonic() < deadline, demo.process.describe()
        time.sleep(0.2)
    assert "config_reload_rejected" not in demo.process.output()
