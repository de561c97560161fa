"""`okta-agent-proxy demo`: the whole product on loopback, with nothing to configure and no Okta tenant.

It starts the embedded Okta emulator — an org with a custom authorization server for the gateway's callers
(`aus-gateway`), another for the `employees` backend (`aus-employees`), a user who can sign in with a password, the
gateway's own OIDC app (the OAuth front door's, DESIGN.md §8), and three agent apps, `cursor` and `claude-code` with
key pairs and Cross App Access policies for `aus-employees` — and the two sample MCP backends as child processes:
`employees` accepts only access tokens `aus-employees` minted for it (so every call proves the ID-JAG exchange
happened), `partners` only its pre-shared key. It writes a config that references the secrets as `${ENV}` (fresh
values each run), runs the gateway in this process with the front door on, and prints the line that adds the
gateway to Claude Code (or VS Code) — whose login then runs through the emulated Okta sign-in and consent — and user
tokens and commands that work as printed — agents allowed, one denied; the `audit` command with this
installation's full path, since `./run demo` does not put the venv on PATH. The secrets exist only in this
process: a reload of the edited config resolves them from the environment snapshot taken at start. Ctrl-C stops
everything.
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

from okta_agent_proxy import keys
from okta_agent_proxy.app import run_until_stopped
from okta_agent_proxy.config.loader import ConfigError, load
from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, User, XaaPolicy

DEMO_CONFIG = """\
# Written by `okta-agent-proxy demo`. Secrets come from the environment of the demo process.
agents:
  cursor:
    client_id: {cursor_id}
    private_key: ${{DEMO_CURSOR_KEY}}
    scopes: [mcp:read]
    backend_access: [employees, partners]
  claude-code:
    client_id: {claude_id}
    private_key: ${{DEMO_CLAUDE_KEY}}
    # Claude Code logging in through the front door: by its client metadata document, else by the name it registers
    inbound_client_ids: [{claude_id}, "https://claude.ai/oauth/claude-code-client-metadata"]
    client_names: ["Claude Code*"]
    scopes: [mcp:read]
    backend_access: [employees, partners]
    tool_access:
      employees: {{deny: ["*_salary"]}}   # claude-code does not see (nor may call) get_salary
  vscode:
    client_id: {vscode_id}
    inbound_client_ids: ["https://vscode.dev/oauth/client-metadata.json"]
    client_names: ["Visual Studio Code*", "VS Code*"]
    scopes: [mcp:read]
    backend_access: [employees, partners]
  intern-bot:
    client_id: {intern_id}
    scopes: [mcp:read]
    backend_access: [partners]
front_door:
  default_agent: intern-bot     # any other client that logs in: partners only
  default_scopes: [mcp:read]
backends:
  employees:
    url: http://127.0.0.1:{employees_port}/mcp
    paths: [/employees, /hr]
    auth_method: okta-cross-app
    auth_config:
      id_jag_mode: static
      target_authorization_server: {employees_issuer}
      target_token_endpoint: {employees_issuer}/v1/token
      scopes: [employees:read]
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


CURSOR_ID = "0oademocursor0000001"
CLAUDE_ID = "0oademoclaude0000002"
VSCODE_ID = "0oademovscode0000004"
INTERN = App("0oademointern0000003", "Intern bot")
GATEWAY_APP_ID = "0oademogateway000005"  # the gateway's own OIDC app: the front door signs users in as it
PASSWORD = "lovelace-1815"
USER = User("ada.lovelace@example.com", "00udemoada0lovelace1", password=PASSWORD, name="Ada Lovelace")
AUTH_SERVER = "aus-gateway"
EMPLOYEES_SERVER = "aus-employees"
TOKEN_LIFETIME = 8 * 3600


def cli_command() -> str:
    """This installation's `okta-agent-proxy`, as a shell runs it: `./run demo` does not put the venv on PATH."""
    script = Path(sys.executable).with_name("okta-agent-proxy")
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m okta_agent_proxy"


def instructions(gateway: str, idp: OktaEmulator, tokens: dict[str, str], workdir: Path) -> str:
    accept = "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream'"
    cursor = '-H "Authorization: Bearer $CURSOR_TOKEN"'
    claude = '-H "Authorization: Bearer $CLAUDE_TOKEN"'
    intern = '-H "Authorization: Bearer $INTERN_TOKEN"'
    list_tools = shlex.quote('{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}')
    call = shlex.quote(
        '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_employee",'
        '"arguments":{"employee_id":"E002"}}}'
    )
    slow = shlex.quote(
        '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"slow_report",'
        '"arguments":{"steps":5},"_meta":{"progressToken":"demo"}}}'
    )
    audit_url = shlex.quote(f"sqlite:///{workdir / 'audit.db'}")
    return f"""
Okta Agent Proxy demo: the gateway is at {gateway}
  employees (Cross App Access) {gateway}/employees   (also {gateway}/hr)
  partners  (pre-shared key)   {gateway}/partners
  Okta emulator                {idp.base_url}  (OKTA_DOMAIN; callers' tokens from {idp.issuer(AUTH_SERVER)})
Agents: cursor, claude-code and vscode may reach employees and partners (claude-code without get_salary);
intern-bot only partners. Your token never reaches a backend: for employees the gateway trades it at the emulated
Okta for an ID-JAG, then for a token of employees' own authorization server (watch for token_exchange_completed in
this log); partners gets its key.

Log in from an MCP client (the OAuth front door: a browser opens the emulated Okta sign-in, then a consent page):
  claude mcp add --transport http employees {gateway}/employees
  VS Code, in .vscode/mcp.json: {{"servers": {{"employees": {{"type": "http", "url": "{gateway}/employees"}}}}}}
  Sign in as {USER.login} with password {PASSWORD} (the sign-in page shows them too).

Or paste user {USER.login}'s access tokens (valid {TOKEN_LIFETIME // 3600} h), one per agent app, into a terminal:
  export CURSOR_TOKEN={tokens["cursor"]}
  export CLAUDE_TOKEN={tokens["claude-code"]}
  export INTERN_TOKEN={tokens["intern-bot"]}

Then try:
  curl -sN {gateway}/partners {accept} {cursor} -d {list_tools}
  curl -sN {gateway}/employees {accept} {cursor} -d {call}
  curl -sN {gateway}/hr {accept} {cursor} -d {slow}      # progress events arrive one by one
  curl -s  {gateway}/employees {accept} {claude} -d {list_tools}   # claude-code's list: no get_salary
  curl -s  {gateway}/employees {accept} {intern} -d {list_tools}   # 403: intern-bot may not reach employees
  curl -si {gateway}/employees {accept} -d {list_tools}   # 401 with the discovery challenge
  curl -s  {gateway}/.well-known/oauth-protected-resource/employees
  npx -y @modelcontextprotocol/inspector@2.12.0 --cli {gateway}/partners --transport http --method tools/list \\
      --header "Authorization: Bearer $CURSOR_TOKEN"   # needs Node 22

The audit log of this run: {cli_command()} audit --database-url {audit_url}

Press Ctrl-C to stop.
"""


async def run_demo(port: int = 8000, workdir: Path | None = None) -> None:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="okta-agent-proxy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = f"http://localhost:{port}"
    agent_key, claude_key = keys.generate_rsa_key(), keys.generate_rsa_key()
    signing_key = keys.load_signing_key(keys.private_pem(agent_key))
    claude_signing_key = keys.load_signing_key(keys.private_pem(claude_key))
    app_secret = secrets.token_urlsafe(24)
    secrets_env = {
        "DEMO_PARTNERS_KEY": secrets.token_urlsafe(24),
        "DEMO_CURSOR_KEY": keys.private_pem(agent_key),
        "DEMO_CLAUDE_KEY": keys.private_pem(claude_key),
    }
    ports = {"employees_port": free_port(), "partners_port": free_port()}
    employees_url = f"http://127.0.0.1:{ports['employees_port']}/mcp"
    servers = [
        AuthorizationServer(AUTH_SERVER, gateway, scopes=("mcp:read", "mcp:write")),
        AuthorizationServer(EMPLOYEES_SERVER, employees_url, scopes=("employees:read",), resources=(employees_url,)),
    ]
    cursor = App(CURSOR_ID, "Cursor", public_jwk=signing_key.public_jwk())
    claude = App(CLAUDE_ID, "Claude Code", public_jwk=claude_signing_key.public_jwk())
    gateway_app = App(
        GATEWAY_APP_ID, "Okta Agent Proxy", client_secret=app_secret, redirect_uris=(f"{gateway}/oauth/callback",)
    )
    policies = [
        XaaPolicy(client, EMPLOYEES_SERVER, resources=(employees_url,), scopes=("employees:read",))
        for client in (CURSOR_ID, CLAUDE_ID, GATEWAY_APP_ID)
    ]
    idp = OktaEmulator(
        auth_servers=servers,
        users=[USER],
        apps=[cursor, claude, INTERN, gateway_app],
        xaa_policies=policies,
        sign_in_notice=f"Demo user: {USER.login} / {PASSWORD}",
    )
    async with idp:
        employees_issuer = idp.issuer(EMPLOYEES_SERVER)
        config_path = workdir / "config.yaml"
        config_path.write_text(
            DEMO_CONFIG.format(
                **ports,
                cursor_id=CURSOR_ID,
                claude_id=CLAUDE_ID,
                vscode_id=VSCODE_ID,
                intern_id=INTERN.client_id,
                employees_issuer=employees_issuer,
            ),
            encoding="utf-8",
        )
        tokens = {
            name: idp.mint_access_token(
                AUTH_SERVER, user=USER, client_id=app.client_id, scopes=["mcp:read"], lifetime=TOKEN_LIFETIME
            )
            for name, app in (("cursor", cursor), ("claude-code", claude), ("intern-bot", INTERN))
        }
        processes = [
            await start_backend(
                "employees",
                ports["employees_port"],
                {
                    "SAMPLE_BACKEND_TOKEN_ISSUER": employees_issuer,
                    "SAMPLE_BACKEND_TOKEN_AUDIENCE": employees_url,
                    "SAMPLE_BACKEND_JWKS_URI": idp.jwks_uri(EMPLOYEES_SERVER),
                },
            ),
            await start_backend(
                "partners", ports["partners_port"], {"SAMPLE_BACKEND_API_KEY": secrets_env["DEMO_PARTNERS_KEY"]}
            ),
        ]
        try:
            try:
                loaded = load(
                    config_path,
                    environ={**os.environ, **secrets_env},
                    env_file=None,
                    overrides={
                        "GATEWAY_PORT": port,
                        "GATEWAY_BASE_URL": gateway,
                        "GATEWAY_HOST": "127.0.0.1",
                        "OKTA_DOMAIN": idp.base_url,
                        "OKTA_ISSUER": idp.issuer(AUTH_SERVER),
                        "DATABASE_URL": f"sqlite:///{workdir / 'audit.db'}",
                        "DATA_DIR": str(workdir),
                        "FRONT_DOOR": "on",
                        "SHUTDOWN_DRAIN_SECONDS": 0,  # no load balancer to tell: a stop is at once
                        "OKTA_CLIENT_ID": GATEWAY_APP_ID,
                        "OKTA_CLIENT_SECRET": app_secret,
                    },
                )
            except ConfigError as exc:  # pragma: no cover - the demo writes its own config
                raise SystemExit("\n".join(str(p) for p in exc.problems)) from None
            try:
                await run_until_stopped(
                    loaded,
                    "127.0.0.1",
                    port,
                    on_ready=lambda bound: print(instructions(gateway, idp, tokens, workdir), flush=True),
                )
            except OSError as exc:
                raise SystemExit(f"demo: cannot listen on port {port} ({exc.strerror}); try --port 8080") from None
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
            for process in processes:
                await process.wait()
