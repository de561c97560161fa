"""User sign-in at the Okta emulator's org authorization server: the authorization code flow an OIDC web app (such as
the gateway's front door, DESIGN.md §8) runs against Okta, and the refresh tokens that keep its users signed in.

What is emulated, at the org server (issuer = the emulator's base URL):
- `GET /oauth2/v1/authorize` with Okta's parameters: `client_id` (a registered `App`), `redirect_uri` (exactly one of
  the app's `redirect_uris`), `response_type=code`, `scope` (OIDC scopes, `openid` required), `state` (required:
  Okta's /authorize reference marks it so), `nonce`, PKCE `code_challenge` + `code_challenge_method=S256` (required
  for public apps and for apps with `require_pkce`, enforced whenever sent; `plain` is refused, as Okta supports only
  S256), `prompt`, `login_hint` (fills the username), `response_mode=query`. Errors Okta shows itself (unknown
  client, redirect URI not registered) are an HTML 400 page, never a redirect; errors found once the redirect URI is
  trusted go back to it with `error`, `error_description` and `state`.
- A plain HTML sign-in page (no JavaScript): one form POSTing `username`, `password` and the hidden opaque
  transaction id `tx` to `/login`. A wrong password shows the page again, 401, with "Unable to sign in" (the same for
  an unknown user); then 302 to `redirect_uri?code=…&state=…`. No `iss` in that redirect: Okta's org server does
  not advertise RFC 9207 (`authorization_response_iss_parameter_supported` is absent from its metadata), so
  neither does the emulator.
- Codes: opaque, single use, valid 300 s ("This code remains valid for 300 seconds":
  developer.okta.com/docs/guides/implement-auth-code/use-flow/), bound to the client, redirect URI, PKCE challenge,
  nonce, scopes and user. A redemption attempt consumes the code whether it succeeds or not, so a wrong PKCE
  verifier cannot be retried and a replayed code is `invalid_grant`.
- `/oauth2/v1/token` grant `authorization_code`: the client authenticated as Okta does (`okta_emulator_clients.py`;
  a public app by `client_id` alone), the same client and `redirect_uri`, the PKCE S256 verifier checked →
  `token_type`, `expires_in` (3600), `access_token` (Okta-shaped, `aud` = the org), `scope`, `id_token` (with
  `openid`), `refresh_token` (only with `offline_access`).
- ID tokens: RS256 with the org key; `sub` (user id), `ver`, `iss` (the org), `aud` (the client id), `iat`, `exp`
  (1 h), `jti` "ID.…", `amr` ["pwd"], `idp` (the org id), `auth_time`, `at_hash`, `nonce` (when sent); `name` and
  `preferred_username` with `profile`; `email` with `email`. `groups` only when the `groups` scope is requested and
  the app defines a groups claim (`App.groups_claim_filter`, "Matches regex"), as Okta's guide for the org server
  says ("The scopes that you need to include ... are openid and groups":
  developer.okta.com/docs/guides/customize-tokens-groups-claim/add-groups-claim-org-as/); the groups include
  `Everyone`, which on Okta holds every user.
- Grant `refresh_token`: the refresh token's own client only; `scope` may narrow, never widen; new access and ID
  tokens (a refreshed ID token keeps `auth_time` and has no `nonce`, OpenID Connect Core §12.2). Per app
  (`App.refresh_token_rotation`, developer.okta.com/docs/guides/refresh-tokens/): STATIC ("persistent", Okta's
  default for web apps) answers with the same refresh token; ROTATE (Okta's default for SPAs) with a new one each
  time, the previous one still honoured for `refresh_token_leeway_seconds` (Okta's default 30); presented after
  that it is reuse, and, as Okta does, every refresh token of that sign-in is revoked → `invalid_grant`.

For tests: `revoke_refresh_tokens` (an admin revoking a user's tokens), counters (`authorizations_started`,
`logins`, `failed_logins`, `codes_redeemed`, `refreshes`, `refresh_token_reuses`, failures by error code), and the
last `authorization_requests` as received.

Not emulated: Okta sessions (every authorization shows the sign-in page; `prompt=none` is `login_required`), MFA,
consent, user-to-app assignment (every user may sign in to every app), account lockout, the "thin" ID token (Okta
documents that an ID token returned with an access token may lack some profile claims; the emulator's carries the
claims listed above), `/v1/userinfo`, `/v1/revoke`, `/v1/introspect`, logout, token and refresh-token lifetimes
beyond the access and ID tokens' hour, the implicit and hybrid flows, `response_mode` other than `query`,
`request` objects (JAR, PAR), and the authorize endpoint of custom authorization servers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiMapping
from yarl import URL

from okta_agent_proxy.devkit.okta_emulator_directory import OIDC_SCOPES, ORG, App, User
from okta_agent_proxy.devkit.okta_emulator_oauth import OAuthError, TokenRequest, single

__all__ = [
    "AUTHORIZATION_CODE",
    "CODE_LIFETIME_SECONDS",
    "EVERYONE",
    "REFRESH_TOKEN",
    "SIGN_IN_PATH",
    "TOKEN_LIFETIME_SECONDS",
    "TRANSACTION_LIFETIME_SECONDS",
    "USER_GRANTS",
    "UserLogin",
]

AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"
USER_GRANTS = (AUTHORIZATION_CODE, REFRESH_TOKEN)
CODE_LIFETIME_SECONDS = 300
TRANSACTION_LIFETIME_SECONDS = 600  # how long a sign-in page stays usable
TOKEN_LIFETIME_SECONDS = 3600  # the org server's access and ID tokens (fixed on Okta)
SIGN_IN_PATH = "/login"
EVERYONE = "Everyone"
_RECORDED_REQUESTS = 100
_PKCE_VALUE = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1-4.2
_PROMPTS = {"none", "login", "consent"}
_UNABLE_TO_SIGN_IN = "Unable to sign in"
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class PageError(Exception):
    """An error Okta shows on its own page instead of redirecting: the redirect URI is not (or no longer) trusted."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


@dataclass(frozen=True)
class _Authorization:
    """A validated `/authorize` request: what the code it leads to is bound to."""

    app: App
    redirect_uri: str
    state: str
    scopes: tuple[str, ...]
    nonce: str | None
    code_challenge: str | None
    login_hint: str


@dataclass(frozen=True)
class _Code:
    authorization: _Authorization
    user: User
    auth_time: int
    expires_at: float


@dataclass
class _Grant:
    """One sign-in of a user at an app that asked for `offline_access`: its refresh tokens stand or fall together."""

    user: User
    client_id: str
    scopes: tuple[str, ...]
    auth_time: int
    revoked: bool = False


@dataclass
class _RefreshToken:
    grant: _Grant
    rotated_at: float | None = None  # when a refresh replaced it (ROTATE apps); None while current


class UserLogin:
    """The org server's sign-in (`OktaEmulator.login`): `/authorize`, the sign-in form, the `authorization_code` and
    `refresh_token` grants, and what tests control and count."""

    def __init__(
        self,
        apps: Mapping[str, App],
        users: Mapping[str, User],
        *,
        mint_access_token: Callable[..., str],
        mint_id_token: Callable[..., str],
        clock: Callable[[], float],
        notice: str | None = None,
    ) -> None:
        """`apps` by client id, `users` by login; the emulator's minting functions and clock. `notice`: a line shown
        on the sign-in page (the demo prints its user's credentials there)."""
        self._apps = apps
        self._by_login = {user.login.casefold(): user for user in users.values()}  # Okta logins ignore case
        self._mint_access_token = mint_access_token
        self._mint_id_token = mint_id_token
        self._clock = clock
        self._notice = notice
        self._pending: dict[str, tuple[_Authorization, float]] = {}  # transaction id → request, expiry
        self._codes: dict[str, _Code] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._grants: list[_Grant] = []
        self.authorization_requests: deque[dict[str, str]] = deque(maxlen=_RECORDED_REQUESTS)
        """The latest `/authorize` query parameters as received (first value of each), oldest first."""
        self.authorizations_started = 0
        """Valid `/authorize` requests: sign-in pages shown."""
        self.authorization_errors: Counter[str] = Counter()
        """Refused `/authorize` requests by error code, shown as a page or redirected."""
        self.logins = 0
        """Successful sign-ins (codes issued)."""
        self.failed_logins = 0
        """Sign-in form posts refused for a wrong username or password."""
        self.codes_redeemed = 0
        self.code_failures: Counter[str] = Counter()
        """Refused `authorization_code` grants by error code, client authentication failures included."""
        self.refreshes = 0
        self.refresh_failures: Counter[str] = Counter()
        """Refused `refresh_token` grants by error code, client authentication failures included."""
        self.refresh_token_reuses = 0
        """Rotated refresh tokens presented after their leeway (each revoked its sign-in's refresh tokens)."""

    @property
    def enabled(self) -> bool:
        """Some app can sign users in (has redirect URIs): only then does the org serve the user grants."""
        return any(app.redirect_uris for app in self._apps.values())

    # ---- test controls

    def revoke_refresh_tokens(self, user: User | str, client_id: str | None = None) -> int:
        """Revoke the user's refresh tokens (at one app, or all), as an admin does in Okta; returns the sign-ins
        revoked. `user`: a User or a login."""
        login = user.login if isinstance(user, User) else user
        revoked = 0
        for grant in self._grants:
            if grant.user.login == login and client_id in (None, grant.client_id) and not grant.revoked:
                grant.revoked, revoked = True, revoked + 1
        return revoked

    def count(self, auth_server_id: str, grant_type: str | None, error: str | None) -> None:
        """Count a `/v1/token` outcome (`error` None: success); only the user grants at the org are counted."""
        if auth_server_id != ORG:
            return
        if grant_type == AUTHORIZATION_CODE:
            self.codes_redeemed += error is None
            self.code_failures.update([error] if error else [])
        elif grant_type == REFRESH_TOKEN:
            self.refreshes += error is None
            self.refresh_failures.update([error] if error else [])

    # ---- /authorize and the sign-in form

    def authorize(self, query: MultiMapping[str]) -> web.Response:
        self.authorization_requests.append({name: query.getone(name) for name in dict.fromkeys(query.keys())})
        try:
            app, redirect_uri = self._trusted_redirect(query)
        except PageError as refusal:
            self.authorization_errors[refusal.error] += 1
            return _error_page(refusal)
        try:
            authorization = self._authorization(app, redirect_uri, query)
        except OAuthError as refusal:
            self.authorization_errors[refusal.error] += 1
            state = query.get("state")
            return _redirect(redirect_uri, error=refusal.error, error_description=refusal.description, state=state)
        now = self._clock()
        self._pending = {tx: entry for tx, entry in self._pending.items() if entry[1] > now}
        transaction = secrets.token_urlsafe(32)
        self._pending[transaction] = (authorization, now + TRANSACTION_LIFETIME_SECONDS)
        self.authorizations_started += 1
        return self._sign_in_page(app, transaction, authorization.login_hint, message=None, status=200)

    def sign_in(self, form: MultiMapping[str]) -> web.Response:
        """The sign-in form's POST: a code back to the app, or the page again."""
        try:
            transaction = _page_param(form, "tx")
            entry = self._pending.get(transaction or "")
            if transaction is None or entry is None or entry[1] <= self._clock():
                raise PageError("invalid_request", "This sign-in page has expired. Go back to the app and try again.")
        except PageError as refusal:
            return _error_page(refusal)
        authorization = entry[0]
        username = (form.get("username") or "").strip()
        user = self._by_login.get(username.casefold())
        password = (form.get("password") or "").encode()
        if user is None or user.password is None or not hmac.compare_digest(password, user.password.encode()):
            self.failed_logins += 1
            return self._sign_in_page(authorization.app, transaction, username, message=_UNABLE_TO_SIGN_IN, status=401)
        del self._pending[transaction]
        now = self._clock()
        self._codes = {code: record for code, record in self._codes.items() if record.expires_at > now}
        code = secrets.token_urlsafe(32)
        self._codes[code] = _Code(authorization, user, int(now), now + CODE_LIFETIME_SECONDS)
        self.logins += 1
        return _redirect(authorization.redirect_uri, code=code, state=authorization.state)

    def _trusted_redirect(self, query: MultiMapping[str]) -> tuple[App, str]:
        client_id = _page_param(query, "client_id")
        app = self._apps.get(client_id or "")
        if app is None:
            raise PageError("invalid_client", "Invalid value for 'client_id' parameter.")
        redirect_uri = _page_param(query, "redirect_uri")
        if redirect_uri is None or redirect_uri not in app.redirect_uris:
            raise PageError(
                "invalid_request",
                "The 'redirect_uri' parameter must be a Login redirect URI in the client app settings.",
            )
        return app, redirect_uri

    @staticmethod
    def _authorization(app: App, redirect_uri: str, query: MultiMapping[str]) -> _Authorization:
        """The request's parameters, checked in a fixed order (Okta's own is not documented); OAuthError: the error
        to redirect."""
        if single(query, "response_type") != "code":
            raise OAuthError(
                "unsupported_response_type", "The response type is not supported by the authorization server."
            )
        if single(query, "response_mode") not in (None, "query"):
            raise OAuthError("invalid_request", "The 'response_mode' parameter is not supported; use 'query'.")
        scopes = tuple(dict.fromkeys((single(query, "scope") or "").split()))
        if "openid" not in scopes:
            raise OAuthError("invalid_scope", "The authentication request has an invalid 'scope' parameter: 'openid'.")
        if any(scope not in OIDC_SCOPES for scope in scopes):
            raise OAuthError("invalid_scope", "One or more scopes are not configured for the authorization server.")
        state = single(query, "state")
        if state is None:
            raise OAuthError("invalid_request", "The 'state' parameter is required.")
        prompts = set((single(query, "prompt") or "").split())
        if not prompts <= _PROMPTS or ("none" in prompts and len(prompts) > 1):
            raise OAuthError("invalid_request", "The 'prompt' parameter is invalid.")
        if "none" in prompts:
            raise OAuthError("login_required", "The client specified not to prompt, but the user is not logged in.")
        challenge, method = single(query, "code_challenge"), single(query, "code_challenge_method")
        if challenge is None and (method is not None or app.public or app.require_pkce):
            raise OAuthError("invalid_request", "PKCE code challenge is required for this client.")
        if challenge is not None and (method != "S256" or not _PKCE_VALUE.fullmatch(challenge)):
            raise OAuthError("invalid_request", "The PKCE 'code_challenge' or 'code_challenge_method' is invalid.")
        nonce, hint = single(query, "nonce"), single(query, "login_hint") or ""
        return _Authorization(app, redirect_uri, state, scopes, nonce, challenge, hint)

    def _sign_in_page(
        self, app: App, transaction: str, username: str, *, message: str | None, status: int
    ) -> web.Response:
        notice = f'<p class="notice">{html.escape(self._notice)}</p>' if self._notice else ""
        alert = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        body = _SIGN_IN_PAGE.format(
            app=html.escape(app.name),
            notice=notice,
            alert=alert,
            action=SIGN_IN_PATH,
            tx=html.escape(transaction),
            username=html.escape(username),
        )
        return web.Response(text=body, status=status, content_type="text/html", headers=_PAGE_HEADERS)

    # ---- /v1/token: the user grants

    async def redeem_code(self, request: TokenRequest) -> dict[str, Any]:
        code = request.param("code")
        if code is None:
            raise OAuthError("invalid_request", "The 'code' parameter is required.")
        record = self._codes.pop(code, None)  # consumed by this attempt, whatever its outcome
        if record is None or record.expires_at <= self._clock():
            raise OAuthError("invalid_grant", "The authorization code is invalid or has expired.")
        authorization = record.authorization
        if authorization.app.client_id != request.client.client_id:
            raise OAuthError("invalid_grant", "The authorization code is invalid or has expired.")
        if request.param("redirect_uri") != authorization.redirect_uri:
            raise OAuthError(
                "invalid_grant",
                "The 'redirect_uri' does not match the redirection URI used in the authorization request.",
            )
        verifier = request.param("code_verifier")
        if authorization.code_challenge is None:
            if verifier is not None:  # no downgrade: a verifier proves nothing without a challenge (RFC 9700 §2.1.1)
                raise OAuthError(
                    "invalid_grant", "PKCE verification failed: the authorization request had no challenge."
                )
        elif verifier is None or not _PKCE_VALUE.fullmatch(verifier):
            raise OAuthError("invalid_grant", "PKCE verification failed: a valid 'code_verifier' is required.")
        elif not hmac.compare_digest(_s256(verifier), authorization.code_challenge):
            raise OAuthError("invalid_grant", "PKCE verification failed.")
        refresh_token = None
        if "offline_access" in authorization.scopes:
            grant = _Grant(record.user, request.client.client_id, authorization.scopes, record.auth_time)
            self._grants.append(grant)
            refresh_token = self._new_refresh_token(grant)
        return self._tokens(
            request.client, record.user, authorization.scopes, record.auth_time, authorization.nonce, refresh_token
        )

    async def refresh(self, request: TokenRequest) -> dict[str, Any]:
        presented = request.param("refresh_token")
        if presented is None:
            raise OAuthError("invalid_request", "The 'refresh_token' parameter is required.")
        token = self._refresh_tokens.get(presented)
        if token is None or token.grant.revoked or token.grant.client_id != request.client.client_id:
            raise OAuthError("invalid_grant", "The refresh token is invalid or expired.")
        app, grant, now = request.client, token.grant, self._clock()
        if token.rotated_at is not None and now - token.rotated_at > app.refresh_token_leeway_seconds:
            grant.revoked = True  # reuse: the newest token of this sign-in goes too
            self.refresh_token_reuses += 1
            raise OAuthError("invalid_grant", "The refresh token is invalid or expired.")
        requested = tuple(dict.fromkeys((request.param("scope") or "").split()))
        if any(scope not in grant.scopes for scope in requested):
            raise OAuthError("invalid_scope", "The requested scope exceeds the scope granted by the refresh token.")
        refresh_token = presented
        if app.refresh_token_rotation == "ROTATE":
            token.rotated_at = token.rotated_at if token.rotated_at is not None else now
            refresh_token = self._new_refresh_token(grant)
        return self._tokens(app, grant.user, requested or grant.scopes, grant.auth_time, None, refresh_token)

    def _new_refresh_token(self, grant: _Grant) -> str:
        value = secrets.token_urlsafe(32)
        self._refresh_tokens[value] = _RefreshToken(grant)
        return value

    def _tokens(
        self,
        app: App,
        user: User,
        scopes: Sequence[str],
        auth_time: int,
        nonce: str | None,
        refresh_token: str | None,
    ) -> dict[str, Any]:
        access_token = self._mint_access_token(
            ORG, user=user, client_id=app.client_id, scopes=scopes, extra_claims={"auth_time": auth_time}
        )
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME_SECONDS,
            "access_token": access_token,
            "scope": " ".join(scopes),
        }
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        if "openid" in scopes:
            body["id_token"] = self._id_token(app, user, scopes, auth_time, nonce, access_token)
        return body

    def _id_token(
        self, app: App, user: User, scopes: Sequence[str], auth_time: int, nonce: str | None, access_token: str
    ) -> str:
        claims: dict[str, Any] = {"auth_time": auth_time, "at_hash": _at_hash(access_token)}
        claims["preferred_username"] = user.login if "profile" in scopes else None
        if "profile" in scopes:
            claims["name"] = user.display_name
        if "email" in scopes:
            claims["email"] = user.login
        if "groups" in scopes and app.groups_claim_filter is not None:
            pattern = re.compile(app.groups_claim_filter)
            claims["groups"] = [group for group in dict.fromkeys((EVERYONE, *user.groups)) if pattern.fullmatch(group)]
        return self._mint_id_token(
            ORG, user=user, client_id=app.client_id, lifetime=TOKEN_LIFETIME_SECONDS, nonce=nonce, extra_claims=claims
        )


def _page_param(params: MultiMapping[str], name: str) -> str | None:
    """A single-valued parameter of a request answered with a page: repeating it is a page error."""
    try:
        return single(params, name)
    except OAuthError as refusal:
        raise PageError(refusal.error, refusal.description) from None


def _redirect(redirect_uri: str, **params: str | None) -> web.Response:
    location = URL(redirect_uri).update_query({name: value for name, value in params.items() if value is not None})
    return web.Response(status=302, headers={"Location": str(location), "Cache-Control": "no-store"})


def _error_page(refusal: PageError) -> web.Response:
    body = _ERROR_PAGE.format(error=html.escape(refusal.error), description=html.escape(refusal.description))
    return web.Response(text=body, status=400, content_type="text/html", headers=_PAGE_HEADERS)


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _at_hash(access_token: str) -> str:
    """OpenID Connect Core §3.1.3.6: the left half of the SHA-256 of the access token, base64url."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode()


_STYLE = (
    (
        "body{font-family:system-ui,sans-serif;background:#f4f4f4;margin:0}"
        "main{max-width:22rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:.5rem}"
        "label,input,button{display:block;width:100%;box-sizing:border-box}input{margin:.25rem 0 1rem;padding:.5rem}"
        "button{padding:.6rem;background:#1662dd;color:#fff;border:0;border-radius:.25rem}"
        ".error{color:#b00020}.notice{background:#eef4ff;padding:.5rem}"
    )
    .replace("{", "{{")
    .replace("}", "}}")
)  # the pages below are str.format templates
_SIGN_IN_PAGE = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Sign In</title>'
    f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>\n'
    "<body><main><h1>Sign In</h1><p>to <strong>{app}</strong> (Okta emulator)</p>{notice}{alert}\n"
    '<form method="post" action="{action}">'
    '<input type="hidden" name="tx" value="{tx}">'
    '<label for="username">Username</label>'
    '<input id="username" name="username" type="text" autocomplete="username" value="{username}" required>'
    '<label for="password">Password</label>'
    '<input id="password" name="password" type="password" autocomplete="current-password" required>'
    '<button type="submit">Sign In</button></form></main></body></html>\n'
)
_ERROR_PAGE = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>400 Bad Request</title>'
    f"<style>{_STYLE}</style></head>\n"
    '<body><main><h1>400 Bad Request</h1><p class="error-code">{error}</p><p>{description}</p></main></body></html>\n'
)
