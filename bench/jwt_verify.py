"""What an inbound access token costs the gateway, without the network: µs per validation, in one process.

Against the devkit Okta emulator (in this process, on 127.0.0.1; its JWKS is fetched once), with an Okta-shaped
RS256 token (2048-bit key):

- `uncached`: `OktaTokenValidator.validate` when the token is not in the verified-token cache — what a request
  with a token the gateway has not seen pays: hash, header checks, key lookup, RS256 signature, claim checks;
- `jwt.decode`: PyJWT's `jwt.decode` alone with the RSA public key (signature and claims), for reference;
- `cached`: `validate` for a token already verified — what every later request with that token pays.

Each figure is the best of `--repeats` timed loops (so a busy machine shows up less). Prints one JSON line.
Usage: jwt_verify.py [--seconds 0.3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import uvloop

from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, User
from okta_agent_proxy.inbound.jwks import JwksCache
from okta_agent_proxy.inbound.validator import OktaTokenValidator
from okta_agent_proxy.observability.logging import configure

AUDIENCE = "api://oap-bench"


async def per_op_us(op: Callable[[], Awaitable[Any]], seconds: float, repeats: int) -> float:
    """Best µs per call of `op` over `repeats` loops of about `seconds` each."""
    batch = 1
    while True:  # size a batch to ~10 ms
        started = time.perf_counter()
        for _ in range(batch):
            await op()
        if time.perf_counter() - started > 0.01:
            break
        batch *= 2
    best = float("inf")
    for _ in range(repeats):
        calls = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(batch):
                await op()
            calls += batch
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return round(best, 2)


async def measure(seconds: float, repeats: int) -> dict[str, Any]:
    server = AuthorizationServer("aus-bench", AUDIENCE, scopes=("mcp:read",))
    user, app = User("bench.user@example.com"), App("0oabenchagent0000001", "Bench agent")
    async with (
        OktaEmulator(auth_servers=[server], users=[user], apps=[app]) as idp,
        aiohttp.ClientSession() as session,
    ):
        token = idp.mint_access_token(server.id, user=user, client_id=app.client_id, scopes=["mcp:read"])
        issuer = idp.issuer(server.id)
        jwks = JwksCache(session, issuer, idp.jwks_uri(server.id))
        validator = OktaTokenValidator(jwks, issuer, [AUDIENCE])
        await validator.warm()
        key = await jwks.key_for(jwt.get_unverified_header(token)["kid"], "RS256")
        assert key is not None

        async def uncached() -> None:
            validator.set_audiences([AUDIENCE])  # empties the verified-token cache
            await validator.validate(token)

        async def cached() -> None:
            await validator.validate(token)

        async def decode_only() -> None:
            jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=AUDIENCE,
                issuer=issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )

        before = validator.verifications
        result = {
            "uncached_validate_us": await per_op_us(uncached, seconds, repeats),
            "jwt_decode_rs256_us": await per_op_us(decode_only, seconds, repeats),
            "cached_validate_us": await per_op_us(cached, seconds, repeats),
            "token_bytes": len(token),
            "key": "RSA 2048, RS256",
        }
        assert validator.verifications > before  # the uncached loop really verified signatures
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed loop (default 0.3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per figure; the best counts (default 3)")
    args = parser.parse_args()
    configure("WARNING")
    print(json.dumps(uvloop.run(measure(args.seconds, args.repeats))), flush=True)


if __name__ == "__main__":
    main()
