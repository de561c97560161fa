"""The Okta emulator's signing keys: `KeyRing`, one authorization server's keys, of which the newest RSA 2048 key
signs and older ones stay published if kept. A `kid` is the RFC 7638 thumbprint (Okta's are opaque and stable), so
a new key always has a new `kid`.

Deliberately independent of `okta_agent_proxy.keys` and the gateway's validator: the emulator is the oracle the
gateway is tested against, so it must not share that code's mistakes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

__all__ = ["EmulatorKey", "KeyRing", "jwk_thumbprint"]

_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK: its required members, sorted, without whitespace."""
    members = _THUMBPRINT_MEMBERS[str(jwk["kty"])]
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class EmulatorKey:
    """One RS256 signing key of an authorization server."""

    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> EmulatorKey:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private_key.public_key()))
        return cls(kid=jwk_thumbprint(public), private_key=private_key)

    def public_jwk(self) -> dict[str, Any]:
        """The JWK as Okta publishes it: `kty`, `alg`, `kid`, `use`, `e`, `n`."""
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private_key.public_key()))
        return {"kty": "RSA", "alg": "RS256", "kid": self.kid, "use": "sig", "e": public["e"], "n": public["n"]}

    def sign(self, claims: Mapping[str, Any], headers: Mapping[str, Any]) -> str:
        """A JWS with header `{"kid", "alg": "RS256"}` updated by `headers` (an `alg` there picks RS384/RS512).

        A None value in `claims` or `headers` leaves that member out. No `typ` unless given: Okta sends none."""
        header = {name: value for name, value in {"kid": self.kid, **headers}.items() if value is not None}
        header.setdefault("typ", None)  # PyJWT adds "typ": "JWT" unless told not to
        algorithm = str(header.pop("alg", "RS256"))
        payload = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(payload, self.private_key, algorithm=algorithm, headers=header)


class KeyRing:
    """The published keys of one authorization server; the newest one signs."""

    def __init__(self, first: EmulatorKey) -> None:
        self._keys: list[EmulatorKey] = [first]

    @property
    def signing_key(self) -> EmulatorKey:
        return self._keys[-1]

    @property
    def kids(self) -> list[str]:
        return [key.kid for key in self._keys]

    def find(self, kid: object) -> EmulatorKey | None:
        """The published key with this `kid`, if any."""
        return next((key for key in self._keys if key.kid == kid), None)

    def rotate(self, new: EmulatorKey, *, keep_old: bool) -> str:
        """Make `new` the signing key; the previous keys stay published only when `keep_old`."""
        self._keys = [*self._keys, new] if keep_old else [new]
        return new.kid

    def retire(self, kid: str) -> None:
        """Unpublish a key that no longer signs. Retiring the signing key is refused: rotate first."""
        if kid not in self.kids:
            raise KeyError(kid)
        if kid == self.signing_key.kid:
            raise ValueError("cannot retire the signing key; rotate_keys() first")
        self._keys = [key for key in self._keys if key.kid != kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self._keys]}
