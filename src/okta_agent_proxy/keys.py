"""Agent signing keys: parsed once from the YAML's PEM (PKCS#8, or PKCS#1 for RSA) or JWK.

A key is used to sign client assertions (RFC 7523 private_key_jwt) toward Okta and backend authorization servers.
Its `kid` is the configured `key_id`, else the JWK's `kid`, else the RFC 7638 thumbprint of the public key — the
value Okta shows for a key pasted without one. The private material never prints: `repr` shows only the kid.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# Keys published in this project's own files (env.template). `check` warns while one is in use.
PUBLISHED_EXAMPLE_KEYS = frozenset({"j2R2aQrUxAmZzSLatZqYiVc7WUlRyMp3Deu0BylfSUM"})

_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class InvalidKeyError(ValueError):
    """A key that cannot be used; the message names the problem, never the key material."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: PrivateKey = field(repr=False)

    @property
    def is_published_example(self) -> bool:
        return thumbprint(self.private_key) in PUBLISHED_EXAMPLE_KEYS

    def public_jwk(self) -> dict[str, Any]:
        jwk = _public_jwk(self.private_key)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(key: PrivateKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "crv", "x", "y")}


def thumbprint(key: PrivateKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of the public key."""
    jwk = _public_jwk(key)
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _algorithm_for(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise InvalidKeyError("RSA keys must be at least 2048 bits")
        return "RS256"
    alg = _EC_ALGS.get(key.curve.name)
    if alg is None:
        raise InvalidKeyError(f"unsupported EC curve {key.curve.name}")
    return alg


def _load_pem(text: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        # The library's message can quote nothing secret, but keep ours fixed anyway.
        raise InvalidKeyError("not a parsable unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InvalidKeyError("only RSA and EC private keys are supported")
    return key


def _load_jwk(jwk: dict[str, Any]) -> tuple[PrivateKey, str | None]:
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            if "d" not in jwk:
                raise InvalidKeyError("the JWK is a public key; a private key (with 'd') is needed")
            key: Any = RSAAlgorithm.from_jwk(jwk)
        elif kty == "EC":
            if "d" not in jwk:
                raise InvalidKeyError("the JWK is a public key; a private key (with 'd') is needed")
            key = ECAlgorithm.from_jwk(jwk)
        else:
            raise InvalidKeyError("unsupported JWK kty (RSA and EC are supported)")
    except InvalidKeyError:
        raise
    except Exception as exc:  # PyJWT raises several types for malformed JWKs
        raise InvalidKeyError("not a parsable private JWK") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InvalidKeyError("the JWK is not a private key")
    kid = jwk.get("kid")
    return key, kid if isinstance(kid, str) and kid else None


def load_signing_key(value: str | dict[str, Any], key_id: str | None = None) -> SigningKey:
    """Parse a PEM string, a JWK (mapping or JSON text) into a SigningKey."""
    jwk_kid: str | None = None
    if isinstance(value, dict):
        key, jwk_kid = _load_jwk(value)
    else:
        text = value.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidKeyError("looks like a JWK but is not valid JSON") from exc
            if not isinstance(parsed, dict):
                raise InvalidKeyError("a JWK must be a JSON object")
            key, jwk_kid = _load_jwk(parsed)
        elif "-----BEGIN" in text:
            if "ENCRYPTED" in text:
                raise InvalidKeyError("encrypted PEM keys are not supported; store the key unencrypted in a secret")
            key = _load_pem(text)
        else:
            raise InvalidKeyError("not a PEM private key or a JWK")
    algorithm = _algorithm_for(key)
    return SigningKey(kid=key_id or jwk_kid or thumbprint(key), algorithm=algorithm, private_key=key)


def generate_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
