"""How a batch of audit rows reaches the database: one transaction of a few INSERT statements (`audit_rows.py`
builds them), run by one of two inserters that `Store.writer` chooses between.

- `EngineInserter` runs the transaction on the store's async engine: PostgreSQL (asyncpg does its network I/O on
  the event loop, which costs the loop little) and an in-memory SQLite database.
- `ThreadInserter` runs it on a sync SQLAlchemy engine in a thread of its own: a SQLite file. SQLite does its work
  in the calling thread, and aiosqlite hands every call (cursor, execute, close, commit) to its thread and back; a
  batch went through some 20 such hand-offs, each a fight for the GIL with the event loop. Here a batch is one
  hand-off, and SQLite's own work runs while the thread has given the GIL up.

Both raise `RowsRefused` when the database refuses the data itself (a constraint, a value it cannot store):
retrying cannot help, but writing row by row saves the rest. Any other error (unreachable, locked) is raised as
it is, for the writer to retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["CLOSE_WAIT", "EngineInserter", "Inserter", "RowsRefused", "Statements", "ThreadInserter"]

CLOSE_WAIT = 5.0
A = TypeVar("A")
R = TypeVar("R")
Statements = list[tuple[str, list[tuple[Any, ...]]]]  # (INSERT, its parameter sets), as `RowEncoder.statements`


class RowsRefused(Exception):
    """The database refused the rows' data (the message names only the driver's error type)."""


@contextmanager
def _refusals() -> Iterator[None]:
    """The driver's refusal of the data itself, as `RowsRefused`; any other error as it is."""
    try:
        yield
    except (DataError, IntegrityError) as exc:
        raise RowsRefused(type(exc.orig).__name__) from None


def _driver_parameters(parameter_sets: list[tuple[Any, ...]]) -> Any:
    """`exec_driver_sql`'s parameters: one set as itself (an execute), several as a list (an executemany)."""
    return parameter_sets[0] if len(parameter_sets) == 1 else parameter_sets


class Inserter(Protocol):
    max_batch: int  # rows per transaction that suit it, at most

    async def call(self, function: Callable[[A], R], argument: A) -> R:
        """`function(argument)`, where this inserter works: on the event loop, or on its thread."""

    async def insert(self, statements: Statements) -> None:
        """Run `statements` in one transaction; `RowsRefused` if the data itself was refused."""


class EngineInserter:
    """Each batch in a transaction on an async engine."""

    # The driver encodes a batch on the event loop, in one go: more than this made the loop's CPU per request grow
    # (PostgreSQL, 2000 rows: +1.7 to +1.9 µs per request, in two runs of 10–12 rounds).
    max_batch = 500

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def call(self, function: Callable[[A], R], argument: A) -> R:
        return function(argument)

    async def insert(self, statements: Statements) -> None:
        with _refusals():
            async with self._engine.begin() as connection:
                for sql, parameters in statements:
                    await connection.exec_driver_sql(sql, _driver_parameters(parameters))


class ThreadInserter:
    """Each batch in a transaction on a sync engine, in the one thread this inserter owns (which also closes the
    engine's connections, at `close`). Writers may share one."""

    # A commit, its WAL frames and the hand-off to the thread are paid once per batch: 2000 rows instead of 500 took
    # about 4 µs of CPU off each request at 7 000 requests/s (mostly kernel time).
    max_batch = 2000

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-insert")
        self._inserting: Any = None  # the sqlite3 connection of the insert in progress, to interrupt at close
        self._closed = False

    async def call(self, function: Callable[[A], R], argument: A) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, argument)

    async def insert(self, statements: Statements) -> None:
        await self.call(self._insert, statements)

    def _insert(self, statements: Statements) -> None:
        try:
            with _refusals(), self.engine.begin() as connection:
                self._inserting = connection.connection.driver_connection
                for sql, parameters in statements:
                    connection.exec_driver_sql(sql, _driver_parameters(parameters))
        finally:
            self._inserting = None

    async def close(self) -> None:
        """Close the engine's connections, after the insert in progress. That insert gets `CLOSE_WAIT` s; then it
        is interrupted (rolled back: the writer has counted its rows as failed), so that nothing is written after
        the store is closed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        disposed = asyncio.get_running_loop().run_in_executor(self._thread, self.engine.dispose)
        self._thread.shutdown(wait=False)
        _, pending = await asyncio.wait({disposed}, timeout=CLOSE_WAIT)
        inserting = self._inserting
        if pending and inserting is not None:
            inserting.interrupt()  # sqlite3 allows this from another thread
            await asyncio.wait({disposed}, timeout=CLOSE_WAIT)
