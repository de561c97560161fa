"""Validate the caller's Okta access token (DESIGN.md §2, step 2; PROTOCOL.md §2.6 and §3).

A token is accepted only if all of these hold: it came in `Authorization: Bearer` (the pipeline never looks at a
query string or cookie); its header names an allowed asymmetric algorithm (RS*/ES*, never `none` or HMAC) and a
`kid` the issuer publishes; it is not an ID-JAG (`typ: oauth-id-jag+jwt`); the signature verifies with that key;
`iss` is exactly the configured issuer; `aud` is one of the configured audiences (an Okta ID token, whose `aud` is
a client id, fails here); and `exp`/`nbf`/`iat` hold within the configured leeway. Header fields that point at
other keys (`jku`, `x5u`, `jwk`, `x5c`) are never consulted.

A verified token is cached by its SHA-256 until it expires (bounded, oldest evicted first), so a client that sends
the same token on every request pays for one signature check, not one per request. The raw token is never kept.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from okta_agent_proxy.errors import InvalidToken
from okta_agent_proxy.inbound.jwks import ALLOWED_ALGORITHMS, JwksCache

MAX_TOKEN_BYTES = 16 * 1024
REFUSED_TYPES = frozenset({"oauth-id-jag+jwt"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the verified token says."""

    issuer: str
    subject: str
    uid: str | None
    client_id: str | None  # Okta `cid` (or `client_id` / `azp`): the app or agent the token was issued to
    scopes: frozenset[str]
    expires_at: float
    jti: str | None
    token_hash: str
    grant_id: str | None = None  # a front-door token's grant (DESIGN.md §8); None for Okta's tokens
    client_name: str | None = None  # a front-door client's registered name (declared, not verified)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    return frozenset()


def _client_id(claims: dict[str, Any]) -> str | None:
    for name in ("cid", "client_id", "azp"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


class OktaTokenValidator:
    def __init__(
        self,
        jwks: JwksCache,
        issuer: str,
        audiences: Iterable[str],
        *,
        leeway: float = 60,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jwks = jwks
        self._issuer = issuer
        self._audiences = list(audiences)
        self._leeway = leeway
        self._clock = clock
        self._cache: dict[str, tuple[Principal, str]] = {}  # token hash → (principal, kid)
        self._cache_size = cache_size
        self.verifications = 0

    def set_audiences(self, audiences: Iterable[str]) -> None:
        """Accept these audiences from now on (config reload); tokens verified before are checked again."""
        self._audiences = list(audiences)
        self._cache.clear()

    @property
    def jwks_ready(self) -> bool:
        return self._jwks.ready

    async def warm(self) -> None:
        await self._jwks.refresh()

    async def validate(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("the access token is too large")
        digest = token_hash(token)
        cached = self._cache.get(digest)
        if cached is not None:
            principal, kid = cached
            # Still valid, and still signed by a published key: a retired key's tokens stop working at once.
            if self._clock() < principal.expires_at + self._leeway and self._jwks.publishes(kid):
                return principal
            del self._cache[digest]
        principal, kid = await self._verify(token, digest)
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[digest] = (principal, kid)
        return principal

    async def _verify(self, token: str, digest: str) -> tuple[Principal, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the access token is malformed") from None
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidToken("the access token's algorithm is not accepted")
        if isinstance(typ, str) and typ.lower() in REFUSED_TYPES:
            raise InvalidToken("an identity assertion grant is not an access token")
        if not isinstance(kid, str):
            raise InvalidToken("the access token has no key id")
        key = await self._jwks.key_for(kid, alg)
        if key is None:
            raise InvalidToken("the access token is signed with an unknown key")
        self.verifications += 1
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audiences,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the access token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("the access token is not for this gateway") from None
        except jwt.PyJWTError:
            raise InvalidToken("the access token is invalid") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("the access token has no subject")
        uid = claims.get("uid")
        jti = claims.get("jti")
        principal = Principal(
            issuer=self._issuer,
            subject=subject,
            uid=uid if isinstance(uid, str) else None,
            client_id=_client_id(claims),
            scopes=_scopes(claims),
            expires_at=float(claims["exp"]),
            jti=jti if isinstance(jti, str) else None,
            token_hash=digest,
        )
        return principal, kid
