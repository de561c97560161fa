"""Agent signing keys (okta_agent_proxy.keys): every accepted encoding, the rejected ones, the kid rule, no leaks."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from okta_agent_proxy.config.models import Agent
from okta_agent_proxy.keys import InvalidKeyError, SigningKey, load_signing_key, thumbprint
from tests.unit.helpers import (
    RFC7517_EC,
    RFC7517_RSA_N,
    RFC7638_THUMBPRINT,
    ec_key,
    pem,
    pem_body_chunks,
    private_jwk,
    rfc_rsa_jwk,
    rsa_key,
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- accepted encodings -----------------------------------------------------------------------------------------------


def test_pem_pkcs8_rsa() -> None:
    text = pem(rsa_key())
    assert text.startswith("-----BEGIN PRIVATE KEY-----")
    key = load_signing_key(text)
    assert key.algorithm == "RS256"
    assert key.private_key.private_numbers() == rsa_key().private_numbers()


def test_pem_pkcs1_rsa() -> None:
    text = pem(rsa_key(), pkcs8=False)
    assert text.startswith("-----BEGIN RSA PRIVATE KEY-----")
    key = load_signing_key(text)
    assert key.algorithm == "RS256"
    assert key.kid == load_signing_key(pem(rsa_key())).kid


@pytest.mark.parametrize("pkcs8", [True, False], ids=["pkcs8", "sec1"])
@pytest.mark.parametrize(
    ("curve", "algorithm"), [("secp256r1", "ES256"), ("secp384r1", "ES384"), ("secp521r1", "ES512")]
)
def test_ec_pem(curve: str, algorithm: str, pkcs8: bool) -> None:
    text = pem(ec_key(curve), pkcs8=pkcs8)
    assert ("BEGIN EC PRIVATE KEY" in text) is not pkcs8
    key = load_signing_key(text)
    assert key.algorithm == algorithm


def test_pem_surrounded_by_whitespace_loads() -> None:
    assert load_signing_key("\n  " + pem(ec_key()) + "\n\n").algorithm == "ES256"


@pytest.mark.parametrize("make", [rsa_key, ec_key], ids=["rsa", "ec"])
def test_jwk_as_mapping_and_as_json_text(make: Any) -> None:
    jwk = private_jwk(make())
    from_dict = load_signing_key(jwk)
    from_text = load_signing_key(json.dumps(jwk))
    from_pem = load_signing_key(pem(make()))
    assert from_dict.kid == from_text.kid == from_pem.kid
    assert from_dict.algorithm == from_text.algorithm == from_pem.algorithm


def test_rfc7517_rsa_jwk_with_only_n_e_d() -> None:
    key = load_signing_key(rfc_rsa_jwk(crt=False))
    assert key.algorithm == "RS256"
    assert key.private_key.key_size == 2048


# --- rejected keys ----------------------------------------------------------------------------------------------------


def _public_only(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y", "kid")}


@pytest.mark.parametrize("make", [rsa_key, ec_key], ids=["rsa", "ec"])
def test_public_only_jwk_is_rejected(make: Any) -> None:
    with pytest.raises(InvalidKeyError):
        load_signing_key(_public_only(private_jwk(make())))
    with pytest.raises(InvalidKeyError):
        load_signing_key(json.dumps(_public_only(private_jwk(make()))))


def test_rsa_below_2048_bits_is_rejected() -> None:
    small = rsa_key(1024)
    with pytest.raises(InvalidKeyError):
        load_signing_key(pem(small))
    with pytest.raises(InvalidKeyError):
        load_signing_key(private_jwk(small))


def test_unsupported_ec_curve_is_rejected() -> None:
    with pytest.raises(InvalidKeyError):
        load_signing_key(pem(ec_key("secp256k1")))


def test_public_key_pem_is_rejected() -> None:
    public = (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(InvalidKeyError):
        load_signing_key(public)


def test_encrypted_pem_is_rejected() -> None:
    encrypted = (
        ec_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        .decode()
    )
    with pytest.raises(InvalidKeyError):
        load_signing_key(encrypted)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "...",
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCA...",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCA...\n-----END PRIVATE KEY-----\n",
        "{not json",
        "[1, 2]",
        '{"kty": "oct", "k": "c2VjcmV0"}',
        '{"kty": "OKP", "crv": "Ed25519", "x": "abc", "d": "abc"}',
        '{"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"}',
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"},
        {},
    ],
    ids=[
        "empty",
        "ellipsis",
        "bare-base64",
        "truncated-pem",
        "bad-json",
        "json-array",
        "oct",
        "okp",
        "garbage-rsa",
        "garbage-ec",
        "empty-dict",
    ],
)
def test_unparsable_keys_are_rejected(value: str | dict[str, Any]) -> None:
    with pytest.raises(InvalidKeyError):
        load_signing_key(value)


def test_rejection_messages_never_quote_the_key() -> None:
    secret = "Zm9vYmFyU2VjcmV0TWF0ZXJpYWwxMjM0NTY3ODkw"
    values: list[str | dict[str, Any]] = [
        f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----",
        f'{{"kty": "RSA", "n": "{secret}", "e": "AQAB", "d": "{secret}"}}',
        {"kty": secret, "d": secret},
        {"kty": "EC", "crv": secret, "x": secret, "y": secret, "d": secret},
        f'{{"kty": "EC", "d": "{secret}"',
        secret,
    ]
    for value in values:
        with pytest.raises(InvalidKeyError) as caught:
            load_signing_key(value)
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value)


# --- kid: key_id > JWK kid > RFC 7638 thumbprint ----------------------------------------------------------------------


def test_thumbprint_matches_rfc7638_example() -> None:
    key = load_signing_key(rfc_rsa_jwk())
    assert thumbprint(key.private_key) == RFC7638_THUMBPRINT
    assert key.kid == RFC7638_THUMBPRINT


def test_ec_thumbprint_is_the_rfc7638_digest_of_crv_kty_x_y() -> None:
    canonical = json.dumps(
        {m: RFC7517_EC[m] for m in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    ).encode()
    expected = _b64(hashlib.sha256(canonical).digest())
    assert load_signing_key(dict(RFC7517_EC)).kid == expected


def test_kid_precedence() -> None:
    jwk_with_kid = rfc_rsa_jwk(kid="2011-04-29")
    assert load_signing_key(rfc_rsa_jwk()).kid == RFC7638_THUMBPRINT
    assert load_signing_key(jwk_with_kid).kid == "2011-04-29"
    assert load_signing_key(jwk_with_kid, key_id="configured").kid == "configured"
    assert load_signing_key(pem(rsa_key()), key_id="configured").kid == "configured"
    assert load_signing_key(pem(rsa_key())).kid == thumbprint(rsa_key())


def test_empty_jwk_kid_falls_back_to_thumbprint() -> None:
    assert load_signing_key(rfc_rsa_jwk(kid="")).kid == RFC7638_THUMBPRINT


def test_agent_key_id_wins_over_jwk_kid() -> None:
    agent = Agent.model_validate({"client_id": "a", "key_id": "from-yaml", "private_key": rfc_rsa_jwk(kid="jwk")})
    assert agent.private_key is not None
    assert agent.private_key.kid == "from-yaml"
    agent = Agent.model_validate({"client_id": "a", "private_key": json.dumps(rfc_rsa_jwk(kid="jwk"))})
    assert agent.private_key is not None
    assert agent.private_key.kid == "jwk"
    agent = Agent.model_validate({"client_id": "a", "private_key": rfc_rsa_jwk()})
    assert agent.private_key is not None
    assert agent.private_key.kid == RFC7638_THUMBPRINT


def test_public_jwk_has_no_private_members() -> None:
    key = load_signing_key(rfc_rsa_jwk(kid="k1"))
    public = key.public_jwk()
    assert public["kid"] == "k1"
    assert public["alg"] == "RS256"
    assert public["n"] == RFC7517_RSA_N
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(public)
    ec_public = load_signing_key(dict(RFC7517_EC)).public_jwk()
    assert "d" not in ec_public
    assert (ec_public["x"], ec_public["y"]) == (RFC7517_EC["x"], RFC7517_EC["y"])


def test_published_example_key_is_flagged() -> None:
    env_template_key = {
        "kty": "EC",
        "crv": "P-256",
        "x": "4sqJ_kiZyeRUQTUmOx0B3agz27W95PIUcnXfyXChp98",
        "y": "fC6zCPyn7-JYK_T80HDF4hYkqPbXJTWJFeb-wHuR8PA",
        "d": "sFxtHzxUcYdk7L5rcsRwihhl2z4Sis-s3lWxYg3PmuM",
    }
    assert load_signing_key(env_template_key).is_published_example
    assert not load_signing_key(pem(ec_key())).is_published_example


# --- no key material in any representation ----------------------------------------------------------------------------


def _assert_no_material(text: str, key: SigningKey, pem_text: str) -> None:
    for chunk in pem_body_chunks(pem_text):
        assert chunk not in text
    numbers = key.private_key.private_numbers()
    secret_int = numbers.d if hasattr(numbers, "d") else numbers.private_value
    assert str(secret_int) not in text
    assert "PRIVATE KEY" not in text


@pytest.mark.parametrize("make", [rsa_key, ec_key], ids=["rsa", "ec"])
def test_repr_never_shows_key_material(make: Any) -> None:
    pem_text = pem(make())
    key = load_signing_key(pem_text)
    jwk_d = private_jwk(make())["d"]
    agent = Agent.model_validate({"client_id": "a", "private_key": pem_text})
    for text in (repr(key), str(key), repr(agent), str(agent), agent.model_dump_json(exclude={"private_key"})):
        _assert_no_material(text, key, pem_text)
        assert jwk_d not in text
    assert key.kid in repr(key)
