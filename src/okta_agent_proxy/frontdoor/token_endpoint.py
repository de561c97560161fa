"""`POST /oauth/token` and `POST /oauth/revoke` (DESIGN.md §8; RFC 6749 §4.1.3 and §6, RFC 7636, RFC 7009).

Public clients only: a client proves nothing but its `client_id` and, for a code, the PKCE verifier. So a code is
spent by any attempt (consumed first, then checked: client, exact redirect URI, verifier, resource) and a wrong one
revokes the grant it was for — whoever holds a stolen code cannot retry; a code presented twice revokes what the
first redemption issued. A refresh token rotates on every use; the rotated one presented again within
`FRONT_DOOR_REFRESH_GRACE_SECONDS` gets the same new pair (clients that refresh from several processes at once),
after that it is reuse and the whole grant is revoked, on every replica (`grants.GrantLiveness`). A refresh keeps
the grant's resource (another → `invalid_target`) and may narrow its scopes, never widen them.

Access tokens are JWTs (`tokens.py`); refresh tokens are 256-bit random strings stored as hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from okta_agent_proxy.errors import CredentialUnavailable, IdpUnavailable, InvalidToken
from okta_agent_proxy.frontdoor.cimd import is_client_id_url
from okta_agent_proxy.frontdoor.context import FrontDoorContext
from okta_agent_proxy.frontdoor.forms import OAuthError, form, json_answer, oauth_error_answer, required
from okta_agent_proxy.frontdoor.okta_login import pkce_challenge
from okta_agent_proxy.frontdoor.resources import InvalidTarget, normalize_resource
from okta_agent_proxy.frontdoor.tokens import InvalidFrontDoorToken
from okta_agent_proxy.http.interface import Answer, HttpRequest
from okta_agent_proxy.store.frontdoor import EventKind, Grant, Outcome, RevokeReason

_VERIFIER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def verifier_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.1 and §4.6: 43–128 unreserved characters whose S256 is the challenge."""
    if not 43 <= len(verifier) <= 128 or not set(verifier) <= _VERIFIER_CHARS:
        return False
    return hmac.compare_digest(pkce_challenge(verifier), challenge)


async def token(context: FrontDoorContext, request: HttpRequest) -> Answer:
    try:
        params = await form(request, context.settings.HEADER_READ_TIMEOUT_SECONDS)
        _no_client_secret(request, params)
        grant_type = required(params, "grant_type")
        if grant_type == "authorization_code":
            return await _code(context, params)
        if grant_type == "refresh_token":
            return await _refresh(context, params)
        raise OAuthError("unsupported_grant_type", "grant_type must be authorization_code or refresh_token")
    except OAuthError as error:
        return oauth_error_answer(error)


def _no_client_secret(request: HttpRequest, params: dict[str, str]) -> None:
    """Public clients authenticate with nothing (`token_endpoint_auth_method: none`); a client that sends
    credentials was not registered here as it believes."""
    if "client_secret" in params or "client_assertion" in params or "Authorization" in request.headers:
        raise OAuthError("invalid_client", "this gateway's clients are public: send client_id and no secret", 401)


async def _code(context: FrontDoorContext, params: dict[str, str]) -> Answer:
    code, client_id = required(params, "code"), required(params, "client_id")
    redirect_uri, verifier = required(params, "redirect_uri"), required(params, "code_verifier")
    used = await context.store.consume_code(code)
    record, grant = used.code, used.grant
    if used.outcome is Outcome.ALREADY_USED and record is not None:
        await context.event(EventKind.CODE_REPLAY, client_id=record.client_id, grant_id=record.grant_id)
        await context.liveness.revoked(record.grant_id)
    if used.outcome is not Outcome.OK or record is None or grant is None:
        raise OAuthError("invalid_grant", "the code is invalid, expired or already used")
    problem = None
    if record.client_id != client_id:
        problem = "the code was issued to another client"
    elif record.redirect_uri != redirect_uri:
        problem = "redirect_uri differs from the authorization request's"
    elif not verifier_matches(verifier, record.code_challenge):
        problem = "the PKCE code_verifier does not match"
    if problem is not None:
        await context.store.revoke_grant(grant.grant_id, RevokeReason.PKCE_FAILURE)
        await context.liveness.revoked(grant.grant_id)
        await context.event(
            EventKind.REFUSAL, client_id=client_id[:200], grant_id=grant.grant_id, detail={"reason": problem}
        )
        raise OAuthError("invalid_grant", problem)
    _same_resource(params, grant)
    refresh_token = secrets.token_urlsafe(32)
    lifetime = timedelta(days=context.settings.FRONT_DOOR_REFRESH_TTL_DAYS)
    stored = await context.store.issue_refresh_token(
        refresh_token, grant_id=grant.grant_id, expires_at=datetime.now(UTC) + lifetime
    )
    if stored is None:
        raise OAuthError("invalid_grant", "this authorization was revoked")
    pair = await _pair(context, grant, record.scopes, refresh_token)
    await context.event(EventKind.TOKEN_ISSUED, client_id=client_id, user_sub=grant.user_sub, grant_id=grant.grant_id)
    return json_answer(pair)


async def _refresh(context: FrontDoorContext, params: dict[str, str]) -> Answer:
    presented, client_id = required(params, "refresh_token"), required(params, "client_id")
    found = await context.store.find_refresh_token(presented)
    if found is None or found[1].client_id != client_id:
        raise OAuthError("invalid_grant", "the refresh token is invalid")
    _, grant = found
    _same_resource(params, grant)
    scopes = _narrowed(params.get("scope"), grant.scopes)
    await _still_allowed_at_okta(context, grant)
    new_token = secrets.token_urlsafe(32)
    pair = await _pair(context, grant, scopes, new_token)
    sealed = context.sealers.successors.seal(json.dumps(pair).encode(), _successor_aad(presented))
    lifetime = timedelta(days=context.settings.FRONT_DOOR_REFRESH_TTL_DAYS)
    rotation = await context.store.rotate_refresh_token(
        presented,
        new_token=new_token,
        new_expires_at=datetime.now(UTC) + lifetime,
        successor_sealed=sealed,
        grace=timedelta(seconds=context.settings.FRONT_DOOR_REFRESH_GRACE_SECONDS),
    )
    if rotation.outcome is Outcome.OK:
        await context.event(EventKind.REFRESH, client_id=client_id, user_sub=grant.user_sub, grant_id=grant.grant_id)
        return json_answer(pair)
    if rotation.outcome is Outcome.WITHIN_GRACE and rotation.successor_sealed is not None:
        opened = context.sealers.successors.open(rotation.successor_sealed, _successor_aad(presented))
        if opened is not None:
            return json_answer(json.loads(opened))
    if rotation.outcome is Outcome.REUSED:
        await context.liveness.revoked(grant.grant_id)
        await context.event(
            EventKind.REFRESH_REUSE, client_id=client_id, user_sub=grant.user_sub, grant_id=grant.grant_id
        )
    raise OAuthError("invalid_grant", "the refresh token is invalid, expired or already used")


async def _still_allowed_at_okta(context: FrontDoorContext, grant: Grant) -> None:
    """A refresh goes on only while Okta would go on: the held ID token is refreshed at Okta when it is near its
    expiry (at most an hour for Okta's), so a user deactivated or signed out at Okta — `invalid_grant` there — loses
    the grant at the next refresh, whatever the backends (without this, only Cross App Access would ever ask)."""
    try:
        await context.held.id_token(grant.grant_id)
    except InvalidToken:
        raise OAuthError("invalid_grant", "the sign-in at Okta has ended; sign in again") from None
    except IdpUnavailable:
        raise OAuthError("temporarily_unavailable", "Okta cannot be reached; try again", 503) from None
    except CredentialUnavailable:
        raise OAuthError("server_error", "the gateway cannot renew this sign-in", 500) from None


def _successor_aad(presented: str) -> bytes:
    return b"oap-successor:" + hashlib.sha256(presented.encode()).digest()


def _same_resource(params: dict[str, str], grant: Grant) -> None:
    resource = params.get("resource")
    if resource is None:
        return
    try:
        same = normalize_resource(resource) == grant.resource
    except InvalidTarget:
        same = False
    if not same:
        raise OAuthError("invalid_target", "resource differs from the one this authorization is for")


def _narrowed(requested: str | None, granted: Sequence[str]) -> list[str]:
    if requested is None:
        return list(granted)
    asked = set(requested.split())
    if not asked <= set(granted):
        raise OAuthError("invalid_scope", "a refresh cannot add scopes")
    return sorted(asked)


async def _pair(context: FrontDoorContext, grant: Grant, scopes: Sequence[str], refresh_token: str) -> dict[str, Any]:
    client_name = None
    if not is_client_id_url(grant.client_id):
        client = await context.store.get_client(grant.client_id)
        client_name = client.client_name if client is not None else None
    signer = context.signer
    access_token = signer.mint(
        subject=grant.user_sub,
        client_id=grant.client_id,
        resource=grant.resource,
        scopes=scopes,
        grant_id=grant.grant_id,
        client_name=client_name,
    )
    return {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": signer.ttl_seconds,
        "refresh_token": refresh_token,
        "scope": " ".join(scopes),
    }


async def revoke(context: FrontDoorContext, request: HttpRequest) -> Answer:
    """RFC 7009: 200 whether or not the token was known (§2.2), so the endpoint tells nothing about tokens."""
    try:
        params = await form(request, context.settings.HEADER_READ_TIMEOUT_SECONDS)
        _no_client_secret(request, params)
        presented, client_id = required(params, "token"), required(params, "client_id")
    except OAuthError as error:
        return oauth_error_answer(error)
    grant_id = await _grant_of(context, presented, client_id)
    if grant_id is not None and await context.store.revoke_grant(grant_id, RevokeReason.CLIENT_REQUEST) is not None:
        await context.liveness.revoked(grant_id)
        await context.event(EventKind.REVOCATION, client_id=client_id, grant_id=grant_id, detail={"by": "client"})
    return json_answer({})


async def _grant_of(context: FrontDoorContext, presented: str, client_id: str) -> str | None:
    found = await context.store.find_refresh_token(presented)
    if found is not None:
        return found[1].grant_id if found[1].client_id == client_id else None
    try:
        claims = context.signer.verify_for(presented, lambda audience: True)
    except InvalidFrontDoorToken:
        return None
    return claims.grant_id if claims.client_id == client_id else None
