"""User sign-in at the devkit Okta emulator's org authorization server, driven over real loopback HTTP the way an OIDC
web app (the gateway's front door, DESIGN.md §8) drives Okta: `/oauth2/v1/authorize`, the HTML sign-in form parsed
and posted, every redirect followed by hand, the token endpoint with PKCE, refresh tokens, and an ID-JAG exchange
from the ID token it issued. Tokens are verified with PyJWT against the JWKS the metadata names; refusals are checked
by their error code and status, never by their wording."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import jwt
import pytest
import structlog.testing
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from okta_agent_proxy.devkit.okta_emulator import ORG, App, AuthorizationServer, OktaEmulator, User, XaaPolicy

CALLBACK = "http://localhost:8000/oauth/callback"
SPA_CALLBACK = "http://127.0.0.1:3000/callback"
SECRET = "gateway secret"
ADA = User("ada@example.com", "00uada0000000000001x", password="correct horse", name="Ada Lovelace", groups=("Eng",))
BOB = User("bob@example.com", "00ubob00000000000001", password="bob's password")
CAROL = User("carol@example.com", "00ucarol000000000001")  # no password: cannot sign in
GATEWAY = App("0oagateway0000000001", "Okta Agent Proxy", client_secret=SECRET, redirect_uris=(CALLBACK,))
ROTATING = App(
    "0oarotating000000001",
    "Rotating app",
    client_secret=SECRET,
    redirect_uris=(CALLBACK,),
    refresh_token_rotation="ROTATE",
)
STRICT = App(
    "0oastrict00000000001", "PKCE required", client_secret=SECRET, redirect_uris=(CALLBACK,), require_pkce=True
)
FILTERED = App(
    "0oafiltered000000001", "Eng only", client_secret=SECRET, redirect_uris=(CALLBACK,), groups_claim_filter="Eng.*"
)
NO_GROUPS = App(
    "0oanogroups000000001", "No groups", client_secret=SECRET, redirect_uris=(CALLBACK,), groups_claim_filter=None
)
SPA = App("0oaspa0000000000001x", "Single-page app", redirect_uris=(SPA_CALLBACK,), refresh_token_rotation="ROTATE")
AGENT, AGENT_KID = "wlpgateway0000000001", "agent-key-1"  # an AI agent linked to the gateway's app
EMPLOYEES, EMPLOYEES_MCP = "aus-employees", "http://localhost:8000/employees"
FRONT_DOOR_SCOPE = "openid profile email offline_access"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ID_TOKEN_CLAIMS = {"sub", "ver", "iss", "aud", "iat", "exp", "jti", "amr", "idp", "auth_time", "at_hash"}


class Clock:
    """The emulator's clock, which a test moves forward (codes, transactions and refresh-token leeway expire)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


AGENT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def agent_app() -> App:
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(AGENT_KEY.public_key()))
    return App(AGENT, "Gateway agent", public_jwk={**public, "kid": AGENT_KID}, linked_client_id=GATEWAY.client_id)


def emulator(clock: Clock | None = None, **options: Any) -> OktaEmulator:
    server = AuthorizationServer(EMPLOYEES, "api://employees", ("employees:read",), resources=(EMPLOYEES_MCP,))
    apps = [GATEWAY, ROTATING, STRICT, FILTERED, NO_GROUPS, SPA, agent_app()]
    policies = [XaaPolicy(GATEWAY.client_id, EMPLOYEES), XaaPolicy(AGENT, EMPLOYEES)]
    return OktaEmulator(
        auth_servers=[server],
        users=[ADA, BOB, CAROL],
        apps=apps,
        xaa_policies=policies,
        clock=clock or time.time,
        **options,
    )


class Page(HTMLParser):
    """What a test needs of an HTML page: its form, its inputs, its alert and error code, whether it has scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.action: str | None = None
        self.method: str | None = None
        self.fields: dict[str, str] = {}
        self.texts: dict[str, str] = {}  # "alert", "error-code", "notice": their text
        self.scripts = 0
        self._capturing: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.action, self.method = attributes.get("action"), attributes.get("method")
        elif tag == "input" and attributes.get("name"):
            self.fields[str(attributes["name"])] = attributes.get("value") or ""
        elif tag == "script":
            self.scripts += 1
        elif attributes.get("role") == "alert" or attributes.get("class") in ("error-code", "notice"):
            self._capturing = "alert" if attributes.get("role") == "alert" else str(attributes["class"])

    def handle_data(self, data: str) -> None:
        if self._capturing is not None:
            self.texts[self._capturing] = data
            self._capturing = None


@dataclass
class Login:
    """One authorization code flow as the client runs it: its PKCE verifier, state and nonce, and where it stands."""

    app: App = GATEWAY
    redirect_uri: str = CALLBACK
    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    state: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def challenge(self) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(self.verifier.encode()).digest()).rstrip(b"=").decode()

    def query(self, **changes: str | None) -> dict[str, str]:
        """The `/authorize` parameters; `changes` override (None removes) them."""
        query = {
            "client_id": self.app.client_id,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "scope": FRONT_DOOR_SCOPE,
            "state": self.state,
            "nonce": self.nonce,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
        }
        return {name: value for name, value in {**query, **changes}.items() if value is not None}


@dataclass
class Client:
    """An HTTP client that follows no redirect by itself, the way a test must see each hop."""

    idp: OktaEmulator
    http: aiohttp.ClientSession

    async def get(self, url: str, params: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], str]:
        async with self.http.get(url, params=params, allow_redirects=False) as response:
            return response.status, response.headers, await response.text()

    async def authorize(self, login: Login, **changes: str | None) -> tuple[int, Mapping[str, str], str]:
        return await self.get(self.idp.authorization_endpoint, login.query(**changes))

    async def submit(self, page_text: str, username: str, password: str) -> tuple[int, Mapping[str, str], str]:
        """Fill in and post the sign-in form as a browser would."""
        page = Page(page_text)
        assert page.method == "post" and page.action, page_text
        form = {**page.fields, "username": username, "password": password}
        url = urljoin(self.idp.authorization_endpoint, page.action)
        async with self.http.post(url, data=form, allow_redirects=False) as response:
            return response.status, response.headers, await response.text()

    async def code(self, login: Login, user: User = ADA, **changes: str | None) -> str:
        """Authorize, sign in as `user`, follow the redirect to the callback and return its `code`."""
        status, _, text = await self.authorize(login, **changes)
        assert status == 200, text
        status, headers, text = await self.submit(text, user.login, str(user.password))
        assert status == 302, text
        params = callback_params(headers["Location"], login.redirect_uri)
        assert params["state"] == login.state
        return params["code"]

    async def token(
        self, form: Mapping[str, str], app: App | None = GATEWAY, secret: str = SECRET
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        """POST to the org's token endpoint as `app` with client_secret_basic (None: no client authentication)."""
        headers = {} if app is None else basic(app.client_id, secret)
        async with self.http.post(self.idp.token_endpoint(ORG), data=dict(form), headers=headers) as response:
            return response.status, await response.json(), response.headers

    async def redeem(self, login: Login, code: str, /, **changes: str | None) -> tuple[int, dict[str, Any]]:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": login.redirect_uri}
        form["code_verifier"] = login.verifier
        form = {name: value for name, value in {**form, **changes}.items() if value is not None}
        status, body, _ = await self.token(form, login.app)
        return status, body

    async def sign_in(self, login: Login, user: User = ADA, **changes: str | None) -> dict[str, Any]:
        """The whole flow; the token response."""
        status, body = await self.redeem(login, await self.code(login, user, **changes))
        assert status == 200, body
        return body

    async def refresh(self, refresh_token: str, app: App = GATEWAY, **extra: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = await self.token(
            {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}, app
        )
        return status, body

    async def verify(self, token: str, audience: str, server: str = ORG) -> dict[str, Any]:
        """As a relying party: the JWKS named by the server's OIDC metadata, the key by `kid`, RS256 only, `iss` =
        the metadata's issuer."""
        async with self.http.get(f"{self.idp.issuer(server)}/.well-known/openid-configuration") as response:
            metadata = await response.json()
        async with self.http.get(metadata["jwks_uri"]) as response:
            jwks = jwt.PyJWKSet.from_dict(await response.json())
        key = {key.key_id: key for key in jwks.keys}[jwt.get_unverified_header(token)["kid"]]
        issuer = metadata["issuer"]
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=issuer)
        return claims


def callback_params(location: str, redirect_uri: str) -> dict[str, str]:
    """The query of a redirect to `redirect_uri` (each parameter exactly once)."""
    assert location.split("?")[0] == redirect_uri, location
    params = parse_qs(urlsplit(location).query, keep_blank_values=True)
    assert all(len(values) == 1 for values in params.values()), params
    return {name: values[0] for name, values in params.items()}


def basic(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic (RFC 6749 §2.3.1; these ids and secrets need no form-encoding)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def at_hash(access_token: str) -> str:
    digest = hashlib.sha256(access_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(clock: Clock) -> AsyncIterator[Client]:
    async with (
        emulator(clock, sign_in_notice="Demo user: ada@example.com / correct horse") as idp,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        yield Client(idp, http)


# ---- metadata


async def test_metadata_advertises_the_sign_in(client: Client) -> None:
    for document in ("oauth-authorization-server", "openid-configuration"):
        _, _, text = await client.get(f"{client.idp.base_url}/.well-known/{document}")
        metadata = json.loads(text)
        assert metadata["authorization_endpoint"] == f"{client.idp.base_url}/oauth2/v1/authorize"
        assert metadata["grant_types_supported"] == ["authorization_code", "refresh_token", TOKEN_EXCHANGE]
        assert metadata["code_challenge_methods_supported"] == ["S256"]
        assert "none" in metadata["token_endpoint_auth_methods_supported"]
        assert "authorization_response_iss_parameter_supported" not in metadata  # Okta's org server has none
        status, _, _ = await client.get(metadata["authorization_endpoint"], Login().query())
        assert status == 200
    custom = json.loads((await client.get(f"{client.idp.issuer(EMPLOYEES)}/.well-known/oauth-authorization-server"))[2])
    assert "authorization_code" not in custom["grant_types_supported"]
    assert "none" not in custom["token_endpoint_auth_methods_supported"]


async def test_an_org_whose_apps_have_no_redirect_uris_serves_no_user_grants(client: Client) -> None:
    async with OktaEmulator(users=[ADA], apps=[App("0oaservice0000000001", "Service", client_secret=SECRET)]) as idp:
        _, _, text = await client.get(f"{idp.base_url}/.well-known/oauth-authorization-server")
        assert json.loads(text)["grant_types_supported"] == [TOKEN_EXCHANGE]
        form = {"grant_type": "authorization_code", "code": "x", "client_id": "0oaservice0000000001"}
        async with client.http.post(idp.token_endpoint(ORG), data=form) as response:
            assert (response.status, (await response.json())["error"]) == (400, "unsupported_grant_type")


# ---- the whole flow


async def test_sign_in_and_redeem_the_code(client: Client) -> None:
    login = Login()
    status, headers, text = await client.authorize(login, login_hint=ADA.login)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    page = Page(text)
    assert (page.method, page.action, page.scripts) == ("post", "/login", 0)
    assert set(page.fields) == {"tx", "username", "password"} and page.fields["username"] == ADA.login
    assert page.texts["notice"] == "Demo user: ada@example.com / correct horse"
    assert client.idp.login.authorizations_started == 1
    assert client.idp.login.authorization_requests[-1] == login.query(login_hint=ADA.login)

    status, headers, _ = await client.submit(text, ADA.login.upper(), "correct horse")  # logins ignore case
    assert status == 302
    params = callback_params(headers["Location"], CALLBACK)
    assert set(params) == {"code", "state"} and params["state"] == login.state  # no `iss`: Okta's org server sends none
    status, body, headers = await client.token(
        {
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": CALLBACK,
            "code_verifier": login.verifier,
        }
    )
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert set(body) == {"token_type", "expires_in", "access_token", "scope", "id_token", "refresh_token"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, FRONT_DOOR_SCOPE)

    claims = await client.verify(body["id_token"], GATEWAY.client_id)
    assert set(claims) == ID_TOKEN_CLAIMS | {"nonce", "name", "preferred_username", "email"}  # no groups scope
    assert (claims["iss"], claims["aud"], claims["sub"], claims["nonce"]) == (
        client.idp.base_url,
        GATEWAY.client_id,
        ADA.uid,
        login.nonce,
    )
    assert (claims["name"], claims["email"], claims["preferred_username"]) == ("Ada Lovelace", ADA.login, ADA.login)
    assert (claims["ver"], claims["amr"], claims["idp"], claims["at_hash"]) == (
        1,
        ["pwd"],
        client.idp.org_id,
        at_hash(body["access_token"]),
    )
    assert claims["jti"].startswith("ID.") and claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(body["id_token"]) == {"alg": "RS256", "kid": client.idp.signing_kid(ORG)}
    access = await client.verify(body["access_token"], client.idp.base_url)
    assert (access["cid"], access["uid"], access["sub"]) == (GATEWAY.client_id, ADA.uid, ADA.login)
    assert access["scp"] == FRONT_DOOR_SCOPE.split() and access["auth_time"] == claims["auth_time"]
    login_counts = client.idp.login
    assert (login_counts.logins, login_counts.failed_logins, login_counts.codes_redeemed) == (1, 0, 1)


@pytest.mark.parametrize(
    ("app", "groups"),
    [(GATEWAY, ["Everyone", "Eng"]), (FILTERED, ["Eng"]), (NO_GROUPS, None)],
    ids=["all_groups", "filtered", "no_groups_claim"],
)
async def test_groups_claim_with_the_groups_scope(client: Client, app: App, groups: list[str] | None) -> None:
    body = await client.sign_in(Login(app), scope="openid groups")
    claims = await client.verify(body["id_token"], app.client_id)
    assert claims.get("groups") == groups
    assert {"name", "email", "preferred_username"}.isdisjoint(claims)  # neither profile nor email asked
    assert "refresh_token" not in body  # no offline_access


async def test_a_public_app_signs_in_with_pkce_and_its_client_id_alone(client: Client) -> None:
    login = Login(SPA, SPA_CALLBACK)
    code = await client.code(login)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": SPA_CALLBACK}
    form |= {"client_id": SPA.client_id, "code_verifier": login.verifier}
    status, body, _ = await client.token(form, app=None)
    assert status == 200, body
    assert (await client.verify(body["id_token"], SPA.client_id))["sub"] == ADA.uid
    refreshed = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": SPA.client_id}
    status, body, _ = await client.token(refreshed, app=None)
    assert status == 200, body
    status, body, _ = await client.token({"grant_type": TOKEN_EXCHANGE, "client_id": SPA.client_id}, app=None)
    assert (status, body["error"]) == (401, "invalid_client")  # its client id alone suffices for the user grants only


# ---- the sign-in page


async def test_wrong_password_shows_the_page_again(client: Client) -> None:
    login = Login()
    _, _, text = await client.authorize(login)
    for username, password in [(ADA.login, "wrong"), ("nobody@example.com", "correct horse"), (CAROL.login, "")]:
        status, headers, page_text = await client.submit(text, username, password)
        assert (status, "Location" in headers) == (401, False)
        page = Page(page_text)
        assert page.texts["alert"] == "Unable to sign in" and page.fields["tx"] == Page(text).fields["tx"]
    assert client.idp.login.failed_logins == 3
    status, headers, _ = await client.submit(text, ADA.login, "correct horse")  # the same page still works
    assert status == 302 and callback_params(headers["Location"], CALLBACK)["state"] == login.state
    status, _, page_text = await client.submit(text, ADA.login, "correct horse")  # but only once
    assert (status, Page(page_text).texts["error-code"]) == (400, "invalid_request")
    assert client.idp.login.logins == 1


async def test_a_sign_in_page_expires(client: Client, clock: Clock) -> None:
    _, _, text = await client.authorize(Login())
    clock.now += 601
    status, headers, page_text = await client.submit(text, ADA.login, "correct horse")
    assert (status, "Location" in headers, Page(page_text).texts["error-code"]) == (400, False, "invalid_request")


async def test_the_page_escapes_what_it_echoes(client: Client) -> None:
    status, _, text = await client.authorize(Login(), login_hint='"><script>alert(1)</script>')
    assert status == 200 and "<script>" not in text
    assert Page(text).fields["username"] == '"><script>alert(1)</script>' and Page(text).scripts == 0


PAGE_ERRORS: dict[str, tuple[dict[str, str | None], str]] = {
    "no_client_id": ({"client_id": None}, "invalid_client"),
    "unknown_client": ({"client_id": "0oaunknown0000000001"}, "invalid_client"),
    "no_redirect_uri": ({"redirect_uri": None}, "invalid_request"),
    "unregistered_redirect_uri": ({"redirect_uri": "http://localhost:8000/elsewhere"}, "invalid_request"),
    "trailing_slash": ({"redirect_uri": CALLBACK + "/"}, "invalid_request"),
    "another_apps_redirect_uri": ({"redirect_uri": SPA_CALLBACK}, "invalid_request"),
}


@pytest.mark.parametrize(("changes", "error"), PAGE_ERRORS.values(), ids=PAGE_ERRORS.keys())
async def test_errors_okta_shows_itself(client: Client, changes: dict[str, str | None], error: str) -> None:
    status, headers, text = await client.authorize(Login(), **changes)
    assert (status, "Location" in headers) == (400, False)
    assert headers["Content-Type"].startswith("text/html") and Page(text).texts["error-code"] == error
    assert (client.idp.login.authorizations_started, client.idp.login.authorization_errors) == (0, {error: 1})


async def test_a_repeated_client_id_is_shown_not_redirected(client: Client) -> None:
    query = [*Login().query().items(), ("client_id", GATEWAY.client_id)]
    async with client.http.get(client.idp.authorization_endpoint, params=query, allow_redirects=False) as response:
        assert (response.status, "Location" in response.headers) == (400, False)


REDIRECTED_ERRORS: dict[str, tuple[App, dict[str, str | None], str]] = {
    "no_response_type": (GATEWAY, {"response_type": None}, "unsupported_response_type"),
    "implicit": (GATEWAY, {"response_type": "id_token token"}, "unsupported_response_type"),
    "fragment_mode": (GATEWAY, {"response_mode": "fragment"}, "invalid_request"),
    "no_openid": (GATEWAY, {"scope": "profile email"}, "invalid_scope"),
    "custom_scope": (GATEWAY, {"scope": "openid employees:read"}, "invalid_scope"),
    "no_state": (GATEWAY, {"state": None}, "invalid_request"),
    "prompt_none": (GATEWAY, {"prompt": "none"}, "login_required"),
    "unknown_prompt": (GATEWAY, {"prompt": "select_account"}, "invalid_request"),
    "plain_pkce": (GATEWAY, {"code_challenge_method": "plain"}, "invalid_request"),
    "no_pkce_method": (GATEWAY, {"code_challenge_method": None}, "invalid_request"),
    "short_challenge": (GATEWAY, {"code_challenge": "too-short"}, "invalid_request"),
    "method_without_challenge": (GATEWAY, {"code_challenge": None}, "invalid_request"),
    "public_app_without_pkce": (SPA, {"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
    "pkce_required": (STRICT, {"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
}


@pytest.mark.parametrize(("app", "changes", "error"), REDIRECTED_ERRORS.values(), ids=REDIRECTED_ERRORS.keys())
async def test_errors_redirected_to_a_trusted_redirect_uri(
    client: Client, app: App, changes: dict[str, str | None], error: str
) -> None:
    login = Login(app, app.redirect_uris[0])
    status, headers, _ = await client.authorize(login, **changes)
    assert status == 302
    params = callback_params(headers["Location"], login.redirect_uri)
    assert (params["error"], params.get("state")) == (error, None if "state" in changes else login.state)
    assert params["error_description"] and "code" not in params
    assert (client.idp.login.authorizations_started, client.idp.login.authorization_errors) == (0, {error: 1})


async def test_a_confidential_app_may_skip_pkce(client: Client) -> None:
    login = Login()
    code = await client.code(login, code_challenge=None, code_challenge_method=None)
    assert (await client.redeem(login, code, code_verifier=None))[0] == 200


# ---- the authorization_code grant


async def test_a_code_is_single_use(client: Client) -> None:
    login = Login()
    code = await client.code(login)
    assert (await client.redeem(login, code))[0] == 200
    status, body = await client.redeem(login, code)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (client.idp.login.codes_redeemed, client.idp.login.code_failures) == (1, {"invalid_grant": 1})


CODE_REFUSALS: dict[str, tuple[dict[str, str | None], int, str]] = {
    "pkce_mismatch": ({"code_verifier": secrets.token_urlsafe(48)}, 400, "invalid_grant"),
    "no_verifier": ({"code_verifier": None}, 400, "invalid_grant"),
    "malformed_verifier": ({"code_verifier": "short"}, 400, "invalid_grant"),
    "other_redirect_uri": ({"redirect_uri": "http://localhost:8000/elsewhere"}, 400, "invalid_grant"),
    "no_redirect_uri": ({"redirect_uri": None}, 400, "invalid_grant"),
    "unknown_code": ({"code": "not-a-code"}, 400, "invalid_grant"),
    "no_code": ({"code": None}, 400, "invalid_request"),
}


@pytest.mark.parametrize(("changes", "status", "error"), CODE_REFUSALS.values(), ids=CODE_REFUSALS.keys())
async def test_code_refusals(client: Client, changes: dict[str, str | None], status: int, error: str) -> None:
    login = Login()
    code = await client.code(login)
    refused, body = await client.redeem(login, code, **changes)
    assert (refused, body["error"], "access_token" in body) == (status, error, False)
    expected = 200 if error == "invalid_request" or changes.get("code") else 400  # a tried code is consumed
    assert (await client.redeem(login, code))[0] == expected


async def test_a_code_is_bound_to_its_client(client: Client) -> None:
    login = Login()
    code = await client.code(login)
    status, body, _ = await client.token({"grant_type": "authorization_code", "code": code}, GATEWAY, secret="wrong")
    assert (status, body["error"]) == (401, "invalid_client")  # client authentication comes first: code untouched
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "code_verifier": login.verifier}
    status, body, _ = await client.token(form, ROTATING)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_a_code_expires_after_300_seconds(client: Client, clock: Clock) -> None:
    login = Login()
    code = await client.code(login)
    clock.now += 301
    status, body = await client.redeem(login, code)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_a_verifier_without_a_challenge_is_refused(client: Client) -> None:
    login = Login()
    code = await client.code(login, code_challenge=None, code_challenge_method=None)
    status, body = await client.redeem(login, code)
    assert (status, body["error"]) == (400, "invalid_grant")


# ---- refresh tokens


async def test_persistent_refresh_tokens(client: Client) -> None:
    first = await client.sign_in(Login())
    original = await client.verify(first["id_token"], GATEWAY.client_id)
    status, body = await client.refresh(first["refresh_token"])
    assert status == 200 and body["refresh_token"] == first["refresh_token"]  # STATIC: Okta's default for web apps
    assert body["scope"] == FRONT_DOOR_SCOPE and body["access_token"] != first["access_token"]
    claims = await client.verify(body["id_token"], GATEWAY.client_id)
    assert claims["jti"] != original["jti"] and claims["sub"] == ADA.uid
    assert claims["auth_time"] == original["auth_time"] and "nonce" not in claims  # OIDC Core §12.2
    status, body = await client.refresh(first["refresh_token"], scope="openid email")
    assert (status, body["scope"]) == (200, "openid email")
    status, body = await client.refresh(first["refresh_token"], scope="openid groups")
    assert (status, body["error"]) == (400, "invalid_scope")
    status, body = await client.refresh(first["refresh_token"], ROTATING)
    assert (status, body["error"]) == (400, "invalid_grant")  # another client's token
    status, body = await client.refresh("not-a-refresh-token")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (client.idp.login.refreshes, client.idp.login.refresh_failures) == (
        2,
        {"invalid_scope": 1, "invalid_grant": 2},
    )


async def test_rotating_refresh_tokens_and_reuse_detection(client: Client, clock: Clock) -> None:
    first = (await client.sign_in(Login(ROTATING)))["refresh_token"]
    status, body = await client.refresh(first, ROTATING)
    assert status == 200 and body["refresh_token"] != first
    second = body["refresh_token"]
    clock.now += 30  # within Okta's default 30 s leeway the rotated token still works
    status, body = await client.refresh(first, ROTATING)
    assert status == 200 and body["refresh_token"] not in (first, second)
    newest = body["refresh_token"]
    clock.now += 1
    status, body = await client.refresh(first, ROTATING)  # reuse: every token of this sign-in is revoked
    assert (status, body["error"]) == (400, "invalid_grant")
    for token in (second, newest):
        status, body = await client.refresh(token, ROTATING)
        assert (status, body["error"]) == (400, "invalid_grant")
    assert (client.idp.login.refreshes, client.idp.login.refresh_token_reuses) == (2, 1)


async def test_an_admin_revokes_a_users_refresh_tokens(client: Client) -> None:
    ada_tokens = [(await client.sign_in(Login(app)))["refresh_token"] for app in (GATEWAY, ROTATING)]
    bob = (await client.sign_in(Login(), BOB))["refresh_token"]
    assert client.idp.login.revoke_refresh_tokens(ADA, GATEWAY.client_id) == 1
    assert (await client.refresh(ada_tokens[0]))[1]["error"] == "invalid_grant"
    assert (await client.refresh(ada_tokens[1], ROTATING))[0] == 200
    assert client.idp.login.revoke_refresh_tokens(ADA.login) == 1
    assert (await client.refresh(ada_tokens[1], ROTATING))[1]["error"] == "invalid_grant"
    assert (await client.refresh(bob))[0] == 200


# ---- Cross App Access from the ID token


async def test_the_id_token_is_the_subject_of_an_id_jag_exchange(client: Client) -> None:
    id_token = (await client.sign_in(Login()))["id_token"]
    exchange = {
        "grant_type": TOKEN_EXCHANGE,
        "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
        "subject_token": id_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "audience": client.idp.issuer(EMPLOYEES),
        "resource": EMPLOYEES_MCP,
        "scope": "employees:read",
    }
    status, body, _ = await client.token(exchange)  # as the gateway's own app, with its client secret
    assert status == 200, body
    id_jag = await client.verify(body["access_token"], client.idp.issuer(EMPLOYEES))
    assert (id_jag["sub"], id_jag["client_id"], id_jag["resource"]) == (ADA.uid, GATEWAY.client_id, EMPLOYEES_MCP)
    redeem = {"grant_type": JWT_BEARER, "assertion": body["access_token"]}
    async with client.http.post(
        client.idp.token_endpoint(EMPLOYEES), data=redeem, headers=basic(GATEWAY.client_id, SECRET)
    ) as response:
        assert response.status == 200
        access_token = (await response.json())["access_token"]
    access = await client.verify(access_token, EMPLOYEES_MCP, EMPLOYEES)
    assert (access["sub"], access["uid"], access["cid"]) == (ADA.login, ADA.uid, GATEWAY.client_id)

    now = int(time.time())
    endpoint = client.idp.token_endpoint(ORG)
    claims = {"iss": AGENT, "sub": AGENT, "aud": endpoint, "iat": now, "exp": now + 300, "jti": secrets.token_hex(8)}
    signed = jwt.encode(claims, AGENT_KEY, algorithm="RS256", headers={"kid": AGENT_KID})
    as_agent = {**exchange, "client_assertion_type": ASSERTION_TYPE, "client_assertion": signed}
    status, body, _ = await client.token(as_agent, app=None)  # the AI agent linked to the gateway's app
    assert status == 200, body
    assert (await client.verify(body["access_token"], client.idp.issuer(EMPLOYEES)))["client_id"] == AGENT

    spa_login = Login(SPA, SPA_CALLBACK)
    form = {"grant_type": "authorization_code", "code": await client.code(spa_login), "redirect_uri": SPA_CALLBACK}
    form |= {"client_id": SPA.client_id, "code_verifier": spa_login.verifier}
    spa_id_token = (await client.token(form, app=None))[1]["id_token"]
    status, body, _ = await client.token({**exchange, "subject_token": spa_id_token})
    assert (status, body["error"]) == (400, "invalid_grant")  # issued to another app
    assert client.idp.xaa.id_jag_exchanges == 2


# ---- secrets stay out of the logs


async def test_codes_tokens_and_passwords_are_never_logged(client: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        login = Login()
        code = await client.code(login)
        _, tokens = await client.redeem(login, code)
        _, refreshed = await client.refresh(tokens["refresh_token"])
    logged = json.dumps(logs, default=str)
    assert "okta_emulator_sign_in" in logged and "okta_emulator_token_issued" in logged
    secrets_seen = [code, ADA.password, login.verifier, *tokens.values(), *refreshed.values()]
    assert not [value for value in secrets_seen if isinstance(value, str) and len(value) > 8 and value in logged]
