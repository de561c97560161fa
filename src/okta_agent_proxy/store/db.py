"""The database behind the audit log and config history: one async engine, SQLite by default, PostgreSQL when scaled.

`DATABASE_URL` is what an operator writes; the async driver is chosen here (DESIGN.md §1): `sqlite:///path` →
aiosqlite, `postgresql://…` (or `postgres://…`, or a sync driver such as `+psycopg2`) → asyncpg, and libpq's
`sslmode` becomes asyncpg's `ssl`. The default is a SQLite file under `./data/`, whose folder is created.

SQLite is set up for one gateway writing while other processes (more workers, the `audit` CLI) read and write:
- WAL journal, so readers never block the writer nor the writer readers; `synchronous=NORMAL`, which in WAL mode
  keeps every committed transaction through a process crash (`kill -9`) and may lose only the last ones to a power
  cut;
- a busy timeout, so a second writer waits for the lock instead of failing;
- SQLAlchemy, not the sqlite3 module, emits BEGIN (SQLAlchemy's documented recipe), so every statement — DDL
  included — is inside a real transaction. `write_transaction` begins `IMMEDIATE`: a transaction that reads and then
  writes takes the write lock first, so it cannot fail with a stale snapshot when another process wrote meanwhile.
Audit rows go into a SQLite file through a sync engine of their own, on a thread of their own (see
`audit_inserts.py`), set up like the async one. Every engine hides bound parameters in errors and logs
(`hide_parameters`): a failed audit insert must not print the row it was writing. Passwords in URLs are never
rendered (`display_url`).

`open_store(url, read_only=True)` is how a reader (the `audit` command) opens it: a SQLite file is opened in SQLite's
read-only mode (`file:…?mode=ro`) and must already exist — neither it nor its folder is ever created (SQLite may add
the `-wal`/`-shm` files a WAL database is read through) — and PostgreSQL transactions are `READ ONLY`. It connects
once before returning, so a missing file, an unreachable server or a database never migrated is a
`StoreUnavailableError` whose message is one line, without the password.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Unpack
from urllib.parse import quote

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from okta_agent_proxy.config.models import AuditConfig
from okta_agent_proxy.store.audit import AuditWriter, WriterOptions
from okta_agent_proxy.store.audit_inserts import ThreadInserter
from okta_agent_proxy.store.migrations import upgrade
from okta_agent_proxy.store.models import audit_events

__all__ = [
    "DEFAULT_DATABASE_URL",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "Store",
    "StoreConfigError",
    "StoreFileMissingError",
    "StoreUnavailableError",
    "async_database_url",
    "create_store_engine",
    "database_error_reason",
    "database_location",
    "display_url",
    "migrate",
    "open_store",
    "write_transaction",
]

DEFAULT_DATABASE_URL = "sqlite:///./data/okta-agent-proxy.db"
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
READ_ONLY_CONNECT_TIMEOUT_SECONDS = 10.0
_WRITE_INTENT = "okta_agent_proxy_write_intent"  # execution option read by the SQLite BEGIN hook


class StoreConfigError(ValueError):
    """`DATABASE_URL` cannot be used. The message never quotes the URL (it may hold a password)."""


class StoreUnavailableError(RuntimeError):
    """A store opened read-only cannot be read: one line, never the password."""


class StoreFileMissingError(StoreUnavailableError):
    """The SQLite file a read-only store names does not exist (it is not created)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"no database at {path}")


def async_database_url(database_url: str | None = None) -> URL:
    """The URL with its async driver: aiosqlite for SQLite, asyncpg for PostgreSQL."""
    try:
        url = make_url(database_url or DEFAULT_DATABASE_URL)
    except ArgumentError:
        raise StoreConfigError("DATABASE_URL is not a URL (expected sqlite:///path or postgresql://…)") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        query = dict(url.query)
        if "sslmode" in query and "ssl" not in query:
            query["ssl"] = query.pop("sslmode")
        return url.set(drivername="postgresql+asyncpg", query=query)
    raise StoreConfigError(
        f"DATABASE_URL names an unsupported database ({backend}); use sqlite:///path or postgresql://host/database"
    )


def display_url(url: URL | str) -> str:
    """A URL safe to print: the password is masked."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory or URI-style database."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" or url.query.get("uri"):
        return None
    return Path(database)


def create_store_engine(database_url: str | None = None) -> AsyncEngine:
    """An async engine for `DATABASE_URL` (see the module docstring for what is set up)."""
    url = async_database_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, hide_parameters=True, pool_pre_ping=True)
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, hide_parameters=True, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    _configure_sqlite(engine.sync_engine, wal=path is not None)
    return engine


def _sqlite_insert_engine(url: URL) -> Engine:
    """A sync engine on the SQLite file of `url`, for `ThreadInserter`."""
    sync_url = url.set(drivername="sqlite+pysqlite")
    engine = create_engine(sync_url, hide_parameters=True, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    _configure_sqlite(engine, wal=True)
    return engine


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN (below), not the sqlite3 module
        cursor = dbapi_connection.cursor()
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_INTENT, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write after reading: on SQLite it holds the write lock from its start."""
    async with engine.connect() as connection:
        await connection.execution_options(**{_WRITE_INTENT: True})
        async with connection.begin():
            yield connection


class Store:
    """The open database: its engine and the audit writers made on it. `close()` flushes them, then disconnects."""

    def __init__(self, engine: AsyncEngine, *, read_only: bool = False) -> None:
        self.engine = engine
        self.read_only = read_only
        self._writers: list[AuditWriter] = []
        # A SQLite file: audit rows go in on a thread of their own (made at the first writer), the rest on `engine`.
        self._sqlite_file = sqlite_file(engine.url) is not None
        self._thread_inserter: ThreadInserter | None = None

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        return display_url(self.engine.url)

    def writer(self, config: AuditConfig, **options: Unpack[WriterOptions]) -> AuditWriter:
        """A new `AuditWriter` on this store (then `await writer.start()`); `options` tune batching and pruning."""
        if self.read_only:
            raise RuntimeError("this store was opened read-only")
        writer = AuditWriter(self.engine, config, inserter=self._sqlite_inserter(), **options)
        self._writers.append(writer)
        return writer

    @property
    def insert_engine(self) -> Engine:
        """The engine audit rows are inserted with (to observe them: `sqlalchemy.event` listens on it)."""
        inserter = self._sqlite_inserter()
        return inserter.engine if inserter is not None else self.engine.sync_engine

    def _sqlite_inserter(self) -> ThreadInserter | None:
        if self._sqlite_file and self._thread_inserter is None:
            self._thread_inserter = ThreadInserter(_sqlite_insert_engine(self.engine.url))
        return self._thread_inserter

    async def ping(self) -> None:
        """Raise unless the database answers (for `/readyz`)."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def close(self, timeout: float = 30.0) -> None:
        """Flush and stop every writer made here (each gives up after `timeout` s), then close the connections."""
        try:
            await asyncio.gather(*(writer.close(timeout) for writer in self._writers))
        finally:
            if self._thread_inserter is not None:
                await self._thread_inserter.close()
            await self.engine.dispose()


async def open_store(database_url: str | None = None, *, read_only: bool = False) -> Store:
    """Open (without migrating) the store at `database_url` (default: the SQLite file under ./data/).

    `read_only`: see the module docstring; raises `StoreConfigError` or `StoreUnavailableError`.
    """
    if not read_only:
        return Store(create_store_engine(database_url))
    try:
        url = async_database_url(database_url)
    except StoreConfigError:
        raise
    except ValueError:  # e.g. a port that is not a number
        raise StoreConfigError("DATABASE_URL is not a URL (expected sqlite:///path or postgresql://…)") from None
    engine = _read_only_engine(url)
    try:
        await _check_readable(engine, database_location(url))
    except BaseException:
        await engine.dispose()
        raise
    return Store(engine, read_only=True)


def _read_only_engine(url: URL) -> AsyncEngine:
    if url.get_backend_name() != "sqlite":
        return create_async_engine(
            url,
            hide_parameters=True,
            pool_pre_ping=True,
            execution_options={"postgresql_readonly": True},
            connect_args={"timeout": READ_ONLY_CONNECT_TIMEOUT_SECONDS},
        )
    if url.host or url.port or url.username or url.password:
        raise StoreConfigError("a SQLite URL names no host: sqlite:///relative/path or sqlite:////absolute/path")
    path = sqlite_file(url)
    if path is not None:
        path = Path(os.path.abspath(path))
        if not path.exists():
            raise StoreFileMissingError(path)
        if path.is_dir():
            raise StoreUnavailableError(f"cannot open the database at {path}: it is a directory")
        url = url.set(database=f"file:{quote(str(path))}", query={**url.query, "mode": "ro", "uri": "true"})
    elif url.query.get("uri") and "mode" not in url.query:
        url = url.update_query_dict({"mode": "ro"})
    engine = create_async_engine(url, hide_parameters=True, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    _configure_sqlite(engine.sync_engine, wal=False)  # the journal mode is the writer's to set
    return engine


async def _check_readable(engine: AsyncEngine, shown: str) -> None:
    """Connect once: the server answers, the file is a database, the audit table is there."""
    verb = "open" if engine.dialect.name == "sqlite" else "connect to"
    try:
        async with engine.connect() as connection:
            migrated = await connection.run_sync(lambda sync: inspect(sync).has_table(audit_events.name))
    except (OSError, DBAPIError) as exc:
        reason = database_error_reason(exc, engine.url)
        raise StoreUnavailableError(f"cannot {verb} the database at {shown}: {reason}") from None
    except TypeError as exc:  # the driver's connect() refused a parameter of the URL's query
        raise StoreConfigError(f"DATABASE_URL has a query parameter the driver does not accept ({exc})") from None
    if not migrated:
        raise StoreUnavailableError(
            f"the database at {shown} has no {audit_events.name} table"
            " (never migrated; `okta-agent-proxy serve` creates it)"
        )


def database_location(url: URL) -> str:
    """Where a store is, for a message: the SQLite file's absolute path, or the URL without password nor query."""
    path = sqlite_file(url)
    if path is not None:
        return os.path.abspath(path)
    return display_url(url.set(drivername=url.get_backend_name(), query={}))


def database_error_reason(exc: BaseException, url: URL) -> str:
    """Why a connection or a query failed, in one line without the URL's password (nor SQLAlchemy's decorations)."""
    if isinstance(exc, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(exc, socket.gaierror):
        reason = f"cannot resolve the host {url.host}"
    elif isinstance(exc, TimeoutError):
        reason = "timed out"
    else:
        orig = exc.orig if isinstance(exc, DBAPIError) else None
        lines = str(orig if orig is not None else exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        if reason.startswith("(sqlalchemy.") and ") " in reason:  # "(sqlalchemy.dialects….Error) message"
            reason = reason.split(") ", 1)[1]
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason


async def migrate(database_url: str | None = None, revision: str = "head") -> None:
    """Upgrade the schema to `revision`, serialised across replicas (see `migrations.upgrade`)."""
    engine = create_store_engine(database_url)
    try:
        await upgrade(engine, revision, begin=write_transaction, lock_file=_lock_file(engine.url))
    finally:
        await engine.dispose()


def _lock_file(url: URL) -> Path | None:
    path = sqlite_file(url)
    return path.with_name(path.name + ".migrate.lock") if path is not None else None
