"""A front-door login for the bench, made without a browser: a grant in the gateway's store and a token for it.

    front_door_setup.py --database-url sqlite:///…/gw.db --base-url http://127.0.0.1:PORT --resource-path /mcp \
                        --key-file …/front-door-key.pem [--scope mcp:read]

Run by the Python of the revision under test (its own store schema and token code), before its gateway starts:
migrates the database (`store.db.migrate`), registers a client (`FrontDoorStore.register_client`, no name: its
agent is `front_door.default_agent`), stores a live grant for it (`create_grant`; the "sealed" Okta tokens are
placeholder bytes — a request with a cached backend credential never opens them), and mints the
gateway's own access token for `base-url + resource-path` with the signing key in `--key-file` (an EC P-256 PEM,
written first if the file does not exist; the gateway gets the same PEM as `FRONT_DOOR_SIGNING_KEY`, so it
verifies what this minted). Prints one JSON line: `token`, `client_id`, `grant_id`, `resource`.

What the bench measures with it is the request path of a client that logged in through the front door: the token
verified (then cached), its grant's liveness (cached ≤ 30 s), the agent by `front_door.default_agent`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from okta_agent_proxy.frontdoor.tokens import FrontDoorTokens
from okta_agent_proxy.keys import load_signing_key
from okta_agent_proxy.store.db import create_store_engine, migrate
from okta_agent_proxy.store.frontdoor import FrontDoorStore

USER_SUB = "00ubenchuser0000001"  # bench/idp.py's user
REDIRECT_URI = "http://127.0.0.1:33418/callback"  # the registration's; never followed
PLACEHOLDER = b"bench: not a sealed token; nothing on the measured path opens it"


def signing_key_pem(path: Path) -> str:
    """The PEM in `path`, after writing a new P-256 key there (mode 0600) if there is none."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(pem)
    return path.read_text()


async def login(database_url: str, base_url: str, resource: str, pem: str, scopes: list[str]) -> dict[str, str]:
    await migrate(database_url)
    engine = create_store_engine(database_url)
    try:
        store = FrontDoorStore(engine)
        client = await store.register_client(client_name=None, redirect_uris=[REDIRECT_URI])
        grant = await store.create_grant(
            user_sub=USER_SUB,
            user_claims={"sub": USER_SUB},
            client_id=client.client_id,
            resource=resource,
            scopes=scopes,
            okta_id_token=PLACEHOLDER,
            okta_id_token_expires_at=None,
            okta_refresh_token=None,
            okta_refresh_token_expires_at=None,
            expires_at=datetime.now(UTC) + timedelta(days=1),
        )
    finally:
        await engine.dispose()
    tokens = FrontDoorTokens(base_url, [load_signing_key(pem)])
    token = tokens.mint(
        subject=USER_SUB, client_id=client.client_id, resource=resource, scopes=scopes, grant_id=grant.grant_id
    )
    return {"token": token, "client_id": client.client_id, "grant_id": grant.grant_id, "resource": resource}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--base-url", required=True, help="the gateway's GATEWAY_BASE_URL (the tokens' issuer)")
    parser.add_argument("--resource-path", required=True, help="the backend's path under the gateway")
    parser.add_argument("--key-file", type=Path, required=True, help="the signing key's PEM (made if missing)")
    parser.add_argument("--scope", action="append", default=None, help="a scope of the grant (default mcp:read)")
    args = parser.parse_args()
    pem = signing_key_pem(args.key_file)
    resource = args.base_url.rstrip("/") + args.resource_path
    facts = asyncio.run(login(args.database_url, args.base_url, resource, pem, args.scope or ["mcp:read"]))
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
