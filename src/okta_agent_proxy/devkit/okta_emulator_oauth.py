"""The Okta emulator's token-endpoint vocabulary: what a grant handler receives (`TokenRequest`) and returns
(`GrantHandler`), how it refuses (`OAuthError`, RFC 6749 §5.2), the RFC 8414 metadata document that advertises the
endpoints, and the body of Okta's own (non-OAuth) API errors.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from okta_agent_proxy.devkit.okta_emulator_directory import App

__all__ = [
    "ASSERTION_ALGORITHMS",
    "CLIENT_ASSERTION_TYPE",
    "GrantHandler",
    "OAuthError",
    "TokenRequest",
    "metadata_document",
    "okta_error",
    "single",
]

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The algorithms Okta accepts for private_key_jwt, by JWK key type (and EC curve).
ASSERTION_ALGORITHMS: Mapping[str, tuple[str, ...]] = {
    "RSA": ("RS256", "RS384", "RS512"),
    "EC/P-256": ("ES256",),
    "EC/P-384": ("ES384",),
    "EC/P-521": ("ES512",),
}


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
    *,
    issuer: str,
    endpoints: str,
    grant_types: Sequence[str],
    scopes: Sequence[str],
    oidc: bool,
    public_clients: bool = False,
) -> dict[str, Any]:
    """RFC 8414 metadata (or OpenID Connect Discovery when `oidc`) for endpoints under `endpoints` (`…/v1/…`).

    `authorization_endpoint` is always advertised, as Okta does (clients' metadata models require it); the emulator
    serves it at the org server only. `public_clients`: the token endpoint also takes auth method `none`."""
    document: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": f"{endpoints}/v1/authorize",
        "token_endpoint": f"{endpoints}/v1/token",
        "jwks_uri": f"{endpoints}/v1/keys",
        "response_types_supported": ["code"],
        "grant_types_supported": sorted(grant_types),
        "scopes_supported": list(scopes),
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
            *(["none"] if public_clients else []),
        ],
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
