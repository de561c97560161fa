"""What `FrontDoorStore` takes and returns (DESIGN.md §8): its records, the outcomes of its single-use operations,
and how a record is stored.

- **Outcomes**: `Outcome` (what using a pending step, a code or a refresh token came to), `RevokeReason`, and the
  `EventKind`s of security events.
- **Records**, one per table row (`OAuthClient`, `Grant`, `AuthorizationCode`, `RefreshToken`, `Consent`,
  `SecurityEvent`, `StoredSigningKey`): frozen, and their fields are named after the columns, so `row_values` turns a
  record into its row and `Grant(**row)` a row into its record. Sealed values (`bytes`) stay out of their `repr`.
- **Results** of the operations that can lose a race (`PendingUse`, `CodeUse`, `Rotation`, `OktaRefreshLease`), and
  the settings of the two that take them (`Retention` for `prune`, `SecurityEventQuery` for the event log).
- **How a secret is stored**: `secret_hash`; and `check_event_detail`, the guard that keeps tokens out of an event.
- **Rows**: `row_values`, `first_row` and `upsert` (an INSERT … ON CONFLICT on either database), shared by the
  repository's modules.

The repository is `FrontDoorStore` in `frontdoor.py` (clients, pending steps, consents, security events, pruning),
with `frontdoor_grants.py` (grants, codes, refresh tokens, the Okta refresh lease) and `frontdoor_keys.py` (signing
keys) mixed in. Import these records from `frontdoor.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, RowMapping, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from okta_agent_proxy.store.models import security_events

__all__ = [
    "AuthorizationCode",
    "CodeUse",
    "Consent",
    "EventKind",
    "Grant",
    "OAuthClient",
    "OktaRefreshLease",
    "Outcome",
    "PendingUse",
    "RefreshToken",
    "Retention",
    "RevokeReason",
    "Rotation",
    "SecurityEvent",
    "SecurityEventQuery",
    "StoredSigningKey",
    "check_event_detail",
    "first_row",
    "row_values",
    "secret_hash",
    "upsert",
]

# Keys a security event's detail must not have (case-insensitive; `endswith` for the first group): the guard
# against a caller putting a token there by mistake. It cannot see a secret under an innocent name.
_SECRET_SUFFIXES = ("token", "secret", "password", "verifier", "assertion", "private_key")
_SECRET_KEYS = frozenset({"code", "state", "nonce", "cookie", "authorization"})


def secret_hash(value: str) -> str:
    """How a code, a refresh token or a single-use value is stored: SHA-256, hex."""
    return hashlib.sha256(value.encode()).hexdigest()


class Outcome(StrEnum):
    """What using a single-use value (a pending step, a code, a refresh token) came to."""

    OK = "ok"
    ALREADY_USED = "already_used"  # a code: its grant is now revoked; a pending step: a replayed state
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    REVOKED = "revoked"  # its grant was revoked (a code: or has expired)
    WITHIN_GRACE = "within_grace"  # a refresh token rotated moments ago: here is the pair that rotation issued
    REUSED = "reused"  # a refresh token rotated before the grace: its grant is now revoked


class RevokeReason(StrEnum):
    """Why a grant was revoked by this module (callers may pass their own reasons too)."""

    CODE_REPLAY = "code_replay"
    REFRESH_TOKEN_REUSE = "refresh_token_reuse"
    PKCE_FAILURE = "pkce_failure"  # a code redeemed with the wrong verifier, client or redirect URI
    CONSENT_DENIED = "consent_denied"
    CLIENT_REQUEST = "client_request"  # RFC 7009 revocation by the client
    OKTA_REFUSED = "okta_refused"  # Okta answered invalid_grant to a refresh: the user's Okta session is over
    OKTA_EXPIRED = "okta_expired"  # the held ID token expired and Okta gave no refresh token to renew it


class EventKind(StrEnum):
    """Kinds of security events DESIGN §8 names (`record_event` takes any string)."""

    REGISTRATION = "registration"
    LOGIN = "login"
    CONSENT = "consent"
    TOKEN_ISSUED = "token_issued"
    REFRESH = "refresh"
    REFRESH_REUSE = "refresh_reuse"
    CODE_REPLAY = "code_replay"
    REVOCATION = "revocation"
    REFUSAL = "refusal"
    OKTA_REFRESH = "okta_refresh"


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """A registered client (`kind` "registered") or a cached client metadata document (`kind` "cimd")."""

    client_id: str
    kind: str
    client_name: str | None
    redirect_uris: list[str]
    document: dict[str, Any] | None
    created_at: datetime
    last_used_at: datetime | None
    fetched_at: datetime | None
    expires_at: datetime | None

    def document_fresh(self, now: datetime) -> bool:
        """A CIMD client's cached document may still be used (else fetch it again)."""
        return self.expires_at is not None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class Grant:
    """A user's login for one client and resource. The `okta_*` tokens are sealed bytes (None once revoked)."""

    grant_id: str
    user_sub: str
    user_claims: dict[str, Any]
    client_id: str
    resource: str
    scopes: list[str]
    okta_id_token: bytes | None = field(repr=False)
    okta_id_token_expires_at: datetime | None
    okta_refresh_token: bytes | None = field(repr=False)
    okta_refresh_token_expires_at: datetime | None
    okta_refreshed_at: datetime | None
    version: int
    refresh_lease_holder: str | None
    refresh_lease_until: datetime | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None

    def live(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    """A code's bindings (the code itself is not stored: `code_hash` is its SHA-256)."""

    code_hash: str
    grant_id: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    resource: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """A refresh token of a grant's family, by its SHA-256."""

    token_hash: str
    grant_id: str
    parent_hash: str | None
    issued_at: datetime
    expires_at: datetime
    rotated_at: datetime | None
    replaced_by: str | None
    successor_sealed: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Consent:
    user_sub: str
    client_id: str
    backend: str
    scopes: list[str]
    approved_at: datetime

    def covers(self, scopes: Sequence[str]) -> bool:
        """Every scope of `scopes` was approved."""
        return set(scopes) <= set(self.scopes)


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    id: int
    time: datetime
    kind: str
    replica: str
    client_id: str | None
    user_sub: str | None
    grant_id: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredSigningKey:
    """A signing key: `private_key` sealed; `slot` "current" for the key that signs, None once retired."""

    kid: str
    algorithm: str
    private_key: bytes = field(repr=False)
    public_jwk: dict[str, Any]
    slot: str | None
    created_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True, slots=True)
class PendingUse:
    """The result of `consume_pending`; `payload` and `client_id` as given to `start_pending` (OK only)."""

    outcome: Outcome
    payload: bytes | None = field(default=None, repr=False)
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class CodeUse:
    """The result of `consume_code`: OK, REVOKED, ALREADY_USED (the grant is now revoked), EXPIRED or UNKNOWN;
    `code` and `grant` whenever the code is known."""

    outcome: Outcome
    code: AuthorizationCode | None = None
    grant: Grant | None = None


@dataclass(frozen=True, slots=True)
class Rotation:
    """The result of `rotate_refresh_token`: OK, WITHIN_GRACE (with `successor_sealed`, the pair to hand out
    again), REUSED (the grant is now revoked), REVOKED, EXPIRED or UNKNOWN; `grant` whenever the token is known."""

    outcome: Outcome
    grant: Grant | None = None
    successor_sealed: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class OktaRefreshLease:
    """The right, until `grant.refresh_lease_until`, to refresh this grant's Okta tokens."""

    grant: Grant
    holder: str


@dataclass(frozen=True, slots=True)
class Retention:
    """How long `prune` keeps what is no longer usable."""

    events: timedelta = timedelta(days=90)  # security events: pass `audit.retention_days`
    replay_window: timedelta = timedelta(hours=1)  # spent or expired codes and states, to recognise a replay
    refresh_grace: timedelta = timedelta(seconds=30)  # FRONT_DOOR_REFRESH_GRACE_SECONDS: successor pairs erased
    dead_grants: timedelta = timedelta(days=1)  # revoked or expired grants (with their codes and tokens)
    never_used_clients: timedelta = timedelta(days=1)  # registered (or fetched) and never used, without grants
    idle_clients: timedelta = timedelta(days=90)  # not used for this long, without grants
    retired_keys: timedelta = timedelta(days=7)  # published after retirement (longer than any token's lifetime)


@dataclass(frozen=True, slots=True)
class SecurityEventQuery:
    """Filters for `security_events`, combined with AND; `last` keeps the N most recent."""

    last: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    kind: str | None = None
    user_sub: str | None = None
    client_id: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        t = security_events.c
        where: list[ColumnElement[bool]] = []
        if self.since is not None:
            where.append(t.time >= self.since)
        if self.until is not None:
            where.append(t.time < self.until)
        for column, value in ((t.kind, self.kind), (t.user_sub, self.user_sub), (t.client_id, self.client_id)):
            if value is not None:
                where.append(column == value)
        return where


# ---------------------------------------------------------------- rows


def row_values(record: Any, table: Table) -> dict[str, Any]:
    """A record's fields as the table's row (the records' fields are named after the columns)."""
    return {column.name: getattr(record, column.name) for column in table.columns}


async def first_row(connection: AsyncConnection, statement: Any) -> dict[str, Any] | None:
    """The statement's first row as keyword arguments for a record, or None."""
    row: RowMapping | None = (await connection.execute(statement)).mappings().first()
    return dict(row) if row is not None else None


def upsert(connection: AsyncConnection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say ON CONFLICT, in the connection's dialect."""
    return postgresql.insert(table) if connection.dialect.name == "postgresql" else sqlite.insert(table)


def check_event_detail(detail: Mapping[str, Any]) -> None:
    """ValueError if a security event's `detail` has a key named like a secret, at any depth."""
    for key, value in detail.items():
        name = str(key).lower()
        if name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES):
            raise ValueError(f"a security event's detail must not hold secrets (key {key!r})")
        if isinstance(value, Mapping):
            check_event_detail(value)
