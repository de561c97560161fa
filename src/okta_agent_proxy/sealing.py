"""AES-256-GCM sealing under keys derived from operator secrets: the one place for it (DESIGN.md §4, §8).

Used for MCP session ids (`mcp/sessions.py`), the credential cache shared in Redis (`outbound/shared_cache.py`), and
the front door's Okta tokens at rest. A sealed blob is a fresh 96-bit nonce, then the ciphertext and its tag
(`cryptography`'s AESGCM); the AAD names where the blob belongs (a prefix, a Redis key), so a blob moved elsewhere
does not open. The first key seals; every key opens — a former secret keeps opening while a rotation settles.

Keys: `derive_key(secret, purpose)` is HKDF-SHA256 of an operator secret, one key per purpose, so no two uses ever
share a key; `generated_key(path)` makes 32 random bytes once into a file (mode 0600) when no secret is set, shared
by the processes of one host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class Sealer:
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._sealing = AESGCM(keys[0])
        self._opening = [AESGCM(key) for key in keys]

    def seal(self, plain: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)  # fresh for every seal: never reused under one key
        return nonce + self._sealing.encrypt(nonce, plain, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None when no key opens `sealed` for `aad` (altered, truncated, another key, elsewhere)."""
        nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        if len(nonce) < NONCE_BYTES:
            return None
        for key in self._opening:
            with contextlib.suppress(InvalidTag):
                return key.decrypt(nonce, ciphertext, aad)
        return None


def generated_key(path: Path) -> bytes:
    """The key in `path`, made first if there is none: written to a temporary file and linked into place, so that
    processes starting together (`--workers`) all end up with the one that got there first."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_bytes(32).hex() + "\n")
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a 32-byte key in hex; delete it to have a new one made")
    return key
