"""`AuditWriter`: audit events into `audit_events`, off the request path (pipeline step 9, DESIGN.md §4).

A request hands its event to `record()`, which appends it to a bounded in-memory queue and returns without touching
the database. One background task drains the queue in batched INSERTs: a batch is written when `max_batch` events
are waiting or `max_delay` seconds after the first of them arrived, whichever comes first (under a backlog, at
once). So the database sees a few large transactions instead of one per request, and a request never waits for it.

When the queue is full, `audit.when_full` decides: `drop` discards the event and counts it in `dropped` (a metric);
`block` makes `record()` wait for room — no event is lost, and the gateway slows to the database's pace.

What can be lost, and what cannot:
- `close()` writes everything queued (and everything a blocked `record()` was holding) before it returns; only if
  the database stays unreachable past its deadline are the remaining rows given up and counted in `failed`.
- A crash (`kill -9`) loses what was queued and not yet committed: at most `queue_size` + `max_batch` events, in
  practice the events of the last `max_delay` seconds plus one write. A committed row survives (see `db.py`).
- A database outage stalls the writer, which retries the batch in hand with backoff while the queue fills and the
  policy applies. Only a row the database rejects on its own (bad data) is skipped and counted in `failed`; the
  rest of its batch is written row by row.
Rows are sanitised first so that what a caller controls cannot make an INSERT fail: text is capped in length, NUL
and lone surrogates are replaced, and tool-call arguments (stored only with `audit.record_arguments`) become JSON
text capped at 64 KiB. Errors are logged by type only — a driver message may quote the data being written.

Old rows are pruned every `prune_interval` seconds, in chunks (short write locks on SQLite): whatever is older than
`audit.retention_days`.
"""

from __future__ import annotations

import asyncio
import json
import math
import operator
import re
import sqlite3
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any, TypedDict

from sqlalchemy import Dialect, Double, Text, bindparam, delete, insert, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from okta_agent_proxy.config import AuditConfig
from okta_agent_proxy.observability.logging import get_logger
from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.models import audit_events

__all__ = ["ARGUMENTS_LIMIT", "TEXT_LIMIT", "AuditWriter", "RowEncoder", "WriterOptions"]

TEXT_LIMIT = 4096  # characters of any one text field
ARGUMENTS_LIMIT = 65_536  # characters of the arguments' JSON
PRUNE_CHUNK = 5_000
_RETRY_FIRST, _RETRY_MAX = 0.1, 5.0

log = get_logger(__name__)
_table = audit_events
_FIELDS = AuditEvent._fields
# Rows in the largest multi-row INSERT (a power of two): a batch of up to twice as many goes in one statement per
# set bit of its size. Within the bound-parameter limits: SQLite's 32 766 (999 before 3.32), PostgreSQL's 32 767.
MAX_ROWS_PER_STATEMENT = 256
_PARAMETER = re.compile(r"\$(\d+)")  # a numbered parameter ($1, asyncpg's style)
_TEXT_FIELDS = frozenset(
    c.name for c in _table.columns if isinstance(c.type, Text) and c.name in _FIELDS and c.name != "arguments"
)
_FLOAT_FIELDS = frozenset(c.name for c in _table.columns if isinstance(c.type, Double))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _text(value: str, limit: int = TEXT_LIMIT) -> str:
    if len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # the common case, checked in C
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate (from a JSON "\ud800" escape) cannot be stored as UTF-8
        value = value.encode("utf-8", "replace").decode()
    return value


def _arguments(value: Any) -> str | None:
    if value is None:
        return None
    encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=lambda o: f"<{type(o).__name__}>")
    if len(encoded) > ARGUMENTS_LIMIT:
        encoded = json.dumps({"truncated": True, "chars": len(encoded)})
    return _text(encoded, ARGUMENTS_LIMIT)


def _sqlite_time(value: datetime) -> str:
    # The text SQLAlchemy's SQLite DateTime stores and parses: naive UTC, microseconds always present.
    if value.tzinfo is UTC:  # the recorder's: the same text without "+00:00", made in one step
        return value.isoformat(sep=" ", timespec="microseconds")[:-6]
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ", timespec="microseconds")


def _aware_time(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _insert_statement(dialect: Dialect) -> str:
    """The one-row INSERT; its parameters are the values in `AuditEvent` field order."""
    # inline(): no RETURNING of the generated id (which PostgreSQL would otherwise send back for a one-row INSERT)
    compiled = insert(_table).values({name: bindparam(name) for name in _FIELDS}).inline().compile(dialect=dialect)
    if list(compiled.positiontup or []) != list(_FIELDS):
        raise RuntimeError("audit_events INSERT does not bind the AuditEvent fields in their order")
    return str(compiled)


def _multi_row(single: str, rows: int) -> str:
    """`single` (a one-row INSERT) extended to `rows` rows: its VALUES group repeated, numbered parameters
    renumbered for each row (`?` parameters need nothing)."""
    head, values, group = single.partition(" VALUES ")
    if not values or not (group.startswith("(") and group.endswith(")")):
        raise RuntimeError("audit_events INSERT has an unexpected shape")
    width = len(_FIELDS)

    def renumbered(row: int) -> str:
        return _PARAMETER.sub(lambda m: f"${int(m.group(1)) + row * width}", group)

    return head + values + ", ".join(renumbered(row) for row in range(rows))


def _rows_per_statement(dialect: Dialect) -> int:
    limit = 32_766
    if dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 32, 0):
        limit = 999
    rows = MAX_ROWS_PER_STATEMENT
    while rows * len(_FIELDS) > limit:
        rows //= 2
    return rows


class RowEncoder:
    """Turns events into `audit_events` parameter tuples for one dialect, sanitised so the database accepts them,
    and groups them into INSERT statements.

    The statement is compiled once and run with plain tuples: per row this is a copy of the event (a tuple in
    column order) and a few string checks, with no per-column SQLAlchemy processing on the event loop. A batch goes
    in a few multi-row INSERTs (`VALUES (…), (…), …`; see `statements`): the database does less per row, and
    SQLite's driver gives up and takes back the GIL once per statement instead of once per row, a hand-over
    between the event loop and the driver's thread that is costly on a busy core.
    """

    def __init__(self, dialect: Dialect, *, record_arguments: bool) -> None:
        self.sql = _insert_statement(dialect)
        self._statements = {1: self.sql}  # by row count: powers of two, made when first needed
        self.max_rows = _rows_per_statement(dialect)
        self._text_at = tuple(i for i, name in enumerate(_FIELDS) if name in _TEXT_FIELDS)
        self._texts = operator.itemgetter(*self._text_at)
        self._float_at = tuple(i for i, name in enumerate(_FIELDS) if name in _FLOAT_FIELDS)
        self._time_at = _FIELDS.index("time")
        self._arguments_at = _FIELDS.index("arguments")
        self._time = _sqlite_time if dialect.name == "sqlite" else _aware_time
        self.record_arguments = record_arguments

    def statement(self, rows: int) -> str:
        """The INSERT of `rows` rows (a power of two up to `max_rows`); its parameters row after row."""
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = _multi_row(self.sql, rows)
        return sql

    def statements(self, rows: list[tuple[Any, ...]]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """(INSERT, parameter sets) pairs that write `rows`: whole chunks of `max_rows` rows with the largest
        statement (one parameter set each), then the rest in one statement per set bit of its count — a batch of
        500 rows is 6 statements (256 + 128 + 64 + 32 + 16 + 4)."""
        size = self.max_rows
        start = len(rows) - len(rows) % size
        result = []
        if start:
            chunks = [tuple(chain.from_iterable(rows[i : i + size])) for i in range(0, start, size)]
            result.append((self.statement(size), chunks))
        while size > 1:
            size //= 2
            if (len(rows) - start) & size:
                result.append((self.statement(size), [tuple(chain.from_iterable(rows[start : start + size]))]))
                start += size
        if start < len(rows):
            result.append((self.sql, [rows[start]]))
        return result

    def encode(self, event: AuditEvent) -> tuple[Any, ...]:
        values = list(event)
        if not _clean(self._texts(values)):
            for i in self._text_at:
                value = values[i]
                if value is not None:
                    values[i] = _text(value if isinstance(value, str) else str(value))
        for i in self._float_at:
            value = values[i]
            if value is not None and not math.isfinite(value):
                values[i] = -1.0  # SQLite would store NaN as NULL, breaking NOT NULL; -1 marks "not measurable"
        values[self._time_at] = self._time(values[self._time_at])
        values[self._arguments_at] = _arguments(event.arguments) if self.record_arguments else None
        return tuple(values)


def _clean(texts: tuple[Any, ...]) -> bool:
    """Whether all these text fields can be stored as they are — checked on their concatenation, in C."""
    try:
        joined = "".join(filter(None, texts))
    except TypeError:  # a field that is not a str
        return False
    if len(joined) > TEXT_LIMIT or "\x00" in joined:
        return False
    if joined.isascii():
        return True
    try:
        joined.encode()
    except UnicodeEncodeError:
        return False
    return True


class WriterOptions(TypedDict, total=False):
    """Tuning of an `AuditWriter` (the defaults suit a gateway)."""

    max_batch: int  # rows per INSERT transaction (500)
    max_delay: float  # seconds an event may wait for a batch to fill (0.2)
    prune_interval: float  # seconds between retention prunes (3600)
    close_timeout: float  # seconds `close()` keeps trying an unreachable database (30)
    clock: Callable[[], datetime]  # now, in UTC, for retention


class AuditWriter:
    """Queue audit events and write them in batches (see the module docstring).

    Counters, for metrics: `queue_depth` (waiting), `dropped` (refused: queue full under `drop`, or after close),
    `written`, `failed` (accepted but not stored), `batches` (INSERT transactions committed).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        config: AuditConfig,
        *,
        max_batch: int = 500,
        max_delay: float = 0.2,
        prune_interval: float = 3600.0,
        close_timeout: float = 30.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if max_batch < 1 or max_delay < 0 or prune_interval <= 0:
            raise ValueError("max_batch must be ≥ 1, max_delay ≥ 0 and prune_interval > 0")
        self._engine = engine
        self._config = config
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._prune_interval = prune_interval
        self._close_timeout = close_timeout
        self._clock = clock
        self._capacity = config.queue_size
        self._batch_ready_at = min(max_batch, config.queue_size)
        self._encoder = RowEncoder(engine.dialect, record_arguments=config.record_arguments)

        self._queue: deque[AuditEvent] = deque()
        self._wake = asyncio.Event()  # the drain task has something to do
        self._room = asyncio.Event()  # the queue has room again (for `block`)
        self._progress = asyncio.Event()  # a batch was settled (for `flush`)
        self._stop = asyncio.Event()  # the prune task should end
        self._first_at = 0.0  # when the oldest waiting event arrived (loop time); -inf: a backlog, write now
        self._blocked = 0  # `record()` calls waiting for room
        self._accepted = 0
        self._settled = 0  # written + failed
        self._flush_target = 0
        self._closing = False
        self._give_up_at = math.inf
        self._drain_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None

        self.dropped = 0
        self.written = 0
        self.failed = 0
        self.batches = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def config(self) -> AuditConfig:
        return self._config

    def reconfigure(self, config: AuditConfig) -> None:
        """Apply a reloaded `audit` section at once: the queue's size and what happens when it is full, whether
        arguments are stored (events already queued included), and the retention of the next prune."""
        self._config = config
        self._capacity = config.queue_size
        self._batch_ready_at = min(self._max_batch, config.queue_size)
        self._encoder.record_arguments = config.record_arguments
        self._room.set()  # a larger queue has room for blocked `record()` calls
        self._wake.set()  # a smaller batch threshold may already be reached

    async def start(self) -> None:
        """Start the drain and prune tasks (idempotent)."""
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="audit-writer")
        if self._prune_task is None and not self._closing:
            self._prune_task = asyncio.create_task(self._prune_loop(), name="audit-prune")

    async def record(self, event: AuditEvent) -> None:
        """Queue `event`. Returns at once unless the queue is full under `when_full: block`."""
        if self._closing:
            self.dropped += 1
            return
        if len(self._queue) >= self._capacity:
            if self._config.when_full == "drop":
                self.dropped += 1
                return
            self._blocked += 1
            try:
                while len(self._queue) >= self._capacity:
                    self._room.clear()
                    await self._room.wait()
            finally:
                self._blocked -= 1
        self._enqueue(event)

    def _enqueue(self, event: AuditEvent) -> None:
        if not self._queue:
            self._first_at = asyncio.get_running_loop().time()
            self._wake.set()
        self._queue.append(event)
        self._accepted += 1
        if len(self._queue) >= self._batch_ready_at:
            self._wake.set()

    async def flush(self) -> None:
        """Wait until every event queued so far is written (or given up); skips the batching delay."""
        if self._drain_task is None:
            raise RuntimeError("AuditWriter.flush() needs start() first")
        target = self._accepted
        self._flush_target = max(self._flush_target, target)
        self._wake.set()
        while self._settled < target:
            self._progress.clear()
            await self._progress.wait()

    async def close(self, timeout: float | None = None) -> None:
        """Write everything queued, then stop. Rows still unwritten after `timeout` s are counted in `failed`."""
        if self._closing:
            if self._drain_task is not None:
                await asyncio.wait({self._drain_task})
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        budget = self._close_timeout if timeout is None else timeout
        self._give_up_at = loop.time() + budget
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="audit-writer")
        self._stop.set()
        self._wake.set()
        tasks = {t for t in (self._drain_task, self._prune_task) if t is not None}
        # The drain gives up on its own at the deadline; the margin covers a database call that hangs.
        _, pending = await asyncio.wait(tasks, timeout=budget + 1.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._queue:
            self._settle(failed=len(self._queue))
            log.error("audit_rows_lost_at_close", rows=len(self._queue))
            self._queue.clear()

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                if self._closing and self._blocked == 0:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self._batch_ready_at and self._first_at > -math.inf and not self._urgent():
                try:
                    async with asyncio.timeout_at(self._first_at + self._max_delay):
                        while len(self._queue) < self._batch_ready_at and not self._urgent():
                            self._wake.clear()
                            await self._wake.wait()
                except TimeoutError:
                    pass
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            if self._queue:
                self._first_at = -math.inf  # a backlog: the next batch goes at once
            self._room.set()
            try:
                await self._write(batch)
            except Exception as exc:  # a bug here must not stop the writer for good
                log.error("audit_write_error", reason=type(exc).__name__, rows=len(batch))
                self._settle(failed=len(batch))

    def _urgent(self) -> bool:
        return self._closing or self._flush_target > self._settled

    async def _write(self, batch: list[AuditEvent]) -> None:
        rows: list[tuple[Any, ...]] = []
        encode = self._encoder.encode
        for event in batch:
            try:
                rows.append(encode(event))
            except Exception as exc:
                log.error("audit_event_unusable", reason=type(exc).__name__, request_id=str(event.request_id)[:64])
                self._settle(failed=1)
        retry = _RETRY_FIRST
        while rows:
            try:
                async with self._engine.begin() as connection:
                    for sql, parameters in self._encoder.statements(rows):
                        if len(parameters) == 1:
                            await connection.exec_driver_sql(sql, parameters[0])
                        else:
                            await connection.exec_driver_sql(sql, parameters)
            except (DataError, IntegrityError):
                await self._write_one_by_one(rows)
                return
            except Exception as exc:
                loop = asyncio.get_running_loop()
                if loop.time() + retry > self._give_up_at:
                    log.error("audit_rows_lost", reason=type(exc).__name__, rows=len(rows))
                    self._settle(failed=len(rows))
                    return
                log.warning("audit_write_retry", reason=type(exc).__name__, rows=len(rows), retry_in=retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, _RETRY_MAX)
            else:
                self.batches += 1
                self._settle(written=len(rows))
                return

    async def _write_one_by_one(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            try:
                async with self._engine.begin() as connection:
                    await connection.exec_driver_sql(self._encoder.sql, [row])
            except Exception as exc:
                log.error("audit_row_rejected", reason=type(exc).__name__)
                self._settle(failed=1)
            else:
                self.batches += 1
                self._settle(written=1)

    def _settle(self, *, written: int = 0, failed: int = 0) -> None:
        self.written += written
        self.failed += failed
        self._settled += written + failed
        self._progress.set()

    async def prune(self) -> int:
        """Delete rows older than `audit.retention_days`; returns how many."""
        cutoff = self._clock() - timedelta(days=self._config.retention_days)
        oldest = select(_table.c.id).where(_table.c.time < cutoff).limit(PRUNE_CHUNK).scalar_subquery()
        statement = delete(_table).where(_table.c.id.in_(oldest))
        total = 0
        while True:
            async with self._engine.begin() as connection:
                deleted = (await connection.execute(statement)).rowcount
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def _prune_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pruned = await self.prune()
            except Exception as exc:
                log.warning("audit_prune_failed", reason=type(exc).__name__)
            else:
                if pruned:
                    log.info("audit_pruned", rows=pruned, retention_days=self._config.retention_days)
            try:
                async with asyncio.timeout(self._prune_interval):
                    await self._stop.wait()
            except TimeoutError:
                pass
