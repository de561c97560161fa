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
Rows are sanitised first (`audit_rows.py`) so that what a caller controls cannot make an INSERT fail, and inserted
by an `Inserter` (`audit_inserts.py`: on the event loop for PostgreSQL, on a thread of its own for a SQLite file).
Errors are logged by type only — a driver message may quote the data being written.

Old rows are pruned every `prune_interval` seconds, in chunks (short write locks on SQLite): whatever is older than
`audit.retention_days`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from okta_agent_proxy.config.models import AuditConfig
from okta_agent_proxy.store.audit_inserts import EngineInserter, Inserter, RowsRefused, Statements
from okta_agent_proxy.store.audit_rows import RowEncoder
from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.models import audit_events

__all__ = ["MAX_DELAY", "AuditWriter", "WriterOptions"]

# A batch is written when `max_batch` events wait (by default the inserter's `max_batch`: 2000 on SQLite's thread,
# 500 on the event loop) or MAX_DELAY seconds after the first of them arrived.
MAX_DELAY = 0.2
PRUNE_CHUNK = 5_000
_RETRY_FIRST, _RETRY_MAX = 0.1, 5.0

log = structlog.get_logger(__name__)
_table = audit_events


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WriterOptions(TypedDict, total=False):
    """Tuning of an `AuditWriter` (the defaults suit a gateway)."""

    max_batch: int  # rows per INSERT transaction (the inserter's `max_batch`)
    max_delay: float  # seconds an event may wait for a batch to fill (MAX_DELAY)
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
        inserter: Inserter | None = None,
        max_batch: int | None = None,
        max_delay: float = MAX_DELAY,
        prune_interval: float = 3600.0,
        close_timeout: float = 30.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._engine = engine  # for pruning
        self._inserter = inserter or EngineInserter(engine)
        max_batch = self._inserter.max_batch if max_batch is None else max_batch
        if max_batch < 1 or max_delay < 0 or prune_interval <= 0:
            raise ValueError("max_batch must be ≥ 1, max_delay ≥ 0 and prune_interval > 0")
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
        self._room.set()  # blocked `record()` calls look again: the queue may be larger, or the policy `drop`
        self._wake.set()  # a smaller batch threshold may already be reached

    async def start(self) -> None:
        """Start the drain and prune tasks (idempotent)."""
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="audit-writer")
        if self._prune_task is None and not self._closing:
            self._prune_task = asyncio.create_task(self._prune_loop(), name="audit-prune")

    def offer(self, event: AuditEvent) -> bool:
        """Queue `event` if that needs no wait: True when it was queued or dropped (closing, or the queue full under
        `when_full: drop`); False when the queue is full under `block` — then `await record(event)`."""
        if self._closing:
            self.dropped += 1
            return True
        if len(self._queue) < self._capacity:
            self._enqueue(event)
            return True
        if self._drops_when_full():
            self.dropped += 1
            return True
        return False

    async def record(self, event: AuditEvent) -> None:
        """Queue `event`. Returns at once unless the queue is full under `when_full: block`."""
        if self.offer(event):
            return
        self._blocked += 1
        try:
            while len(self._queue) >= self._capacity:
                self._room.clear()
                await self._room.wait()
                if self._drops_when_full() and len(self._queue) >= self._capacity:
                    self.dropped += 1  # a reload switched to `drop` while this call waited
                    return
        except asyncio.CancelledError:
            # The request ended while it waited (its client left, or a shutdown's grace ended): `block` still keeps
            # its row, the queue over its size by one for the moment (by at most the requests in flight) — unless
            # the policy is `drop` by now, or the writer is closing.
            if self._drops_when_full() or self._closing:
                self.dropped += 1
            else:
                self._enqueue(event)
            raise
        finally:
            self._blocked -= 1
        self._enqueue(event)

    def _drops_when_full(self) -> bool:
        return self._config.when_full == "drop"  # read each time: a reload may change it while a call waits

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
        # Encoded where the rows are inserted: for a SQLite file on the inserter's thread, in one tight loop over the
        # batch, which cost about half as much CPU as the same work did on the event loop between requests.
        rows, statements, unusable = await self._inserter.call(self._prepare, batch)
        if unusable:
            self._settle(failed=unusable)
        retry = _RETRY_FIRST
        while rows:
            try:
                await self._inserter.insert(statements)
            except asyncio.CancelledError:  # `close()` gave up on an insert that hangs (a database locked for long)
                log.error("audit_rows_lost", reason="close_timeout", rows=len(rows))
                self._settle(failed=len(rows))
                raise
            except RowsRefused:
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

    def _prepare(self, batch: list[AuditEvent]) -> tuple[list[tuple[Any, ...]], Statements, int]:
        """The batch's rows, the INSERTs that write them, and how many events could not be encoded (logged)."""
        rows: list[tuple[Any, ...]] = []
        encode = self._encoder.encode
        unusable = 0
        for event in batch:
            try:
                rows.append(encode(event))
            except Exception as exc:
                log.error("audit_event_unusable", reason=type(exc).__name__, request_id=str(event.request_id)[:64])
                unusable += 1
        return rows, self._encoder.statements(rows), unusable

    async def _write_one_by_one(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            try:
                await self._inserter.insert([(self._encoder.sql, [row])])
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
