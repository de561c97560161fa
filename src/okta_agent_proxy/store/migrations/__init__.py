"""Alembic migrations of the store, run from code — `serve --migrate`, `demo` and tests call `db.migrate()`.

Replicas that start together must not race on the schema:
- PostgreSQL: the whole upgrade is one transaction that first takes a transaction-level advisory lock
  (`pg_advisory_xact_lock`, scoped to the database). A second replica waits on the lock, then finds the schema at
  head and does nothing; the lock goes with the commit or the rollback, even if the process dies.
- SQLite: an exclusive `flock` on `<database>.migrate.lock` (taken by polling with a deadline, so a cancelled start
  never leaves a thread waiting), then an `IMMEDIATE` transaction against the gateway processes writing meanwhile.
DDL is transactional on both databases, so a failed upgrade leaves the previous schema in place. There is no
alembic.ini: `alembic_config()` builds the configuration, and `env.py` runs on the connection handed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

if sys.platform != "win32":
    import fcntl

__all__ = ["HEAD", "MIGRATIONS_DIR", "MigrationLockTimeout", "alembic_config", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent
HEAD = "head"
LOCK_TIMEOUT_SECONDS = 300.0
_LOCK_POLL_SECONDS = 0.05
# One 64-bit key for "this project's migrations"; advisory locks are per database, so databases do not contend.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"okta-agent-proxy/migrations").digest()[:8], "big", signed=True)


class MigrationLockTimeout(TimeoutError):
    """Another process held the migration lock for longer than the deadline."""


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration of these migrations; `connection` is the one `env.py` migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(
    engine: AsyncEngine,
    revision: str = HEAD,
    *,
    begin: Callable[[AsyncEngine], AbstractAsyncContextManager[AsyncConnection]],
    lock_file: Path | None = None,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> None:
    """Upgrade the schema to `revision` in one transaction opened by `begin`, holding the migration lock."""
    async with _file_lock(lock_file, lock_timeout), begin(engine) as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'"))
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        await connection.run_sync(_upgrade, revision)


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


@contextlib.asynccontextmanager
async def _file_lock(path: Path | None, timeout: float) -> AsyncIterator[None]:
    if path is None or sys.platform == "win32":  # Windows: the IMMEDIATE transaction alone serialises migrations
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise MigrationLockTimeout(f"another process holds {path.name} (waited {timeout:.0f} s)")
            await asyncio.sleep(_LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock
