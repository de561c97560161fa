"""Sample MCP backends for the demo and the tests, built with the official `mcp` SDK (the `demo` extra).

`employees` and `partners` are small directories with tools (employees also has `get_salary`, which the demo's tool
policy hides from one agent), a resource and a prompt; both have a `slow_report`
tool that streams progress for about two seconds, to show that the gateway streams. Each backend checks the
credential the gateway must send (an API key header or HTTP Basic, given by environment variables so it never
shows in a process list) and answers 401 without it — so a working demo proves the gateway injected it. With
`SAMPLE_BACKEND_TOKEN_ISSUER` (and `_AUDIENCE`, `SAMPLE_BACKEND_JWKS_URI`) it instead requires an access token its own
authorization server minted for it, as a Cross App Access backend does.

Run one: `python -m okta_agent_proxy.devkit.sample_backends employees --port 9001`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SALARIES = {"E001": 212_000, "E002": 245_000, "E003": 158_000}  # what the demo's tool policy hides from claude-code
EMPLOYEES = {
    "E001": {"name": "Ada Lovelace", "title": "Principal Engineer", "department": "Engineering"},
    "E002": {"name": "Grace Hopper", "title": "Director of Platforms", "department": "Engineering"},
    "E003": {"name": "Katherine Johnson", "title": "Staff Analyst", "department": "Finance"},
}
PARTNERS = {
    "P100": {"name": "Acme Logistics", "tier": "gold"},
    "P200": {"name": "Globex Supplies", "tier": "silver"},
}


def _add_slow_report(server: MCPServer) -> None:
    @server.tool()
    async def slow_report(ctx: Context, steps: int = 5, interval_ms: int = 400) -> str:
        """Build a report slowly, reporting progress after each step."""
        steps = max(1, min(steps, 50))
        for step in range(1, steps + 1):
            await asyncio.sleep(max(0, min(interval_ms, 5000)) / 1000)
            await ctx.report_progress(step, steps, f"step {step} of {steps}")
        return f"report ready after {steps} steps"


def employees_server() -> MCPServer:
    server = MCPServer("employees", instructions="The employee directory.")

    @server.tool()
    def list_employees(department: str | None = None) -> list[dict[str, str]]:
        """List employees, optionally of one department."""
        return [
            {"id": eid, **info}
            for eid, info in EMPLOYEES.items()
            if department is None or info["department"] == department
        ]

    @server.tool()
    def get_employee(employee_id: str) -> dict[str, str]:
        """Get one employee by id (E001…)."""
        if employee_id not in EMPLOYEES:
            raise ValueError(f"unknown employee {employee_id}")
        return {"id": employee_id, **EMPLOYEES[employee_id]}

    @server.tool()
    def get_salary(employee_id: str) -> dict[str, int | str]:
        """Get one employee's salary (a tool the demo hides from some agents)."""
        if employee_id not in SALARIES:
            raise ValueError(f"unknown employee {employee_id}")
        return {"id": employee_id, "salary": SALARIES[employee_id]}

    @server.resource("employees://directory")
    def directory() -> str:
        """The whole directory as text."""
        return "\n".join(f"{eid}: {info['name']} ({info['title']})" for eid, info in EMPLOYEES.items())

    @server.prompt()
    def introduce(employee_id: str) -> str:
        """A prompt to introduce an employee."""
        return f"Write a short, friendly introduction of employee {employee_id}."

    _add_slow_report(server)
    return server


def partners_server() -> MCPServer:
    server = MCPServer("partners", instructions="The partner registry.")

    @server.tool()
    def list_partners(tier: str | None = None) -> list[dict[str, str]]:
        """List partners, optionally of one tier."""
        return [{"id": pid, **info} for pid, info in PARTNERS.items() if tier is None or info["tier"] == tier]

    @server.resource("partners://registry")
    def registry() -> str:
        """The partner registry as text."""
        return "\n".join(f"{pid}: {info['name']} ({info['tier']})" for pid, info in PARTNERS.items())

    @server.prompt()
    def partner_brief(partner_id: str) -> str:
        """A prompt for a partner brief."""
        return f"Summarise our relationship with partner {partner_id}."

    _add_slow_report(server)
    return server


SERVERS: dict[str, Callable[[], MCPServer]] = {"employees": employees_server, "partners": partners_server}


class RequireCredential:
    """ASGI middleware: 401 unless the request carries the expected header value (compared in constant time)."""

    def __init__(self, app: Any, header: str, expected: str) -> None:
        self._app = app
        self._header = header.lower().encode()
        self._expected = expected.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(self._header, b"")
            if not hmac.compare_digest(got, self._expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send({"type": "http.response.body", "body": b"missing or wrong credential"})
                return
        await self._app(scope, receive, send)


class RequireAccessToken:
    """ASGI middleware: 401 unless `Authorization: Bearer` carries a JWT from `issuer` for `audience` — what a
    backend behind Cross App Access checks. Keys come from `jwks_uri`, refetched (off the event loop) on an unknown
    `kid`."""

    def __init__(self, app: Any, issuer: str, audience: str, jwks_uri: str) -> None:
        import jwt

        self._app = app
        self._issuer = issuer
        self._audience = audience
        self._jwks = jwt.PyJWKClient(jwks_uri, cache_keys=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not await self._valid(dict(scope["headers"]).get(b"authorization", b"")):
            await send({"type": "http.response.start", "status": 401, "headers": [(b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": b"a valid access token for this server is required"})
            return
        await self._app(scope, receive, send)

    async def _valid(self, header: bytes) -> bool:
        import jwt

        token = header.decode(errors="replace").removeprefix("Bearer ").strip()
        try:
            key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            jwt.decode(token, key.key, algorithms=["RS256"], audience=self._audience, issuer=self._issuer)
        except jwt.PyJWTError:
            return False
        return True


def credential_check(environ: dict[str, str]) -> tuple[str, str] | None:
    """(header, expected value) from SAMPLE_BACKEND_API_KEY[/_HEADER] or SAMPLE_BACKEND_BASIC (user:pass)."""
    if key := environ.get("SAMPLE_BACKEND_API_KEY"):
        return environ.get("SAMPLE_BACKEND_API_KEY_HEADER", "X-API-Key"), key
    if basic := environ.get("SAMPLE_BACKEND_BASIC"):
        return "Authorization", "Basic " + base64.b64encode(basic.encode()).decode()
    return None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stateful", action="store_true", help="keep sessions (Mcp-Session-Id) and a GET stream")
    parser.add_argument("--json", action="store_true", help="answer POSTs with JSON instead of SSE streams")
    args = parser.parse_args(argv)
    server = SERVERS[args.name]()
    app: Any = server.streamable_http_app(
        streamable_http_path="/mcp", json_response=args.json, stateless_http=not args.stateful
    )
    check = credential_check(dict(os.environ))
    if check is not None:
        app = RequireCredential(app, *check)
    if issuer := os.environ.get("SAMPLE_BACKEND_TOKEN_ISSUER"):
        audience = os.environ.get("SAMPLE_BACKEND_TOKEN_AUDIENCE", f"http://{args.host}:{args.port}/mcp")
        app = RequireAccessToken(app, issuer, audience, os.environ["SAMPLE_BACKEND_JWKS_URI"])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
