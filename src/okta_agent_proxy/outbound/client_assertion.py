"""private_key_jwt client assertions (RFC 7523 §2.2 and §3; OIDC Core §9), shaped as Okta documents them.

`iss` = `sub` = the client id; `aud` = the full token endpoint URL of the server being called (Okta's rule) or its
issuer identifier (draft-ietf-oauth-rfc7523bis), chosen per server; a fresh `jti` every time (Okta enforces single
use); a short `exp` (5 minutes); `iat` now; the key's `kid` in the header so the server can pick the right key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import jwt

from okta_agent_proxy.keys import SigningKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_SECONDS = 300


def client_assertion(
    key: SigningKey,
    client_id: str,
    audience: str,
    *,
    lifetime: int = ASSERTION_LIFETIME_SECONDS,
    clock: Callable[[], float] = time.time,
) -> str:
    now = int(clock())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "exp": now + lifetime,
    }
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})
