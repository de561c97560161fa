"""`GET /oauth/authorize` and `GET /oauth/callback` (DESIGN.md §8): the client's authorization request, the user's
login at Okta as the gateway's own app, and the way back.

`/oauth/authorize` checks the client and its redirect URI first, then everything else; a request refused at this
stage gets an HTML page, never a redirect — not even to a registered URI, since registration is open and a redirect
before any user interaction would make the gateway an open redirector (RFC 9700 §4.11.2). Errors after the sign-in
(Okta's refusal, no scope to grant, consent denied) go back to the client with `error`, `state` and `iss` (RFC
9207). A good request is sent on to Okta's org authorization server
with the gateway's client id, its own PKCE, `state` and `nonce`; the client's request travels in a sealed, HttpOnly,
SameSite=Lax cookie named after Okta's `state` (several flows may run in one browser), and that `state` is a
single-use value in the store.

`/oauth/callback` opens the cookie the `state` names, spends the `state` (a replay or a forged state is refused and
recorded), redeems Okta's code, verifies the ID token (`okta_login.py`), grants the scopes the user's groups allow,
stores the grant with the Okta tokens sealed, and goes on to consent (`consent.py`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta

import structlog
from multidict import CIMultiDict

from okta_agent_proxy.frontdoor.clients import UnknownClient, find_client
from okta_agent_proxy.frontdoor.consent import continue_to_consent
from okta_agent_proxy.frontdoor.context import FLOW_SECONDS, FrontDoorContext, b64, unb64
from okta_agent_proxy.frontdoor.forms import OAuthError, cookies, html_error, parameters, redirect, required
from okta_agent_proxy.frontdoor.grants import seal_okta_tokens
from okta_agent_proxy.frontdoor.okta_login import InvalidIdToken, OktaLoginError, OktaTokens, OktaUnavailable
from okta_agent_proxy.frontdoor.redirects import match_redirect_uri
from okta_agent_proxy.frontdoor.resources import InvalidTarget
from okta_agent_proxy.frontdoor.scopes import allowed_scopes, granted_scopes, groups_of
from okta_agent_proxy.http.interface import Answer, HttpRequest
from okta_agent_proxy.store.frontdoor import EventKind, Outcome

log = structlog.get_logger(__name__)
OKTA_STATE = "okta_state"
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}\Z")  # base64url of a SHA-256, unpadded (RFC 7636 §4.2)
_USER_CLAIMS = ("sub", "name", "email", "preferred_username", "groups")


@dataclass(frozen=True)
class PendingAuthorization:
    """The client's request while the user is at Okta (sealed into the cookie)."""

    client_id: str
    redirect_uri: str  # as the client sent it (its port)
    state: str | None
    code_challenge: str
    resource: str
    backend: str
    scope: str | None
    okta_nonce: str
    okta_verifier: str


def redirect_error(context: FrontDoorContext, uri: str, state: str | None, error: str, description: str) -> Answer:
    return redirect(uri, {"error": error, "error_description": description, "state": state, "iss": context.issuer})


async def authorize(context: FrontDoorContext, request: HttpRequest) -> Answer:
    try:
        params = parameters(request.query_string)
        client_id = required(params, "client_id")
        requested_uri = required(params, "redirect_uri")
    except OAuthError as error:
        return html_error("Invalid request", error.description)
    try:
        client = await find_client(context, client_id)
    except UnknownClient as unknown:
        detail = {"reason": "unknown_client", **({"document": unknown.why} if unknown.why else {})}
        await context.event(EventKind.REFUSAL, client_id=client_id[:200], detail=detail)
        return html_error("Unknown application", str(unknown))
    redirect_uri = requested_uri if match_redirect_uri(requested_uri, client.redirect_uris) else None
    if redirect_uri is None:
        await context.event(EventKind.REFUSAL, client_id=client_id, detail={"reason": "redirect_uri_mismatch"})
        return html_error("Invalid redirect", "redirect_uri is not one this application registered.")
    try:
        pending = _pending(context, params, client_id, redirect_uri)
    except OAuthError as error:
        # Not redirected, though the redirect URI is registered: anyone may register any https URI, and a request
        # that fails before the user has done anything would make this gateway's name an open redirector
        # (RFC 9700 §4.11.2). Errors found after the sign-in go back to the client.
        return html_error("Invalid request", f"{error.error}: {error.description}")
    await context.store.touch_client(client_id)
    start = context.login.start()
    await context.store.start_pending(
        start.state, purpose=OKTA_STATE, ttl=timedelta(seconds=FLOW_SECONDS), client_id=client_id
    )
    pending = replace(pending, okta_nonce=start.nonce, okta_verifier=start.code_verifier)
    sealed = context.sealers.flow.seal(json.dumps(asdict(pending)).encode(), _cookie_aad(start.state))
    cookie = context.set_cookie(context.cookie_name("authz", start.state), b64(sealed))
    return Answer(303, b"", {"Location": start.authorize_url, "Set-Cookie": cookie, "Cache-Control": "no-store"}, None)


def _pending(context: FrontDoorContext, params: dict[str, str], client_id: str, uri: str) -> PendingAuthorization:
    if params.get("response_type") != "code":
        raise OAuthError("unsupported_response_type", "response_type must be code")
    challenge = params.get("code_challenge")
    if challenge is None or params.get("code_challenge_method") != "S256":
        raise OAuthError("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256")
    if not _S256_CHALLENGE.match(challenge):
        raise OAuthError("invalid_request", "code_challenge is not an S256 challenge")
    if "request" in params or "request_uri" in params:
        raise OAuthError("request_not_supported", "request objects are not supported")
    try:
        resource = context.resources.resolve(params.get("resource"))
    except InvalidTarget as target:
        raise OAuthError("invalid_target", str(target)) from None
    return PendingAuthorization(
        client_id, uri, params.get("state"), challenge, resource.url, resource.backend, params.get("scope"), "", ""
    )


def _cookie_aad(okta_state: str) -> bytes:
    return b"oap-authz:" + okta_state.encode()


async def callback(context: FrontDoorContext, request: HttpRequest) -> Answer:
    try:
        params = parameters(request.query_string)
        okta_state = required(params, "state")
    except OAuthError as error:
        await context.event(EventKind.REFUSAL, detail={"reason": "bad_state"})
        return html_error("Invalid request", error.description)
    name = context.cookie_name("authz", okta_state)
    clear = context.set_cookie(name, "", max_age=0)
    pending = _open_pending(context, cookies(request).get(name), okta_state)
    used = await context.store.consume_pending(okta_state, purpose=OKTA_STATE)
    if pending is None or used.outcome is not Outcome.OK:
        reason = "state_replayed" if used.outcome is Outcome.ALREADY_USED else "bad_state"
        await context.event(EventKind.REFUSAL, client_id=used.client_id, detail={"reason": reason})
        return html_error(
            "Sign-in could not be completed",
            "This sign-in link has expired, was already used, or was opened in another browser. Start again from "
            "your application.",
        )
    answer = await _finish(context, params, pending)
    headers = CIMultiDict(answer.headers)
    headers.add("Set-Cookie", clear)  # beside the consent page's own cookie, if it sets one
    return Answer(answer.status, answer.body, headers, answer.content_type)


def _open_pending(context: FrontDoorContext, cookie: str | None, okta_state: str) -> PendingAuthorization | None:
    sealed = unb64(cookie) if cookie else None
    opened = context.sealers.flow.open(sealed, _cookie_aad(okta_state)) if sealed else None
    if opened is None:
        return None
    return PendingAuthorization(**json.loads(opened))


async def _finish(context: FrontDoorContext, params: dict[str, str], pending: PendingAuthorization) -> Answer:
    back, state = pending.redirect_uri, pending.state
    if "error" in params:  # the user cancelled at Okta, or Okta refused the login
        error = params["error"] if params["error"] in ("access_denied", "temporarily_unavailable") else "access_denied"
        return redirect_error(context, back, state, error, "the sign-in at Okta did not complete")
    try:
        tokens = await context.login.finish(
            required(params, "code"), code_verifier=pending.okta_verifier, nonce=pending.okta_nonce
        )
    except OAuthError as error:
        return redirect_error(context, back, state, "access_denied", error.description)
    except InvalidIdToken as invalid:
        log.warning("okta_id_token_refused", reason=str(invalid))
        await context.event(EventKind.REFUSAL, client_id=pending.client_id, detail={"reason": "id_token_refused"})
        return redirect_error(context, back, state, "server_error", "the identity provider's answer was refused")
    except OktaLoginError as refused:
        log.error("okta_login_refused", error=refused.error)
        return redirect_error(context, back, state, "server_error", "the identity provider refused the sign-in")
    except OktaUnavailable:
        return redirect_error(context, back, state, "temporarily_unavailable", "the identity provider is unavailable")
    claims = tokens.claims
    subject = str(claims["sub"])
    scopes = granted_scopes(pending.scope, allowed_scopes(context.config().front_door, groups_of(claims)))
    if not scopes:
        await context.event(
            EventKind.REFUSAL, client_id=pending.client_id, user_sub=subject, detail={"reason": "no_scope"}
        )
        return redirect_error(context, back, state, "invalid_scope", "none of the requested scopes may be granted")
    grant = await _store_grant(context, pending, tokens, subject, scopes)
    await context.event(
        EventKind.LOGIN,
        client_id=pending.client_id,
        user_sub=subject,
        grant_id=grant,
        detail={"backend": pending.backend, "scopes": list(scopes)},
    )
    return await continue_to_consent(context, pending, grant, claims, scopes)


async def _store_grant(
    context: FrontDoorContext, pending: PendingAuthorization, tokens: OktaTokens, subject: str, scopes: Sequence[str]
) -> str:
    grant_id = secrets.token_urlsafe(18)
    id_token, refresh_token = seal_okta_tokens(context.sealers.okta_tokens, grant_id, tokens)
    await context.store.create_grant(
        grant_id=grant_id,
        user_sub=subject,
        user_claims={name: tokens.claims[name] for name in _USER_CLAIMS if name in tokens.claims},
        client_id=pending.client_id,
        resource=pending.resource,
        scopes=scopes,
        okta_id_token=id_token,
        okta_id_token_expires_at=datetime.fromtimestamp(tokens.expires_at, UTC),
        okta_refresh_token=refresh_token,
        okta_refresh_token_expires_at=None,
        expires_at=datetime.now(UTC) + timedelta(seconds=FLOW_SECONDS),  # until consent; tokens extend it
    )
    return grant_id
