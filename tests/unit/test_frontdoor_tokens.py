"""`frontdoor.tokens`: the gateway's own access tokens, minted and verified with real ES256 signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from okta_agent_proxy.frontdoor.tokens import FrontDoorTokens, InvalidFrontDoorToken, generate_signing_key
from okta_agent_proxy.keys import SigningKey, generate_rsa_key

ISSUER = "https://gateway.example.com"
EMPLOYEES, PARTNERS = f"{ISSUER}/employees", f"{ISSUER}/partners"
NOW = 1_800_000_000.0


def tokens(*keys: SigningKey, now: float = NOW) -> FrontDoorTokens:
    return FrontDoorTokens(ISSUER, list(keys), ttl_seconds=3600, clock=lambda: now)


def mint(issuer: FrontDoorTokens, resource: str = EMPLOYEES) -> str:
    return issuer.mint(subject="00u-alice", client_id="client-1", resource=resource, scopes=["mcp:read"], grant_id="g1")


def test_a_minted_token_verifies_for_its_resource_only() -> None:
    key = generate_signing_key()
    issuer = tokens(key)
    token = mint(issuer)
    claims = issuer.verify(token, EMPLOYEES)
    assert (claims.subject, claims.client_id, claims.scopes, claims.grant_id) == (
        "00u-alice",
        "client-1",
        ("mcp:read",),
        "g1",
    )
    assert claims.expires_at == NOW + 3600
    header = jwt.get_unverified_header(token)
    assert (header["typ"], header["alg"], header["kid"]) == ("at+jwt", "ES256", key.kid)
    with pytest.raises(InvalidFrontDoorToken, match="another resource"):
        issuer.verify(token, PARTNERS)  # a token for /employees is refused on /partners


def test_expiry_with_leeway() -> None:
    key = generate_signing_key()
    token = mint(tokens(key))
    assert tokens(key, now=NOW + 3600 + 59).verify(token, EMPLOYEES)
    with pytest.raises(InvalidFrontDoorToken, match="expired"):
        tokens(key, now=NOW + 3600 + 61).verify(token, EMPLOYEES)


def test_rotation_keeps_the_previous_key_verifying_and_published() -> None:
    old, new = generate_signing_key(), generate_signing_key()
    token = mint(tokens(old))
    rotating = tokens(new, old)
    assert rotating.verify(token, EMPLOYEES).grant_id == "g1"
    assert [k["kid"] for k in rotating.jwks()["keys"]] == [new.kid, old.kid]
    assert all("d" not in k for k in rotating.jwks()["keys"])
    with pytest.raises(InvalidFrontDoorToken, match="does not publish"):
        tokens(new).verify(token, EMPLOYEES)


def _forge(header: dict[str, object], claims: dict[str, object], key: object, algorithm: str) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=header)  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(header: dict[str, object], claims: dict[str, object], key: SigningKey) -> str:
    """The algorithm-confusion forgery, by hand (PyJWT itself refuses to HMAC with a public key)."""
    signing_input = _b64(json.dumps({**header, "alg": "HS256"}).encode()) + "." + _b64(json.dumps(claims).encode())
    secret = json.dumps(key.public_jwk()).encode()
    return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def test_forgeries_are_refused() -> None:
    key = generate_signing_key()
    issuer = tokens(key)
    good = jwt.decode(mint(issuer), options={"verify_signature": False})
    other = ec.generate_private_key(ec.SECP256R1())
    cases = {
        "another key, same kid": _forge({"kid": key.kid, "typ": "at+jwt"}, good, other, "ES256"),
        "no typ (an ID token, say)": _forge({"kid": key.kid}, good, key.private_key, "ES256"),
        "HS256 with the public key as secret": _hs256({"kid": key.kid, "typ": "at+jwt"}, good, key),
        "RS256": _forge({"kid": key.kid, "typ": "at+jwt"}, good, generate_rsa_key(), "RS256"),
        "another issuer": _forge(
            {"kid": key.kid, "typ": "at+jwt"}, {**good, "iss": "https://evil"}, key.private_key, "ES256"
        ),
        "no grant": _forge(
            {"kid": key.kid, "typ": "at+jwt"}, {k: v for k, v in good.items() if k != "grant"}, key.private_key, "ES256"
        ),
        "audience list with ours": _forge(
            {"kid": key.kid, "typ": "at+jwt"}, {**good, "aud": [PARTNERS, EMPLOYEES]}, key.private_key, "ES256"
        ),
        "scope not a string": _forge(
            {"kid": key.kid, "typ": "at+jwt"}, {**good, "scope": ["x"]}, key.private_key, "ES256"
        ),
        "garbage": "not.a.jwt",
    }
    alg_none = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "at+jwt", "kid": key.kid}).encode())
    cases["alg none"] = alg_none.decode().rstrip("=") + "." + mint(issuer).split(".")[1] + "."
    accepted = []
    for name, token in cases.items():
        try:
            issuer.verify(token, EMPLOYEES)
        except InvalidFrontDoorToken:
            continue
        accepted.append(name)
    assert accepted == [], accepted
