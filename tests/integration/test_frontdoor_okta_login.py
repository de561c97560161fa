"""The front door's sign-in at Okta (`frontdoor/okta_login.py`) against the devkit Okta emulator over loopback HTTP:
the authorize URL it builds is followed, the emulator's HTML sign-in form posted with a user's password, the code read
from the redirect and redeemed; refreshes, refusals and outages. ID tokens that must be refused are minted with the
emulator's own minting (its org key, claims and headers changed) or signed with a second key, and served through the
emulator's `register_grant` hook, so every refusal comes from a real signed JWT fetched over HTTP. Refusals are
checked by exception type and OAuth error code, never by wording."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import jwt
import pytest
import structlog.testing
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from okta_agent_proxy.devkit.okta_emulator import ORG, App, OktaEmulator, TokenRequest, User
from okta_agent_proxy.frontdoor.okta_login import (
    InvalidIdToken,
    LoginStart,
    OktaApp,
    OktaLogin,
    OktaLoginError,
    OktaTokens,
    OktaUnavailable,
)
from okta_agent_proxy.keys import SigningKey
from okta_agent_proxy.outbound.cross_app import org_base_url
from okta_agent_proxy.outbound.oauth_client import ClientAuth

CALLBACK = "http://127.0.0.1:8000/oauth/callback"
SECRET = "gateway secret"
ADA = User("ada@example.com", "00uada0000000000001x", password="correct horse", name="Ada Lovelace", groups=("Eng",))
GATEWAY = App(
    "0oagateway0000000001",
    "Okta Agent Proxy",
    client_secret=SECRET,
    redirect_uris=(CALLBACK,),
    groups_claim_filter="Eng.*",
)
ROTATING = App(
    "0oarotating000000001", "Rotating", client_secret=SECRET, redirect_uris=(CALLBACK,), refresh_token_rotation="ROTATE"
)
ASSERTION_KEY = SigningKey("gateway-key-1", "ES256", ec.generate_private_key(ec.SECP256R1()))
KEYED = App("0oakeyed000000000001", "Keyed", public_jwk=ASSERTION_KEY.public_jwk(), redirect_uris=(CALLBACK,))
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # published nowhere
NONCE = "the-nonce-of-this-sign-in"
TOKEN_PATH, KEYS_PATH = "/oauth2/v1/token", "/oauth2/v1/keys"

Answer = Callable[[], Awaitable[web.StreamResponse]]


class Outage:
    """An aiohttp middleware in front of the emulator: a path set in `answers` gets that answer instead."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        answer = self.answers.get(request.path)
        return await answer() if answer is not None else await handler(request)

    def answer(self, path: str, status: int, body: str, content_type: str = "application/json") -> None:
        async def respond() -> web.StreamResponse:
            return web.Response(status=status, text=body, content_type=content_type)

        self.answers[path] = respond


@dataclass
class Org:
    idp: OktaEmulator
    http: aiohttp.ClientSession
    outage: Outage
    _logins: list[OktaLogin] = field(default_factory=list)

    def app(self, app: App = GATEWAY, auth: ClientAuth | None = None) -> OktaApp:
        auth = auth or ClientAuth.client_secret_basic(app.client_id, SecretStr(SECRET))
        return OktaApp(org=org_base_url(self.idp.base_url), client_id=app.client_id, auth=auth, redirect_uri=CALLBACK)

    def login(self, app: App = GATEWAY, auth: ClientAuth | None = None, **options: Any) -> OktaLogin:
        return OktaLogin(self.app(app, auth), self.http, **options)

    async def code(self, start: LoginStart, user: User = ADA) -> str:
        """Follow the authorize URL, post the sign-in form as a browser would, and read the code from the redirect."""
        async with self.http.get(start.authorize_url, allow_redirects=False) as response:
            assert response.status == 200, await response.text()
            form = SignInForm(await response.text())
        fields = {**form.fields, "username": user.login, "password": str(user.password)}
        async with self.http.post(urljoin(start.authorize_url, form.action), data=fields, allow_redirects=False) as r:
            assert r.status == 302, await r.text()
            location = r.headers["Location"]
        assert location.split("?")[0] == CALLBACK
        params = parse_qs(urlsplit(location).query)
        assert params["state"] == [start.state]
        return params["code"][0]

    async def sign_in(self, login: OktaLogin, user: User = ADA) -> OktaTokens:
        start = login.start()
        return await login.finish(await self.code(start, user), code_verifier=start.code_verifier, nonce=start.nonce)

    def serve_id_token(self, id_token: str | None) -> None:
        """From now on the org's authorization_code grant answers with this ID token (None: with none at all)."""

        async def grant(request: TokenRequest) -> dict[str, Any]:
            body = {"token_type": "Bearer", "expires_in": 3600, "access_token": "opaque", "scope": "openid"}
            return body | ({"id_token": id_token} if id_token is not None else {})

        self.idp.register_grant("authorization_code", grant, kind="org")


class SignInForm(HTMLParser):
    """The sign-in page's form: its action and its inputs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.action = attributes.get("action") or ""
        elif tag == "input" and attributes.get("name"):
            self.fields[str(attributes["name"])] = attributes.get("value") or ""


@pytest.fixture
async def org() -> AsyncIterator[Org]:
    outage = Outage()
    idp = OktaEmulator(auth_servers=(), users=[ADA], apps=[GATEWAY, ROTATING, KEYED], middlewares=[outage.middleware])
    async with idp, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield Org(idp, http, outage)


# ---- the authorize URL


async def test_start_builds_the_authorize_url() -> None:
    auth = ClientAuth.client_secret_basic(GATEWAY.client_id, SecretStr(SECRET))
    app = OktaApp(org_base_url("dev-1.okta.com"), GATEWAY.client_id, auth, "https://gw.example.com/oauth/callback")
    async with aiohttp.ClientSession() as http:
        login = OktaLogin(app, http)
        start, other = login.start(), login.start()
    url = urlsplit(start.authorize_url)
    assert (url.scheme, url.netloc, url.path) == ("https", "dev-1.okta.com", "/oauth2/v1/authorize")
    query = {name: values[0] for name, values in parse_qs(url.query, strict_parsing=True).items()}
    challenge = base64.urlsafe_b64encode(hashlib.sha256(start.code_verifier.encode()).digest()).rstrip(b"=").decode()
    assert query == {
        "response_type": "code",
        "client_id": GATEWAY.client_id,
        "redirect_uri": "https://gw.example.com/oauth/callback",
        "scope": "openid profile email offline_access groups",
        "state": start.state,
        "nonce": start.nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    assert 43 <= len(start.code_verifier) <= 128 and start.code_verifier.replace("-", "").replace("_", "").isalnum()
    assert len(start.state) >= 22 and len(start.nonce) >= 22  # at least 128 bits of base64url
    assert {start.state, start.nonce, start.code_verifier}.isdisjoint({other.state, other.nonce, other.code_verifier})
    assert not [value for value in (start.state, start.nonce, start.code_verifier) if value in repr(start)]


# ---- signing in and refreshing


async def test_a_user_signs_in(org: Org) -> None:
    login = org.login()
    with structlog.testing.capture_logs() as logs:
        start = login.start()
        code = await org.code(start)
        tokens = await login.finish(code, code_verifier=start.code_verifier, nonce=start.nonce)
    claims = tokens.claims
    assert (claims["iss"], claims["aud"], claims["sub"]) == (org.idp.base_url, GATEWAY.client_id, ADA.uid)
    assert (claims["name"], claims["email"], claims["groups"], claims["nonce"]) == (
        "Ada Lovelace",
        ADA.login,
        ["Eng"],  # the app's groups filter, "Eng.*", leaves out Everyone
        start.nonce,
    )
    assert tokens.expires_at == claims["exp"] and jwt.decode(tokens.id_token, options={"verify_signature": False})
    assert tokens.refresh_token is not None  # offline_access
    assert org.idp.login.authorization_requests[-1]["scope"] == "openid profile email offline_access groups"
    assert org.idp.login.codes_redeemed == 1
    assert tokens.id_token not in repr(tokens) and tokens.refresh_token not in repr(tokens)
    logged = json.dumps(logs, default=str)
    assert not [value for value in (code, tokens.id_token, tokens.refresh_token, SECRET) if value in logged]


async def test_private_key_jwt_client_authentication(org: Org) -> None:
    login = org.login(KEYED, ClientAuth.private_key_jwt(KEYED.client_id, ASSERTION_KEY))
    tokens = await org.sign_in(login)
    assert (tokens.claims["aud"], tokens.claims["sub"]) == (KEYED.client_id, ADA.uid)
    refreshed = await login.refresh(str(tokens.refresh_token))  # a second assertion: a fresh jti each time
    assert refreshed.claims["sub"] == ADA.uid


async def test_refresh_with_a_persistent_refresh_token(org: Org) -> None:
    login = org.login()
    first = await org.sign_in(login)
    assert first.refresh_token is not None
    refreshed = await login.refresh(first.refresh_token, subject=ADA.uid)
    assert refreshed.refresh_token is None  # Okta answered with the same one: keep it
    assert refreshed.claims["sub"] == ADA.uid and refreshed.claims["jti"] != first.claims["jti"]
    assert "nonce" not in refreshed.claims and refreshed.expires_at == refreshed.claims["exp"]
    with pytest.raises(InvalidIdToken):
        await login.refresh(first.refresh_token, subject="00uanotherusr0000001")
    org.idp.login.revoke_refresh_tokens(ADA)
    with pytest.raises(OktaLoginError) as refused:
        await login.refresh(first.refresh_token)
    assert (refused.value.error, refused.value.status) == ("invalid_grant", 400)


async def test_refresh_with_a_rotating_refresh_token(org: Org) -> None:
    login = org.login(ROTATING)
    first = await org.sign_in(login)
    assert first.refresh_token is not None
    second = await login.refresh(first.refresh_token)
    assert second.refresh_token is not None and second.refresh_token != first.refresh_token
    third = await login.refresh(second.refresh_token)
    assert third.refresh_token not in (None, first.refresh_token, second.refresh_token)
    assert third.claims["sub"] == ADA.uid and org.idp.login.refreshes == 2


async def test_a_key_rotation_is_picked_up(org: Org) -> None:
    login = org.login()
    await login.warm()
    new_kid = org.idp.rotate_keys(ORG, keep_old=False)
    tokens = await org.sign_in(login)  # an unknown kid: the keys are fetched again
    assert jwt.get_unverified_header(tokens.id_token)["kid"] == new_kid


# ---- refusals at the token endpoint


async def test_a_code_is_redeemed_once(org: Org) -> None:
    login = org.login()
    start = login.start()
    code = await org.code(start)
    await login.finish(code, code_verifier=start.code_verifier, nonce=start.nonce)
    with pytest.raises(OktaLoginError) as refused:
        await login.finish(code, code_verifier=start.code_verifier, nonce=start.nonce)
    assert refused.value.error == "invalid_grant" and code not in str(refused.value)


async def test_a_wrong_pkce_verifier_is_refused(org: Org) -> None:
    login = org.login()
    start = login.start()
    code = await org.code(start)
    with pytest.raises(OktaLoginError) as refused:
        await login.finish(code, code_verifier=login.start().code_verifier, nonce=start.nonce)
    assert refused.value.error == "invalid_grant"


async def test_a_wrong_client_secret_is_refused(org: Org) -> None:
    wrong = "not the gateway secret"
    login = org.login(auth=ClientAuth.client_secret_basic(GATEWAY.client_id, SecretStr(wrong)))
    start = login.start()
    code = await org.code(start)
    with pytest.raises(OktaLoginError) as refused:
        await login.finish(code, code_verifier=start.code_verifier, nonce=start.nonce)
    assert (refused.value.error, refused.value.status) == ("invalid_client", 401)
    assert wrong not in str(refused.value) and code not in str(refused.value)


async def test_a_wrong_nonce_is_refused(org: Org) -> None:
    login = org.login()
    start = login.start()
    code = await org.code(start)
    with pytest.raises(InvalidIdToken):
        await login.finish(code, code_verifier=start.code_verifier, nonce=login.start().nonce)


async def test_a_token_response_without_an_id_token(org: Org) -> None:
    org.serve_id_token(None)
    with pytest.raises(OktaLoginError) as refused:
        await org.login().finish("code", code_verifier="v" * 43, nonce=NONCE)
    assert refused.value.error == "invalid_response"


# ---- ID tokens that must be refused (or, within the rules, accepted)


def _now() -> int:
    return int(time.time())


# name → (claims changed (None removes), headers changed, accepted)
ID_TOKENS: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any], bool]] = {
    "as_issued": (dict, {}, True),
    "other_issuer": (lambda: {"iss": "https://dev-2.okta.com"}, {}, False),
    "custom_server_issuer": (lambda: {"iss": "{org}/oauth2/default"}, {}, False),
    "other_audience": (lambda: {"aud": "0oaother000000000001"}, {}, False),
    "several_audiences_with_azp": (lambda: {"aud": ["{client}", "0oaother000000000001"], "azp": "{client}"}, {}, True),
    "several_audiences_without_azp": (lambda: {"aud": ["{client}", "0oaother000000000001"]}, {}, False),
    "azp_of_another_client": (lambda: {"azp": "0oaother000000000001"}, {}, False),
    "no_nonce": (lambda: {"nonce": None}, {}, False),
    "no_subject": (lambda: {"sub": None}, {}, False),
    "empty_subject": (lambda: {"sub": ""}, {}, False),
    "expired": (lambda: {"exp": _now() - 61 - 5}, {}, False),
    "expired_within_leeway": (lambda: {"exp": _now() - 30}, {}, True),
    "issued_in_the_future": (lambda: {"iat": _now() + 300}, {}, False),
    "not_yet_valid": (lambda: {"nbf": _now() + 300}, {}, False),
    "no_expiry": (lambda: {"exp": None}, {}, False),
    "malformed_expiry": (lambda: {"exp": "tomorrow"}, {}, False),
    "an_id_jag": (dict, {"typ": "oauth-id-jag+jwt"}, False),
    "an_access_token": (dict, {"typ": "application/at+jwt"}, False),
    "rs384_under_an_rs256_key": (dict, {"alg": "RS384"}, False),  # the org's JWK says RS256: no other algorithm
    "unknown_kid": (dict, {"kid": "not-published"}, False),
    "no_kid": (dict, {"kid": None}, False),
}


def _fill(value: Any, org: Org) -> Any:
    if isinstance(value, str):
        return value.replace("{org}", org.idp.base_url).replace("{client}", GATEWAY.client_id)
    return [_fill(item, org) for item in value] if isinstance(value, list) else value


@pytest.mark.parametrize(("claims", "headers", "accepted"), ID_TOKENS.values(), ids=ID_TOKENS.keys())
async def test_id_token_checks(
    org: Org, claims: Callable[[], dict[str, Any]], headers: dict[str, Any], accepted: bool
) -> None:
    changes = {name: _fill(value, org) for name, value in claims().items()}
    id_token = org.idp.mint_id_token(
        ORG, user=ADA, client_id=GATEWAY.client_id, nonce=NONCE, extra_claims=changes, headers=headers
    )
    org.serve_id_token(id_token)
    finishing = org.login().finish("code", code_verifier="v" * 43, nonce=NONCE)
    if accepted:
        assert (await finishing).claims["sub"] == ADA.uid
    else:
        with pytest.raises(InvalidIdToken):
            await finishing


def _signed(org: Org, key: Any, algorithm: str, **headers: Any) -> str:
    now = _now()
    claims = {"iss": org.idp.base_url, "aud": GATEWAY.client_id, "sub": ADA.uid, "iat": now, "exp": now + 3600}
    return jwt.encode({**claims, "nonce": NONCE}, key, algorithm=algorithm, headers=headers)


FORGERIES: dict[str, Callable[[Org], str]] = {
    "another_key_under_the_orgs_kid": lambda org: _signed(org, OTHER_KEY, "RS256", kid=org.idp.signing_kid(ORG)),
    "hmac_with_a_public_value": lambda org: _signed(
        org, org.idp.jwks(ORG)["keys"][0]["n"].encode(), "HS256", kid=org.idp.signing_kid(ORG)
    ),
    "alg_none": lambda org: _signed(org, None, "none", kid=org.idp.signing_kid(ORG)),
    "not_a_jwt": lambda org: "not.a.jwt",
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
async def test_forged_id_tokens_are_refused(org: Org, forge: Callable[[Org], str]) -> None:
    org.serve_id_token(forge(org))
    with pytest.raises(InvalidIdToken):
        await org.login().finish("code", code_verifier="v" * 43, nonce=NONCE)


# ---- Okta unreachable or unreadable


async def test_okta_stopped(org: Org) -> None:
    login, cold = org.login(), org.login()
    tokens = await org.sign_in(login)
    assert tokens.refresh_token is not None
    await org.idp.close()
    with pytest.raises(OktaUnavailable):
        await login.finish("code", code_verifier="v" * 43, nonce=NONCE)
    with pytest.raises(OktaUnavailable):
        await login.refresh(tokens.refresh_token)
    with pytest.raises(OktaUnavailable):
        await cold.warm()


UNREADABLE: dict[str, tuple[int, str, str]] = {
    "service_unavailable": (503, '{"error":"temporarily_unavailable"}', "application/json"),
    "html_page": (200, "<html>Sign in</html>", "text/html"),
    "html_error_page": (403, "<html>Forbidden</html>", "text/html"),
    "json_array": (200, "[]", "application/json"),
}


@pytest.mark.parametrize(("status", "body", "content_type"), UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_unreadable_token_answers(org: Org, status: int, body: str, content_type: str) -> None:
    org.outage.answer(TOKEN_PATH, status, body, content_type)
    with pytest.raises(OktaUnavailable):
        await org.login().refresh("a refresh token")


async def test_a_slow_token_endpoint_times_out(org: Org) -> None:
    async def slow() -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(status=200)

    org.outage.answers[TOKEN_PATH] = slow
    with pytest.raises(OktaUnavailable):
        await org.login(timeout=0.2).refresh("a refresh token")


async def test_the_keys_unreachable(org: Org) -> None:
    login, warmed = org.login(), org.login()
    await warmed.warm()
    org.outage.answer(KEYS_PATH, 503, '{"errorCode":"E0000009"}')
    with pytest.raises(OktaUnavailable):
        await login.warm()
    with pytest.raises(OktaUnavailable):
        await org.sign_in(login)
    assert (await org.sign_in(warmed)).claims["sub"] == ADA.uid  # keys fetched by warm() are kept
