"""Reading the audit log back: the filters of `okta-agent-proxy audit` and the `--follow` tail.

`iter_events` pages through the matching rows by `(time, id)` keyset — short read transactions, however many rows a
`--since 30d --json` export covers, so a reader never holds a long snapshot open against the writer. `--last N` is
the N most recent by request time, printed oldest first.

`follow_events` then tails the table by `id`, the insertion order. Ids are allocated when a row is inserted but
become visible when its transaction commits, so with several writers (replicas on PostgreSQL) a row can appear
below an id already shown. The tail therefore re-reads a window of `lookback` ids below the highest it has seen and
remembers what it already yielded there: a row committed late is still shown once, as long as no more than
`lookback` ids were allocated meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, RowMapping, Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.models import audit_events

__all__ = ["AuditQuery", "StoredEvent", "follow_events", "iter_events", "query_events"]

PAGE_SIZE = 1000
_FIELDS = AuditEvent._fields
_t = audit_events.c


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters, all optional and combined with AND. `user` matches the token's `sub` or Okta `uid`."""

    last: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    agent: str | None = None
    backend: str | None = None
    outcome: str | None = None

    def __post_init__(self) -> None:
        if self.last is not None and self.last < 0:
            raise ValueError("last must be ≥ 0")

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.since is not None:
            where.append(_t.time >= self.since)
        if self.until is not None:
            where.append(_t.time < self.until)
        if self.user is not None:
            where.append(or_(_t.user_sub == self.user, _t.user_uid == self.user))
        for column, value in ((_t.agent, self.agent), (_t.backend, self.backend), (_t.outcome, self.outcome)):
            if value is not None:
                where.append(column == value)
        return where


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An audit row: its `id` (insertion order) and the event."""

    id: int
    event: AuditEvent

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one line per event for a SIEM): `id`, then the event's fields; time in ISO 8601."""
        data: dict[str, Any] = {"id": self.id}
        for name in _FIELDS:
            value = getattr(self.event, name)
            data[name] = value.isoformat() if isinstance(value, datetime) else value
        return data


def _stored(row: RowMapping) -> StoredEvent:
    values = {name: row[name] for name in _FIELDS}
    if values["arguments"] is not None:
        values["arguments"] = json.loads(values["arguments"])
    return StoredEvent(id=row["id"], event=AuditEvent(**values))


async def _fetch(connection: AsyncConnection, statement: Select[Any]) -> list[StoredEvent]:
    return [_stored(row) for row in (await connection.execute(statement)).mappings()]


async def iter_events(
    engine: AsyncEngine, query: AuditQuery | None = None, *, page_size: int = PAGE_SIZE
) -> AsyncGenerator[StoredEvent, None]:
    """The matching rows, oldest first (by request time, then id)."""
    query = query or AuditQuery()
    base = select(audit_events).where(*query.conditions())
    if query.last is not None:
        newest = base.order_by(_t.time.desc(), _t.id.desc()).limit(query.last)
        async with engine.connect() as connection:
            rows = await _fetch(connection, newest)
        for stored in reversed(rows):
            yield stored
        return
    after: tuple[datetime, int] | None = None
    while True:
        page = base
        if after is not None:
            page = base.where(or_(_t.time > after[0], and_(_t.time == after[0], _t.id > after[1])))
        async with engine.connect() as connection:
            rows = await _fetch(connection, page.order_by(_t.time, _t.id).limit(page_size))
        for stored in rows:
            yield stored
        if len(rows) < page_size:
            return
        after = (rows[-1].event.time, rows[-1].id)


async def query_events(engine: AsyncEngine, query: AuditQuery | None = None) -> list[StoredEvent]:
    """`iter_events` as a list."""
    return [stored async for stored in iter_events(engine, query)]


async def follow_events(
    engine: AsyncEngine,
    query: AuditQuery | None = None,
    *,
    poll_interval: float = 1.0,
    lookback: int = 10_000,
) -> AsyncGenerator[StoredEvent, None]:
    """What `iter_events` yields, then every matching row committed afterwards, each once, until closed.

    Close it (`contextlib.aclosing`, or cancel the consuming task) to stop.
    """
    query = query or AuditQuery()
    conditions = query.conditions()
    async with engine.connect() as connection:
        start = await _max_id(connection)
    high = start
    yielded: set[int] = set()
    async for stored in iter_events(engine, query):
        if stored.id > start:
            yielded.add(stored.id)
        yield stored
    while True:
        floor = max(start, high - lookback)
        async with engine.connect() as connection:
            top = await _max_id(connection)
            ids = (await connection.execute(select(_t.id).where(_t.id > floor, *conditions))).scalars().all()
            fresh = sorted(i for i in ids if i not in yielded)
            rows: list[StoredEvent] = []
            for offset in range(0, len(fresh), PAGE_SIZE):
                chunk = fresh[offset : offset + PAGE_SIZE]
                rows += await _fetch(connection, select(audit_events).where(_t.id.in_(chunk)).order_by(_t.id))
        for stored in rows:
            yielded.add(stored.id)
            yield stored
        high = max(high, top)
        yielded = {i for i in yielded if i > high - lookback}
        await asyncio.sleep(poll_interval)


async def _max_id(connection: AsyncConnection) -> int:
    return int((await connection.execute(select(func.coalesce(func.max(_t.id), 0)))).scalar_one())
