"""`okta-agent-proxy demo`: the whole product on loopback, with nothing to configure.

It starts the two sample MCP backends (`employees` behind a service account, `partners` behind a pre-shared key)
as child processes, writes a config that references their secrets as `${ENV}` (fresh random values each run),
runs the gateway in this process, and prints commands that work as printed. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import socket
import sys
import tempfile
from pathlib import Path

from okta_agent_proxy.app import run_until_stopped
from okta_agent_proxy.config_loader import ConfigError, load

DEMO_CONFIG = """\
# Written by `okta-agent-proxy demo`. Secrets come from the environment of the demo process.
backends:
  employees:
    url: http://127.0.0.1:{employees_port}/mcp
    paths: [/employees, /hr]
    auth_method: service-account
    auth_config:
      username: demo-service
      password: ${{DEMO_EMPLOYEES_PASSWORD}}
  partners:
    url: http://127.0.0.1:{partners_port}/mcp
    paths: [/partners]
    auth_method: pre-shared-key
    auth_config:
      key: ${{DEMO_PARTNERS_KEY}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, process: asyncio.subprocess.Process, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"sample backend exited with code {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"sample backend did not listen on port {port}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def start_backend(name: str, port: int, env: dict[str, str]) -> asyncio.subprocess.Process:
    command = [sys.executable, "-m", "okta_agent_proxy.devkit.sample_backends", name, "--port", str(port)]
    process = await asyncio.create_subprocess_exec(*command, env={**os.environ, **env})
    await wait_for_port(port, process)
    return process


def instructions(gateway: str) -> str:
    accept = "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream'"
    list_tools = shlex.quote('{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}')
    call = shlex.quote(
        '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_employee",'
        '"arguments":{"employee_id":"E002"}}}'
    )
    slow = shlex.quote(
        '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"slow_report",'
        '"arguments":{"steps":5},"_meta":{"progressToken":"demo"}}}'
    )
    return f"""
Okta Agent Proxy demo: the gateway is at {gateway}
  employees (service account)  {gateway}/employees   (also {gateway}/hr)
  partners  (pre-shared key)   {gateway}/partners
The backends accept only the credential the gateway adds; your requests carry none.

Try, in another terminal:
  curl -sN {gateway}/partners {accept} -d {list_tools}
  curl -sN {gateway}/employees {accept} -d {call}
  curl -sN {gateway}/hr {accept} -d {slow}      # progress events arrive one by one
  curl -s  {gateway}/nowhere {accept} -d {list_tools}   # 404 with a JSON error body
  curl -s  {gateway}/healthz

Press Ctrl-C to stop.
"""


async def run_demo(port: int = 8000, workdir: Path | None = None) -> None:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="okta-agent-proxy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    secrets_env = {
        "DEMO_EMPLOYEES_PASSWORD": secrets.token_urlsafe(24),
        "DEMO_PARTNERS_KEY": secrets.token_urlsafe(24),
    }
    ports = {"employees_port": free_port(), "partners_port": free_port()}
    config_path = workdir / "config.yaml"
    config_path.write_text(DEMO_CONFIG.format(**ports), encoding="utf-8")

    processes = [
        await start_backend(
            "employees",
            ports["employees_port"],
            {"SAMPLE_BACKEND_BASIC": f"demo-service:{secrets_env['DEMO_EMPLOYEES_PASSWORD']}"},
        ),
        await start_backend(
            "partners", ports["partners_port"], {"SAMPLE_BACKEND_API_KEY": secrets_env["DEMO_PARTNERS_KEY"]}
        ),
    ]
    try:
        gateway = f"http://localhost:{port}"
        try:
            loaded = load(
                config_path,
                environ={**os.environ, **secrets_env},
                env_file=None,
                overrides={"GATEWAY_PORT": port, "GATEWAY_BASE_URL": gateway, "GATEWAY_HOST": "127.0.0.1"},
            )
        except ConfigError as exc:  # pragma: no cover - the demo writes its own config
            raise SystemExit("\n".join(str(p) for p in exc.problems)) from None
        try:
            await run_until_stopped(
                loaded, "127.0.0.1", port, on_ready=lambda bound: print(instructions(gateway), flush=True)
            )
        except OSError as exc:
            raise SystemExit(f"demo: cannot listen on port {port} ({exc.strerror}); try --port 8080") from None
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            await process.wait()
