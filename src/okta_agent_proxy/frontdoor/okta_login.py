"""The front door's own sign-in at Okta (DESIGN.md §8): the gateway as an OIDC web app of the org authorization server.

The flow is OpenID Connect Core §3.1 (authorization code) with PKCE (RFC 7636, S256 only) at the org server
(PROTOCOL.md §2.1: issuer `https://{OKTA_DOMAIN}`, `/oauth2/v1/authorize`, `/oauth2/v1/token`, `/oauth2/v1/keys`).
`start` makes a fresh `state` and `nonce` (256 bits each) and a PKCE verifier and returns the authorize URL; the
caller keeps the three values (sealed, in a cookie) until Okta redirects back. `finish` redeems the code with the
verifier; `refresh` uses the refresh token (OIDC Core §12) to get a new ID token before the held one expires, since
Cross App Access needs a live ID token (PROTOCOL.md §2.3).

Every ID token is verified before anything reads it (OIDC Core §3.1.3.7): the header must name an allowed asymmetric
algorithm (RS*/ES*, never `none` or HMAC) and a `kid` the org publishes (an unknown `kid` refetches the keys once, as
for caller tokens: `inbound/jwks.py`); `jku`, `x5u`, `jwk` and `x5c` are never consulted; an ID-JAG or an access token
(`typ` `oauth-id-jag+jwt`, `at+jwt`) is not an ID token; the signature verifies; `iss` is the org exactly; `aud` is
the gateway's client id — several audiences only with `azp` = that client id, and an `azp` naming another client is
refused; `exp`, `iat` (and `nbf` if present) hold within the leeway on the injected clock; `nonce` matches (compared
in constant time) on a sign-in; `sub` is a non-empty string. A refreshed ID token has no `nonce` (OIDC Core §12.2);
pass `subject` to `refresh` to insist that it names the same user as the grant.

Libraries, and why: PyJWT for the JOSE work, the project's one JOSE library (DESIGN.md §5) — the caller-token
validator, the client assertions and the front door's own tokens (`frontdoor/tokens.py`) already use it, so the
algorithm allow-list and the key handling are the same code, checked by the same tests; authlib or joserfc would add a
second library that must be kept to the same rules. The keys come from `inbound.jwks.JwksCache`, which already
rate-limits refetches and tells an outage (503) from a bad token. PKCE, `state` and `nonce` are `secrets` and
`hashlib` from the standard library: 43-128 unreserved characters and base64url(SHA-256) are two lines, not worth a
dependency. Client authentication (client_secret_basic or private_key_jwt, Okta's assertion rules) is
`outbound.oauth_client.TokenEndpointClient.authenticate`, shared with every other outbound grant; the POST itself is
done here because `TokenEndpointClient.request_token` keeps only the access-token fields of the answer, and this
client needs the `id_token` and `refresh_token`.

Errors: Okta's refusal (RFC 6749 §5.2) is `OktaLoginError` with Okta's error code; an answer that cannot be had or
read (network failure, timeout, 5xx, not a JSON object, the keys unreachable) is `OktaUnavailable`; an ID token that
fails a check is `InvalidIdToken`. No message ever carries a token, code, verifier or secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt

from okta_agent_proxy.errors import IdpUnavailable
from okta_agent_proxy.inbound.jwks import ALLOWED_ALGORITHMS, JwksCache, JwksFetchError
from okta_agent_proxy.outbound.oauth_client import (
    ClientAuth,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
    UnreadableTokenResponse,
)

__all__ = ["InvalidIdToken", "LoginStart", "OktaApp", "OktaLogin", "OktaLoginError", "OktaTokens", "OktaUnavailable"]

DEFAULT_SCOPES = ("openid", "profile", "email", "offline_access", "groups")
# Header types that mark a JWT as something other than an ID token (RFC 9068 §2.1; the ID-JAG draft §3).
REFUSED_TYPES = frozenset({"oauth-id-jag+jwt", "at+jwt"})


@dataclass(frozen=True)
class OktaApp:
    """The gateway's own OIDC web app at the org: what `OKTA_DOMAIN`, `OKTA_CLIENT_ID` and its secret or key say."""

    org: str  # the org's base URL, also the org server's issuer: `outbound.cross_app.org_base_url(OKTA_DOMAIN)`
    client_id: str
    auth: ClientAuth
    redirect_uri: str  # {GATEWAY_BASE_URL}/oauth/callback
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    @property
    def authorize_endpoint(self) -> str:
        return f"{self.org}/oauth2/v1/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.org}/oauth2/v1/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.org}/oauth2/v1/keys"


@dataclass(frozen=True)
class LoginStart:
    """One sign-in under way: the values the callback needs, and where to send the browser."""

    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    authorize_url: str = field(repr=False)  # carries the state and nonce


@dataclass(frozen=True)
class OktaTokens:
    """A verified ID token, its claims, and the refresh token that came with it (None: keep the one held)."""

    id_token: str = field(repr=False)
    claims: dict[str, Any]
    expires_at: float  # the ID token's `exp`
    refresh_token: str | None = field(repr=False, default=None)


class OktaLoginError(Exception):
    """Okta refused the token request. `error` is its RFC 6749 §5.2 code (`invalid_grant`, `invalid_client`, …) or
    `invalid_response` for a success without an ID token; `description` is Okta's text, for the audit log only."""

    def __init__(self, error: str, description: str | None = None, *, status: int | None = None) -> None:
        super().__init__(f"Okta refused the token request: {error}")
        self.error = error
        self.description = description
        self.status = status


class OktaUnavailable(Exception):
    """Okta could not be reached, timed out, failed on its side, or answered something unreadable."""


class InvalidIdToken(Exception):
    """The ID token failed a check; the message says which, in words safe to log."""


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2 S256: base64url(SHA-256(ASCII(verifier))), without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


class OktaLogin:
    """Signs users in at the org as the gateway's app, and keeps their ID tokens fresh."""

    def __init__(
        self,
        app: OktaApp,
        session: aiohttp.ClientSession,
        *,
        leeway: float = 60,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
    ) -> None:
        self._app = app
        self._leeway = leeway
        self._clock = clock
        self._client = TokenEndpointClient(session, timeout=timeout, clock=clock)
        self._jwks = JwksCache(session, issuer=app.org, jwks_uri=app.jwks_uri, fetch_timeout=timeout)

    def start(self) -> LoginStart:
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]: RFC 7636 §4.1 allows 43-128
        query = {
            "response_type": "code",
            "client_id": self._app.client_id,
            "redirect_uri": self._app.redirect_uri,
            "scope": " ".join(self._app.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_challenge(verifier),
            "code_challenge_method": "S256",
        }
        url = f"{self._app.authorize_endpoint}?{urlencode(query, quote_via=quote)}"
        return LoginStart(state=state, nonce=nonce, code_verifier=verifier, authorize_url=url)

    async def finish(self, code: str, *, code_verifier: str, nonce: str) -> OktaTokens:
        """Redeem the code Okta sent to the callback (its `state` already checked by the caller)."""
        params = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._app.redirect_uri,
            "code_verifier": code_verifier,
        }
        document = await self._token_request(params)
        id_token = _id_token_of(document)
        claims = await self._verify(id_token, nonce=nonce)
        return OktaTokens(id_token, claims, float(claims["exp"]), _text(document, "refresh_token"))

    async def refresh(self, refresh_token: str, *, subject: str | None = None) -> OktaTokens:
        """A new ID token for the grant; `subject`: the grant's user, which the new ID token must name (OIDC Core
        §12.2). The result's `refresh_token` is None unless Okta answered with a different one (rotation)."""
        document = await self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token})
        id_token = _id_token_of(document)
        claims = await self._verify(id_token, nonce=None)
        if subject is not None and not hmac.compare_digest(claims["sub"].encode(), subject.encode()):
            raise InvalidIdToken("the refreshed ID token names another user")
        rotated = _text(document, "refresh_token")
        return OktaTokens(id_token, claims, float(claims["exp"]), rotated if rotated != refresh_token else None)

    async def warm(self) -> None:
        """Fetch the org's keys now (readiness, `doctor`)."""
        try:
            await self._jwks.refresh()
        except JwksFetchError as exc:
            raise OktaUnavailable(f"Okta's keys cannot be fetched: {exc}") from None

    # ---- the token endpoint

    async def _token_request(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The 200 answer's JSON object; OktaLoginError for a refusal, OktaUnavailable for anything unreadable."""
        try:
            return await self._client.request_document(self._app.token_endpoint, params, self._app.auth)
        except TokenEndpointUnavailable as exc:
            raise OktaUnavailable(f"Okta's token endpoint cannot be reached: {exc}") from None
        except UnreadableTokenResponse as exc:
            raise OktaUnavailable(f"Okta's token endpoint answered {exc.status} with an unreadable body") from None
        except TokenEndpointError as exc:
            raise OktaLoginError(exc.error, exc.description, status=exc.status) from None

    # ---- the ID token (OIDC Core §3.1.3.7)

    async def _verify(self, id_token: str, *, nonce: str | None) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise InvalidIdToken("the ID token is not a JWS") from None
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidIdToken("the ID token's algorithm is not accepted")
        if isinstance(typ, str) and typ.lower().removeprefix("application/") in REFUSED_TYPES:
            raise InvalidIdToken("the token is not an ID token (typ)")
        if not isinstance(kid, str):
            raise InvalidIdToken("the ID token has no key id")
        try:
            key = await self._jwks.key_for(kid, alg)
        except IdpUnavailable:
            raise OktaUnavailable("Okta's keys cannot be fetched") from None
        if key is None:
            raise InvalidIdToken("the ID token is signed with a key the org does not publish")
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key,
                algorithms=[alg],
                issuer=self._app.org,
                audience=self._app.client_id,
                # time is checked below, on the injected clock (PyJWT reads the system's)
                options={
                    "require": ["iss", "aud", "sub", "exp", "iat"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidIdToken("the ID token's signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise InvalidIdToken("the ID token was issued by another issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidIdToken("the ID token was issued to another client") from None
        except jwt.PyJWTError as exc:
            raise InvalidIdToken(f"the ID token is invalid ({type(exc).__name__})") from None
        self._check_claims(claims, nonce)
        return claims

    def _check_claims(self, claims: dict[str, Any], nonce: str | None) -> None:
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if azp is not None and azp != self._app.client_id:
            raise InvalidIdToken("the ID token was authorized for another client (azp)")
        if len(audiences) > 1 and azp is None:
            raise InvalidIdToken("the ID token has several audiences and no azp")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise InvalidIdToken("the ID token has no subject")
        now = self._clock()
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf")
        if not _is_time(exp) or not _is_time(iat) or (nbf is not None and not _is_time(nbf)):
            raise InvalidIdToken("the ID token's times are malformed")
        if now > exp + self._leeway:
            raise InvalidIdToken("the ID token has expired")
        if iat > now + self._leeway or (nbf is not None and nbf > now + self._leeway):
            raise InvalidIdToken("the ID token is not valid yet")
        if nonce is not None:
            got = claims.get("nonce")
            if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
                raise InvalidIdToken("the ID token's nonce does not match this sign-in")


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(document: Mapping[str, Any], name: str) -> str | None:
    value = document.get(name)
    return value if isinstance(value, str) and value else None


def _id_token_of(document: Mapping[str, Any]) -> str:
    id_token = _text(document, "id_token")
    if id_token is None:
        raise OktaLoginError("invalid_response", "the token response has no id_token", status=200)
    return id_token
