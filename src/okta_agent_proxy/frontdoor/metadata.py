"""The front door's RFC 8414 authorization server metadata (DESIGN.md §8), served at both well-known names.

MCP clients find it from the protected resource metadata's `authorization_servers` (RFC 9728) and read the endpoints
from it: nothing else of the gateway's URL layout is known to them. `issuer` is `GATEWAY_BASE_URL` (an origin: the
front door refuses a base URL with a path), so `/.well-known/oauth-authorization-server` at that origin is the RFC
8414 §3 location, and `/.well-known/openid-configuration` the one clients that speak OpenID Connect discovery try.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WELL_KNOWN_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
AUTHORIZE, CALLBACK, CONSENT = "/oauth/authorize", "/oauth/callback", "/oauth/consent"
TOKEN, REGISTER, REVOKE, JWKS = "/oauth/token", "/oauth/register", "/oauth/revoke", "/oauth/jwks"


def authorization_server_metadata(issuer: str, scopes: Iterable[str], *, cimd: bool) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "authorization_endpoint": issuer + AUTHORIZE,
        "token_endpoint": issuer + TOKEN,
        "registration_endpoint": issuer + REGISTER,
        "revocation_endpoint": issuer + REVOKE,
        "jwks_uri": issuer + JWKS,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],  # public clients: PKCE, no secret (OAuth 2.1)
        "revocation_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": sorted(set(scopes)),
        "authorization_response_iss_parameter_supported": True,  # RFC 9207: `iss` on every authorization response
        "client_id_metadata_document_supported": cimd,
    }
