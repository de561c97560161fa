"""Audit events as `audit_events` rows: sanitised parameter tuples, and the INSERT statements that write a batch.

Rows are sanitised so that what a caller controls cannot make an INSERT fail: text is capped in length, NUL and
lone surrogates are replaced, and tool-call arguments (stored only with `audit.record_arguments`) become JSON text
capped at 64 KiB. A batch goes in a few multi-row INSERTs — the text SQLAlchemy compiles for `insert().values([…])`,
made from its one-row statement by `internals.multi_row_insert` (see `RowEncoder.statements`); on SQLite each names
only the columns that some row of it sets.
"""

from __future__ import annotations

import json
import math
import operator
import sqlite3
from datetime import UTC, datetime
from itertools import chain
from typing import Any

from sqlalchemy import Dialect, Double, Text, bindparam, insert

from okta_agent_proxy.internals import multi_row_insert
from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.models import audit_events, epoch_microseconds

__all__ = ["ARGUMENTS_LIMIT", "MAX_ROWS_PER_STATEMENT", "TEXT_LIMIT", "RowEncoder"]

TEXT_LIMIT = 4096  # characters of any one text field
ARGUMENTS_LIMIT = 65_536  # characters of the arguments' JSON
# Rows in the largest multi-row INSERT (a power of two): a batch of up to twice as many goes in one statement per
# set bit of its size. Within the bound-parameter limits: SQLite's 32 766 (999 before 3.32), PostgreSQL's 32 767.
MAX_ROWS_PER_STATEMENT = 256

_table = audit_events
_FIELDS = AuditEvent._fields
_SUBSETS_KEPT = 512  # INSERTs of column subsets remembered (each: a set of columns × a row count)
_TEXT_FIELDS = frozenset(
    c.name for c in _table.columns if isinstance(c.type, Text) and c.name in _FIELDS and c.name != "arguments"
)
_FLOAT_FIELDS = frozenset(c.name for c in _table.columns if isinstance(c.type, Double))


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


def _aware_time(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _insert_statement(dialect: Dialect, columns: tuple[str, ...] = _FIELDS, rows: int = 1) -> str:
    """The INSERT of `rows` rows of `columns` (default: every field), SQLAlchemy's multi-row `VALUES (…), (…), …`
    for more than one; its parameters are the rows' values, row after row, each row in `columns`' order."""
    names = [[f"{name}_{row}" for name in columns] for row in range(rows)]
    values: list[dict[str, Any]] = [
        {name: bindparam(bound) for name, bound in zip(columns, row, strict=True)} for row in names
    ]
    # inline(): no RETURNING of the generated id (which PostgreSQL would otherwise send back for a one-row INSERT)
    compiled = insert(_table).values(values).inline().compile(dialect=dialect)
    if list(compiled.positiontup or []) != list(chain.from_iterable(names)):
        raise RuntimeError("audit_events INSERT does not bind the AuditEvent fields in their order")
    return str(compiled)


def _sqlite_parameter_limit() -> int:
    """The bound-parameter limit of the SQLite library in use (a build setting: 999 by default before 3.32)."""
    connection = sqlite3.connect(":memory:")
    try:
        return connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    finally:
        connection.close()


def _rows_per_statement(dialect: Dialect) -> int:
    limit = _sqlite_parameter_limit() if dialect.name == "sqlite" else 32_767  # PostgreSQL's protocol: int16
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
    SQLite's driver gives up and takes back the GIL once per statement instead of once per row.

    On SQLite a statement leaves out the columns no row of it sets (their default is NULL): Python's sqlite3 binds a
    None through an adapter lookup that costs several times a string's binding, and an audit row is mostly NULLs
    (2 µs of CPU per request at full load, measured). asyncpg binds NULLs cheaply: on PostgreSQL every column is
    bound, and the usual event goes to the driver as it is.
    """

    def __init__(self, dialect: Dialect, *, record_arguments: bool) -> None:
        self.sql = _insert_statement(dialect)
        self._statements = {1: self.sql}  # by row count: powers of two, made when first needed
        self._dialect = dialect
        self._omit_empty = dialect.name == "sqlite"
        self._subsets: dict[tuple[tuple[int, ...], int], str] = {}  # (columns kept, rows) → INSERT
        self.max_rows = _rows_per_statement(dialect)
        self._text_at = tuple(i for i, name in enumerate(_FIELDS) if name in _TEXT_FIELDS)
        self._texts = operator.itemgetter(*self._text_at)
        self._float_at = tuple(i for i, name in enumerate(_FIELDS) if name in _FLOAT_FIELDS)
        self._floats = operator.itemgetter(*self._float_at)
        if [_FIELDS[i] for i in self._float_at] != ["latency_ms", "headers_ms"]:
            raise RuntimeError("audit_events' float columns are not the ones `_plain` checks")
        self._time_at = _FIELDS.index("time")
        self._arguments_at = _FIELDS.index("arguments")
        self._time = epoch_microseconds if dialect.name == "sqlite" else _aware_time
        self.record_arguments = record_arguments

    def statement(self, rows: int) -> str:
        """The INSERT of `rows` rows (a power of two up to `max_rows`); its parameters row after row."""
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = multi_row_insert(self.sql, rows)
        return sql

    def _plain(self, event: AuditEvent) -> bool:
        """Whether all but the time can be written as it is: no arguments, text that needs no cleaning and finite
        floats — the usual request."""
        if event.arguments is not None:
            return False
        latency, headers = self._floats(event)
        return math.isfinite(latency) and (headers is None or math.isfinite(headers)) and _clean(self._texts(event))

    def statements(self, rows: list[tuple[Any, ...]]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """(INSERT, parameter sets) pairs that write `rows`: chunks of `max_rows` rows, then the rest in one chunk
        per set bit of its count — a batch of 2000 rows is 7 × 256 + 128 + 64 + 16 — each chunk one parameter set of
        its statement, consecutive chunks with the same statement in one pair."""
        result: list[tuple[str, list[tuple[Any, ...]]]] = []
        start, size = 0, self.max_rows
        while start < len(rows):
            while size > len(rows) - start:
                size //= 2
            sql, values = self._chunk(rows[start : start + size])
            if result and result[-1][0] is sql:
                result[-1][1].append(values)
            else:
                result.append((sql, [values]))
            start += size
        return result

    def _chunk(self, rows: list[tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
        """The INSERT of `rows` (a power of two of them) and its parameters."""
        if self._omit_empty:
            columns = list(zip(*rows, strict=True))
            count = len(rows)
            kept = tuple(i for i, values in enumerate(columns) if values.count(None) != count)
            if 0 < len(kept) < len(columns):
                values = tuple(chain.from_iterable(zip(*[columns[i] for i in kept], strict=True)))
                return self._subset(kept, count), values
        return self.statement(len(rows)), tuple(chain.from_iterable(rows))

    def _subset(self, kept: tuple[int, ...], rows: int) -> str:
        sql = self._subsets.get((kept, rows))
        if sql is None:
            if len(self._subsets) >= _SUBSETS_KEPT:
                self._subsets.clear()
            single = _insert_statement(self._dialect, tuple(_FIELDS[i] for i in kept))
            sql = self._subsets[(kept, rows)] = multi_row_insert(single, rows)
        return sql

    def encode(self, event: AuditEvent) -> tuple[Any, ...]:
        if self._plain(event):
            time = event.time
            if self._time is _aware_time and time.tzinfo is not None:
                return event  # PostgreSQL: already a tuple in column order, no copy
            return (self._time(time), *event[1:])
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
