"""The consent step (DESIGN.md §8): the user approves this client for this backend, once, then it is remembered.

After the login, a user who already approved this client for this backend with at least these scopes goes straight
back to the client with a code — when the code goes to an `https` redirect URI. A loopback or custom-scheme
redirect proves nothing of who receives the code (any local process can listen on a port, or claim a scheme, and
name a known client), so the page is shown every time for those (RFC 8252 §8.6). Anyone else sees the consent page
(`pages.py`). Its form carries a CSRF token — a
single-use value in the store whose sealed payload is the rest of the flow — and the browser that was shown the
page holds a cookie whose hash that payload names: a token copied into another browser, or a form posted from
another site (SameSite=Lax keeps the cookie off a cross-site POST; the edge refuses a foreign `Origin`), does not
complete. Approve → a one-time code (60 s) bound to the client, the redirect URI, the PKCE challenge, the resource
and the grant; deny → `access_denied`, and the grant made at login is revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from okta_agent_proxy.frontdoor.clients import UnknownClient, find_client
from okta_agent_proxy.frontdoor.context import FLOW_SECONDS, FrontDoorContext
from okta_agent_proxy.frontdoor.forms import OAuthError, cookies, form, html_answer, html_error, redirect
from okta_agent_proxy.frontdoor.pages import ConsentView, consent_page
from okta_agent_proxy.http.interface import Answer, HttpRequest
from okta_agent_proxy.store.frontdoor import EventKind, Outcome, RevokeReason

if TYPE_CHECKING:
    from okta_agent_proxy.frontdoor.authorize import PendingAuthorization

CONSENT = "consent"
CODE_SECONDS = 60


async def continue_to_consent(
    context: FrontDoorContext,
    pending: PendingAuthorization,
    grant_id: str,
    claims: Mapping[str, Any],
    scopes: Sequence[str],
) -> Answer:
    subject = str(claims["sub"])
    step = {
        "grant": grant_id,
        "sub": subject,
        "client_id": pending.client_id,
        "redirect_uri": pending.redirect_uri,
        "state": pending.state,
        "code_challenge": pending.code_challenge,
        "resource": pending.resource,
        "backend": pending.backend,
        "scopes": list(scopes),
    }
    remembered = await context.store.find_consent(subject, pending.client_id, pending.backend)
    if remembered is not None and remembered.covers(scopes) and pending.redirect_uri.startswith("https://"):
        return await _issue_code(context, step)
    try:
        client = await find_client(context, pending.client_id)
    except UnknownClient as unknown:  # its document went away meanwhile
        return html_error("Unknown application", str(unknown))
    csrf, browser = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    step["browser"] = hashlib.sha256(browser.encode()).hexdigest()
    sealed = context.sealers.flow.seal(json.dumps(step).encode(), _aad(csrf))
    await context.store.start_pending(
        csrf, purpose=CONSENT, ttl=timedelta(seconds=FLOW_SECONDS), client_id=pending.client_id, payload=sealed
    )
    view = ConsentView(
        client_name=client.client_name,
        client_id=client.client_id,
        verified_host=client.verified_host,
        redirect_host=_redirect_host(pending.redirect_uri),
        backend=pending.backend,
        resource=pending.resource,
        scopes=tuple(scopes),
        user=str(claims.get("name") or claims.get("email") or claims.get("preferred_username") or subject),
        csrf_token=csrf,
    )
    cookie = context.set_cookie(context.cookie_name(CONSENT, csrf), browser)
    return html_answer(consent_page(view), headers={"Set-Cookie": cookie})


async def decide(context: FrontDoorContext, request: HttpRequest) -> Answer:
    """`POST /oauth/consent`."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        await context.event(EventKind.REFUSAL, detail={"reason": "consent_cross_site"})
        return html_error("Request refused", "This form can only be sent from this gateway's own page.", 403)
    try:
        fields = await form(request, context.settings.HEADER_READ_TIMEOUT_SECONDS)
    except OAuthError as error:
        return html_error("Invalid request", error.description)
    csrf, decision = fields.get("csrf"), fields.get("decision")
    if csrf is None or decision not in ("approve", "deny"):
        await context.event(EventKind.REFUSAL, detail={"reason": "consent_malformed"})
        return html_error("Invalid request", "The consent form is incomplete.")
    used = await context.store.consume_pending(csrf, purpose=CONSENT)
    name = context.cookie_name(CONSENT, csrf)
    step = _open(context, used.payload, csrf) if used.outcome is Outcome.OK else None
    browser = cookies(request).get(name, "")
    expected = step.get("browser", "") if step else ""
    if step is None or not hmac.compare_digest(hashlib.sha256(browser.encode()).hexdigest(), expected):
        await context.event(EventKind.REFUSAL, client_id=used.client_id, detail={"reason": "consent_csrf"})
        return html_error(
            "Request refused", "This consent form has expired, was already used, or belongs to another browser.", 403
        )
    clear = {"Set-Cookie": context.set_cookie(name, "", max_age=0)}
    if decision == "deny":
        await context.store.revoke_grant(step["grant"], RevokeReason.CONSENT_DENIED)
        await context.event(
            EventKind.CONSENT,
            client_id=step["client_id"],
            user_sub=step["sub"],
            grant_id=step["grant"],
            detail={"decision": "deny", "backend": step["backend"]},
        )
        values = {"error": "access_denied", "error_description": "the user denied access", "state": step["state"]}
        return redirect(step["redirect_uri"], {**values, "iss": context.issuer}, clear)
    await context.store.record_consent(
        user_sub=step["sub"], client_id=step["client_id"], backend=step["backend"], scopes=step["scopes"]
    )
    await context.event(
        EventKind.CONSENT,
        client_id=step["client_id"],
        user_sub=step["sub"],
        grant_id=step["grant"],
        detail={"decision": "approve", "backend": step["backend"], "scopes": step["scopes"]},
    )
    answer = await _issue_code(context, step)
    return Answer(answer.status, answer.body, {**answer.headers, **clear}, answer.content_type)


async def _issue_code(context: FrontDoorContext, step: Mapping[str, Any]) -> Answer:
    code = secrets.token_urlsafe(32)
    await context.store.create_code(
        code,
        grant_id=step["grant"],
        client_id=step["client_id"],
        redirect_uri=step["redirect_uri"],
        code_challenge=step["code_challenge"],
        resource=step["resource"],
        scopes=step["scopes"],
        ttl=timedelta(seconds=CODE_SECONDS),
    )
    return redirect(step["redirect_uri"], {"code": code, "state": step["state"], "iss": context.issuer})


def _open(context: FrontDoorContext, payload: bytes | None, csrf: str) -> dict[str, Any] | None:
    opened = context.sealers.flow.open(payload, _aad(csrf)) if payload else None
    return json.loads(opened) if opened is not None else None


def _aad(csrf: str) -> bytes:
    return b"oap-consent:" + csrf.encode()


def _redirect_host(uri: str) -> str:
    parts = urlsplit(uri)
    return parts.netloc or f"{parts.scheme}:"
