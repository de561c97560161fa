"""The bench's identity provider: the devkit Okta emulator, plus a token for the gateway's JWT runs.

Serves on 127.0.0.1 until SIGTERM, after printing one JSON line with its issuer, JWKS URL, the audience, the agent
app's client id and an access token (user + agent app, `mcp:read`, valid for `--lifetime` seconds). The gateway
validates that token on every request; with the same token each time, that is one signature check and then the
validator's cache.

For the Cross App Access targets the org also has the backend's authorization server (`aus-bench-backend`, scope
`bench:read`, redeems ID-JAGs) and a policy letting the agent get ID-JAGs for it; the agent app authenticates with
`private_key_jwt`, by an EC key whose private half is written to `--agent-key` (PKCS#8 PEM, mode 0600) for the
gateway's config. `GET /bench/xaa-counts` answers the emulator's Cross App Access counters, so the bench can check
that a gateway exchanged once and then served every request from its credential cache.

Usage: idp.py AUDIENCE --agent-key PATH [--lifetime 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, User, XaaPolicy
from okta_agent_proxy.observability.logging import configure

AUTH_SERVER_ID = "aus-bench"
BACKEND_AUTH_SERVER_ID = "aus-bench-backend"  # the cross-app backend's authorization server
BACKEND_SCOPES = ("bench:read",)
USER = User("bench.user@example.com", "00ubenchuser0000001")
AGENT_CLIENT_ID = "0oabenchagent0000001"
AGENT_KEY_ID = "bench-agent-key"
SCOPES = ("mcp:read",)
COUNTS_PATH = "/bench/xaa-counts"


def agent_key(path: Path) -> dict[str, Any]:
    """A new EC P-256 key: the private half written to `path` for the gateway, the public JWK returned."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return public | {"kid": AGENT_KEY_ID, "alg": "ES256", "use": "sig"}


async def serve(audience: str, lifetime: int, key_path: Path) -> None:
    servers = [
        AuthorizationServer(AUTH_SERVER_ID, audience, scopes=SCOPES),
        AuthorizationServer(BACKEND_AUTH_SERVER_ID, "api://oap-bench-backend", scopes=BACKEND_SCOPES),
    ]
    agent = App(AGENT_CLIENT_ID, "Bench agent", public_jwk=agent_key(key_path))
    policy = XaaPolicy(agent_client_id=AGENT_CLIENT_ID, audience=BACKEND_AUTH_SERVER_ID)
    emulator: list[OktaEmulator] = []  # the counters' owner, once made (the middleware is needed to make it)

    @web.middleware
    async def counts(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != COUNTS_PATH:
            return await handler(request)
        xaa = emulator[0].xaa
        return web.json_response(
            {
                "id_jag_exchanges": xaa.id_jag_exchanges,
                "jwt_bearer_grants": xaa.jwt_bearer_grants,
                "failures": sum(xaa.id_jag_failures.values()) + sum(xaa.jwt_bearer_failures.values()),
            }
        )

    idp = OktaEmulator(auth_servers=servers, users=[USER], apps=[agent], xaa_policies=[policy], middlewares=[counts])
    emulator.append(idp)
    async with idp:
        token = idp.mint_access_token(
            AUTH_SERVER_ID, user=USER, client_id=AGENT_CLIENT_ID, scopes=SCOPES, lifetime=lifetime
        )
        facts = {
            "issuer": idp.issuer(AUTH_SERVER_ID),
            "jwks_uri": idp.jwks_uri(AUTH_SERVER_ID),
            "audience": audience,
            "client_id": AGENT_CLIENT_ID,
            "token": token,
            "org": idp.base_url,
            "agent_key": str(key_path),
            "agent_key_id": AGENT_KEY_ID,
            "backend_issuer": idp.issuer(BACKEND_AUTH_SERVER_ID),
            "backend_token_endpoint": idp.token_endpoint(BACKEND_AUTH_SERVER_ID),
            "backend_scope": BACKEND_SCOPES[0],
            "counts_url": idp.base_url + COUNTS_PATH,
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
    parser.add_argument("--agent-key", type=Path, required=True, help="where to write the agent's private key")
    parser.add_argument("--lifetime", type=int, default=3600)
    args = parser.parse_args()
    configure("WARNING")  # stdout carries the one JSON line
    uvloop.run(serve(args.audience, args.lifetime, args.agent_key))


if __name__ == "__main__":
    main()
