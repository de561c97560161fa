"""The two steps of Cross App Access (draft-ietf-oauth-identity-assertion-authz-grant; PROTOCOL.md §1–2).

Step 1, RFC 8693 token exchange at the IdP (Okta's org authorization server): the agent, authenticated with its own
key, trades the user's token for an Identity Assertion JWT Authorization Grant (ID-JAG) addressed to the backend's
authorization server (`audience` = that server's issuer) and, optionally, for one `resource`.
Step 2, RFC 7523 JWT-bearer grant at the backend's authorization server: the ID-JAG is redeemed for an access token
that only that backend accepts.

The URNs are the draft's (-03/-04 share them); they live here, once, because the draft may still rename them.
Each ID-JAG is used once: the gateway never stores one (EMA requires `jti` replay detection at the AS).
"""

from __future__ import annotations

from collections.abc import Sequence

from okta_agent_proxy.outbound.oauth_client import ClientAuth, TokenEndpointClient, TokenEndpointError, TokenResponse

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG_TYPE = "urn:ietf:params:oauth:token-type:id-jag"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ID_JAG_GRANT_PROFILE = "urn:ietf:params:oauth:grant-profile:id-jag"


async def exchange_for_id_jag(
    client: TokenEndpointClient,
    *,
    token_endpoint: str,
    auth: ClientAuth,
    subject_token: str,
    subject_token_type: str,
    audience: str,
    resource: str | None,
    scopes: Sequence[str] = (),
) -> TokenResponse:
    """Step 1. The answer's `issued_token_type` must be the ID-JAG type; `token_type` is ignored (Okta's docs show
    both `N_A` and `Bearer`)."""
    params = {
        "grant_type": TOKEN_EXCHANGE,
        "requested_token_type": ID_JAG_TYPE,
        "audience": audience,
        "subject_token": subject_token,
        "subject_token_type": subject_token_type,
    }
    if resource:
        params["resource"] = resource
    if scopes:
        params["scope"] = " ".join(scopes)
    response = await client.request_token(token_endpoint, params, auth)
    if response.issued_token_type != ID_JAG_TYPE:
        raise TokenEndpointError(200, "invalid_response", "the IdP did not issue an ID-JAG")
    return response


async def redeem_id_jag(
    client: TokenEndpointClient,
    *,
    token_endpoint: str,
    auth: ClientAuth,
    id_jag: str,
    scopes: Sequence[str] = (),
) -> TokenResponse:
    """Step 2: the JWT-bearer grant (RFC 7523 §2.1) with the ID-JAG as the assertion."""
    params = {"grant_type": JWT_BEARER, "assertion": id_jag}
    if scopes:
        params["scope"] = " ".join(scopes)
    return await client.request_token(token_endpoint, params, auth)
