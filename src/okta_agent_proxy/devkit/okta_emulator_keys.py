"""The Okta emulator's directory, token-endpoint vocabulary, keys and client authentication (HTTP: `okta_emulator.py`).

- Directory: `User`, `App` (OAuth clients and AI agents), `AuthorizationServer` (custom servers). Token endpoint:
  `TokenRequest` and `GrantHandler` (the extension point), `OAuthError` (RFC 6749 §5.2), RFC 8414 metadata.
- `KeyRing`: one authorization server's keys; the newest RSA 2048 key signs, older ones stay published if kept.
  A `kid` is the RFC 7638 thumbprint (Okta's are opaque and stable), so a new key always has a new `kid`.
- `ClientAuthenticator`: RFC 6749 §2.3.1 `client_secret_basic` / `client_secret_post` and RFC 7523 `private_key_jwt`
  with Okta's assertion rules (PROTOCOL.md §2.5): `iss` = `sub` = client_id; `aud` = the token endpoint URL (or the
  issuer, when enabled: rfc7523bis); `exp` at most 1 h ahead; `iat` not in the future; signed by the app's public
  JWK (matching `kid` and `alg` when the JWK names them); `jti` single use. Okta treats `jti` as optional; the
  emulator requires it, since the gateway must always send a fresh one.

Deliberately independent of `okta_agent_proxy.keys` and the gateway's validator: the emulator is the oracle the
gateway is tested against, so it must not share that code's mistakes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import string
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from multidict import MultiMapping

__all__ = [
    "ASSERTION_ALGORITHMS",
    "CLIENT_ASSERTION_TYPE",
    "OIDC_SCOPES",
    "ORG",
    "App",
    "AuthorizationServer",
    "ClientAuthenticator",
    "EmulatorKey",
    "GrantHandler",
    "KeyRing",
    "OAuthError",
    "TokenRequest",
    "User",
    "by_key",
    "jwk_thumbprint",
    "metadata_document",
    "okta_error",
    "okta_id",
    "single",
]

Clock = Callable[[], float]
_T = TypeVar("_T")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The algorithms Okta accepts for private_key_jwt, by JWK key type (and EC curve).
ASSERTION_ALGORITHMS: Mapping[str, tuple[str, ...]] = {
    "RSA": ("RS256", "RS384", "RS512"),
    "EC/P-256": ("ES256",),
    "EC/P-384": ("ES384",),
    "EC/P-521": ("ES512",),
}
MAX_ASSERTION_LIFETIME_SECONDS = 3600
ORG = "org"  # the id under which the org authorization server is addressed in the emulator's API
OIDC_SCOPES = ("openid", "profile", "email", "address", "phone", "offline_access", "groups")
_ID_ALPHABET = string.ascii_letters + string.digits
_SERVER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
CLOCK_SKEW_SECONDS = 60
# Checks only the signature: claims are checked against the emulator's injectable clock.
_SIGNATURE_CHECK = jwt.PyJWS(options={"enforce_minimum_key_length": True})
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}

# ---- the directory: users, apps, custom authorization servers


def okta_id(prefix: str) -> str:
    """An Okta-style object id: a type prefix (`00u` user, `0oa` app, `00o` org) and 17 random characters."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))


@dataclass(frozen=True)
class User:
    """An Okta user: `login` becomes the access token's `sub`, `uid` its `uid` (and the ID token's `sub`)."""

    login: str
    uid: str = field(default_factory=lambda: okta_id("00u"))


@dataclass(frozen=True)
class App:
    """An OAuth client registered with the org (an OIDC app, a service app, or an AI agent's `wlp…` principal).

    `client_secret` enables `client_secret_basic`/`client_secret_post`; `public_jwk` enables `private_key_jwt`.
    An app with neither is a public client: tokens can be minted for it, but it cannot authenticate at /v1/token.
    `linked_client_id`: an AI agent's linked OIDC sign-on app, whose ID tokens the agent may exchange for ID-JAGs.
    """

    client_id: str
    name: str
    client_secret: str | None = field(default=None, repr=False)
    public_jwk: Mapping[str, Any] | None = None
    linked_client_id: str | None = None

    def __post_init__(self) -> None:
        if self.public_jwk is not None and any(k in self.public_jwk for k in ("d", "p", "q", "k")):
            raise ValueError(f"app {self.client_id}: public_jwk holds private key material")


@dataclass(frozen=True)
class AuthorizationServer:
    """A custom authorization server `/oauth2/{id}`: its default `aud` and its scopes (empty: any custom scope).

    `resources`: the resources (MCP servers) it protects; when declared, an ID-JAG's `resource` must be one of them.
    `jwt_bearer`: it redeems ID-JAGs (RFC 7523 jwt-bearer grant, advertised with the id-jag grant profile)."""

    id: str
    audience: str
    scopes: tuple[str, ...] = ()
    default_scopes: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    jwt_bearer: bool = True

    def __post_init__(self) -> None:
        if self.id in (ORG, "v1") or not _SERVER_ID.fullmatch(self.id):
            raise ValueError(f"invalid custom authorization server id {self.id!r}")

    def grantable_scopes(self, requested: str | None) -> list[str]:
        """The scopes of a client_credentials grant: as requested, else the defaults; OIDC scopes are refused."""
        scopes = (requested or "").split() or list(self.default_scopes)
        if not scopes:
            raise OAuthError("invalid_scope", "No default scopes are configured; 'scope' must be provided.")
        if any(scope in OIDC_SCOPES or (self.scopes and scope not in self.scopes) for scope in scopes):
            raise OAuthError("invalid_scope", "One or more scopes are not configured for the authorization server.")
        return scopes


def by_key(items: Sequence[_T], key: Callable[[_T], str], what: str) -> dict[str, _T]:
    """`items` by their key; two items with one key are a configuration error."""
    indexed = {key(item): item for item in items}
    if len(indexed) != len(items):
        raise ValueError(f"duplicate {what}")
    return indexed


# ---- the token endpoint's vocabulary and documents


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: rendered as JSON with `no-store`; 401 for `invalid_client`."""

    def __init__(self, error: str, description: str, *, status: int | None = None, basic_challenge: bool = False):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status if status is not None else (401 if error == "invalid_client" else 400)
        self.basic_challenge = basic_challenge

    def response(self) -> web.Response:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.basic_challenge:  # RFC 6749 §5.2: a client that tried Basic gets a Basic challenge
            headers["WWW-Authenticate"] = 'Basic realm="okta-emulator"'
        body = {"error": self.error, "error_description": self.description}
        return web.json_response(body, status=self.status, headers=headers)


def single(form: MultiMapping[str], name: str) -> str | None:
    """A parameter that may appear at most once (RFC 6749 §3.2); `None` when absent or empty."""
    values = form.getall(name, [])
    if len(values) > 1:
        raise OAuthError("invalid_request", f"The '{name}' parameter must not be repeated.")
    return (values[0] or None) if values else None


@dataclass(frozen=True)
class TokenRequest:
    """A client-authenticated request at a `/v1/token` endpoint, handed to the `GrantHandler` of its grant type."""

    auth_server_id: str
    client: App
    form: MultiMapping[str]

    def param(self, name: str) -> str | None:
        """A single-valued form parameter; repeating it is `invalid_request` (RFC 6749 §3.2)."""
        return single(self.form, name)


# Returns the successful token response body; raises OAuthError to refuse.
GrantHandler = Callable[[TokenRequest], Awaitable[dict[str, Any]]]


def metadata_document(
    *, issuer: str, endpoints: str, grant_types: Sequence[str], scopes: Sequence[str], oidc: bool
) -> dict[str, Any]:
    """RFC 8414 metadata (or OpenID Connect Discovery when `oidc`) for endpoints under `endpoints` (`…/v1/…`).

    `authorization_endpoint` is advertised as Okta does (clients' metadata models require it) but not served."""
    document: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": f"{endpoints}/v1/authorize",
        "token_endpoint": f"{endpoints}/v1/token",
        "jwks_uri": f"{endpoints}/v1/keys",
        "response_types_supported": ["code"],
        "grant_types_supported": sorted(grant_types),
        "scopes_supported": list(scopes),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": sorted(
            {a for algs in ASSERTION_ALGORITHMS.values() for a in algs}
        ),
        "code_challenge_methods_supported": ["S256"],
    }
    if oidc:
        document |= {"subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"]}
    return document


def okta_error(code: str, summary: str) -> str:
    """The JSON body of an Okta API error (not an OAuth error): `errorCode`, `errorSummary`, ..."""
    return json.dumps({"errorCode": code, "errorSummary": summary, "errorLink": code, "errorCauses": []})


# ---- keys


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK: its required members, sorted, without whitespace."""
    members = _THUMBPRINT_MEMBERS[str(jwk["kty"])]
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class EmulatorKey:
    """One RS256 signing key of an authorization server."""

    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> EmulatorKey:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private_key.public_key()))
        return cls(kid=jwk_thumbprint(public), private_key=private_key)

    def public_jwk(self) -> dict[str, Any]:
        """The JWK as Okta publishes it: `kty`, `alg`, `kid`, `use`, `e`, `n`."""
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private_key.public_key()))
        return {"kty": "RSA", "alg": "RS256", "kid": self.kid, "use": "sig", "e": public["e"], "n": public["n"]}

    def sign(self, claims: Mapping[str, Any], headers: Mapping[str, Any]) -> str:
        """A JWS with header `{"kid", "alg": "RS256"}` updated by `headers` (an `alg` there picks RS384/RS512).

        A None value in `claims` or `headers` leaves that member out. No `typ` unless given: Okta sends none."""
        header = {name: value for name, value in {"kid": self.kid, **headers}.items() if value is not None}
        header.setdefault("typ", None)  # PyJWT adds "typ": "JWT" unless told not to
        algorithm = str(header.pop("alg", "RS256"))
        payload = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(payload, self.private_key, algorithm=algorithm, headers=header)


class KeyRing:
    """The published keys of one authorization server; the newest one signs."""

    def __init__(self, first: EmulatorKey) -> None:
        self._keys: list[EmulatorKey] = [first]

    @property
    def signing_key(self) -> EmulatorKey:
        return self._keys[-1]

    @property
    def kids(self) -> list[str]:
        return [key.kid for key in self._keys]

    def find(self, kid: object) -> EmulatorKey | None:
        """The published key with this `kid`, if any."""
        return next((key for key in self._keys if key.kid == kid), None)

    def rotate(self, new: EmulatorKey, *, keep_old: bool) -> str:
        """Make `new` the signing key; the previous keys stay published only when `keep_old`."""
        self._keys = [*self._keys, new] if keep_old else [new]
        return new.kid

    def retire(self, kid: str) -> None:
        """Unpublish a key that no longer signs. Retiring the signing key is refused: rotate first."""
        if kid not in self.kids:
            raise KeyError(kid)
        if kid == self.signing_key.kid:
            raise ValueError("cannot retire the signing key; rotate_keys() first")
        self._keys = [key for key in self._keys if key.kid != kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self._keys]}


# ---- client authentication


def _invalid_client(description: str, *, basic: bool = False) -> OAuthError:
    return OAuthError("invalid_client", description, basic_challenge=basic)


class ClientAuthenticator:
    """Authenticates the client of a token request against the registered apps; remembers assertion `jti`s."""

    def __init__(self, apps: Mapping[str, App], clock: Clock) -> None:
        self._apps = apps
        self._clock = clock
        self._used_jtis: dict[tuple[str, str], float] = {}

    def authenticate(
        self, authorization: str | None, form: MultiMapping[str], assertion_audiences: Collection[str]
    ) -> App:
        assertion = single(form, "client_assertion")
        secret = single(form, "client_secret")
        methods = [authorization is not None, assertion is not None, secret is not None]
        if sum(methods) > 1:  # RFC 6749 §2.3: exactly one method per request
            raise OAuthError("invalid_request", "Only one client authentication method may be used.")
        if authorization is not None:
            return self._basic(authorization, single(form, "client_id"))
        if assertion is not None:
            if single(form, "client_assertion_type") != CLIENT_ASSERTION_TYPE:
                raise _invalid_client("The client_assertion_type is invalid.")
            return self._private_key_jwt(assertion, single(form, "client_id"), assertion_audiences)
        client_id = single(form, "client_id")
        if client_id is None:
            raise _invalid_client("Client authentication failed: no client credentials were presented.")
        return self._check_secret(client_id, secret, basic=False)

    def _basic(self, authorization: str, form_client_id: str | None) -> App:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise _invalid_client("The Authorization header must use the Basic scheme.", basic=True)
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _invalid_client("The Basic credentials are malformed.", basic=True) from None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon:
            raise _invalid_client("The Basic credentials are malformed.", basic=True)
        client_id = unquote_plus(raw_id)  # RFC 6749 §2.3.1: both parts are form-urlencoded first
        if form_client_id is not None and form_client_id != client_id:
            raise _invalid_client("The client_id does not match the authenticated client.", basic=True)
        return self._check_secret(client_id, unquote_plus(raw_secret), basic=True)

    def _check_secret(self, client_id: str, secret: str | None, *, basic: bool) -> App:
        app = self._apps.get(client_id)
        if app is None:
            raise _invalid_client("The client_id is not registered.", basic=basic)
        if app.client_secret is None:
            raise _invalid_client("The client is not configured for client secret authentication.", basic=basic)
        if secret is None or not hmac.compare_digest(secret.encode(), app.client_secret.encode()):
            raise _invalid_client("The client secret supplied for a confidential client is invalid.", basic=basic)
        return app

    def _private_key_jwt(self, assertion: str, form_client_id: str | None, audiences: Collection[str]) -> App:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _invalid_client("The client_assertion is not a valid JWT.") from None
        client_id = unverified.get("iss")
        app = self._apps.get(client_id) if isinstance(client_id, str) else None
        if app is None or client_id is None:
            raise _invalid_client("The client_assertion issuer is not a registered client.")
        if form_client_id is not None and form_client_id != client_id:
            raise _invalid_client("The client_id does not match the client_assertion issuer.")
        if app.public_jwk is None:
            raise _invalid_client("JWKSet not configured for the client.")
        jwk = app.public_jwk
        kid = header.get("kid")
        if kid is not None and jwk.get("kid") is not None and kid != jwk["kid"]:
            raise _invalid_client("The client_assertion kid is invalid.")
        family = "RSA" if jwk.get("kty") == "RSA" else f"{jwk.get('kty')}/{jwk.get('crv')}"
        algorithm = header.get("alg")
        if algorithm not in ASSERTION_ALGORITHMS.get(family, ()) or jwk.get("alg", algorithm) != algorithm:
            raise _invalid_client("The client_assertion signature algorithm is not allowed for the client's key.")
        try:
            _SIGNATURE_CHECK.decode(assertion, jwt.PyJWK(dict(jwk), algorithm=str(algorithm)), [str(algorithm)])
        except jwt.PyJWTError:
            raise _invalid_client("The client_assertion signature is invalid.") from None
        self._check_assertion_claims(client_id, unverified, audiences)
        return app

    def _check_assertion_claims(self, client_id: str, claims: Mapping[str, Any], audiences: Collection[str]) -> None:
        now = self._clock()
        if claims.get("sub") != client_id:
            raise _invalid_client("The client_assertion sub must equal its iss (the client_id).")
        aud = claims.get("aud")
        aud_values = aud if isinstance(aud, list) else [aud]
        if not any(value in audiences for value in aud_values):
            raise _invalid_client("The audience of the client_assertion is invalid; use the token endpoint URL.")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _invalid_client("The client_assertion must contain a numeric exp claim.")
        if exp <= now - CLOCK_SKEW_SECONDS:
            raise _invalid_client("The client_assertion has expired.")
        if exp > now + MAX_ASSERTION_LIFETIME_SECONDS + CLOCK_SKEW_SECONDS:
            raise _invalid_client("The client_assertion expiration is too far in the future (max 1 hour).")
        iat = claims.get("iat")
        if iat is not None and (not isinstance(iat, int | float) or iat > now + CLOCK_SKEW_SECONDS):
            raise _invalid_client("The client_assertion iat is in the future.")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _invalid_client("The client_assertion must contain a jti claim.")
        self._used_jtis = {k: until for k, until in self._used_jtis.items() if until > now - CLOCK_SKEW_SECONDS}
        if (client_id, jti) in self._used_jtis:
            raise _invalid_client("The client_assertion jti has already been used.")
        self._used_jtis[(client_id, jti)] = float(exp)
