"""The devkit Okta emulator over real loopback HTTP: discovery where Okta serves it, tokens that verify with PyJWT
against the JWKS fetched from it, key rotation, JWKS failure injection (`FaultyOktaEmulator`: the emulator with the
tests' outage middleware), and the token endpoint's client_credentials grant with client_secret_basic,
client_secret_post and private_key_jwt. Claims and headers are checked exactly; error bodies by their RFC 6749 code,
never their wording."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from functools import cache
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
import structlog.testing
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from okta_agent_proxy.devkit.demo_idp import run_emulator
from okta_agent_proxy.devkit.okta_emulator import ORG, App, AuthorizationServer, OAuthError, TokenRequest, User
from tests.support.okta_faults import FaultyOktaEmulator

GATEWAY = "aus-gateway"
AUDIENCE = "http://localhost:8000"
ADA = User("ada@example.com", "00uada0000000000001x")
CURSOR = App("0oacursor00000000001", "Cursor")
SECRET = "s3cret value/with:colon"
SERVICE = App("0oaservice0000000001", "Reporting service", client_secret=SECRET)
AGENT = "wlpagent000000000001"
AGENT_KID = "agent-key-1"
ACCESS_CLAIMS = {"ver", "jti", "iss", "aud", "iat", "exp", "cid", "uid", "scp", "auth_time", "sub"}
FORM = {"grant_type": "client_credentials", "scope": "mcp:read"}


@cache
def agent_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def agent_app() -> App:
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(agent_key().public_key()))
    return App(AGENT, "Gateway agent", public_jwk={**public, "kid": AGENT_KID})


def emulator(**options: Any) -> FaultyOktaEmulator:
    servers = [AuthorizationServer(GATEWAY, AUDIENCE, scopes=("mcp:read", "mcp:write")), AuthorizationServer("b", "x")]
    return FaultyOktaEmulator(auth_servers=servers, users=[ADA], apps=[CURSOR, SERVICE, agent_app()], **options)


@pytest.fixture
async def idp() -> AsyncIterator[FaultyOktaEmulator]:
    async with emulator() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, url
        return await response.json()


async def verify(http: aiohttp.ClientSession, token: str, issuer: str, audience: str) -> dict[str, Any]:
    """Verify as a relying party would: discover the JWKS from the path-appended metadata, select the key by kid."""
    metadata = await get_json(http, f"{issuer}/.well-known/oauth-authorization-server")
    jwks = jwt.PyJWKSet.from_dict(await get_json(http, metadata["jwks_uri"]))
    key = {key.key_id: key for key in jwks.keys}[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=issuer)
    return claims


def assertion(audience: str, **changes: Any) -> str:
    """A private_key_jwt client assertion as Okta documents it; `changes` override (None removes) claims."""
    now = int(time.time())
    claims = {"iss": AGENT, "sub": AGENT, "aud": audience, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    claims = {k: v for k, v in {**claims, **changes}.items() if v is not None}
    return jwt.encode(claims, agent_key(), algorithm="RS256", headers={"kid": AGENT_KID})


def assertion_form(signed: str, **extra: str) -> dict[str, str]:
    client_assertion_type = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    return {**FORM, "client_assertion_type": client_assertion_type, "client_assertion": signed, **extra}


def basic(client_id: str, secret: str, *, form_encode: bool = True) -> dict[str, str]:
    """RFC 6749 §2.3.1 client_secret_basic: id and secret are form-urlencoded, then joined and Base64-encoded."""
    if form_encode:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def post_token(
    http: aiohttp.ClientSession, url: str, form: Mapping[str, str], headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with http.post(url, data=dict(form), headers=headers) as response:
        return response.status, await response.json(), response.headers


# ---- discovery


@pytest.mark.parametrize("document", ["oauth-authorization-server", "openid-configuration"])
async def test_metadata_is_path_appended_for_custom_servers(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession, document: str
) -> None:
    issuer = idp.issuer(GATEWAY)
    assert issuer == f"{idp.base_url}/oauth2/{GATEWAY}"
    metadata = await get_json(http, f"{issuer}/.well-known/{document}")
    assert metadata["issuer"] == issuer
    assert metadata["jwks_uri"] == idp.jwks_uri(GATEWAY) == f"{issuer}/v1/keys"
    assert metadata["token_endpoint"] == idp.token_endpoint(GATEWAY) == f"{issuer}/v1/token"
    assert metadata["grant_types_supported"] == ["client_credentials", "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert metadata["authorization_grant_profiles_supported"] == ["urn:ietf:params:oauth:grant-profile:id-jag"]
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]


@pytest.mark.parametrize("document", ["oauth-authorization-server", "openid-configuration"])
async def test_org_metadata_is_at_the_root(idp: FaultyOktaEmulator, http: aiohttp.ClientSession, document: str) -> None:
    metadata = await get_json(http, f"{idp.base_url}/.well-known/{document}")
    assert metadata["issuer"] == idp.issuer(ORG) == idp.base_url
    assert metadata["jwks_uri"] == idp.jwks_uri(ORG) == f"{idp.base_url}/oauth2/v1/keys"
    assert metadata["token_endpoint"] == f"{idp.base_url}/oauth2/v1/token"


async def test_path_inserted_metadata_is_absent_like_okta(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    for document in ("oauth-authorization-server", "openid-configuration"):
        async with http.get(f"{idp.base_url}/.well-known/{document}/oauth2/{GATEWAY}") as response:
            assert response.status == 404


async def test_path_inserted_metadata_when_enabled(http: aiohttp.ClientSession) -> None:
    async with emulator(path_inserted_metadata=True) as idp:
        metadata = await get_json(http, f"{idp.base_url}/.well-known/oauth-authorization-server/oauth2/{GATEWAY}")
        assert metadata["issuer"] == idp.issuer(GATEWAY)
        assert metadata["jwks_uri"] == idp.jwks_uri(GATEWAY)


@pytest.mark.parametrize(
    "path", ["/oauth2/nope/v1/keys", "/oauth2/org/v1/keys", "/oauth2/nope/.well-known/openid-configuration"]
)
async def test_unknown_authorization_server_is_okta_404(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(f"{idp.base_url}{path}") as response:
        assert response.status == 404
        assert (await response.json())["errorCode"] == "E0000007"


# ---- minted tokens


async def test_access_token_has_okta_shape_and_verifies(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    token = idp.mint_access_token(GATEWAY, user=ADA, client_id=CURSOR.client_id, scopes=["mcp:read", "mcp:write"])
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": idp.signing_kid(GATEWAY)}
    claims = await verify(http, token, idp.issuer(GATEWAY), AUDIENCE)
    assert set(claims) == ACCESS_CLAIMS
    assert claims["ver"] == 1
    assert re.fullmatch(r"AT\.[A-Za-z0-9_-]{20,}", claims["jti"])
    assert (claims["iss"], claims["aud"]) == (idp.issuer(GATEWAY), AUDIENCE)
    assert (claims["cid"], claims["uid"], claims["sub"]) == (CURSOR.client_id, ADA.uid, ADA.login)
    assert claims["scp"] == ["mcp:read", "mcp:write"]
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60


async def test_access_token_options(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    token = idp.mint_access_token(
        GATEWAY,
        user=ADA.login,  # a configured user, by login
        client_id="0oaother",
        scopes=[],
        lifetime=60,
        audience=[AUDIENCE, "api://other"],
        extra_claims={"auth_time": None, "groups": ["eng"]},
        headers={"typ": "at+jwt"},
    )
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = await verify(http, token, idp.issuer(GATEWAY), AUDIENCE)
    assert set(claims) == ACCESS_CLAIMS - {"auth_time"} | {"groups"}
    assert claims["aud"] == [AUDIENCE, "api://other"]
    assert (claims["scp"], claims["exp"] - claims["iat"]) == ([], 60)


async def test_client_credentials_shaped_token(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    token = idp.mint_access_token(GATEWAY, user=None, client_id=SERVICE.client_id, scopes=["mcp:read"])
    claims = await verify(http, token, idp.issuer(GATEWAY), AUDIENCE)
    assert "uid" not in claims
    assert claims["sub"] == claims["cid"] == SERVICE.client_id


async def test_org_access_token_is_for_the_org(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    token = idp.mint_access_token(ORG, user=ADA, client_id=CURSOR.client_id, scopes=["okta.users.read"])
    claims = await verify(http, token, idp.base_url, idp.base_url)
    assert (claims["iss"], claims["aud"]) == (idp.base_url, idp.base_url)
    assert jwt.get_unverified_header(token)["kid"] not in {k["kid"] for k in idp.jwks(GATEWAY)["keys"]}


async def test_id_token_is_for_the_client(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    token = idp.mint_id_token(GATEWAY, user=ADA, client_id=CURSOR.client_id, nonce="n-1")
    claims = await verify(http, token, idp.issuer(GATEWAY), CURSOR.client_id)
    assert (claims["aud"], claims["sub"], claims["preferred_username"]) == (CURSOR.client_id, ADA.uid, ADA.login)
    assert claims["jti"].startswith("ID.") and claims["nonce"] == "n-1"
    assert "scp" not in claims and "cid" not in claims
    with pytest.raises(jwt.InvalidAudienceError):
        await verify(http, token, idp.issuer(GATEWAY), AUDIENCE)


def test_unstarted_emulator_has_no_addresses() -> None:
    idp = emulator()
    with pytest.raises(RuntimeError):
        _ = idp.base_url
    with pytest.raises(KeyError):
        idp.mint_access_token(GATEWAY, user=ADA, client_id="x", scopes=[])


# ---- keys


def rfc7638(jwk: Mapping[str, Any]) -> str:
    canonical = f'{{"e":"{jwk["e"]}","kty":"RSA","n":"{jwk["n"]}"}}'
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


async def test_jwks_publishes_one_rsa_key_per_server_under_its_thumbprint(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession
) -> None:
    kids = set()
    for server in (ORG, GATEWAY, "b"):
        (key,) = (await get_json(http, idp.jwks_uri(server)))["keys"]
        assert set(key) == {"kty", "alg", "kid", "use", "e", "n"}
        assert (key["kty"], key["alg"], key["use"]) == ("RSA", "RS256", "sig")
        assert key["kid"] == rfc7638(key) == idp.signing_kid(server)
        assert len(base64.urlsafe_b64decode(key["n"] + "==")) == 256  # 2048 bits
        kids.add(key["kid"])
    assert len(kids) == 3


async def test_rotation_keeping_the_old_key(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    old_kid = idp.signing_kid(GATEWAY)
    old_token = idp.mint_access_token(GATEWAY, user=ADA, client_id=CURSOR.client_id, scopes=["mcp:read"])
    new_kid = idp.rotate_keys(GATEWAY)
    assert new_kid != old_kid
    assert [key["kid"] for key in (await get_json(http, idp.jwks_uri(GATEWAY)))["keys"]] == [old_kid, new_kid]
    new_token = idp.mint_access_token(GATEWAY, user=ADA, client_id=CURSOR.client_id, scopes=["mcp:read"])
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    for token in (old_token, new_token):
        assert (await verify(http, token, idp.issuer(GATEWAY), AUDIENCE))["sub"] == ADA.login

    idp.retire_key(GATEWAY, old_kid)
    assert [key["kid"] for key in (await get_json(http, idp.jwks_uri(GATEWAY)))["keys"]] == [new_kid]
    with pytest.raises(KeyError):  # the old token's key is no longer published
        await verify(http, old_token, idp.issuer(GATEWAY), AUDIENCE)
    with pytest.raises(ValueError, match="signing key"):
        idp.retire_key(GATEWAY, new_kid)
    with pytest.raises(KeyError):
        idp.retire_key(GATEWAY, old_kid)


async def test_rotation_dropping_the_old_key(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    old_kid = idp.signing_kid(GATEWAY)
    new_kid = idp.rotate_keys(GATEWAY, keep_old=False)
    assert [key["kid"] for key in (await get_json(http, idp.jwks_uri(GATEWAY)))["keys"]] == [new_kid]
    assert old_kid != new_kid
    (org_key,) = (await get_json(http, idp.jwks_uri(ORG)))["keys"]  # other servers are untouched
    assert org_key["kid"] == idp.signing_kid(ORG)


# ---- JWKS failure injection and counters


async def test_jwks_down_and_garbage_and_recovery(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    url = idp.jwks_uri(GATEWAY)
    idp.set_jwks_mode("down")
    async with http.get(url) as response:
        assert response.status == 503
    idp.set_jwks_mode("garbage")
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(await response.text())
    idp.set_jwks_mode("ok")
    assert (await get_json(http, url))["keys"][0]["kid"] == idp.signing_kid(GATEWAY)
    await get_json(http, idp.jwks_uri(ORG))
    assert (idp.jwks_fetches[GATEWAY], idp.jwks_fetches[ORG], idp.jwks_fetches["b"]) == (3, 1, 0)
    with pytest.raises(ValueError, match="mode"):
        idp.set_jwks_mode("sideways")  # type: ignore[arg-type]


async def test_jwks_slow_delays_the_answer(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    url = idp.jwks_uri(GATEWAY)
    idp.set_jwks_mode("slow", delay_seconds=0.5)
    with pytest.raises(TimeoutError):
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=0.1)):
            pass
    started = time.monotonic()
    assert (await get_json(http, url))["keys"]
    assert time.monotonic() - started >= 0.45
    assert idp.jwks_fetches[GATEWAY] == 2


async def test_close_does_not_wait_for_a_slow_jwks_answer(http: aiohttp.ClientSession) -> None:
    idp = emulator(jwks_delay_seconds=60)
    await idp.start()
    idp.set_jwks_mode("slow")
    pending = asyncio.ensure_future(http.get(idp.jwks_uri(GATEWAY)))
    async with asyncio.timeout(10):
        while not idp.jwks_fetches[GATEWAY]:
            await asyncio.sleep(0.01)
        await idp.close()
    with pytest.raises(aiohttp.ClientError):
        (await pending).close()


# ---- token endpoint


async def test_client_credentials_with_client_secret_basic(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession
) -> None:
    # Many clients skip the form-encoding; decoding it anyway leaves a secret without '+' or '%' unchanged.
    for credentials in (basic(SERVICE.client_id, SECRET), basic(SERVICE.client_id, SECRET, form_encode=False)):
        status, body, headers = await post_token(http, idp.token_endpoint(GATEWAY), FORM, credentials)
        assert status == 200, body
        assert headers["Cache-Control"] == "no-store"
        assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, "mcp:read")
        claims = await verify(http, body["access_token"], idp.issuer(GATEWAY), AUDIENCE)
        assert claims["sub"] == claims["cid"] == SERVICE.client_id
        assert claims["scp"] == ["mcp:read"] and "uid" not in claims
    assert idp.token_requests[GATEWAY] == 2


async def test_client_credentials_with_client_secret_post(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    form = {**FORM, "client_id": SERVICE.client_id, "client_secret": SECRET}
    status, body, _ = await post_token(http, idp.token_endpoint(GATEWAY), form)
    assert status == 200, body


@pytest.mark.parametrize(
    ("client_id", "secret"), [(SERVICE.client_id, "wrong"), ("0oaunknown", "x"), (CURSOR.client_id, "x")]
)
async def test_bad_client_secret_is_invalid_client(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession, client_id: str, secret: str
) -> None:
    status, body, headers = await post_token(http, idp.token_endpoint(GATEWAY), FORM, basic(client_id, secret))
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["WWW-Authenticate"].startswith("Basic")
    assert headers["Cache-Control"] == "no-store"
    assert secret not in json.dumps(body)


async def test_client_credentials_with_private_key_jwt(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    endpoint = idp.token_endpoint(GATEWAY)
    signed = assertion(endpoint)
    status, body, _ = await post_token(http, endpoint, assertion_form(signed, client_id=AGENT))
    assert status == 200, body
    claims = await verify(http, body["access_token"], idp.issuer(GATEWAY), AUDIENCE)
    assert claims["cid"] == claims["sub"] == AGENT

    status, body, _ = await post_token(http, endpoint, assertion_form(signed))  # the same jti again
    assert (status, body["error"]) == (401, "invalid_client")
    status, body, _ = await post_token(http, endpoint, assertion_form(assertion(endpoint)))  # a fresh jti
    assert status == 200, body


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": "issuer"},  # Okta wants the token endpoint URL
        {"aud": "https://elsewhere.example/oauth2/v1/token"},
        {"sub": "0oasomeoneelse"},
        {"iss": CURSOR.client_id, "sub": CURSOR.client_id},  # a registered app without a key
        {"exp": int(time.time()) + 7200},
        {"exp": int(time.time()) - 600},
        {"jti": None},
    ],
)
async def test_bad_client_assertion_is_invalid_client(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession, changes: dict[str, Any]
) -> None:
    endpoint = idp.token_endpoint(GATEWAY)
    if changes.get("aud") == "issuer":
        changes = {"aud": idp.issuer(GATEWAY)}
    status, body, _ = await post_token(http, endpoint, assertion_form(assertion(endpoint, **changes)))
    assert (status, body["error"]) == (401, "invalid_client")


async def test_issuer_as_assertion_audience_when_enabled(http: aiohttp.ClientSession) -> None:
    async with emulator(issuer_assertion_audience=True) as idp:
        for audience in (idp.issuer(GATEWAY), idp.token_endpoint(GATEWAY)):
            status, body, _ = await post_token(http, idp.token_endpoint(GATEWAY), assertion_form(assertion(audience)))
            assert status == 200, body


async def test_assertion_signed_by_another_key_is_invalid_client(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession
) -> None:
    endpoint = idp.token_endpoint(GATEWAY)
    now = int(time.time())
    claims = {"iss": AGENT, "sub": AGENT, "aud": endpoint, "exp": now + 300, "jti": str(uuid.uuid4())}
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for key, kid in ((stranger, AGENT_KID), (agent_key(), "another-kid")):
        signed = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        status, body, _ = await post_token(http, endpoint, assertion_form(signed))
        assert (status, body["error"]) == (401, "invalid_client")


@pytest.mark.parametrize(
    ("server", "form", "error"),
    [
        (GATEWAY, {"grant_type": "password", "username": "ada", "password": "pw"}, "unsupported_grant_type"),
        (GATEWAY, {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange"}, "unsupported_grant_type"),
        (ORG, {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}, "unsupported_grant_type"),
        (ORG, FORM, "unsupported_grant_type"),
        (GATEWAY, {"scope": "mcp:read"}, "invalid_request"),
    ],
)
async def test_unsupported_or_missing_grant_type(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession, server: str, form: dict[str, str], error: str
) -> None:
    status, body, headers = await post_token(http, idp.token_endpoint(server), form)  # no client authentication
    assert (status, body["error"]) == (400, error)
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "form",
    [
        {"grant_type": "client_credentials", "scope": "openid"},
        {"grant_type": "client_credentials", "scope": "mcp:read mcp:admin"},
        {"grant_type": "client_credentials"},
    ],
)
async def test_client_credentials_scopes(
    idp: FaultyOktaEmulator, http: aiohttp.ClientSession, form: dict[str, str]
) -> None:
    status, body, _ = await post_token(http, idp.token_endpoint(GATEWAY), form, basic(SERVICE.client_id, SECRET))
    assert (status, body["error"]) == (400, "invalid_scope")


async def test_malformed_token_requests(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    endpoint = idp.token_endpoint(GATEWAY)
    async with http.post(endpoint, json=FORM) as response:
        assert (response.status, (await response.json())["error"]) == (400, "invalid_request")
    async with http.post(endpoint, data=[("grant_type", "client_credentials")] * 2) as response:
        assert (response.status, (await response.json())["error"]) == (400, "invalid_request")
    form = {**FORM, "client_id": SERVICE.client_id, "client_secret": SECRET}
    # Two authentication methods at once.
    status, body, _ = await post_token(http, endpoint, form, basic(SERVICE.client_id, SECRET))
    assert (status, body["error"]) == (400, "invalid_request")


async def test_registered_grant_extends_the_token_endpoint(http: aiohttp.ClientSession) -> None:
    async with emulator(token_exchange=False) as idp:  # no built-in ID-JAG exchange: the handler below is the only one
        await check_registered_grant(idp, http)


async def check_registered_grant(idp: FaultyOktaEmulator, http: aiohttp.ClientSession) -> None:
    token_exchange = "urn:ietf:params:oauth:grant-type:token-exchange"
    metadata = await get_json(http, f"{idp.base_url}/.well-known/oauth-authorization-server")
    assert metadata["grant_types_supported"] == []
    assert "identity_chaining_requested_token_types_supported" not in metadata

    async def exchange(request: TokenRequest) -> dict[str, Any]:
        if request.param("audience") != idp.issuer(GATEWAY):
            raise OAuthError("invalid_target", "unknown audience")
        return {"access_token": "id-jag", "issued_token_type": "urn:ietf:params:oauth:token-type:id-jag"}

    idp.register_grant(token_exchange, exchange, kind="org")
    metadata = await get_json(http, f"{idp.base_url}/.well-known/oauth-authorization-server")
    assert metadata["grant_types_supported"] == [token_exchange]
    endpoint = idp.token_endpoint(ORG)
    form = assertion_form(assertion(endpoint), grant_type=token_exchange, audience=idp.issuer(GATEWAY))
    status, body, _ = await post_token(http, endpoint, form)
    assert (status, body["access_token"]) == (200, "id-jag")
    form = assertion_form(assertion(endpoint), grant_type=token_exchange, audience="https://nowhere.example")
    status, body, _ = await post_token(http, endpoint, form)
    assert (status, body["error"]) == (400, "invalid_target")
    status, body, _ = await post_token(http, endpoint, {"grant_type": token_exchange})
    assert (status, body["error"]) == (401, "invalid_client")  # client authentication precedes the grant
    assert idp.token_requests[ORG] == 3


# ---- the standalone runner


async def test_run_emulator_prints_a_working_token(http: aiohttp.ClientSession) -> None:
    out, stop = io.StringIO(), asyncio.Event()
    runner = asyncio.create_task(run_emulator(0, audience="http://localhost:9999", out=out, stop=stop))
    try:
        async with asyncio.timeout(20):
            while "Press Ctrl-C" not in out.getvalue():
                assert not runner.done()
                await asyncio.sleep(0.02)
        printed = out.getvalue()
        issuer = re.search(r"OKTA_ISSUER=(\S+)", printed)
        jwks_uri = re.search(r"OKTA_JWKS_URI=(\S+)", printed)
        token = re.search(r"^(eyJ\S+)$", printed, re.MULTILINE)
        assert issuer and jwks_uri and token
        assert jwks_uri[1] == f"{issuer[1]}/v1/keys"
        claims = await verify(http, token[1], issuer[1], "http://localhost:9999")
        assert set(claims) == ACCESS_CLAIMS
        assert claims["scp"] == ["mcp:read", "mcp:write"]
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await runner


async def test_logs_carry_no_secret_or_token(http: aiohttp.ClientSession) -> None:
    with structlog.testing.capture_logs() as events:
        async with emulator() as idp:
            endpoint = idp.token_endpoint(GATEWAY)
            signed = assertion(endpoint)
            minted = idp.mint_access_token(GATEWAY, user=ADA, client_id=CURSOR.client_id, scopes=["mcp:read"])
            issued = [minted]
            for form, headers in (
                (assertion_form(signed), None),
                (assertion_form(signed), None),  # replayed: refused
                (FORM, basic(SERVICE.client_id, SECRET)),
                (FORM, basic(SERVICE.client_id, "a-wrong-secret")),
            ):
                _, body, _ = await post_token(http, endpoint, form, headers)
                issued += [body["access_token"]] if "access_token" in body else []
    assert {"okta_emulator_token_issued", "okta_emulator_token_refused"} <= {event["event"] for event in events}
    logged = repr(events)
    for secret in (SECRET, quote_plus(SECRET), "a-wrong-secret", signed, signed.split(".")[2], *issued):
        assert secret not in logged
    assert len(issued) == 3
