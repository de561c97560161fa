"""Sealed MCP session ids (DESIGN.md §4): the session travels in the id the client holds, so any replica serves it.

When a backend answers with `Mcp-Session-Id: S`, the client receives `oap1.<base64url(nonce ‖ AES-256-GCM(key,
{"b": backend, "s": S, "iss", "sub", "agent"}))>`; `S` itself is only ever sent to that backend. A request presenting
an id is opened, checked against its route's backend and the caller's (issuer, user, agent) — the user is the
token's `uid` when it has one, else its `sub` — and forwarded with `S`. An id that does not open, belongs to another
backend or principal, or was never issued gets 404 `session_not_found`, exactly as an unknown session does, so the
client re-initializes and the backend never sees the request. A session id is not a credential: it only narrows who
may continue a conversation a valid token started. Without an issuer there is no principal, and ids are sealed to
the backend alone.

The key: HKDF-SHA256 of `SESSION_SECRET` (and of `SESSION_SECRET_PREVIOUS`, accepted for opening while a rotation
settles); unset, 32 random bytes generated once into `DATA_DIR/session.key` (mode 0600), which `--workers` share.
Ending a session is the backend's business: a DELETE is forwarded, and the backend's 404 for an id it no longer
knows reaches the client.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import SessionNotFound

PREFIX = "oap1."
_AAD = PREFIX.encode()
_NONCE_BYTES = 12
_HKDF_INFO = b"okta-agent-proxy mcp session ids v1"
KEY_FILE = "session.key"
MAX_SEALED_CHARS = 4096  # longer than any id we seal for a backend id of up to 1 KiB
_OPENED_MAX = 10_000  # ids opened and remembered (each opening is AES work; a client sends its id on every request)


class SessionOwner(NamedTuple):
    """Who started a session: the token's issuer, the user (`uid`, else `sub`) and the agent; "" without an issuer."""

    issuer: str
    user: str
    agent: str


NOBODY = SessionOwner("", "", "")


class Session(NamedTuple):
    """A request's session: who it is for, the id the client presented (sealed) and the backend's own id in it."""

    owner: SessionOwner
    presented: str | None = None
    backend_id: str | None = None


def derive_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret.encode())


def session_keys(settings: Settings) -> list[bytes]:
    """The keys that open session ids, the sealing one first (see the module docstring)."""
    if settings.SESSION_SECRET is None:
        return [generated_key(Path(settings.DATA_DIR) / KEY_FILE)]
    keys = [derive_key(settings.SESSION_SECRET.get_secret_value())]
    if settings.SESSION_SECRET_PREVIOUS is not None:
        keys.append(derive_key(settings.SESSION_SECRET_PREVIOUS.get_secret_value()))
    return keys


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


class SessionSeal:
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._sealing = AESGCM(keys[0])
        self._opening = [AESGCM(key) for key in keys]
        self._opened: dict[str, tuple[str, str, SessionOwner]] = {}

    def seal(self, backend: str, backend_id: str, owner: SessionOwner) -> str:
        document = {"b": backend, "s": backend_id, "iss": owner.issuer, "sub": owner.user, "agent": owner.agent}
        plain = json.dumps(document, separators=(",", ":")).encode()
        nonce = secrets.token_bytes(_NONCE_BYTES)  # fresh for every seal: never reused under one key
        sealed = nonce + self._sealing.encrypt(nonce, plain, _AAD)
        return PREFIX + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, sealed: str, backend: str, owner: SessionOwner) -> str:
        """The backend's own id inside `sealed`, if it was sealed for `backend` and `owner`; else SessionNotFound."""
        opened = self._opened.get(sealed)
        if opened is None:
            opened = self._open(sealed)
            if len(self._opened) >= _OPENED_MAX:
                self._opened.clear()
            self._opened[sealed] = opened
        sealed_for, backend_id, sealed_owner = opened
        if sealed_for != backend or sealed_owner != owner:
            raise SessionNotFound("session not found; initialize a new one")
        return backend_id

    def _open(self, sealed: str) -> tuple[str, str, SessionOwner]:
        if not sealed.startswith(PREFIX) or len(sealed) > MAX_SEALED_CHARS:
            raise SessionNotFound("session not found; initialize a new one")
        body = sealed[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise SessionNotFound("session not found; initialize a new one") from None
        nonce, ciphertext = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        for key in self._opening:
            try:
                document = json.loads(key.decrypt(nonce, ciphertext, _AAD))
            except (InvalidTag, ValueError):
                continue
            owner = SessionOwner(document["iss"], document["sub"], document["agent"])
            return document["b"], document["s"], owner
        raise SessionNotFound("session not found; initialize a new one")
