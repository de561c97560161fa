"""The front door's own access tokens (DESIGN.md §8): JWTs in the RFC 9068 profile, signed ES256 by the gateway.

Claims: `iss` = `GATEWAY_BASE_URL`; `aud` = the one resource (a backend's URL under the gateway) the token was issued
for; `sub` = the Okta ID token's `sub` (the user); `client_id` = the MCP client; `scope` (space-separated); `grant` =
the grant it came from, so a revoked grant's tokens can be refused before they expire; `jti`, `iat`, `exp`; and, for
a dynamically registered client, `client_name` as it registered (signed here, so later requests need not look it
up: the agent is found from it on every request, under the config of that moment). Header `typ: at+jwt` and the
signing key's `kid`.

Verification accepts only what this module mints: `typ` at+jwt, `alg` ES256 (never what the token's header asks
for), a `kid` among the published keys (the current one and, through a rotation, the previous), `iss`, `exp` with
the leeway, and an `aud` the caller accepts: one naming the backend the request is routed to. The JOSE work is
PyJWT's, as for Okta's tokens and the client assertions elsewhere in the gateway: one JOSE library, already verified
against Okta-shaped and third-party tokens in the tests.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from okta_agent_proxy.keys import SigningKey

ALGORITHM = "ES256"
TOKEN_TYPE = "at+jwt"
_REQUIRED = ("iss", "aud", "sub", "client_id", "scope", "grant", "jti", "iat", "exp")


class InvalidFrontDoorToken(Exception):
    """Refused; the message says why in words safe for a log, never the token."""


@dataclass(frozen=True, slots=True)
class FrontDoorClaims:
    subject: str
    client_id: str
    resource: str
    scopes: tuple[str, ...]
    grant_id: str
    jti: str
    expires_at: float
    client_name: str | None = None


def generate_signing_key() -> SigningKey:
    """A new P-256 key under a random `kid` (the store keeps it sealed, shared by every replica)."""
    return SigningKey(
        kid=secrets.token_urlsafe(12), algorithm=ALGORITHM, private_key=ec.generate_private_key(ec.SECP256R1())
    )


class FrontDoorTokens:
    """Mints with `keys[0]`; verifies with any of `keys` (the previous one stays through a rotation)."""

    def __init__(
        self,
        issuer: str,
        keys: Sequence[SigningKey],
        *,
        ttl_seconds: int = 3600,
        leeway: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys or any(key.algorithm != ALGORITHM for key in keys):
            raise ValueError("front-door tokens need at least one ES256 key")
        self.issuer = issuer
        self._keys = list(keys)
        self._public = {key.kid: key.private_key.public_key() for key in keys}
        # The JOSE header segment each key's tokens start with, exactly as `mint` writes it: telling this gateway's
        # tokens from Okta's is then a set lookup, not a decode of every caller's token (37-54 µs with PyJWT).
        self._header_segments = frozenset(self._sign({}, key).partition(".")[0] for key in keys)
        self._ttl = ttl_seconds
        self._leeway = leeway
        self._clock = clock

    def jwks(self) -> dict[str, Any]:
        """The document at `/oauth/jwks`: every key that verifies, without private members."""
        return {"keys": [key.public_jwk() for key in self._keys]}

    def mint(
        self,
        *,
        subject: str,
        client_id: str,
        resource: str,
        scopes: Sequence[str],
        grant_id: str,
        client_name: str | None = None,
    ) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": resource,
            "sub": subject,
            "client_id": client_id,
            "scope": " ".join(scopes),
            "grant": grant_id,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + self._ttl,
        }
        if client_name is not None:
            claims["client_name"] = client_name
        return self._sign(claims, self._keys[0])

    @staticmethod
    def _sign(claims: dict[str, Any], key: SigningKey) -> str:
        return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": TOKEN_TYPE})

    @property
    def ttl_seconds(self) -> int:
        return self._ttl

    def issued(self, token: str) -> bool:
        """Whether `token` has the header this gateway's tokens have (unverified: which verifier to use, not
        whether to trust it)."""
        return token.partition(".")[0] in self._header_segments

    def verify(self, token: str, resource: str) -> FrontDoorClaims:
        """The claims of a token this gateway minted for `resource`; InvalidFrontDoorToken otherwise."""
        return self.verify_for(token, lambda audience: audience == resource)

    def verify_for(self, token: str, accepts: Callable[[str], bool]) -> FrontDoorClaims:
        """The claims of a token this gateway minted for an audience `accepts`; InvalidFrontDoorToken otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidFrontDoorToken("not a JWT") from None
        if header.get("typ") != TOKEN_TYPE or header.get("alg") != ALGORITHM:
            raise InvalidFrontDoorToken("not a front-door access token")
        public = self._public.get(str(header.get("kid")))
        if public is None:
            raise InvalidFrontDoorToken("signed with a key this gateway does not publish")
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                # time is checked below, on this gateway's clock (PyJWT reads the system's); the audience by `accepts`
                options={
                    "require": list(_REQUIRED),
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidFrontDoorToken(f"refused ({type(exc).__name__})") from None
        if not isinstance(claims["aud"], str) or not accepts(claims["aud"]):
            raise InvalidFrontDoorToken("issued for another resource")
        if not isinstance(claims["exp"], int | float) or self._clock() > claims["exp"] + self._leeway:
            raise InvalidFrontDoorToken("expired")
        if not all(isinstance(claims[name], str) for name in ("aud", "sub", "client_id", "scope", "grant", "jti")):
            raise InvalidFrontDoorToken("malformed claims")
        return FrontDoorClaims(
            subject=claims["sub"],
            client_id=claims["client_id"],
            resource=claims["aud"],
            scopes=tuple(claims["scope"].split()),
            grant_id=claims["grant"],
            jti=claims["jti"],
            expires_at=float(claims["exp"]),
            client_name=claims["client_name"] if isinstance(claims.get("client_name"), str) else None,
        )
