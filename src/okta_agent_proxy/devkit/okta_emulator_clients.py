"""The Okta emulator's client authentication at `/v1/token`: RFC 6749 §2.3.1 `client_secret_basic` /
`client_secret_post` and RFC 7523 `private_key_jwt` with Okta's assertion rules (PROTOCOL.md §2.5): `iss` = `sub` =
client_id; `aud` = the token endpoint URL (or the issuer, when enabled: rfc7523bis); `exp` at most 1 h ahead; `iat`
not in the future; signed by the app's public JWK (matching `kid` and `alg` when the JWK names them); `jti` single
use. Okta treats `jti` as optional; the emulator requires it, since the gateway must always send a fresh one.
A public client (an app with no secret and no key: a SPA or native app) presents only its `client_id`
(`token_endpoint_auth_method` none), and only where the caller allows it: the user grants, which PKCE protects.

Deliberately independent of `okta_agent_proxy.keys` and the gateway's code: the emulator is the oracle the gateway is
tested against, so it must not share that code's mistakes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import unquote_plus

import jwt
from multidict import MultiMapping

from okta_agent_proxy.devkit.okta_emulator_directory import App
from okta_agent_proxy.devkit.okta_emulator_oauth import ASSERTION_ALGORITHMS, CLIENT_ASSERTION_TYPE, OAuthError, single

__all__ = ["CLOCK_SKEW_SECONDS", "MAX_ASSERTION_LIFETIME_SECONDS", "ClientAuthenticator"]

Clock = Callable[[], float]
MAX_ASSERTION_LIFETIME_SECONDS = 3600
CLOCK_SKEW_SECONDS = 60
# Checks only the signature: claims are checked against the emulator's injectable clock.
_SIGNATURE_CHECK = jwt.PyJWS(options={"enforce_minimum_key_length": True})


def _invalid_client(description: str, *, basic: bool = False) -> OAuthError:
    return OAuthError("invalid_client", description, basic_challenge=basic)


class ClientAuthenticator:
    """Authenticates the client of a token request against the registered apps; remembers assertion `jti`s."""

    def __init__(self, apps: Mapping[str, App], clock: Clock) -> None:
        self._apps = apps
        self._clock = clock
        self._used_jtis: dict[tuple[str, str], float] = {}

    def authenticate(
        self,
        authorization: str | None,
        form: MultiMapping[str],
        assertion_audiences: Collection[str],
        *,
        allow_public: bool = False,
    ) -> App:
        """The app that `authorization` or `form` authenticates; `allow_public`: a public app may name itself."""
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
        app = self._apps.get(client_id)
        if secret is None and allow_public and app is not None and app.public:
            return app
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
