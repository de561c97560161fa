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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Unpack

from sqlalchemy import URL, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from okta_agent_proxy.config import AuditConfig
from okta_agent_proxy.store.audit import AuditWriter, WriterOptions
from okta_agent_proxy.store.audit_inserts import ThreadInserter
from okta_agent_proxy.store.migrations import upgrade

__all__ = [
    "DEFAULT_DATABASE_URL",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "Store",
    "StoreConfigError",
    "async_database_url",
    "create_store_engine",
    "display_url",
    "migrate",
    "open_store",
    "write_transaction",
]

DEFAULT_DATABASE_URL = "sqlite:///./data/okta-agent-proxy.db"
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
_WRITE_INTENT = "okta_agent_proxy_write_intent"  # execution option read by the SQLite BEGIN hook


class StoreConfigError(ValueError):
    """`DATABASE_URL` cannot be used. The message never quotes the URL (it may hold a password)."""


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
    raise StoreConfigError(f"DATABASE_URL names an unsupported database ({backend}); use sqlite or postgresql")


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

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
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


async def open_store(database_url: str | None = None) -> Store:
    """Open (without migrating) the store at `database_url` (default: the SQLite file under ./data/)."""
    return Store(create_store_engine(database_url))


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
