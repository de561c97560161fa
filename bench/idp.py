"""The bench's identity provider: the devkit Okta emulator, plus a token for the gateway's JWT runs.

Serves one custom authorization server on 127.0.0.1 until SIGTERM, after printing one JSON line with its issuer,
JWKS URL, the audience, the agent app's client id and an access token (user + agent app, `mcp:read`, valid for
`--lifetime` seconds). The gateway validates that token on every request; with the same token each time, that is
one signature check and then the validator's cache.

Usage: idp.py AUDIENCE [--lifetime 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop

from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, User
from okta_agent_proxy.observability.logging import configure

AUTH_SERVER_ID = "aus-bench"
USER = User("bench.user@example.com", "00ubenchuser0000001")
AGENT_APP = App("0oabenchagent0000001", "Bench agent")
SCOPES = ("mcp:read",)


async def serve(audience: str, lifetime: int) -> None:
    server = AuthorizationServer(AUTH_SERVER_ID, audience, scopes=SCOPES)
    async with OktaEmulator(auth_servers=[server], users=[USER], apps=[AGENT_APP]) as idp:
        token = idp.mint_access_token(
            AUTH_SERVER_ID, user=USER, client_id=AGENT_APP.client_id, scopes=SCOPES, lifetime=lifetime
        )
        facts = {
            "issuer": idp.issuer(AUTH_SERVER_ID),
            "jwks_uri": idp.jwks_uri(AUTH_SERVER_ID),
            "audience": audience,
            "client_id": AGENT_APP.client_id,
            "token": token,
        }
        print(json.dumps(facts), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audience")
    parser.add_argument("--lifetime", type=int, default=3600)
    args = parser.parse_args()
    configure("WARNING")  # stdout carries the one JSON line
    uvloop.run(serve(args.audience, args.lifetime))


if __name__ == "__main__":
    main()
