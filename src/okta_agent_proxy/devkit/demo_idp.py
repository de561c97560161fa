"""`okta-agent-proxy demo idp`: the Okta emulator alone, serving a small demo org and printing a user's token.

The org has one custom authorization server, `aus-gateway`, whose default audience is the gateway's; one user; one
app (`Cursor`). `run_emulator` prints that user's access token on purpose: it is the point of the command, and the
emulator's keys live only as long as the process.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TextIO

from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, User

__all__ = ["DEMO_APP", "DEMO_AUDIENCE", "DEMO_AUTH_SERVER_ID", "DEMO_SCOPES", "DEMO_USER", "run_emulator"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEMO_AUTH_SERVER_ID = "aus-gateway"
DEMO_AUDIENCE = "http://localhost:8000"
DEMO_SCOPES = ("mcp:read", "mcp:write")
DEMO_USER = User("ada.lovelace@example.com", "00udemoada0lovelace1")
DEMO_APP = App("0oademocursor0000001", "Cursor")


async def run_emulator(
    port: int = 0,
    *,
    audience: str = DEMO_AUDIENCE,
    token_lifetime: int = 3600,
    out: TextIO | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the demo org until SIGINT/SIGTERM (or `stop` is set), after printing where it is and a user token.

    The org has one custom authorization server, `aus-gateway`, for the gateway at `audience`, one user and one
    app (`Cursor`); the printed token is that user's, through that app, with `mcp:read mcp:write`."""
    server = AuthorizationServer(DEMO_AUTH_SERVER_ID, audience, scopes=DEMO_SCOPES)
    async with OktaEmulator(auth_servers=[server], users=[DEMO_USER], apps=[DEMO_APP], port=port) as idp:
        token = idp.mint_access_token(
            server.id, user=DEMO_USER, client_id=DEMO_APP.client_id, scopes=DEMO_SCOPES, lifetime=token_lifetime
        )
        issuer = idp.issuer(server.id)
        print(
            f"Okta emulator (an Okta-shaped IdP for development) at {idp.base_url}, the org issuer.\n"
            f"Custom authorization server {server.id}, as the gateway's settings:\n"
            f"  OKTA_DOMAIN={idp.base_url}\n  OKTA_ISSUER={issuer}\n  OKTA_AUDIENCE={audience}\n"
            f"  OKTA_JWKS_URI={idp.jwks_uri(server.id)}\n"
            f"Its metadata (path-appended, as on Okta): {issuer}/.well-known/oauth-authorization-server\n\n"
            f"Access token for {DEMO_USER.login} through app {DEMO_APP.name} (cid {DEMO_APP.client_id}), "
            f"scopes {' '.join(DEMO_SCOPES)}, valid {token_lifetime} s:\n{token}\n\nPress Ctrl-C to stop.",
            file=out or sys.stdout,
            flush=True,
        )
        stop, loop = stop or asyncio.Event(), asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)
