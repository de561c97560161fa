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
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from okta_agent_proxy import sealing
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import SessionNotFound
from okta_agent_proxy.sealing import Sealer, generated_key

PREFIX = "oap1."
_AAD = PREFIX.encode()
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
    return sealing.derive_key(secret.encode(), _HKDF_INFO)


def session_keys(settings: Settings) -> list[bytes]:
    """The keys that open session ids, the sealing one first (see the module docstring)."""
    if settings.SESSION_SECRET is None:
        return [generated_key(Path(settings.DATA_DIR) / KEY_FILE)]
    keys = [derive_key(settings.SESSION_SECRET.get_secret_value())]
    if settings.SESSION_SECRET_PREVIOUS is not None:
        keys.append(derive_key(settings.SESSION_SECRET_PREVIOUS.get_secret_value()))
    return keys


class SessionSeal:
    def __init__(self, keys: Sequence[bytes]) -> None:
        self._sealer = Sealer(keys)
        self._opened: dict[str, tuple[str, str, SessionOwner]] = {}

    def seal(self, backend: str, backend_id: str, owner: SessionOwner) -> str:
        document = {"b": backend, "s": backend_id, "iss": owner.issuer, "sub": owner.user, "agent": owner.agent}
        sealed = self._sealer.seal(json.dumps(document, separators=(",", ":")).encode(), _AAD)
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
        plain = self._sealer.open(raw, _AAD)
        if plain is None:
            raise SessionNotFound("session not found; initialize a new one")
        document = json.loads(plain)  # we sealed it: well-formed
        return document["b"], document["s"], SessionOwner(document["iss"], document["sub"], document["agent"])
