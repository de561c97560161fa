"""The session-heavy load of the `sessions` part: every request continues one MCP session.

Behind the session target, nginx answers every request with `Mcp-Session-Id: bench-session` (the backend's own id),
and returns 400 if a request brings any other session id — so a gateway that forwards the client's id (a sealed
`oap1.…` one) instead of the backend's cannot pass as fast. Before the load, one `initialize` goes through the
gateway; the `Mcp-Session-Id` the gateway answers with (sealed since 60ef05e, the backend's raw id when the gateway
kept an in-process binding table, b6b678e and before) goes on every `tools/list` wrk sends. One request with it must
then come back 200 with the backend's exact body and the same session id (the gateway opened it, not 404
`session_not_found`); a 404 during the load fails the run like any status >= 400.
"""

from __future__ import annotations

import json
from pathlib import Path

from processes import BenchError, http_exchange
from targets import BACKEND_BODY, BACKEND_SESSION_ID, Target
from wrk_runner import REQUEST_BODY, wrk_script

SESSION_HEADER = "Mcp-Session-Id"
INITIALIZE_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "oap-bench", "version": "1"},
        },
    },
    separators=(",", ":"),
)


def _post(target: Target, body: str, headers: dict[str, str], what: str) -> str | None:
    """POST `body`; the backend's exact answer is required. Returns the session id the gateway answered with."""
    status, answer_headers, text = http_exchange("POST", target.url, body, headers)
    if status != 200 or text != BACKEND_BODY:
        raise BenchError(
            f"{target.name}: {what} answered {status} {text[:300]!r} instead of 200 {BACKEND_BODY!r}\n"
            f"{target.service.log_tail()}"
        )
    return answer_headers.get(SESSION_HEADER)


def open_session(target: Target, workdir: Path) -> str:
    """Initializes a session through `target` and points its wrk script at it; returns the id the client holds."""
    session = _post(target, INITIALIZE_BODY, target.headers, "initialize")
    if not session:
        raise BenchError(f"{target.name}: initialize answered no {SESSION_HEADER}, though the backend sent one")
    headers = {**target.headers, SESSION_HEADER: session}
    echoed = _post(target, REQUEST_BODY, headers, f"tools/list with {SESSION_HEADER} {session[:24]}…")
    if echoed != session:
        raise BenchError(f"{target.name}: the session's tools/list came back with {SESSION_HEADER} {echoed!r}")
    slug = "".join(c if c.isalnum() else "-" for c in target.name)
    target.headers = headers
    target.script = workdir / f"mcp_post_{slug}.lua"
    target.script.write_text(wrk_script(headers))
    return session


def describe(session: str) -> str:
    """How the client's session id looks: the backend's own, or sealed."""
    if session == BACKEND_SESSION_ID:
        return f"the backend's own id {session!r} (binding table)"
    return f"{session[:12]}… ({len(session)} chars, sealed)"
