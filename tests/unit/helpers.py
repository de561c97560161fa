"""Shared by the unit tests: generated keys in every supported encoding, and a YAML loader that returns problems."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from okta_agent_proxy.config.checks import Problem
from okta_agent_proxy.config.loader import ConfigError, LoadedConfig, load
from okta_agent_proxy.config.settings import Settings

SEED_CONFIG = Path(__file__).resolve().parents[1] / "data" / "seed_config.yaml"

# RFC 7517 Appendix A.2: the RSA private key whose public half is RFC 7638 §3.1's thumbprint example.
RFC7517_RSA_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj"
    "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQ"
    "vRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7517_RSA_D = (
    "X4cTteJY_gn4FYPsXB8rdXix5vwsg1FLN5E3EaG6RJoVH-HLLKD9M7dx5oo7GURknchnrRweUkC7hT5fJLM0WbFAKNLWY2vv7B6NqXSzUvxT0_YSfqij"
    "wp3RTzlBaCxWp4doFk5N2o8Gy_nHNKroADIkJ46pRUohsXywbReAdYaMwFs9tv8d_cPVY3i07a3t8MN6TNwm0dSawm9v47UiCl3Sk5ZiG7xojPLu4sbg"
    "1U2jx4IBTNBznbJSzFHK66jT8bgkuqsk0GjskDJk19Z4qwjwbsnn4j2WBii3RL-Us2lGVkY8fkFzme1z0HbIkfz0Y6mqnOYtqc0X4jfcKoAC8Q"
)
RFC7517_RSA_P = (
    "83i-7IvMGXoMXCskv73TKr8637FiO7Z27zv8oj6pbWUQyLPQBQxtPVnwD20R-60eTDmD2ujnMt5PoqMrm8RfmNhVWDtjjMmCMjOpSXicFHj7XOuVIYQy"
    "qVWlWEh6dN36GVZYk93N8Bc9vY41xy8B9RzzOGVQzXvNEvn7O0nVbfs"
)
RFC7517_RSA_Q = (
    "3dfOR9cuYq-0S-mkFLzgItgMEfFzB2q3hWehMuG0oCuqnb3vobLyumqjVZQO1dIrdwgTnCdpYzBcOfW5r370AFXjiWft_NGEiovonizhKpo9VVS78TzF"
    "gxkIdrecRezsZ-1kYd_s1qDbxtkDEgfAITAG9LUnADun4vIcb6yelxk"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
# RFC 7517 Appendix A.2: the EC P-256 private key (kid "1").
RFC7517_EC = {
    "kty": "EC",
    "crv": "P-256",
    "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
    "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
    "d": "870MB6gfuTJ4HtUnUvYMyJpr5eUZNP4Bk43bVdj3eAE",
}


@functools.cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(curve: str = "secp256r1") -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {
        "secp256r1": ec.SECP256R1(),
        "secp384r1": ec.SECP384R1(),
        "secp521r1": ec.SECP521R1(),
        "secp256k1": ec.SECP256K1(),
    }
    return ec.generate_private_key(curves[curve])


def _uint(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def _b64uint(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def rfc_rsa_jwk(*, crt: bool = True, **extra: Any) -> dict[str, Any]:
    """RFC 7517 A.2's RSA private key; with the CRT members (fast to load) or with only n, e and d."""
    jwk: dict[str, Any] = {"kty": "RSA", "n": RFC7517_RSA_N, "e": "AQAB", "d": RFC7517_RSA_D}
    if crt:
        d, p, q = _uint(RFC7517_RSA_D), _uint(RFC7517_RSA_P), _uint(RFC7517_RSA_Q)
        jwk |= {
            "p": RFC7517_RSA_P,
            "q": RFC7517_RSA_Q,
            "dp": _b64uint(rsa.rsa_crt_dmp1(d, p)),
            "dq": _b64uint(rsa.rsa_crt_dmq1(d, q)),
            "qi": _b64uint(rsa.rsa_crt_iqmp(p, q)),
        }
    return jwk | extra


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, pkcs8: bool = True) -> str:
    """PKCS#8 (`BEGIN PRIVATE KEY`), or the traditional form (`BEGIN RSA/EC PRIVATE KEY`, PKCS#1 for RSA)."""
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def private_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    text = RSAAlgorithm.to_jwk(key) if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm.to_jwk(key)
    jwk: dict[str, Any] = json.loads(text)
    assert "d" in jwk
    return jwk


def pem_body_chunks(text: str) -> list[str]:
    """Base64 lines of a PEM: none may ever appear in a repr, a log line or a problem."""
    return [line for line in text.splitlines() if line and not line.startswith("-----")]


def write_yaml(directory: Path, document: Mapping[str, Any] | str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(dict(document), sort_keys=False))
    return path


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    return load(path, environ=dict(environ or {}), env_file=None)


def problems_of(path: Path, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """The problems of a config that must fail to load."""
    try:
        load_config(path, environ)
    except ConfigError as exc:
        return exc.problems
    raise AssertionError("the configuration loaded, but it should have failed")


def paths(problems: list[Problem], severity: str = "error") -> set[str]:
    return {p.path for p in problems if p.severity == severity}


_SEED_PEM_PLACEHOLDER = re.compile(
    r"^(?P<indent> *)-----BEGIN PRIVATE KEY-----\n.*?\n(?P=indent)-----END PRIVATE KEY-----\n", re.S | re.M
)


def seed_with_generated_keys() -> str:
    """The seed's YAML, verbatim except its two key placeholders: a PEM PKCS#8 RSA key and a JWK EC key."""
    text = SEED_CONFIG.read_text()
    rsa_pem = pem(rsa_key())
    assert rsa_pem.startswith("-----BEGIN PRIVATE KEY-----")

    def indent_pem(match: re.Match[str]) -> str:
        return "".join(match.group("indent") + line + "\n" for line in rsa_pem.splitlines())

    text, count = _SEED_PEM_PLACEHOLDER.subn(indent_pem, text)
    assert count == 1
    jwk = json.dumps(private_jwk(ec_key()))
    text, count = re.subn(r"(?m)^(\s*private_key:) \.\.\.$", lambda m: f"{m.group(1)} '{jwk}'", text)
    assert count == 1
    return text


def run_check(
    directory: Path, document: Mapping[str, Any] | str, env_lines: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`okta-agent-proxy check` as a user runs it: `document` as the config, `env_lines` (and `PSK=k`) as its .env,
    and none of the gateway's settings from this process's environment."""
    config = write_yaml(directory, document)
    env_file = directory / "check.env"
    env_file.write_text("\n".join([*env_lines, "PSK=k"]) + "\n")
    environment = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    return subprocess.run(
        [sys.executable, "-m", "okta_agent_proxy", "check", "--config", str(config), "--env-file", str(env_file)],
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def printed(stderr: str, severity: str) -> set[str]:
    """The paths of `check`'s `<severity>: <path>: …` lines."""
    found = set()
    for line in stderr.splitlines():
        kind, _, rest = line.partition(": ")
        if kind == severity:
            found.add(rest.split(": ", 1)[0])
    return found
