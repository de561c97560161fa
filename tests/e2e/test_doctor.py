"""`okta-agent-proxy doctor` against the embedded Okta emulator and in-process MCP backends.

The doctor runs on a thread (its own event loop) while the emulator and the backends serve in the test's loop: as
the console script in a subprocess for the healthy setup, elsewhere the same `cli` in this process (click's runner,
the same clean environment), as each subprocess costs seconds of imports. Assertions are on the exit code and on the
stable markers `✓ <check>` / `✗ <check>`, never on the prose.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from okta_agent_proxy.commands.doctor import fail, ok
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, XaaPolicy
from okta_agent_proxy.keys import generate_rsa_key, load_signing_key, private_pem
from tests.support.backends import BACKEND_SESSION_ID, RecordingBackend, running_backend
from tests.support.cli_runner import logs_apart, run_cli_in_process
from tests.support.okta_faults import FaultyOktaEmulator
from tests.support.processes import free_port
from tests.support.redis_servers import shared_redis_url

GATEWAY_AS, BACKEND_AS = "aus-gateway", "aus-employees"
AGENT = "wlp_cursor_agent"
PSK = "psk-Value-that-must-never-print-7f3e"
TIMEOUT = 60.0  # the whole doctor run; each of its requests is bounded by --timeout 3
CONSOLE_SCRIPT = Path(sys.executable).parent / "okta-agent-proxy"

pytestmark = pytest.mark.timeout(120)


@dataclass
class Outcome:
    code: int
    out: str

    def marks(self, mark: str) -> set[str]:
        """The check names printed with `mark` (✓ or ✗)."""
        return {line[2:].split(": ", 1)[0] for line in self.out.splitlines() if line.startswith(f"{mark} ")}


@dataclass
class Setup:
    idp: FaultyOktaEmulator
    backend: RecordingBackend
    tmp_path: Path
    settings: dict[str, str]
    config: dict[str, Any]

    async def doctor(self, *, in_subprocess: bool = False) -> Outcome:
        """`okta-agent-proxy doctor` on this setup, stdout and stderr together: in this process unless
        `in_subprocess` (the console script)."""
        config_path, env_path = self.tmp_path / "config.yaml", self.tmp_path / "test.env"
        config_path.write_text(yaml.safe_dump(self.config))
        env_path.write_text("".join(f"{name}={value}\n" for name, value in self.settings.items()))
        args = ["doctor", "--config", str(config_path), "--env-file", str(env_path), "--timeout", "3"]
        if in_subprocess:
            code, text = await self._subprocess(args)
        else:
            run = asyncio.to_thread(run_cli_in_process, args, env={"PSK_VALUE": PSK}, cwd=self.tmp_path)
            with logs_apart():  # the emulator's log lines are not the doctor's output
                result = await asyncio.wait_for(run, TIMEOUT)
            code, text = result.returncode, result.stdout + result.stderr
        assert PSK not in text
        return Outcome(code, text)

    async def _subprocess(self, args: list[str]) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
        process = await asyncio.create_subprocess_exec(
            CONSOLE_SCRIPT,
            *args,
            cwd=self.tmp_path,
            env={**env, "PYTHONIOENCODING": "utf-8", "PSK_VALUE": PSK},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode()


@asynccontextmanager
async def setup(tmp_path: Path, *, jwt_bearer: bool = True) -> AsyncIterator[Setup]:
    pem = private_pem(generate_rsa_key())
    public_jwk = load_signing_key(pem).public_jwk()
    servers = [
        AuthorizationServer(GATEWAY_AS, "api://gateway"),
        AuthorizationServer(BACKEND_AS, "api://employees", scopes=("employees:read",), jwt_bearer=jwt_bearer),
    ]
    apps = [App(AGENT, "Cursor agent", public_jwk=public_jwk)]
    policies = [XaaPolicy(agent_client_id=AGENT, audience=BACKEND_AS)]
    async with (
        FaultyOktaEmulator(auth_servers=servers, apps=apps, xaa_policies=policies) as idp,
        running_backend() as rb,
    ):
        base = f"http://127.0.0.1:{rb.port}"
        config: dict[str, Any] = {
            "backends": {
                "tools": {
                    "url": f"{base}/mcp",
                    "paths": ["/tools"],
                    "auth_method": "pre-shared-key",
                    "auth_config": {"key": "${PSK_VALUE}"},
                },
                "employees": {
                    "url": f"{base}/unauthorized/mcp",  # answers 401 without a token, as an XAA backend does
                    "paths": ["/employees"],
                    "auth_method": "okta-cross-app",
                    "auth_config": {
                        "target_authorization_server": idp.issuer(BACKEND_AS),
                        "target_token_endpoint": idp.token_endpoint(BACKEND_AS),
                        "scopes": ["employees:read"],
                    },
                },
            },
            "agents": {"cursor": {"client_id": AGENT, "private_key": pem, "backend_access": ["tools", "employees"]}},
        }
        settings = {
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
            "OKTA_AUDIENCE": "api://gateway",
        }
        yield Setup(idp, rb, tmp_path, settings, config)


ALL_CHECKS = {
    "config",
    "issuer metadata",
    "issuer jwks",
    "backend tools mcp",
    "backend employees mcp",
    "backend employees authorization server",
    "agent cursor key",
    "agent cursor key at okta",
}


async def test_healthy_setup_passes_every_check(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        outcome = await s.doctor(in_subprocess=True)
        assert outcome.code == 0, outcome.out
        assert outcome.marks("✓") == ALL_CHECKS, outcome.out
        assert outcome.marks("✗") == set()
        tools = [r for r in s.backend.requests if r.path_qs == "/mcp"]
        methods = [(r.method, r.json["method"] if r.method == "POST" else None) for r in tools]
        assert methods == [("POST", "server/discover"), ("POST", "initialize"), ("DELETE", None)]
        assert all(r.headers["X-API-Key"] == PSK for r in tools)
        assert tools[-1].headers["Mcp-Session-Id"] == BACKEND_SESSION_ID
        unauthorized = [r for r in s.backend.requests if r.path_qs.startswith("/unauthorized")]
        assert unauthorized and all("Authorization" not in r.headers for r in unauthorized)
        assert s.idp.xaa.id_jag_exchanges == 0  # the key probe cannot succeed


@pytest.mark.parametrize("issuer_suffix", ["/oauth2/aus-missing", "/oauth2/aus-gateway/"])
async def test_wrong_issuer(tmp_path: Path, issuer_suffix: str) -> None:
    async with setup(tmp_path) as s:
        s.settings["OKTA_ISSUER"] = s.idp.base_url + issuer_suffix
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert "issuer metadata" in outcome.marks("✗"), outcome.out


async def test_jwks_down(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.idp.set_jwks_mode("down")
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {"issuer jwks"}, outcome.out
        assert "issuer metadata" in outcome.marks("✓")


async def test_wrong_kid(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.config["agents"]["cursor"]["key_id"] = "not-the-registered-kid"
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {"agent cursor key at okta"}, outcome.out
        assert "agent cursor key" in outcome.marks("✓")  # the key itself parses
        assert s.idp.xaa.id_jag_failures["invalid_client"] == 1


async def test_backend_down(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.config["backends"]["tools"]["url"] = f"http://127.0.0.1:{free_port()}/mcp"
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {"backend tools mcp"}, outcome.out


async def test_authorization_server_without_jwt_bearer(tmp_path: Path) -> None:
    async with setup(tmp_path, jwt_bearer=False) as s:
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {"backend employees authorization server"}, outcome.out


async def test_modern_backend_is_detected_by_server_discover(tmp_path: Path) -> None:
    seen: list[Mapping[str, str]] = []

    async def mcp(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(request.headers)
        if body["method"] != "server/discover":
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": {"code": -32601}}, status=404)
        result = {"supportedVersions": ["2026-07-28"], "capabilities": {}, "serverInfo": {"name": "m", "version": "1"}}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with setup(tmp_path) as s:
            s.config["backends"]["tools"]["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/mcp"
            outcome = await s.doctor()
        assert outcome.code == 0, outcome.out
        assert "backend tools mcp" in outcome.marks("✓")
        assert len(seen) == 1 and seen[0]["MCP-Protocol-Version"] == "2026-07-28"
    finally:
        await runner.cleanup()


async def test_broken_yaml_exits_2_with_the_problem(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.config["backends"]["tools"]["paths"] = ["no-slash"]
        outcome = await s.doctor()
        assert outcome.code == 2, outcome.out
        assert "config" in outcome.marks("✗")
        assert "backends.tools.paths[0]" in outcome.out


def test_a_fix_is_printed_only_under_a_failure() -> None:
    assert ok("issuer jwks", "fine").lines() == ["✓ issuer jwks: fine"]
    assert fail("issuer jwks", "bad", "do this").lines() == ["✗ issuer jwks: bad", "    fix: do this"]


async def test_redis_is_checked_when_set_and_its_absence_is_a_warning(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.settings |= {"REDIS_URL": shared_redis_url(), "SESSION_SECRET": "doctor-test-session-secret-0123456789ab"}
        outcome = await s.doctor()
        assert outcome.code == 0, outcome.out
        assert outcome.marks("✓") == ALL_CHECKS | {"redis"}, outcome.out

        s.settings["REDIS_URL"] = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"  # nothing listens there
        outcome = await s.doctor()
        assert outcome.code == 0, outcome.out  # the gateway serves without Redis
        assert "! redis: REDIS_URL does not answer" in outcome.out
        assert "hunter2-secret" not in outcome.out
