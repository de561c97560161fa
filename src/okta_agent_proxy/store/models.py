"""The store's tables (SQLAlchemy 2 typed declarative models), one schema for SQLite and PostgreSQL.

- `audit_events`: one row per request on a backend route (DESIGN.md §4) — every `AuditEvent` field plus a surrogate
  `id` that orders rows by insertion (what `--follow` tails). Indexed for the CLI's queries: by time, and by user,
  agent, backend or outcome within time.
- `backends`, `agents`: the loaded config, as a secret-free view (`config_store.public_view`).
- `config_history`: what changed (a JSON-Patch-like list), when, from which file (its SHA-256), and the resulting
  secret-free config, which the next change is compared with.

Strings are unbounded `Text`: an audit row must never fail to insert on PostgreSQL because a caller sent a long
path or tool name (the writer caps lengths instead). Times are stored in UTC: `timestamptz` on PostgreSQL, ISO
text on SQLite — except an audit event's time, which SQLite stores as integer microseconds since the Unix epoch
(`EpochMicroseconds`) — and always read back timezone-aware. Constraint and index names follow one naming convention so
that migrations name the same objects on both databases.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Double, Index, Integer, MetaData, Text
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


# The Core tables, for bulk statements (typed as `Table`, unlike `Row.__table__`).
audit_events = Model.metadata.tables["audit_events"]
backends = Model.metadata.tables["backends"]
agents = Model.metadata.tables["agents"]
config_history = Model.metadata.tables["config_history"]
