"""`doctor`'s checks of the front door's Okta app (DESIGN.md §8), asked the way the front door will use it, with
`FRONT_DOOR=on`: `check_org_metadata` (the org's OpenID Connect metadata names the org as issuer), `check_app_client`
(Okta accepts the app's credentials: a code request with a random code, which Okta refuses with `invalid_grant` only
after it has authenticated the client) and `check_app_redirect` (the start of a sign-in, whose answer tells whether
`{GATEWAY_BASE_URL}/oauth/callback` is one of the app's sign-in redirect URIs). `check_front_door` runs them.
"""

from __future__ import annotations

import asyncio
import html
import re
import secrets
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp

from okta_agent_proxy.commands.doctor_probes import Result, appended, fail, ok, skip
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.frontdoor.metadata import CALLBACK
from okta_agent_proxy.frontdoor.okta_login import OktaApp, pkce_challenge
from okta_agent_proxy.frontdoor.service import okta_app_auth
from okta_agent_proxy.http.bodies import read_at_most
from okta_agent_proxy.inbound.jwks import JwksFetchError, fetch_json
from okta_agent_proxy.outbound.cross_app import org_base_url
from okta_agent_proxy.outbound.oauth_client import TokenEndpointClient, TokenEndpointError, TokenEndpointUnavailable

_CLIENT_FIXES = {
    "client_secret_basic": "set OKTA_CLIENT_ID and OKTA_CLIENT_SECRET to the Client ID and Client secret of the "
    "gateway's Okta app (Applications → the app → General → Client Credentials)",
    "private_key_jwt": "add the public half of OKTA_CLIENT_PRIVATE_KEY (its kid) to the gateway's Okta app "
    "(General → Client Credentials → Public key / Private key), or set OKTA_CLIENT_ID to that app's Client ID",
}
_CLIENT_HINTS = {"unauthorized_client": " (allow the Authorization Code grant type on the app)"}
_NAMES_REDIRECT_URI = re.compile(r"redirect_uri\W+parameter|login redirect uri", re.IGNORECASE)
_NAMES_CLIENT_ID = re.compile(r"client_id\W+parameter", re.IGNORECASE)
_MAX_PAGE = 512 * 1024


async def check_org_metadata(session: aiohttp.ClientSession, app: OktaApp, timeout: float) -> Result:
    """The org authorization server's OpenID Connect Discovery document: the issuer the ID tokens will name, and
    the two endpoints the front door signs users in with."""
    check = "front door org metadata"
    url = appended(app.org, "openid-configuration")
    fix = (
        "set OKTA_DOMAIN to the Okta org's own domain (acme.okta.com: no path, not a custom authorization server) "
        "and check the gateway can reach it"
    )
    if urlsplit(app.org).path:
        return fail(check, f"OKTA_DOMAIN names a path ({app.org}): the org's issuer is its bare origin", fix)
    try:
        document = await fetch_json(session, url, timeout)
    except JwksFetchError as exc:
        return fail(check, str(exc), fix)
    issuer = document.get("issuer")
    if issuer != app.org:
        named = urlsplit(issuer).netloc if isinstance(issuer, str) else ""
        return fail(
            check,
            f"{url} names issuer {issuer!r}, not the org {app.org}",
            f"set OKTA_DOMAIN to {named}, the host the org names itself by" if named else fix,
        )
    missing = [name for name in ("authorization_endpoint", "token_endpoint") if not isinstance(document.get(name), str)]
    if missing:
        return fail(check, f"{url} has no {' and no '.join(missing)}", fix)
    return ok(check, f"{url} names issuer {app.org}, with an authorization and a token endpoint")


async def check_app_client(client: TokenEndpointClient, app: OktaApp) -> Result:
    """Whether Okta accepts the app's credentials, asked of Okta itself: an authorization-code request with a random
    code. Okta authenticates the client before it looks at the code, so `invalid_grant` (the code) means the
    credentials were accepted and `invalid_client` that they were not; the request cannot succeed."""
    check = "front door client auth"
    method = app.auth.method
    params = {"grant_type": "authorization_code", "code": secrets.token_urlsafe(32), "redirect_uri": app.redirect_uri}
    try:
        await client.request_token(app.token_endpoint, params, app.auth)
    except TokenEndpointUnavailable as exc:
        return fail(check, f"Okta's token endpoint is unavailable ({exc})", "check OKTA_DOMAIN and the network")
    except TokenEndpointError as exc:
        if exc.error == "invalid_grant":
            return ok(check, f"Okta accepted the gateway's client credentials ({method}, {app.client_id})")
        if exc.error == "invalid_client":
            return fail(
                check,
                f"Okta refused the gateway's client credentials ({method}, {app.client_id}): "
                f"{exc.description or exc.error}",
                _CLIENT_FIXES.get(method, "set OKTA_CLIENT_ID to the Client ID of the gateway's Okta app"),
            )
        hint = _CLIENT_HINTS.get(exc.error, "")
        return Result(check, "warn", f"cannot tell: Okta answered {exc.error} before telling{hint}")
    return Result(check, "warn", "cannot tell: Okta answered a made-up authorization code with tokens")


async def check_app_redirect(session: aiohttp.ClientSession, app: OktaApp, timeout: float) -> Result:
    """Whether Okta takes `{GATEWAY_BASE_URL}/oauth/callback` as a sign-in redirect URI of the app: the start of a
    sign-in (the request the front door sends a browser to, with `scope=openid`), its redirects not followed.

    Okta shows a sign-in page (200) or redirects to its sign-in flow when the request is acceptable; for a redirect
    URI the app does not list it shows a 400 page, "The 'redirect_uri' parameter must be a Login redirect URI in the
    client app settings" (support.okta.com, "Okta Error 400 Bad Request"), as the devkit emulator does: an
    untrusted redirect URI gets no redirect (RFC 6749 §4.1.2.1). Errors found once the URI is trusted go back to it
    with `error` (a warning: the URI is registered, something else is wrong); a redirected error that names
    `redirect_uri` fails as the page does."""
    check = "front door redirect uri"
    fix = f"add {app.redirect_uri} as a Sign-in redirect URI of the gateway's Okta app (Applications → General)"
    query = {
        "client_id": app.client_id,
        "redirect_uri": app.redirect_uri,
        "response_type": "code",
        "scope": "openid",
        "state": secrets.token_urlsafe(16),
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": pkce_challenge(secrets.token_urlsafe(48)),
        "code_challenge_method": "S256",
    }
    url = f"{app.authorize_endpoint}?{urlencode(query)}"
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False, headers={"Accept": "text/html"}
        ) as response:
            status, location = response.status, response.headers.get("Location")
            page = await read_at_most(response.content, _MAX_PAGE) if status == 400 else b""
    except (aiohttp.ClientError, TimeoutError) as exc:
        return fail(check, f"GET {app.authorize_endpoint} failed: {type(exc).__name__}", "check OKTA_DOMAIN")
    if status == 200:
        return ok(check, f"Okta shows its sign-in page for {app.redirect_uri}")
    if 300 <= status < 400 and location:
        target = urlsplit(urljoin(url, location))
        error, description = (parse_qs(target.query).get(name, [""])[0] for name in ("error", "error_description"))
        if error and _NAMES_REDIRECT_URI.search(description):
            return fail(check, f"Okta refused the redirect URI {app.redirect_uri} ({error})", fix)
        back = urlunsplit((target.scheme, target.netloc, target.path, "", "")) == app.redirect_uri
        if error and back:
            return Result(check, "warn", f"Okta takes {app.redirect_uri} but refused the sign-in request: {error}")
        if error:
            return Result(check, "warn", f"cannot tell: Okta answered the sign-in request with {error}")
        return ok(check, f"Okta sends the browser to sign in ({target.netloc}{target.path}) for {app.redirect_uri}")
    text = html.unescape(page.decode("utf-8", "replace"))
    if status == 400 and _NAMES_REDIRECT_URI.search(text):
        return fail(check, f"Okta refused the redirect URI {app.redirect_uri}: not a Sign-in redirect URI", fix)
    if status == 400 and _NAMES_CLIENT_ID.search(text):
        return fail(
            check, f"Okta does not know the client id {app.client_id}", "set OKTA_CLIENT_ID to the app's Client ID"
        )
    return fail(
        check,
        f"GET {app.authorize_endpoint} answered {status}",
        "check that OKTA_CLIENT_ID is an OIDC Web App of this org that may use the Authorization Code grant",
    )


async def check_front_door(
    session: aiohttp.ClientSession, client: TokenEndpointClient, settings: Settings, timeout: float
) -> list[Result]:
    """With FRONT_DOOR on, the gateway's own Okta app: the org's metadata first; the credentials and the redirect URI
    only when the org answers as one (else they would fail for the same reason, twice)."""
    if not settings.front_door:
        return []
    # `load` refuses FRONT_DOOR=on without these (Settings.front_door_refusals): doctor never gets here without them
    assert settings.OKTA_DOMAIN is not None and settings.OKTA_CLIENT_ID is not None
    app = OktaApp(
        org=org_base_url(settings.OKTA_DOMAIN),
        client_id=settings.OKTA_CLIENT_ID,
        auth=okta_app_auth(settings),
        redirect_uri=settings.base_url + CALLBACK,
    )
    metadata = await check_org_metadata(session, app, timeout)
    if metadata.status == "fail":
        why = "not checked: the org's metadata did not answer as an Okta org's"
        return [metadata, skip("front door client auth", why), skip("front door redirect uri", why)]
    return [metadata, *await asyncio.gather(check_app_client(client, app), check_app_redirect(session, app, timeout))]
