"""The OAuth front door's storage (DESIGN.md §8): all a replica needs to serve any step of a flow another began.

`FrontDoorStore` wraps the store's engine (SQLite or PostgreSQL); nothing is kept in process. How it stays correct
when replicas race, and why each choice was made:

- **Nothing secret in clear.** Codes, refresh tokens and single-use values (the Okta `state`, a consent form's CSRF
  token) are stored as their SHA-256 (`secret_hash`): they are ≥ 128-bit random values, so a plain hash is enough —
  nothing to brute-force, no salt or slow hash needed — and the methods take the values themselves, so a caller
  cannot store one unhashed by mistake. What must stay usable (the user's Okta tokens, a signing key, the
  successor pair below) arrives as `bytes` already sealed by the caller (AES-GCM, `STATE_ENCRYPTION_KEY`); this
  module never sees a key. A revoked grant's sealed Okta tokens are erased (returned once, for revocation at Okta).
- **Single use across replicas** is one conditional UPDATE (`… WHERE used_at IS NULL`) whose row count says who
  won. On PostgreSQL (READ COMMITTED, its default) a second UPDATE of the row waits for the first to commit and
  re-checks its WHERE, so it matches nothing; on SQLite writes run one at a time (`write_transaction`: BEGIN
  IMMEDIATE). The loser then reads the row in the same transaction to tell "already used" from "expired" or
  "unknown". Under REPEATABLE READ or SERIALIZABLE the loser gets a serialization error instead: never two winners.
- **Replays revoke at once.** A code redeemed twice and a refresh token presented again after the grace period
  revoke their grant inside the transaction that detects them, so nothing can come between detection and
  revocation (a crash, a forgotten call); the caller records the security event and tells the other replicas.
  A missing grant counts as revoked (pruned rows are gone for good).
- **Refresh grace.** DESIGN: a rotated refresh token presented again within `FRONT_DOOR_REFRESH_GRACE_SECONDS`
  (a client refreshing from several processes at once) gets the *same* new pair. The tokens are stored hashed, so
  the pair cannot be re-derived from the row: the rotation keeps the successor pair (access + refresh token) sealed
  by the caller on the rotated row, returns it to whoever presents the old token within the grace, and `prune`
  erases it once the grace is over (revocation does at once). The caller mints and seals its new pair *before*
  calling `rotate_refresh_token` — it cannot know whether it will win; a loser throws its own pair away, and since
  the loser's refresh token was never stored it is worth nothing. Rejected: deriving the successor from the old
  token (an HMAC) — an ES256 access token cannot be re-made byte for byte (its signature is randomised), and one
  key plus one old token would yield every later token; or issuing the second caller a pair of its own — two live
  branches of one family, which would defeat reuse detection.
- **Okta refresh, single-flight per grant**: a lease — a conditional UPDATE of `refresh_lease_until`, the same on
  both databases — rather than a PostgreSQL row lock (`SELECT … FOR UPDATE`) held across the HTTP call to Okta,
  which would pin a pooled connection and an open transaction for the call's whole length (and SQLite has no row
  locks). A lease ends by itself if its holder dies; give it longer than the Okta call's timeout. `Grant.version`
  goes up on every change of the Okta tokens, so replicas that waited see the refresh happened.
- **One signing key for all replicas**: exactly one row has `slot = 'current'` (a unique constraint); creating it
  is `INSERT … ON CONFLICT DO NOTHING` then a read, so the loser of a race gets the winner's key.

Times come from `clock` (UTC, injectable for tests); replicas' clocks must agree to within seconds, as they must
for token expiry anyway.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, RowMapping, Table, and_, delete, exists, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from okta_agent_proxy.store.db import write_transaction
from okta_agent_proxy.store.models import (
    oauth_clients,
    oauth_codes,
    oauth_consents,
    oauth_grants,
    oauth_pending,
    oauth_refresh_tokens,
    security_events,
    signing_keys,
)

__all__ = [
    "CODE_TTL",
    "PENDING_TTL",
    "AuthorizationCode",
    "CodeUse",
    "Consent",
    "EventKind",
    "FrontDoorStore",
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
    "secret_hash",
]

CODE_TTL = timedelta(seconds=60)
PENDING_TTL = timedelta(minutes=10)
TOUCH_INTERVAL = timedelta(minutes=1)  # `last_used_at` is written at most this often per client
PRUNE_CHUNK = 5_000
PAGE_SIZE = 1000
CURRENT = "current"  # `signing_keys.slot` of the key that signs

# Keys a security event's detail must not have (case-insensitive; `endswith` for the first group): the guard
# against a caller putting a token there by mistake. It cannot see a secret under an innocent name.
_SECRET_SUFFIXES = ("token", "secret", "password", "verifier", "assertion", "private_key")
_SECRET_KEYS = frozenset({"code", "state", "nonce", "cookie", "authorization"})

_g = oauth_grants.c
_rt = oauth_refresh_tokens.c


def _utcnow() -> datetime:
    return datetime.now(UTC)


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


# ---------------------------------------------------------------- helpers


def _upsert(connection: AsyncConnection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say ON CONFLICT, in the connection's dialect."""
    return postgresql.insert(table) if connection.dialect.name == "postgresql" else sqlite.insert(table)


def _values(record: Any, table: Table) -> dict[str, Any]:
    """A record's fields as the table's row (the records' fields are named after the columns)."""
    return {column.name: getattr(record, column.name) for column in table.columns}


def _grant_live(grant_id: ColumnElement[str], now: datetime) -> ColumnElement[bool]:
    return exists().where(_g.grant_id == grant_id, _g.revoked_at.is_(None), _g.expires_at > now)


async def _one(connection: AsyncConnection, statement: Any) -> dict[str, Any] | None:
    row: RowMapping | None = (await connection.execute(statement)).mappings().first()
    return dict(row) if row is not None else None


async def _grant(connection: AsyncConnection, grant_id: str, *, lock: bool = False) -> Grant | None:
    statement = select(oauth_grants).where(_g.grant_id == grant_id)
    row = await _one(connection, statement.with_for_update() if lock else statement)  # FOR UPDATE: not on SQLite
    return Grant(**row) if row is not None else None


async def _revoke(connection: AsyncConnection, grant_id: str, reason: str, now: datetime) -> bool:
    """Revoke a live grant: erase its sealed Okta tokens and any successor pair of its family. True if it was live."""
    revoked = await connection.execute(
        update(oauth_grants)
        .where(_g.grant_id == grant_id, _g.revoked_at.is_(None))
        .values(
            revoked_at=now,
            revoked_reason=reason,
            okta_id_token=None,
            okta_refresh_token=None,
            refresh_lease_holder=None,
            refresh_lease_until=None,
        )
    )
    await connection.execute(
        update(oauth_refresh_tokens)
        .where(_rt.grant_id == grant_id, _rt.successor_sealed.is_not(None))
        .values(successor_sealed=None)
    )
    return revoked.rowcount == 1


def _check_detail(detail: Mapping[str, Any]) -> None:
    for key, value in detail.items():
        name = str(key).lower()
        if name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES):
            raise ValueError(f"a security event's detail must not hold secrets (key {key!r})")
        if isinstance(value, Mapping):
            _check_detail(value)


class FrontDoorStore:
    """The front door's tables on `engine` (see the module docstring). `replica` names this process in events."""

    def __init__(self, engine: AsyncEngine, *, replica: str = "", clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._replica = replica
        self._clock = clock

    # ------------------------------------------------------------ clients

    async def register_client(
        self, *, client_name: str | None, redirect_uris: Sequence[str], document: Mapping[str, Any] | None = None
    ) -> OAuthClient:
        """Store an RFC 7591 registration (already validated) under a new random `client_id` (192 bits)."""
        client = OAuthClient(
            client_id=secrets.token_urlsafe(24),
            kind="registered",
            client_name=client_name,
            redirect_uris=list(redirect_uris),
            document=dict(document) if document is not None else None,
            created_at=self._clock(),
            last_used_at=None,
            fetched_at=None,
            expires_at=None,
        )
        async with write_transaction(self._engine) as connection:
            await connection.execute(insert(oauth_clients).values(_values(client, oauth_clients)))
        return client

    async def save_cimd_client(
        self,
        *,
        client_id: str,
        client_name: str | None,
        redirect_uris: Sequence[str],
        document: Mapping[str, Any],
        expires_at: datetime,
    ) -> OAuthClient:
        """Cache a fetched (and validated) client metadata document under its URL, replacing an older copy."""
        now = self._clock()
        values = {
            "client_name": client_name,
            "redirect_uris": list(redirect_uris),
            "document": dict(document),
            "fetched_at": now,
            "expires_at": expires_at,
        }
        async with write_transaction(self._engine) as connection:
            statement = _upsert(connection, oauth_clients).values(
                client_id=client_id, kind="cimd", created_at=now, **values
            )
            statement = statement.on_conflict_do_update(
                index_elements=[oauth_clients.c.client_id], set_=values, where=oauth_clients.c.kind == "cimd"
            )
            await connection.execute(statement)
            row = await _one(connection, select(oauth_clients).where(oauth_clients.c.client_id == client_id))
        assert row is not None
        return OAuthClient(**row)

    async def get_client(self, client_id: str) -> OAuthClient | None:
        async with self._engine.connect() as connection:
            row = await _one(connection, select(oauth_clients).where(oauth_clients.c.client_id == client_id))
        return OAuthClient(**row) if row is not None else None

    async def touch_client(self, client_id: str) -> None:
        """Note that the client started a flow (call it on every authorization request): `prune` keeps clients in
        use. Written at most once a minute per client."""
        now = self._clock()
        c = oauth_clients.c
        async with write_transaction(self._engine) as connection:
            await connection.execute(
                update(oauth_clients)
                .where(c.client_id == client_id, or_(c.last_used_at.is_(None), c.last_used_at < now - TOUCH_INTERVAL))
                .values(last_used_at=now)
            )

    # ------------------------------------------------------------ pending steps (single-use values)

    async def start_pending(
        self,
        value: str,
        *,
        purpose: str,
        ttl: timedelta = PENDING_TTL,
        client_id: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Remember a single-use value (the Okta `state`, a CSRF token) for `ttl`; `payload`, sealed by the caller,
        comes back from `consume_pending` (the pending request itself travels in a sealed cookie, DESIGN §8)."""
        now = self._clock()
        async with write_transaction(self._engine) as connection:
            await connection.execute(
                insert(oauth_pending).values(
                    key_hash=secret_hash(value),
                    purpose=purpose,
                    client_id=client_id,
                    payload=payload,
                    created_at=now,
                    expires_at=now + ttl,
                    used_at=None,
                )
            )

    async def consume_pending(self, value: str, *, purpose: str) -> PendingUse:
        """Use a value once, whichever replica asks: OK the first time, ALREADY_USED after, EXPIRED, or UNKNOWN
        (never started, another purpose, or pruned)."""
        now = self._clock()
        key = secret_hash(value)
        p = oauth_pending.c
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_pending)
                .where(p.key_hash == key, p.purpose == purpose, p.used_at.is_(None), p.expires_at > now)
                .values(used_at=now)
            )
            row = await _one(connection, select(oauth_pending).where(p.key_hash == key, p.purpose == purpose))
        if row is None:
            return PendingUse(Outcome.UNKNOWN)
        if won.rowcount == 1:
            return PendingUse(Outcome.OK, row["payload"], row["client_id"])
        return PendingUse(Outcome.ALREADY_USED if row["used_at"] is not None else Outcome.EXPIRED)

    # ------------------------------------------------------------ grants

    async def create_grant(
        self,
        *,
        user_sub: str,
        user_claims: Mapping[str, Any],
        client_id: str,
        resource: str,
        scopes: Sequence[str],
        okta_id_token: bytes,
        okta_id_token_expires_at: datetime | None,
        okta_refresh_token: bytes | None,
        okta_refresh_token_expires_at: datetime | None,
        expires_at: datetime,
    ) -> Grant:
        """Store a login (tokens sealed by the caller). `expires_at`: until when it lives without a refresh token —
        a short time (the consent's) is right: `issue_refresh_token` extends it to each token's expiry, so a login
        whose consent is never given goes away soon."""
        now = self._clock()
        grant = Grant(
            grant_id=secrets.token_urlsafe(18),
            user_sub=user_sub,
            user_claims=dict(user_claims),
            client_id=client_id,
            resource=resource,
            scopes=list(scopes),
            okta_id_token=okta_id_token,
            okta_id_token_expires_at=okta_id_token_expires_at,
            okta_refresh_token=okta_refresh_token,
            okta_refresh_token_expires_at=okta_refresh_token_expires_at,
            okta_refreshed_at=None,
            version=1,
            refresh_lease_holder=None,
            refresh_lease_until=None,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            revoked_reason=None,
        )
        async with write_transaction(self._engine) as connection:
            await connection.execute(insert(oauth_grants).values(_values(grant, oauth_grants)))
        return grant

    async def get_grant(self, grant_id: str) -> Grant | None:
        """The grant, revoked or not (None: unknown or pruned — treat as revoked)."""
        async with self._engine.connect() as connection:
            return await _grant(connection, grant_id)

    async def grant_is_live(self, grant_id: str) -> bool:
        """Neither revoked, expired nor pruned: the check behind a gateway token (cache it ≤ 30 s, DESIGN §8)."""
        live = (_g.grant_id == grant_id, _g.revoked_at.is_(None), _g.expires_at > self._clock())
        async with self._engine.connect() as connection:
            return (await connection.execute(select(_g.grant_id).where(*live))).first() is not None

    async def revoke_grant(self, grant_id: str, reason: str) -> Grant | None:
        """Revoke a grant and with it its codes and every refresh token of its family. Returns the grant as it was
        (with its sealed Okta tokens, for revoking them at Okta) when this call revoked it; None when it was
        already revoked or is unknown. The Okta tokens are erased from the row."""
        async with write_transaction(self._engine) as connection:
            grant = await _grant(connection, grant_id, lock=True)
            if grant is None or not await _revoke(connection, grant_id, reason, self._clock()):
                return None
        return grant

    # ------------------------------------------------------------ authorization codes

    async def create_code(
        self,
        code: str,
        *,
        grant_id: str,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        resource: str,
        scopes: Sequence[str],
        ttl: timedelta = CODE_TTL,
    ) -> AuthorizationCode:
        """Store a new code's bindings under its hash (the code is the caller's, ≥ 128 random bits)."""
        now = self._clock()
        record = AuthorizationCode(
            code_hash=secret_hash(code),
            grant_id=grant_id,
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            resource=resource,
            scopes=list(scopes),
            created_at=now,
            expires_at=now + ttl,
            used_at=None,
        )
        async with write_transaction(self._engine) as connection:
            await connection.execute(insert(oauth_codes).values(_values(record, oauth_codes)))
        return record

    async def consume_code(self, code: str) -> CodeUse:
        """Redeem a code once across all replicas. Consume first, then check its bindings (client, redirect URI,
        PKCE): any attempt spends it. A second redemption revokes the grant the first one issued tokens for."""
        now = self._clock()
        key = secret_hash(code)
        c = oauth_codes.c
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_codes)
                .where(c.code_hash == key, c.used_at.is_(None), c.expires_at > now)
                .values(used_at=now)
            )
            row = await _one(connection, select(oauth_codes).where(c.code_hash == key))
            if row is None:
                return CodeUse(Outcome.UNKNOWN)
            record = AuthorizationCode(**row)
            grant = await _grant(connection, record.grant_id)
            if won.rowcount == 1:
                live = grant is not None and grant.live(now)
                return CodeUse(Outcome.OK if live else Outcome.REVOKED, record, grant)
            if record.used_at is None:
                return CodeUse(Outcome.EXPIRED, record, grant)
            await _revoke(connection, record.grant_id, RevokeReason.CODE_REPLAY, now)
            return CodeUse(Outcome.ALREADY_USED, record, await _grant(connection, record.grant_id))

    # ------------------------------------------------------------ refresh tokens

    async def issue_refresh_token(self, token: str, *, grant_id: str, expires_at: datetime) -> RefreshToken | None:
        """Store the first refresh token of a grant (after a code), extending the grant to its expiry. None: the
        grant is no longer live (revoked meanwhile): issue nothing."""
        now = self._clock()
        async with write_transaction(self._engine) as connection:
            grant = await _grant(connection, grant_id, lock=True)
            if grant is None or not grant.live(now):
                return None
            return await self._insert_refresh_token(connection, token, grant_id, None, expires_at, now)

    async def find_refresh_token(self, token: str) -> tuple[RefreshToken, Grant] | None:
        """A refresh token and its grant, before rotating it (to check its client and resource and mint the next
        pair) or to revoke it (RFC 7009)."""
        async with self._engine.connect() as connection:
            return await self._token_and_grant(connection, secret_hash(token))

    async def rotate_refresh_token(
        self, token: str, *, new_token: str, new_expires_at: datetime, successor_sealed: bytes, grace: timedelta
    ) -> Rotation:
        """Replace `token` with `new_token` once across all replicas (see the module docstring, "Refresh grace").

        `successor_sealed` is the new pair (access and refresh token) sealed by the caller, kept for `grace` and
        handed to whoever presents `token` again within it (WITHIN_GRACE); after the grace, presenting it is
        reuse: the grant is revoked here (REUSED)."""
        now = self._clock()
        old = secret_hash(token)
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_refresh_tokens)
                .where(
                    _rt.token_hash == old,
                    _rt.rotated_at.is_(None),
                    _rt.expires_at > now,
                    _grant_live(_rt.grant_id, now),
                )
                .values(rotated_at=now, replaced_by=secret_hash(new_token), successor_sealed=successor_sealed)
            )
            found = await self._token_and_grant(connection, old)
            if found is None:
                return Rotation(Outcome.UNKNOWN)
            record, grant = found
            if won.rowcount == 1:
                await self._insert_refresh_token(connection, new_token, grant.grant_id, old, new_expires_at, now)
                return Rotation(Outcome.OK, grant)
            return await self._refused_rotation(connection, record, grant, grace, now)

    async def _refused_rotation(
        self, connection: AsyncConnection, record: RefreshToken, grant: Grant, grace: timedelta, now: datetime
    ) -> Rotation:
        if grant.revoked_at is not None:
            return Rotation(Outcome.REVOKED, grant)
        if record.rotated_at is None:  # the token (or its grant, which ends with its last token) has expired
            return Rotation(Outcome.EXPIRED, grant)
        if record.rotated_at > now - grace and record.successor_sealed is not None:
            return Rotation(Outcome.WITHIN_GRACE, grant, record.successor_sealed)
        await _revoke(connection, grant.grant_id, RevokeReason.REFRESH_TOKEN_REUSE, now)
        return Rotation(Outcome.REUSED, await _grant(connection, grant.grant_id))

    async def _insert_refresh_token(
        self,
        connection: AsyncConnection,
        token: str,
        grant_id: str,
        parent_hash: str | None,
        expires_at: datetime,
        now: datetime,
    ) -> RefreshToken:
        record = RefreshToken(
            token_hash=secret_hash(token),
            grant_id=grant_id,
            parent_hash=parent_hash,
            issued_at=now,
            expires_at=expires_at,
            rotated_at=None,
            replaced_by=None,
            successor_sealed=None,
        )
        await connection.execute(insert(oauth_refresh_tokens).values(_values(record, oauth_refresh_tokens)))
        await connection.execute(
            update(oauth_grants)
            .where(_g.grant_id == grant_id, _g.expires_at < expires_at)
            .values(expires_at=expires_at)
        )
        return record

    async def _token_and_grant(self, connection: AsyncConnection, token_hash: str) -> tuple[RefreshToken, Grant] | None:
        row = await _one(connection, select(oauth_refresh_tokens).where(_rt.token_hash == token_hash))
        if row is None:
            return None
        grant = await _grant(connection, row["grant_id"])
        return (RefreshToken(**row), grant) if grant is not None else None

    # ------------------------------------------------------------ Okta tokens: single-flight refresh

    async def acquire_okta_refresh(self, grant_id: str, *, ttl: timedelta) -> OktaRefreshLease | None:
        """The lease to refresh a live grant's Okta tokens for `ttl` (longer than the Okta call's timeout), or None
        while another replica holds it — then wait for `Grant.version` to change, or for the lease to end."""
        now = self._clock()
        holder = secrets.token_hex(8)
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_grants)
                .where(
                    _g.grant_id == grant_id,
                    _g.revoked_at.is_(None),
                    or_(_g.refresh_lease_until.is_(None), _g.refresh_lease_until <= now),
                )
                .values(refresh_lease_holder=holder, refresh_lease_until=now + ttl)
            )
            grant = await _grant(connection, grant_id) if won.rowcount == 1 else None
        return OktaRefreshLease(grant, holder) if grant is not None else None

    async def save_okta_tokens(
        self,
        lease: OktaRefreshLease,
        *,
        okta_id_token: bytes,
        okta_id_token_expires_at: datetime | None,
        okta_refresh_token: bytes | None,
        okta_refresh_token_expires_at: datetime | None,
    ) -> bool:
        """Store refreshed Okta tokens (sealed) and end the lease; `okta_refresh_token` None keeps the one held
        (Okta did not rotate it). False: the lease was lost (it ran out and another replica took it) or the grant
        was revoked — nothing written."""
        values: dict[str, Any] = {
            "okta_id_token": okta_id_token,
            "okta_id_token_expires_at": okta_id_token_expires_at,
            "okta_refreshed_at": self._clock(),
            "version": _g.version + 1,
            "refresh_lease_holder": None,
            "refresh_lease_until": None,
        }
        if okta_refresh_token is not None:
            values |= {"okta_refresh_token": okta_refresh_token}
            values |= {"okta_refresh_token_expires_at": okta_refresh_token_expires_at}
        async with write_transaction(self._engine) as connection:
            saved = await connection.execute(update(oauth_grants).where(*self._held(lease)).values(values))
        return saved.rowcount == 1

    async def release_okta_refresh(self, lease: OktaRefreshLease) -> None:
        """End a lease without a refresh (the call to Okta failed), so another replica may try at once."""
        async with write_transaction(self._engine) as connection:
            await connection.execute(
                update(oauth_grants)
                .where(*self._held(lease))
                .values(refresh_lease_holder=None, refresh_lease_until=None)
            )

    @staticmethod
    def _held(lease: OktaRefreshLease) -> tuple[ColumnElement[bool], ...]:
        grant_id = lease.grant.grant_id
        return (_g.grant_id == grant_id, _g.refresh_lease_holder == lease.holder, _g.revoked_at.is_(None))

    # ------------------------------------------------------------ consents

    async def record_consent(self, *, user_sub: str, client_id: str, backend: str, scopes: Sequence[str]) -> Consent:
        """Remember that the user approved the client for the backend with `scopes` (replacing an older approval:
        pass every scope the consent page showed)."""
        consent = Consent(user_sub, client_id, backend, sorted(set(scopes)), self._clock())
        key = [oauth_consents.c.user_sub, oauth_consents.c.client_id, oauth_consents.c.backend]
        async with write_transaction(self._engine) as connection:
            statement = _upsert(connection, oauth_consents).values(
                user_sub=user_sub,
                client_id=client_id,
                backend=backend,
                scopes=consent.scopes,
                approved_at=consent.approved_at,
            )
            changed = {"scopes": statement.excluded.scopes, "approved_at": statement.excluded.approved_at}
            await connection.execute(statement.on_conflict_do_update(index_elements=key, set_=changed))
        return consent

    async def find_consent(self, user_sub: str, client_id: str, backend: str) -> Consent | None:
        c = oauth_consents.c
        async with self._engine.connect() as connection:
            row = await _one(
                connection,
                select(oauth_consents).where(c.user_sub == user_sub, c.client_id == client_id, c.backend == backend),
            )
        return Consent(**row) if row is not None else None

    # ------------------------------------------------------------ security events

    async def record_event(
        self,
        kind: str,
        *,
        client_id: str | None = None,
        user_sub: str | None = None,
        grant_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Write a security event now; returns its id. `detail` must be JSON and hold no secret (keys named like
        one are refused: ValueError)."""
        detail = dict(detail or {})
        _check_detail(detail)
        row = {
            "time": self._clock(),
            "kind": str(kind),
            "replica": self._replica,
            "client_id": client_id,
            "user_sub": user_sub,
            "grant_id": grant_id,
            "detail": detail,
        }
        async with write_transaction(self._engine) as connection:
            result = await connection.execute(insert(security_events).values(row))
        (event_id,) = result.inserted_primary_key or (0,)
        return int(event_id)

    async def iter_events(self, query: SecurityEventQuery | None = None) -> AsyncIterator[SecurityEvent]:
        """The matching events, oldest first (by time, then id), read a page at a time."""
        query = query or SecurityEventQuery()
        t = security_events.c
        base = select(security_events).where(*query.conditions())
        if query.last is not None:
            async with self._engine.connect() as connection:
                rows = await self._events(connection, base.order_by(t.time.desc(), t.id.desc()).limit(query.last))
            for event in reversed(rows):
                yield event
            return
        after: SecurityEvent | None = None
        while True:
            page = base
            if after is not None:
                page = base.where(or_(t.time > after.time, and_(t.time == after.time, t.id > after.id)))
            async with self._engine.connect() as connection:
                rows = await self._events(connection, page.order_by(t.time, t.id).limit(PAGE_SIZE))
            for event in rows:
                yield event
            if len(rows) < PAGE_SIZE:
                return
            after = rows[-1]

    async def list_events(self, query: SecurityEventQuery | None = None) -> list[SecurityEvent]:
        return [event async for event in self.iter_events(query)]

    @staticmethod
    async def _events(connection: AsyncConnection, statement: Any) -> list[SecurityEvent]:
        return [SecurityEvent(**row) for row in (await connection.execute(statement)).mappings()]

    # ------------------------------------------------------------ signing keys

    async def current_signing_key(self) -> StoredSigningKey | None:
        async with self._engine.connect() as connection:
            return await self._current_key(connection)

    async def create_signing_key(
        self, *, kid: str, algorithm: str, private_key: bytes, public_jwk: Mapping[str, Any]
    ) -> StoredSigningKey:
        """Make this key the current one unless a key is current already; returns the current key — another
        replica's when it won the race (then discard yours)."""
        async with write_transaction(self._engine) as connection:
            statement = _upsert(connection, signing_keys).values(self._key_row(kid, algorithm, private_key, public_jwk))
            await connection.execute(statement.on_conflict_do_nothing(index_elements=[signing_keys.c.slot]))
            current = await self._current_key(connection)
        assert current is not None
        return current

    async def rotate_signing_key(
        self, *, expected_kid: str, kid: str, algorithm: str, private_key: bytes, public_jwk: Mapping[str, Any]
    ) -> StoredSigningKey:
        """Retire `expected_kid` and make this key current — unless `expected_kid` is no longer current (another
        replica rotated first): returns the current key either way."""
        k = signing_keys.c
        now = self._clock()
        async with write_transaction(self._engine) as connection:
            retired = await connection.execute(
                update(signing_keys).where(k.kid == expected_kid, k.slot == CURRENT).values(slot=None, retired_at=now)
            )
            if retired.rowcount == 1:
                row = self._key_row(kid, algorithm, private_key, public_jwk)
                await connection.execute(insert(signing_keys).values(row))
            current = await self._current_key(connection)
        assert current is not None
        return current

    async def published_signing_keys(self, *, retired_within: timedelta) -> list[StoredSigningKey]:
        """The current key, then keys retired less than `retired_within` ago (for `/oauth/jwks`), newest first."""
        k = signing_keys.c
        cutoff = self._clock() - retired_within
        statement = (
            select(signing_keys)
            .where(or_(k.slot == CURRENT, k.retired_at >= cutoff))
            .order_by(k.retired_at.is_not(None), k.created_at.desc())
        )
        async with self._engine.connect() as connection:
            return [StoredSigningKey(**row) for row in (await connection.execute(statement)).mappings()]

    def _key_row(self, kid: str, algorithm: str, private_key: bytes, public_jwk: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "kid": kid,
            "algorithm": algorithm,
            "private_key": private_key,
            "public_jwk": dict(public_jwk),
            "slot": CURRENT,
            "created_at": self._clock(),
            "retired_at": None,
        }

    @staticmethod
    async def _current_key(connection: AsyncConnection) -> StoredSigningKey | None:
        row = await _one(connection, select(signing_keys).where(signing_keys.c.slot == CURRENT))
        return StoredSigningKey(**row) if row is not None else None

    # ------------------------------------------------------------ pruning

    async def prune(self, retention: Retention | None = None) -> dict[str, int]:
        """Delete what can no longer be used, in chunks (short write locks on SQLite); returns the count per table
        (`successors_erased`: grace-period pairs set to NULL). Safe to run on every replica at once."""
        r = retention or Retention()
        now = self._clock()
        p, c, k, e, cl = oauth_pending.c, oauth_codes.c, signing_keys.c, security_events.c, oauth_clients.c
        counts = {
            "oauth_pending": await self._delete(oauth_pending, p.key_hash, p.expires_at < now - r.replay_window),
            "oauth_codes": await self._delete(oauth_codes, c.code_hash, c.expires_at < now - r.replay_window),
            "oauth_refresh_tokens": await self._delete(oauth_refresh_tokens, _rt.token_hash, _rt.expires_at < now),
            "successors_erased": await self._erase_successors(now - r.refresh_grace),
            "oauth_grants": await self._delete(
                oauth_grants,
                _g.grant_id,
                or_(_g.revoked_at < now - r.dead_grants, _g.expires_at < now - r.dead_grants),
            ),
        }
        unused = or_(
            cl.last_used_at < now - r.idle_clients,
            and_(cl.last_used_at.is_(None), cl.created_at < now - r.never_used_clients),
        )
        without_grants = ~exists().where(_g.client_id == cl.client_id)
        counts["oauth_clients"] = await self._delete(oauth_clients, cl.client_id, unused, without_grants)
        counts["security_events"] = await self._delete(security_events, e.id, e.time < now - r.events)
        counts["signing_keys"] = await self._delete(
            signing_keys, k.kid, k.slot.is_(None), k.retired_at < now - r.retired_keys
        )
        return counts

    async def _delete(self, table: Table, key: Any, *conditions: ColumnElement[bool]) -> int:
        chunk = select(key).where(*conditions).limit(PRUNE_CHUNK).scalar_subquery()
        total = 0
        while True:
            async with write_transaction(self._engine) as connection:
                deleted = (await connection.execute(delete(table).where(key.in_(chunk)))).rowcount
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def _erase_successors(self, rotated_before: datetime) -> int:
        async with write_transaction(self._engine) as connection:
            erased = await connection.execute(
                update(oauth_refresh_tokens)
                .where(_rt.successor_sealed.is_not(None), _rt.rotated_at < rotated_before)
                .values(successor_sealed=None)
            )
        return erased.rowcount
