"""The store's tables (SQLAlchemy 2 typed declarative models), one schema for SQLite and PostgreSQL.

- `audit_events`: one row per request on a backend route (DESIGN.md §4) — every `AuditEvent` field plus a surrogate
  `id` that orders rows by insertion (what `--follow` tails). Indexed for the CLI's queries: by time, and by user,
  agent, backend or outcome within time.
- `backends`, `agents`: the loaded config, as a secret-free view (`config_store.public_view`).
- `config_history`: what changed (a JSON-Patch-like list), when, from which file (its SHA-256), and the resulting
  secret-free config, which the next change is compared with.
- The OAuth front door's state (DESIGN.md §8; read and written by `frontdoor.py`, which says why each table is
  shaped as it is): `oauth_clients`, `oauth_pending`, `oauth_grants`, `oauth_codes`, `oauth_refresh_tokens`,
  `oauth_consents`, `security_events`, `signing_keys`. No token, code or state is stored: only its SHA-256; what
  must be kept usable (the user's Okta tokens, a signing key, a rotated refresh token's successor during the
  grace period) is `bytes` sealed by the caller with `STATE_ENCRYPTION_KEY`.

Strings are unbounded `Text`: an audit row must never fail to insert on PostgreSQL because a caller sent a long
path or tool name (the writer caps lengths instead). Times are stored in UTC: `timestamptz` on PostgreSQL, ISO
text on SQLite — except an audit event's time, which SQLite stores as integer microseconds since the Unix epoch
(`EpochMicroseconds`) — and always read back timezone-aware. Constraint and index names follow one naming convention so
that migrations name the same objects on both databases.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-assigns an INTEGER PRIMARY KEY (the rowid alias), not a BIGINT one.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (a naive value is taken to be UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite has no time zones: store naive UTC so that text comparison orders correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def epoch_microseconds(value: datetime) -> int:
    """`value` (naive: UTC) as whole microseconds since the Unix epoch, exactly."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return (aware - EPOCH) // MICROSECOND


class EpochMicroseconds(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime: `timestamptz` on PostgreSQL; on SQLite an integer, microseconds since the Unix
    epoch. The audit table's time is a key of six indexes: as an integer it costs a fifth of the time to make that
    the 26 characters of text SQLite's DATETIME stores do, and it is a smaller key, cheaper to compare (audit rows
    are written by the thousand per second). Read it in the sqlite3 shell with `strftime('%Y-%m-%d %H:%M:%f', time /
    1e6, 'unixepoch')`."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        return dialect.type_descriptor(BigInteger() if dialect.name == "sqlite" else DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | int | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return epoch_microseconds(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    def process_result_value(self, value: datetime | int | str | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, int):  # SQLite
            return EPOCH + value * MICROSECOND
        if isinstance(value, str):  # SQLite text from before 0002, written by a process not yet upgraded
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Model(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        str: Text(),
        int: Integer(),
        float: Double(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
        list[dict[str, Any]]: JSON(),
        bytes: LargeBinary(),
    }


class AuditEventRow(Model):
    """One `AuditEvent`. Column names are the event's field names."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(EpochMicroseconds())
    request_id: Mapped[str]
    replica: Mapped[str]
    http_method: Mapped[str]
    path: Mapped[str]
    status: Mapped[int]
    outcome: Mapped[str]
    latency_ms: Mapped[float]
    headers_ms: Mapped[float | None]
    backend: Mapped[str | None]
    user_sub: Mapped[str | None]
    user_uid: Mapped[str | None]
    token_jti: Mapped[str | None]
    agent: Mapped[str | None]
    client_id: Mapped[str | None]
    mcp_method: Mapped[str | None]
    mcp_name: Mapped[str | None]
    jsonrpc_id: Mapped[str | None]
    credential_method: Mapped[str | None]
    credential_cache_hit: Mapped[bool | None]
    id_jag_jti: Mapped[str | None]
    upstream_status: Mapped[int | None]
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    detail: Mapped[str | None]
    arguments: Mapped[str | None]  # JSON text, only with audit.record_arguments
    # how the agent was identified: token (an Okta token's client), client_metadata (a fetched metadata document:
    # verified), client_name or default_agent (a front-door client's declared name, or none), header (X-Agent-ID)
    agent_evidence: Mapped[str | None]
    trace_id: Mapped[str | None]  # 32 hex digits, when tracing is on (DESIGN.md §9)

    __table_args__ = (
        Index(None, "time"),
        Index(None, "user_sub", "time"),
        Index(None, "user_uid", "time"),
        Index(None, "agent", "time"),
        Index(None, "backend", "time"),
        Index(None, "outcome", "time"),
        Index(None, "request_id"),
    )


class BackendRow(Model):
    """A configured backend as loaded (secrets excluded)."""

    __tablename__ = "backends"

    name: Mapped[str] = mapped_column(primary_key=True)
    url: Mapped[str]
    auth_method: Mapped[str]
    enabled: Mapped[bool]
    paths: Mapped[list[str]]
    config: Mapped[dict[str, Any]]
    file_hash: Mapped[str]
    updated_at: Mapped[datetime]


class AgentRow(Model):
    """A configured agent as loaded (its private key reduced to kid and algorithm)."""

    __tablename__ = "agents"

    name: Mapped[str] = mapped_column(primary_key=True)
    client_id: Mapped[str]
    enabled: Mapped[bool]
    config: Mapped[dict[str, Any]]
    file_hash: Mapped[str]
    updated_at: Mapped[datetime]


class ConfigHistoryRow(Model):
    """One applied config change: which file (hash) replaced which, and the secret-free diff."""

    __tablename__ = "config_history"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(index=True)
    file_hash: Mapped[str]
    previous_hash: Mapped[str | None]
    source: Mapped[str | None]  # the file's path, as given
    replica: Mapped[str | None]
    changes: Mapped[list[dict[str, Any]]]  # [{"op": "add"|"remove"|"change", "path": …, "old": …, "new": …}]
    snapshot: Mapped[dict[str, Any]]  # the whole secret-free config after the change


# ---------------------------------------------------------------- the OAuth front door (DESIGN.md §8)


class OAuthClientRow(Model):
    """An MCP client the front door knows: registered (RFC 7591; `client_id` random) or a client metadata document
    (CIMD; `client_id` is the document's https URL, the document cached until `expires_at`)."""

    __tablename__ = "oauth_clients"

    client_id: Mapped[str] = mapped_column(primary_key=True)
    kind: Mapped[str]  # "registered" | "cimd"
    client_name: Mapped[str | None]
    redirect_uris: Mapped[list[str]]
    document: Mapped[dict[str, Any] | None]  # the CIMD document as fetched, or the registration's accepted metadata
    created_at: Mapped[datetime] = mapped_column(index=True)
    last_used_at: Mapped[datetime | None] = mapped_column(index=True)
    fetched_at: Mapped[datetime | None]  # CIMD: when the document was fetched
    expires_at: Mapped[datetime | None]  # CIMD: when it must be fetched again

    __table_args__ = (CheckConstraint("kind IN ('registered', 'cimd')", name="kind"),)


class OAuthPendingRow(Model):
    """A single-use marker of a step of a pending authorization (the Okta `state`, a consent form's CSRF token),
    keyed by the SHA-256 of the value: consumed once, on whichever replica the browser comes back to."""

    __tablename__ = "oauth_pending"

    key_hash: Mapped[str] = mapped_column(primary_key=True)
    purpose: Mapped[str]
    client_id: Mapped[str | None]
    payload: Mapped[bytes | None]  # optional, sealed by the caller
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    used_at: Mapped[datetime | None]


class OAuthGrantRow(Model):
    """A user's login through the front door for one client and one resource: the Okta tokens it holds (sealed),
    the lease that makes refreshing them single-flight across replicas, and whether it was revoked."""

    __tablename__ = "oauth_grants"

    grant_id: Mapped[str] = mapped_column(primary_key=True)
    user_sub: Mapped[str] = mapped_column(index=True)
    user_claims: Mapped[dict[str, Any]]  # email, name, groups… of the Okta ID token
    client_id: Mapped[str] = mapped_column(ForeignKey("oauth_clients.client_id"), index=True)
    resource: Mapped[str]
    scopes: Mapped[list[str]]
    okta_id_token: Mapped[bytes | None]  # sealed; NULL once revoked
    okta_id_token_expires_at: Mapped[datetime | None]
    okta_refresh_token: Mapped[bytes | None]  # sealed; NULL once revoked
    okta_refresh_token_expires_at: Mapped[datetime | None]
    okta_refreshed_at: Mapped[datetime | None]
    version: Mapped[int]  # +1 each time the Okta tokens change
    refresh_lease_holder: Mapped[str | None]
    refresh_lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)  # extended by every refresh token issued
    revoked_at: Mapped[datetime | None] = mapped_column(index=True)
    revoked_reason: Mapped[str | None]


class OAuthCodeRow(Model):
    """A one-time authorization code (by its SHA-256), bound to what the token request must repeat."""

    __tablename__ = "oauth_codes"

    code_hash: Mapped[str] = mapped_column(primary_key=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("oauth_grants.grant_id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str]
    redirect_uri: Mapped[str]
    code_challenge: Mapped[str]  # PKCE S256
    resource: Mapped[str]
    scopes: Mapped[list[str]]
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    used_at: Mapped[datetime | None]


class OAuthRefreshTokenRow(Model):
    """A refresh token (by its SHA-256) of a grant's rotating family; a rotated one names its successor and, for
    the grace period only, holds the successor pair sealed (so a concurrent refresh gets the same pair)."""

    __tablename__ = "oauth_refresh_tokens"

    token_hash: Mapped[str] = mapped_column(primary_key=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("oauth_grants.grant_id", ondelete="CASCADE"), index=True)
    parent_hash: Mapped[str | None]
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    rotated_at: Mapped[datetime | None] = mapped_column(index=True)
    replaced_by: Mapped[str | None]
    successor_sealed: Mapped[bytes | None]


class OAuthConsentRow(Model):
    """A user's approval of a client for a backend, with the scopes approved."""

    __tablename__ = "oauth_consents"

    user_sub: Mapped[str] = mapped_column(primary_key=True)
    client_id: Mapped[str] = mapped_column(
        ForeignKey("oauth_clients.client_id", ondelete="CASCADE"), primary_key=True, index=True
    )
    backend: Mapped[str] = mapped_column(primary_key=True)
    scopes: Mapped[list[str]]
    approved_at: Mapped[datetime]


class SecurityEventRow(Model):
    """A security event of the front door (`audit --events`): registration, login, consent, token issue, refresh,
    reuse, revocation, refusal. `detail` never holds a secret."""

    __tablename__ = "security_events"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    time: Mapped[datetime]
    kind: Mapped[str]
    replica: Mapped[str]
    client_id: Mapped[str | None]
    user_sub: Mapped[str | None]
    grant_id: Mapped[str | None]
    detail: Mapped[dict[str, Any]]

    __table_args__ = (
        Index(None, "time"),
        Index(None, "kind", "time"),
        Index(None, "user_sub", "time"),
        Index(None, "client_id", "time"),
    )


class SigningKeyRow(Model):
    """The front door's token-signing keys, shared by every replica. `slot` is "current" on exactly one row (a
    unique constraint settles a creation race) and NULL on retired keys, which stay published for a while."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(primary_key=True)
    algorithm: Mapped[str]
    private_key: Mapped[bytes]  # sealed
    public_jwk: Mapped[dict[str, Any]]
    slot: Mapped[str | None] = mapped_column(unique=True)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None] = mapped_column(index=True)


# The Core tables, for bulk statements (typed as `Table`, unlike `Row.__table__`).
audit_events = Model.metadata.tables["audit_events"]
backends = Model.metadata.tables["backends"]
agents = Model.metadata.tables["agents"]
config_history = Model.metadata.tables["config_history"]
oauth_clients = Model.metadata.tables["oauth_clients"]
oauth_pending = Model.metadata.tables["oauth_pending"]
oauth_grants = Model.metadata.tables["oauth_grants"]
oauth_codes = Model.metadata.tables["oauth_codes"]
oauth_refresh_tokens = Model.metadata.tables["oauth_refresh_tokens"]
oauth_consents = Model.metadata.tables["oauth_consents"]
security_events = Model.metadata.tables["security_events"]
signing_keys = Model.metadata.tables["signing_keys"]
