"""An embedded, Okta-shaped identity provider for the demo and the tests (`okta-agent-proxy demo idp`).

What it emulates, on one loopback port (PROTOCOL.md §2.1, §2.6):
- the **org authorization server**: issuer `http://127.0.0.1:PORT`, `/oauth2/v1/keys`, `/oauth2/v1/token`,
  `/oauth2/v1/authorize` with a sign-in page, metadata at `/.well-known/oauth-authorization-server` and
  `/.well-known/openid-configuration`;
- **custom authorization servers** `/oauth2/{id}`, each with its default audience: `{issuer}/v1/keys`,
  `{issuer}/v1/token`, and metadata where Okta serves it, path-*appended* (`{issuer}/.well-known/…`). The RFC 8414
  path-*inserted* location is 404 as on Okta unless `path_inserted_metadata=True`, so discovery is tested the way
  real Okta behaves.

Okta behaviours kept: access tokens shaped like Okta's (header RS256 + `kid`, no `typ`; `ver` 1, `jti` "AT.…", `iss`,
`aud`, `iat`, `exp`, `cid`, `uid`, `scp` as a JSON array, `auth_time`, `sub` = the user's login, or the client id on
client-credentials tokens); ID tokens with `aud` = the client id and `sub` = the user id; one RSA key per server
under an opaque, stable `kid`, and rotation that may keep the old key published; client_credentials at custom
servers, clients authenticated as Okta does (`okta_emulator_clients.py`); RFC 6749 §5.2 errors with `no-store`; Okta's
JSON 404 for an unknown authorization server.

User sign-in (`self.login`, `okta_emulator_login.py`): the authorization code flow with PKCE, state and nonce at the
org server for apps with `redirect_uris` (users sign in with their `password`), ID tokens with `groups`, and the
refresh_token grant (persistent or rotating per app). The org serves the `authorization_code` and `refresh_token`
grants, and advertises them, only when some app has redirect URIs.

Cross App Access (`self.xaa`, `okta_emulator_xaa.py`): the org server mints ID-JAGs (RFC 8693 token exchange) for
what `xaa_policies` allow, from custom servers' access tokens or from ID tokens (those of the sign-in above
included); custom servers redeem them (RFC 7523 jwt-bearer) unless built with `jwt_bearer=False`.

For tests: tokens minted in code for configured users and apps, claims and headers overridable; `rotate_keys`,
`retire_key`; `xaa`'s and `login`'s counters, `login.revoke_refresh_tokens`; an injectable clock. Extension points:
`/v1/token` dispatches on `grant_type` through a table of `GrantHandler`s per kind of server (`register_grant`),
which is also the metadata's `grant_types_supported`; a grant type missing from the table gets
`unsupported_grant_type` before any client authentication. `middlewares` wrap every route (aiohttp's own
mechanism): the tests inject outages and count or record requests with them (tests/support/okta_faults.py), so the
emulator itself carries no failure modes.

Not emulated: `/v1/authorize` at custom servers (advertised, not served), Okta sessions, MFA, consent,
introspection, `/v1/revoke`, userinfo, logout, access policies beyond Cross App Access (client_credentials gets any
scope its server defines), rate limits, JWKS cache headers, TLS (see `okta_emulator_login.py` for the sign-in's own
limits). State lives in memory. Tokens, codes, passwords and secrets are never logged.

This module is the HTTP face and the minting; the rest lives beside it: the org's users, apps and servers
(`okta_emulator_directory.py`), signing keys (`okta_emulator_keys.py`), client authentication
(`okta_emulator_clients.py`), the token endpoint's vocabulary (`okta_emulator_oauth.py`), user sign-in
(`okta_emulator_login.py`), Cross App Access (`okta_emulator_xaa.py`), and the standalone demo org of
`okta-agent-proxy demo idp` (`demo_idp.py`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, Self

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import MultiDict

from okta_agent_proxy.devkit.okta_emulator_clients import ClientAuthenticator
from okta_agent_proxy.devkit.okta_emulator_directory import (
    OIDC_SCOPES,
    ORG,
    App,
    AuthorizationServer,
    User,
    by_key,
    okta_id,
)
from okta_agent_proxy.devkit.okta_emulator_keys import EmulatorKey, KeyRing
from okta_agent_proxy.devkit.okta_emulator_login import (
    AUTHORIZATION_CODE,
    REFRESH_TOKEN,
    SIGN_IN_PATH,
    USER_GRANTS,
    UserLogin,
)
from okta_agent_proxy.devkit.okta_emulator_oauth import (
    GrantHandler,
    OAuthError,
    TokenRequest,
    metadata_document,
    okta_error,
    single,
)
from okta_agent_proxy.devkit.okta_emulator_xaa import JWT_BEARER, TOKEN_EXCHANGE, CrossAppAccess, XaaPolicy

__all__ = [
    "CLIENT_CREDENTIALS",
    "ORG",
    "App",
    "AuthorizationServer",
    "GrantHandler",
    "OAuthError",
    "OktaEmulator",
    "TokenRequest",
    "User",
    "UserLogin",
    "XaaPolicy",
    "okta_id",
]

CLIENT_CREDENTIALS = "client_credentials"
LOOPBACK = "127.0.0.1"
ServerKind = Literal["org", "custom"]
Clock = Callable[[], float]
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_SHUTDOWN_GRACE_SECONDS = 0.25  # in-flight requests at close (only answers a test's middleware delays take long)


class OktaEmulator:
    """The emulated Okta org. `async with OktaEmulator(...) as idp:` serves it on 127.0.0.1 in the running loop."""

    def __init__(
        self,
        *,
        auth_servers: Sequence[AuthorizationServer] = (AuthorizationServer("default", "api://default"),),
        users: Sequence[User] = (),
        apps: Sequence[App] = (),
        port: int = 0,
        path_inserted_metadata: bool = False,
        issuer_assertion_audience: bool = False,
        xaa_policies: Sequence[XaaPolicy] = (),
        token_exchange: bool = True,
        clock: Clock = time.time,
        middlewares: Sequence[Middleware] = (),
        sign_in_notice: str | None = None,
    ) -> None:
        """`issuer_assertion_audience` also accepts the issuer as a client assertion's `aud` (rfc7523bis);
        Okta accepts only the token endpoint URL. `xaa_policies` start `self.xaa.policies`; `token_exchange=False`:
        no ID-JAGs. `middlewares`: aiohttp middlewares around every route, the first one outermost.
        `sign_in_notice`: a line of text on the sign-in page (the demo shows its user's credentials)."""
        self._custom = by_key(auth_servers, lambda server: server.id, "authorization server id")
        self._users = by_key(users, lambda user: user.login, "user login")
        self._apps = by_key(apps, lambda app: app.client_id, "app client_id")
        self._port = port
        self._path_inserted_metadata = path_inserted_metadata
        self._issuer_assertion_audience = issuer_assertion_audience
        self._clock = clock
        self._middlewares = tuple(middlewares)
        # One logger per emulator, bound on first use: a test's structlog capture sees this instance's events.
        self._log = structlog.get_logger(__name__)
        self._clients = ClientAuthenticator(self._apps, clock)
        self._grants: dict[ServerKind, dict[str, GrantHandler]] = {"org": {}, "custom": {}}
        self.register_grant(CLIENT_CREDENTIALS, self._client_credentials, kind="custom")
        self.login = UserLogin(
            self._apps,
            self._users,
            mint_access_token=self.mint_access_token,
            mint_id_token=self.mint_id_token,
            clock=clock,
            notice=sign_in_notice,
        )
        """User sign-in at the org server: its counters, records and `revoke_refresh_tokens`."""
        if self.login.enabled:
            self.register_grant(AUTHORIZATION_CODE, self.login.redeem_code, kind="org")
            self.register_grant(REFRESH_TOKEN, self.login.refresh, kind="org")
        self.xaa = CrossAppAccess(
            self._custom, self._users, self.issuer, self._keyring, self.mint_access_token, clock, xaa_policies
        )
        """Cross App Access: its policies, counters and `mint_id_jag`."""
        if token_exchange:
            self.register_grant(TOKEN_EXCHANGE, self.xaa.exchange, kind="org")
        self.register_grant(JWT_BEARER, self.xaa.redeem, kind="custom")
        self._keys: dict[str, KeyRing] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.org_id = okta_id("00o")

    # ---- lifecycle and addresses

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the Okta emulator is already started")
        ids = [ORG, *self._custom]
        # RSA key generation is CPU work: keep it off the event loop.
        keys = await asyncio.gather(*(asyncio.to_thread(EmulatorKey.generate) for _ in ids))
        self._keys = {server_id: KeyRing(key) for server_id, key in zip(ids, keys, strict=True)}
        runner = web.AppRunner(
            self._application(), access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_GRACE_SECONDS
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, LOOPBACK, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._base_url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
        self._log.info("okta_emulator_started", base_url=self._base_url, auth_servers=sorted(self._custom))

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner, self._base_url = self._runner, None, None
            await runner.cleanup()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`: the org's URL, also the org authorization server's issuer."""
        if self._base_url is None:
            raise RuntimeError("the Okta emulator is not started")
        return self._base_url

    def issuer(self, auth_server_id: str) -> str:
        self._keyring(auth_server_id)
        return self.base_url if auth_server_id == ORG else f"{self.base_url}/oauth2/{auth_server_id}"

    def jwks_uri(self, auth_server_id: str) -> str:
        return f"{self._endpoints(auth_server_id)}/v1/keys"

    def token_endpoint(self, auth_server_id: str) -> str:
        return f"{self._endpoints(auth_server_id)}/v1/token"

    @property
    def authorization_endpoint(self) -> str:
        """The org server's `/oauth2/v1/authorize` (custom servers advertise theirs but the emulator serves none)."""
        return f"{self._endpoints(ORG)}/v1/authorize"

    def audience(self, auth_server_id: str) -> str:
        """The default `aud` of the server's access tokens (the org's own URL for the org server, as on Okta)."""
        return self.base_url if auth_server_id == ORG else self._custom[auth_server_id].audience

    def _endpoints(self, auth_server_id: str) -> str:
        return f"{self.base_url}/oauth2" if auth_server_id == ORG else self.issuer(auth_server_id)

    def _keyring(self, auth_server_id: str) -> KeyRing:
        if auth_server_id not in self._keys:
            raise KeyError(f"unknown authorization server {auth_server_id!r} (or the emulator is not started)")
        return self._keys[auth_server_id]

    # ---- test controls

    def register_grant(self, grant_type: str, handler: GrantHandler, *, kind: ServerKind) -> None:
        """Serve `grant_type` at every `/v1/token` of this kind of authorization server (replacing any handler)."""
        self._grants[kind][grant_type] = handler

    def rotate_keys(self, auth_server_id: str, keep_old: bool = True) -> str:
        """Publish a new signing key and return its `kid`; the old keys stay in the JWKS only when `keep_old`.

        Generates an RSA key synchronously (about 0.1 s): a test control, not a request path."""
        kid = self._keyring(auth_server_id).rotate(EmulatorKey.generate(), keep_old=keep_old)
        self._log.info("okta_emulator_keys_rotated", auth_server=auth_server_id, kid=kid, kept_old=keep_old)
        return kid

    def retire_key(self, auth_server_id: str, kid: str) -> None:
        """Remove a key that no longer signs from the JWKS (KeyError if unknown, ValueError if it signs)."""
        self._keyring(auth_server_id).retire(kid)
        self._log.info("okta_emulator_key_retired", auth_server=auth_server_id, kid=kid)

    def signing_kid(self, auth_server_id: str) -> str:
        return self._keyring(auth_server_id).signing_key.kid

    def jwks(self, auth_server_id: str) -> dict[str, Any]:
        """The JWKS the server publishes right now (without an HTTP round trip)."""
        return self._keyring(auth_server_id).jwks()

    # ---- minting

    def mint_access_token(
        self,
        auth_server_id: str,
        *,
        user: User | str | None,
        client_id: str,
        scopes: Sequence[str],
        lifetime: int = 3600,
        audience: str | Sequence[str] | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """An access token as the server would issue it to `client_id` for `user` (a User, or a configured login;
        None: a client-credentials token, `sub` = `cid` and no `uid`). `extra_claims` and `headers` are applied
        last; a None value removes the claim or header. An `alg` header changes the algorithm (RS384, RS512)."""
        now = int(self._clock())
        aud = audience or self.audience(auth_server_id)
        claims: dict[str, Any] = {"ver": 1, "jti": f"AT.{secrets.token_urlsafe(32)}"}
        claims |= {"iss": self.issuer(auth_server_id), "aud": aud if isinstance(aud, str) else [*aud], "iat": now}
        claims |= {"exp": now + lifetime, "cid": client_id}
        person = self._user(user) if user is not None else None
        if person is None:
            claims |= {"scp": list(scopes), "sub": client_id}
        else:
            claims |= {"uid": person.uid, "scp": list(scopes), "auth_time": now, "sub": person.login}
        return self._keyring(auth_server_id).signing_key.sign({**claims, **(extra_claims or {})}, headers or {})

    def mint_id_token(
        self,
        auth_server_id: str,
        *,
        user: User | str,
        client_id: str,
        lifetime: int = 3600,
        nonce: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """An OIDC ID token for `user` at `client_id` (`aud` = the client id, `sub` = the user id, no `scp`)."""
        person, now = self._user(user), int(self._clock())
        claims: dict[str, Any] = {"sub": person.uid, "ver": 1, "iss": self.issuer(auth_server_id), "aud": client_id}
        claims |= {"iat": now, "exp": now + lifetime, "jti": f"ID.{secrets.token_urlsafe(32)}", "amr": ["pwd"]}
        claims |= {"idp": self.org_id, **({"nonce": nonce} if nonce else {}), "preferred_username": person.login}
        claims["auth_time"] = now
        return self._keyring(auth_server_id).signing_key.sign({**claims, **(extra_claims or {})}, headers or {})

    def _user(self, user: User | str) -> User:
        return user if isinstance(user, User) else self._users[user]  # KeyError: no configured user with that login

    # ---- HTTP

    def _application(self) -> web.Application:
        app = web.Application(middlewares=self._middlewares)
        oauth, oidc = partial(self._handle_metadata, oidc=False), partial(self._handle_metadata, oidc=True)
        for endpoints, issuer in (("/oauth2", ""), ("/oauth2/{id}", "/oauth2/{id}")):  # org, custom servers
            app.router.add_get(f"{endpoints}/v1/keys", self._handle_jwks)
            app.router.add_post(f"{endpoints}/v1/token", self._handle_token)
            app.router.add_get(f"{issuer}/.well-known/oauth-authorization-server", oauth)
            app.router.add_get(f"{issuer}/.well-known/openid-configuration", oidc)
        app.router.add_get("/oauth2/v1/authorize", self._handle_authorize)
        app.router.add_post(SIGN_IN_PATH, self._handle_sign_in)
        if self._path_inserted_metadata:  # RFC 8414 §3.1; real Okta does not serve it
            app.router.add_get("/.well-known/oauth-authorization-server/oauth2/{id}", oauth)
        return app

    def _server_id(self, request: web.Request) -> str:
        server_id = request.match_info.get("id")
        if server_id is None:
            return ORG
        if server_id not in self._custom:
            body = okta_error("E0000007", f"Not found: {server_id} (AuthorizationServer)")
            raise web.HTTPNotFound(text=body, content_type="application/json")
        return server_id

    async def _handle_jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self._keyring(self._server_id(request)).jwks())

    async def _handle_metadata(self, request: web.Request, *, oidc: bool) -> web.Response:
        server_id = self._server_id(request)
        # grant_types_supported is exactly what this server's /v1/token serves.
        grants = self._served_grants(server_id)
        document = metadata_document(
            issuer=self.issuer(server_id),
            endpoints=self._endpoints(server_id),
            grant_types=list(grants),
            scopes=OIDC_SCOPES if server_id == ORG else self._custom[server_id].scopes,
            oidc=oidc,
            public_clients=AUTHORIZATION_CODE in grants,
        )
        return web.json_response(document | self.xaa.metadata(server_id, grants))

    def _served_grants(self, server_id: str) -> dict[str, GrantHandler]:
        grants = self._grants[_kind(server_id)]
        if server_id != ORG and not self._custom[server_id].jwt_bearer:
            return {grant: handler for grant, handler in grants.items() if grant != JWT_BEARER}
        return grants

    async def _handle_token(self, request: web.Request) -> web.Response:
        server_id = self._server_id(request)
        grant_type: str | None = None
        try:
            if request.content_type != "application/x-www-form-urlencoded":
                raise OAuthError("invalid_request", "The request must be application/x-www-form-urlencoded.")
            form = MultiDict((k, v) for k, v in (await request.post()).items() if isinstance(v, str))
            grant_type = single(form, "grant_type")
            if grant_type is None:
                raise OAuthError("invalid_request", "The 'grant_type' parameter is required.")
            handler = self._served_grants(server_id).get(grant_type)
            if handler is None:
                raise OAuthError("unsupported_grant_type", "The grant type is not supported by this server.")
            audiences = {self.token_endpoint(server_id)}
            if self._issuer_assertion_audience:
                audiences.add(self.issuer(server_id))
            public = server_id == ORG and grant_type in USER_GRANTS  # PKCE protects them: public apps may use them
            client = self._clients.authenticate(
                request.headers.get("Authorization"), form, audiences, allow_public=public
            )
            body = await handler(TokenRequest(server_id, client, form))
        except OAuthError as refusal:
            self.xaa.count(server_id, grant_type, refusal.error)
            self.login.count(server_id, grant_type, refusal.error)
            self._log.info(
                "okta_emulator_token_refused", auth_server=server_id, grant_type=grant_type, error=refusal.error
            )
            return refusal.response()
        self.xaa.count(server_id, grant_type, None)
        self.login.count(server_id, grant_type, None)
        self._log.info(
            "okta_emulator_token_issued", auth_server=server_id, grant_type=grant_type, client=client.client_id
        )
        return web.json_response(body, headers=_NO_STORE)

    async def _handle_authorize(self, request: web.Request) -> web.Response:
        response = self.login.authorize(request.query)
        self._log.info("okta_emulator_authorize", client=request.query.get("client_id"), status=response.status)
        return response

    async def _handle_sign_in(self, request: web.Request) -> web.Response:
        form = MultiDict((k, v) for k, v in (await request.post()).items() if isinstance(v, str))
        response = self.login.sign_in(form)
        self._log.info("okta_emulator_sign_in", status=response.status)
        return response

    async def _client_credentials(self, request: TokenRequest) -> dict[str, Any]:
        """Scopes as requested, else the server's defaults; OIDC scopes and scopes the server lacks are refused."""
        server = self._custom[request.auth_server_id]
        scopes = (request.param("scope") or "").split() or list(server.default_scopes)
        if not scopes:
            raise OAuthError("invalid_scope", "No default scopes are configured; 'scope' must be provided.")
        if any(scope in OIDC_SCOPES or (server.scopes and scope not in server.scopes) for scope in scopes):
            raise OAuthError("invalid_scope", "One or more scopes are not configured for the authorization server.")
        token = self.mint_access_token(server.id, user=None, client_id=request.client.client_id, scopes=scopes)
        return {"token_type": "Bearer", "expires_in": 3600, "access_token": token, "scope": " ".join(scopes)}


def _kind(auth_server_id: str) -> ServerKind:
    return "org" if auth_server_id == ORG else "custom"
