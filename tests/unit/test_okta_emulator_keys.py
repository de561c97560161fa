"""The Okta emulator's keys and client authentication as pure logic, with an injected clock (no sockets).

The HTTP side, and the same rules seen from a client, are in tests/integration/test_okta_emulator.py."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import MultiDict

from okta_agent_proxy.devkit.okta_emulator_clients import ClientAuthenticator
from okta_agent_proxy.devkit.okta_emulator_directory import App, AuthorizationServer
from okta_agent_proxy.devkit.okta_emulator_keys import EmulatorKey, KeyRing, jwk_thumbprint
from okta_agent_proxy.devkit.okta_emulator_oauth import CLIENT_ASSERTION_TYPE, OAuthError, metadata_document, single

NOW = 1_800_000_000
ENDPOINT = "https://emulator.test/oauth2/aus-x/v1/token"
AGENT, EC_AGENT, SERVICE = "wlpagent", "wlpecagent", "0oaservice"
# RFC 7638 §3.1: the example RSA key and its thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj"
    "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQ"
    "vRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@cache
def emulator_key() -> EmulatorKey:
    return EmulatorKey.generate()


def apps() -> dict[str, App]:
    rsa_jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(rsa_key().public_key()))
    ec_jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(ec_key().public_key()))
    return {
        AGENT: App(AGENT, "agent", public_jwk={**rsa_jwk, "kid": "k1", "alg": "RS256"}),
        EC_AGENT: App(EC_AGENT, "ec agent", public_jwk=ec_jwk),
        SERVICE: App(SERVICE, "service", client_secret="hunter2"),
        "0oapublic": App("0oapublic", "public client"),
    }


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authenticator(clock: Clock) -> ClientAuthenticator:
    return ClientAuthenticator(apps(), clock)


def signed_assertion(client_id: str = AGENT, *, kid: str | None = "k1", alg: str = "RS256", **changes: Any) -> str:
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": ENDPOINT,
        "iat": NOW,
        "exp": NOW + 300,
        "jti": str(uuid.uuid4()),
    }
    claims = {k: v for k, v in {**claims, **changes}.items() if v is not None}
    key = ec_key() if alg.startswith("ES") else rsa_key()
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def assertion_form(signed: str, **extra: str) -> MultiDict[str]:
    return MultiDict({"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": signed, **extra})


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def refusal(
    authenticator: ClientAuthenticator, form: MultiDict[str], authorization: str | None = None
) -> tuple[str, int]:
    with pytest.raises(OAuthError) as caught:
        authenticator.authenticate(authorization, form, [ENDPOINT])
    return caught.value.error, caught.value.status


# ---- keys


def test_rfc7638_thumbprint_example() -> None:
    assert jwk_thumbprint({"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}) == (
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )


def test_generated_key_is_published_under_its_thumbprint_without_private_members() -> None:
    key = emulator_key()
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "alg", "kid", "use", "e", "n"}
    assert jwk["kid"] == key.kid == jwk_thumbprint(jwk)
    assert key.private_key.key_size == 2048
    assert "private_key" not in repr(key)


def test_sign_makes_an_okta_header_and_honours_overrides() -> None:
    key = emulator_key()
    public = jwt.PyJWK(key.public_jwk()).key
    token = key.sign({"sub": "a", "drop": None}, {})
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": key.kid}
    assert jwt.decode(token, public, algorithms=["RS256"]) == {"sub": "a"}
    token = key.sign({"sub": "a"}, {"alg": "RS512", "kid": None, "typ": "at+jwt"})
    assert jwt.get_unverified_header(token) == {"alg": "RS512", "typ": "at+jwt"}
    assert jwt.decode(token, public, algorithms=["RS512"]) == {"sub": "a"}


def test_key_ring_rotation_and_retirement() -> None:
    first, second, third = EmulatorKey("k1", rsa_key()), EmulatorKey("k2", rsa_key()), EmulatorKey("k3", rsa_key())
    ring = KeyRing(first)
    assert ring.rotate(second, keep_old=True) == "k2"
    assert (ring.signing_key.kid, ring.kids) == ("k2", ["k1", "k2"])
    assert [key["kid"] for key in ring.jwks()["keys"]] == ["k1", "k2"]
    with pytest.raises(ValueError, match="signing key"):
        ring.retire("k2")
    ring.retire("k1")
    with pytest.raises(KeyError):
        ring.retire("k1")
    ring.rotate(third, keep_old=False)
    assert ring.kids == ["k3"]


def test_key_ring_finds_published_keys_by_kid() -> None:
    first, second = EmulatorKey("k1", rsa_key()), EmulatorKey("k2", rsa_key())
    ring = KeyRing(first)
    ring.rotate(second, keep_old=True)
    assert (ring.find("k1"), ring.find("k2")) == (first, second)
    for unknown in ("k3", None, ["k1"], 1):
        assert ring.find(unknown) is None
    ring.retire("k1")
    assert ring.find("k1") is None


def test_directory_defaults_for_cross_app_access() -> None:
    server = AuthorizationServer("aus-x", "api://x")
    assert (server.resources, server.jwt_bearer) == ((), True)
    assert AuthorizationServer("aus-y", "api://y", resources=("https://y/mcp",), jwt_bearer=False).resources == (
        "https://y/mcp",
    )
    assert App("wlpx", "agent").linked_client_id is None
    with pytest.raises(ValueError, match="server id"):
        AuthorizationServer("org", "api://org")


def test_an_app_refuses_private_key_material() -> None:
    with pytest.raises(ValueError, match="private"):
        App("x", "x", public_jwk={"kty": "RSA", "n": "n", "e": "AQAB", "d": "secret"})
    assert "hunter2" not in repr(apps()[SERVICE])


def test_repeated_parameter_is_invalid_request() -> None:
    form = MultiDict([("scope", "a"), ("scope", "b"), ("empty", "")])
    with pytest.raises(OAuthError) as caught:
        single(form, "scope")
    assert (caught.value.error, caught.value.status) == ("invalid_request", 400)
    assert single(form, "empty") is None and single(form, "absent") is None


# ---- client secrets


def test_client_secret_basic_and_post(authenticator: ClientAuthenticator) -> None:
    assert authenticator.authenticate(basic(SERVICE, "hunter2"), MultiDict(), [ENDPOINT]).client_id == SERVICE
    form = MultiDict({"client_id": SERVICE, "client_secret": "hunter2"})
    assert authenticator.authenticate(None, form, [ENDPOINT]).client_id == SERVICE


@pytest.mark.parametrize(
    ("authorization", "form", "expected"),
    [
        (basic(SERVICE, "wrong"), {}, ("invalid_client", 401)),
        (basic("0oanobody", "hunter2"), {}, ("invalid_client", 401)),
        (basic("0oapublic", ""), {}, ("invalid_client", 401)),
        (basic(SERVICE, "hunter2"), {"client_id": "0oaother"}, ("invalid_client", 401)),
        ("Basic not-base64!", {}, ("invalid_client", 401)),
        ("Basic " + base64.b64encode(b"no-colon").decode(), {}, ("invalid_client", 401)),
        ("Bearer abc", {}, ("invalid_client", 401)),
        (None, {}, ("invalid_client", 401)),
        (None, {"client_id": SERVICE}, ("invalid_client", 401)),
        (None, {"client_id": SERVICE, "client_secret": "wrong"}, ("invalid_client", 401)),
        (basic(SERVICE, "hunter2"), {"client_secret": "hunter2"}, ("invalid_request", 400)),
    ],
)
def test_bad_client_secrets(
    authenticator: ClientAuthenticator, authorization: str | None, form: dict[str, str], expected: tuple[str, int]
) -> None:
    assert refusal(authenticator, MultiDict(form), authorization) == expected


def test_basic_refusal_carries_a_basic_challenge(authenticator: ClientAuthenticator) -> None:
    with pytest.raises(OAuthError) as caught:
        authenticator.authenticate(basic(SERVICE, "wrong"), MultiDict(), [ENDPOINT])
    response = caught.value.response()
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
    assert response.headers["Cache-Control"] == "no-store"


# ---- private_key_jwt


def test_private_key_jwt_rsa_and_ec(authenticator: ClientAuthenticator) -> None:
    assert authenticator.authenticate(None, assertion_form(signed_assertion()), [ENDPOINT]).client_id == AGENT
    for alg in ("RS384", "RS512"):  # the registered JWK names RS256, so other RSA algorithms are refused
        form = assertion_form(signed_assertion(alg=alg))
        assert refusal(authenticator, form)[0] == "invalid_client"
    form = assertion_form(signed_assertion(EC_AGENT, kid=None, alg="ES256"), client_id=EC_AGENT)
    assert authenticator.authenticate(None, form, [ENDPOINT]).client_id == EC_AGENT


def test_private_key_jwt_accepts_an_aud_list_and_the_configured_audiences(authenticator: ClientAuthenticator) -> None:
    form = assertion_form(signed_assertion(aud=["https://other", ENDPOINT]))
    assert authenticator.authenticate(None, form, [ENDPOINT]).client_id == AGENT
    form = assertion_form(signed_assertion(aud="https://emulator.test/oauth2/aus-x"))
    assert authenticator.authenticate(None, form, [ENDPOINT, "https://emulator.test/oauth2/aus-x"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: assertion_form(signed_assertion(aud="https://emulator.test/oauth2/aus-x")),
        lambda: assertion_form(signed_assertion(sub="someone-else")),
        lambda: assertion_form(signed_assertion(exp=NOW - 61)),  # beyond the 60 s skew
        lambda: assertion_form(signed_assertion(exp=NOW + 3661)),  # more than an hour ahead
        lambda: assertion_form(signed_assertion(exp="soon")),
        lambda: assertion_form(signed_assertion(exp=None)),
        lambda: assertion_form(signed_assertion(iat=NOW + 120)),
        lambda: assertion_form(signed_assertion(jti=None)),
        lambda: assertion_form(signed_assertion(kid="k2")),
        lambda: assertion_form(signed_assertion(iss="0oanobody", sub="0oanobody")),
        lambda: assertion_form(signed_assertion(SERVICE)),  # registered, but with no key
        lambda: assertion_form(signed_assertion(EC_AGENT, alg="RS256")),  # an RSA signature for an EC key
        lambda: assertion_form(signed_assertion(), client_id=SERVICE),
        lambda: assertion_form(signed_assertion()[:-4] + "AAAA"),
        lambda: assertion_form("not.a.jwt"),
        lambda: MultiDict({"client_assertion_type": "urn:other", "client_assertion": signed_assertion()}),
        lambda: assertion_form(jwt.encode({"iss": AGENT, "sub": AGENT}, "secret-secret-secret-secret-32b!", "HS256")),
    ],
)
def test_bad_client_assertions_are_invalid_client(
    authenticator: ClientAuthenticator, make: Callable[[], MultiDict[str]]
) -> None:
    form = make()
    assert refusal(authenticator, form) == ("invalid_client", 401)


def test_private_key_jwt_within_skew_is_accepted(authenticator: ClientAuthenticator) -> None:
    form = assertion_form(signed_assertion(exp=NOW - 30, iat=NOW + 30))
    assert authenticator.authenticate(None, form, [ENDPOINT]).client_id == AGENT


def test_a_jti_is_single_use_per_client(authenticator: ClientAuthenticator, clock: Clock) -> None:
    form = assertion_form(signed_assertion(jti="once"))
    authenticator.authenticate(None, form, [ENDPOINT])
    assert refusal(authenticator, form) == ("invalid_client", 401)
    other_client = assertion_form(signed_assertion(EC_AGENT, kid=None, alg="ES256", jti="once"))
    assert authenticator.authenticate(None, other_client, [ENDPOINT]).client_id == EC_AGENT
    clock.now = NOW + 3600  # long after its exp: refused as expired (and no longer remembered)
    assert refusal(authenticator, form) == ("invalid_client", 401)


def test_metadata_document() -> None:
    document = metadata_document(
        issuer="https://x/oauth2/a", endpoints="https://x/oauth2/a", grant_types=["b", "a"], scopes=["s"], oidc=False
    )
    assert document["issuer"] == "https://x/oauth2/a"
    assert (document["token_endpoint"], document["jwks_uri"]) == (
        "https://x/oauth2/a/v1/token",
        "https://x/oauth2/a/v1/keys",
    )
    assert document["grant_types_supported"] == ["a", "b"]
    assert "id_token_signing_alg_values_supported" not in document
    oidc = metadata_document(issuer="https://x", endpoints="https://x/oauth2", grant_types=[], scopes=[], oidc=True)
    assert oidc["subject_types_supported"] == ["public"]
