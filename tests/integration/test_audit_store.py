"""The audit store on real databases: the same suite on a SQLite file and on the PostgreSQL server.

Each PostgreSQL test runs in a database of its own, created and dropped by `tests.support.stacks`
(`OAP_TEST_POSTGRES_URL`, default postgresql://root@127.0.0.1:5432/test; the test is skipped when the server is
unreachable, and fails under `OAP_REQUIRE_SERVICES=1`). Covered: migrations (empty database, up-to-date database, a
database with rows, replicas migrating at once), every AuditEvent field round-tripped, batching by size and by
delay, the `drop` and `block` policies, `close()` flushing everything, retention, query filters and `--follow`, the
config store holding no secret, and durability across SIGTERM and `kill -9` of a writer process. Waits are polls
with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, event, insert, select, text
from sqlalchemy import inspect as inspect_schema
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from okta_agent_proxy.config.models import AuditConfig, GatewayConfig
from okta_agent_proxy.store import audit_inserts
from okta_agent_proxy.store.audit import AuditWriter
from okta_agent_proxy.store.audit_rows import RowEncoder
from okta_agent_proxy.store.config_store import SECRET, config_changes, config_file_hash, save_config
from okta_agent_proxy.store.db import (
    Store,
    StoreConfigError,
    async_database_url,
    create_store_engine,
    display_url,
    migrate,
    open_store,
)
from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.migrations import alembic_config
from okta_agent_proxy.store.models import Model, audit_events
from okta_agent_proxy.store.queries import AuditQuery, StoredEvent, follow_events, iter_events, query_events
from tests.support.node_tools import REPO_ROOT
from tests.support.stacks import postgres_database
from tests.unit.helpers import pem, pem_body_chunks, rsa_key

# Recent (retention prunes by the real clock), with microseconds (they must survive the round trip).
HEAD_REVISION = "0005"
T0 = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=123456)
WAIT_SECONDS = 10.0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'audit.db'}"  # plain sqlite://, in a folder that does not exist yet
    else:
        async with postgres_database() as url:  # plain postgresql://, as operators write it
            yield url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await migrate(database_url)
    opened = await open_store(database_url)
    try:
        yield opened
    finally:
        await opened.close()


def make_event(index: int = 0, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "time": T0 + timedelta(seconds=index),
        "request_id": f"req-{index:05d}",
        "replica": "replica-a",
        "http_method": "POST",
        "path": "/employees/mcp",
        "status": 200,
        "outcome": "ok",
        "latency_ms": 1.5,
    }
    return AuditEvent(**(values | fields))


async def count_rows(engine: AsyncEngine, table: str = "audit_events") -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def request_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(select(audit_events.c.request_id).order_by(audit_events.c.id))
        return list(rows.scalars())


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll `check` until it holds, failing after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await _holds(check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def _holds(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else bool(result)


def insert_batches(engine: Engine) -> list[int]:
    """The rows each committed transaction inserted into audit_events, counted from the parameters the driver got
    (a batch is written with one or more multi-row INSERTs; other connections, such as the pruner's, commit too)."""
    sizes: list[int] = []
    pending: dict[int, int] = {}

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(connection: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, executemany: bool) -> None:
        if statement.startswith("INSERT INTO audit_events"):
            rows_per_set = statement.partition(" VALUES ")[2].count("), (") + 1
            pending[id(connection)] = pending.get(id(connection), 0) + rows_per_set * (
                len(parameters) if executemany else 1
            )

    @event.listens_for(engine, "commit")
    def _committed(connection: Any) -> None:
        if rows := pending.pop(id(connection), 0):
            sizes.append(rows)

    return sizes


# ---------------------------------------------------------------- database URLs


def test_driver_is_chosen_for_the_user() -> None:
    assert async_database_url("sqlite:///data/a.db").drivername == "sqlite+aiosqlite"
    assert async_database_url("sqlite+pysqlite:///a.db").drivername == "sqlite+aiosqlite"
    assert async_database_url(None).database == "./data/okta-agent-proxy.db"
    for plain in ("postgresql://u:p@db/x", "postgres://u:p@db/x", "postgresql+psycopg2://u:p@db/x"):
        assert async_database_url(plain).drivername == "postgresql+asyncpg"
    assert dict(async_database_url("postgresql://db/x?sslmode=require").query) == {"ssl": "require"}
    with pytest.raises(StoreConfigError) as excinfo:
        async_database_url("mysql://user:hunter2@db/x")
    assert "hunter2" not in str(excinfo.value)
    assert "hunter2" not in display_url("postgresql://user:hunter2@db/x")


async def test_sqlite_file_is_created_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'folder' / 'audit.db'}"
    await migrate(url)
    engine = create_store_engine(url)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await connection.execute(text("PRAGMA synchronous"))).scalar_one() == 1  # NORMAL
    finally:
        await engine.dispose()
    assert (tmp_path / "new" / "folder" / "audit.db").is_file()


# ---------------------------------------------------------------- migrations


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Model.metadata))


async def _version(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return list((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())


async def test_migrations_create_the_schema_of_the_models(database_url: str) -> None:
    await migrate(database_url)
    engine = create_store_engine(database_url)
    try:
        assert await _version(engine) == [HEAD_REVISION]
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_diff) == []
            indexes = await connection.run_sync(lambda c: inspect_schema(c).get_indexes("audit_events"))
        indexed = {tuple(index["column_names"]) for index in indexes}
        for columns in (("time",), ("user_sub", "time"), ("agent", "time"), ("backend", "time"), ("outcome", "time")):
            assert columns in indexed
    finally:
        await engine.dispose()


async def test_migrating_an_existing_database_keeps_its_rows(database_url: str) -> None:
    await migrate(database_url, "0001")
    store = await open_store(database_url)
    try:
        async with store.engine.begin() as connection:  # rows as 0001's gateway wrote them (its columns only)
            for index in range(3):
                await insert_row_with_time(
                    connection, T0 if connection.dialect.name != "sqlite" else "2026-01-01 00:00:00", f"req-{index:05d}"
                )
        await migrate(database_url)  # 0001 → head, then head → head: each must keep every row
        await migrate(database_url)
        assert await _version(store.engine) == [HEAD_REVISION]
        assert await request_ids(store.engine) == ["req-00000", "req-00001", "req-00002"]
    finally:
        await store.close()


async def insert_row_with_time(connection: AsyncConnection, time: Any, request_id: str) -> None:
    """A row whose time is bound as given, past the column type (as an older schema or process wrote it)."""
    await connection.execute(
        text(
            "INSERT INTO audit_events (time, request_id, replica, http_method, path, status, outcome, latency_ms,"
            " bytes_in, bytes_out) VALUES (:time, :request_id, 'r', 'POST', '/mcp', 200, 'ok', 1, 0, 0)"
        ),
        {"time": time, "request_id": request_id},
    )


async def test_times_stored_before_0002_read_back_the_same_after_it(database_url: str) -> None:
    """0002 turns SQLite's DATETIME text into integer microseconds, in place (PostgreSQL's timestamptz stays)."""
    await migrate(database_url, "0001")
    times = [T0, T0.replace(microsecond=0), T0.replace(microsecond=5), T0 + timedelta(days=400, microseconds=1)]
    engine = create_store_engine(database_url)
    try:
        async with engine.begin() as connection:
            sqlite_text = connection.dialect.name == "sqlite"
            for index, moment in enumerate(times):
                # As 0001's DATETIME column held it: on SQLite, SQLAlchemy's text (and one without its fraction).
                stored: Any = moment
                if sqlite_text:
                    stored = moment.replace(tzinfo=None).isoformat(" ", "seconds" if index == 1 else "microseconds")
                await insert_row_with_time(connection, stored, f"req-{index}")
        async with engine.connect() as connection:
            before = list((await connection.execute(text("SELECT time FROM audit_events ORDER BY id"))).scalars())
        await migrate(database_url)
        assert [stored.event.time for stored in await query_events(engine)] == sorted(times)
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_diff) == []
        async with engine.begin() as connection:  # and back: 0001's values again
            await connection.run_sync(lambda sync: alembic_command.downgrade(alembic_config(sync), "0001"))
        async with engine.connect() as connection:
            after = list((await connection.execute(text("SELECT time FROM audit_events ORDER BY id"))).scalars())
        expected = before  # PostgreSQL: untouched
        if engine.dialect.name == "sqlite":  # SQLAlchemy's DATETIME text (the row stored without a fraction gets one)
            expected = [moment.replace(tzinfo=None).isoformat(" ", "microseconds") for moment in times]
        assert after == expected
    finally:
        await engine.dispose()


async def test_a_text_time_written_after_0002_by_a_process_not_yet_upgraded_still_reads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rolling.db'}"
    await migrate(url)
    engine = create_store_engine(url)
    try:
        async with engine.begin() as connection:
            await insert_row_with_time(connection, T0.replace(tzinfo=None).isoformat(" ", "microseconds"), "old")
        assert [stored.event.time for stored in await query_events(engine)] == [T0]
    finally:
        await engine.dispose()


async def test_replicas_migrating_at_once_do_not_race(database_url: str) -> None:
    await asyncio.gather(*(migrate(database_url) for _ in range(4)))
    engine = create_store_engine(database_url)
    try:
        assert await _version(engine) == [HEAD_REVISION]
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- writer


def every_field_event() -> AuditEvent:
    return AuditEvent(
        time=T0.replace(microsecond=654321),
        request_id="7f0c6a2e-req",
        replica="gw-1:4242",
        http_method="POST",
        path="/employees/mcp/sub?x=1",
        status=403,
        outcome="authorization_denied",
        latency_ms=12.345,
        headers_ms=2.5,
        backend="employees",
        user_sub="ada@example.com",
        user_uid="00uada0000000000001x",
        token_jti="AT.jti-1",
        agent="cursor",
        client_id="0oacursor00000000001",
        mcp_method="tools/call",
        mcp_name="lookup_employée",
        jsonrpc_id="42",
        credential_method="okta-cross-app",
        credential_cache_hit=False,
        id_jag_jti="idjag-jti-1",
        upstream_status=401,
        bytes_in=123,
        bytes_out=4_567_890_123,
        detail="access_denied: policy refused",
        arguments={"name": "Ada", "limit": 5, "nested": {"ok": True, "none": None}},
    )


async def test_every_field_round_trips(store: Store) -> None:
    writer = store.writer(AuditConfig(record_arguments=True))
    await writer.start()
    original = every_field_event()
    await writer.record(original)
    await writer.flush()
    [stored] = await query_events(store.engine)
    assert stored.event == original
    assert stored.event.time.tzinfo is not None
    minimal = make_event(1)
    await writer.record(minimal)
    await writer.flush()
    assert (await query_events(store.engine))[-1].event == minimal
    assert json.loads(json.dumps(stored.as_json()))["time"] == original.time.isoformat()


async def test_arguments_are_stored_only_when_configured(store: Store) -> None:
    writer = store.writer(AuditConfig(record_arguments=False))
    await writer.start()
    await writer.record(every_field_event())
    await writer.flush()
    [stored] = await query_events(store.engine)
    assert stored.event.arguments is None
    assert stored.event == every_field_event()._replace(arguments=None)


async def test_hostile_text_is_stored_not_rejected(store: Store) -> None:
    writer = store.writer(AuditConfig(record_arguments=True))
    await writer.start()
    hostile = make_event(
        0,
        path="/employees/" + "a" * 100_000,
        mcp_name="nul\x00byte",
        jsonrpc_id="lone \ud800 surrogate",
        arguments={"blob": "x" * 200_000, "nul": "\x00"},
    )
    await writer.record(hostile)
    await writer.record(make_event(1))
    await writer.flush()
    assert (writer.written, writer.failed) == (2, 0)
    first, second = await query_events(store.engine)
    assert len(first.event.path) <= 4096
    assert first.event.mcp_name == "nul\ufffdbyte"
    assert first.event.arguments["truncated"] is True
    assert second.event == make_event(1)


async def test_batches_by_size_then_by_delay(store: Store) -> None:
    sizes = insert_batches(store.insert_engine)
    writer = store.writer(AuditConfig(), max_batch=100, max_delay=60.0)
    for index in range(250):
        await writer.record(make_event(index))
    await writer.start()
    await eventually(lambda: writer.written == 250, "the backlog, written at once in full batches")
    assert sizes == [100, 100, 50]

    for index in range(3):
        await writer.record(make_event(300 + index))
    for _ in range(20):
        await asyncio.sleep(0)
    assert writer.queue_depth == 3  # a partial batch waits for the delay (60 s here) or a flush
    await writer.flush()
    assert sizes[3:] == [3]

    quick = store.writer(AuditConfig(), max_batch=100, max_delay=0.05)
    await quick.start()
    for index in range(3):
        await quick.record(make_event(1000 + index))
    await eventually(lambda: quick.written == 3, "the delay to write a partial batch")
    assert sizes[4:] == [3]
    assert await count_rows(store.engine) == 256


async def test_a_large_batch_goes_in_multi_row_inserts_and_keeps_every_value(store: Store) -> None:
    sizes = insert_batches(store.insert_engine)
    writer = store.writer(AuditConfig(queue_size=1000), max_batch=777, max_delay=60.0)
    events = [
        make_event(
            index,
            status=200 + index % 300,
            bytes_out=index,
            mcp_name=f"tool-{index}",
            headers_ms=index / 7 if index % 2 else None,  # set in some rows of every statement
            detail="refused" if index < 300 else None,  # in the first statements only
            credential_cache_hit=index == 776 or None,  # in the last row only
        )
        for index in range(777)
    ]
    for audit_event in events:
        await writer.record(audit_event)
    await writer.start()
    await writer.flush()
    assert sizes == [777]  # one transaction: 3 × 256 rows, then 8, then 1
    assert [stored.event for stored in await query_events(store.engine)] == events


async def test_a_row_the_database_refuses_costs_only_that_row(store: Store) -> None:
    writer = store.writer(AuditConfig(), max_batch=10, max_delay=60.0)
    refused = make_event(1, status=None)  # NOT NULL: the database itself refuses it
    for audit_event in (make_event(0), refused, make_event(2)):
        await writer.record(audit_event)
    await writer.start()
    await writer.flush()
    assert (writer.written, writer.failed) == (2, 1)  # the batch failed, then went row by row
    assert await request_ids(store.engine) == ["req-00000", "req-00002"]


def test_a_plain_event_is_written_as_it_is_where_the_driver_takes_its_values() -> None:
    plain = make_event(0)
    postgres = RowEncoder(asyncpg.dialect(), record_arguments=True)  # type: ignore[no-untyped-call]
    assert postgres.encode(plain) is plain  # no copy for the usual request
    for unusual in (
        make_event(0, mcp_name="nul\x00"),
        make_event(0, latency_ms=float("nan")),
        make_event(0, arguments={}),
    ):
        row = postgres.encode(unusual)
        assert row is not unusual and row != tuple(unusual)  # cleaned, replaced or encoded
    sqlite_row = RowEncoder(sqlite.dialect(), record_arguments=False).encode(plain)
    assert sqlite_row[0] == (plain.time - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert sqlite_row[1:] == plain[1:]


def test_sqlite_inserts_name_only_the_columns_a_chunk_sets() -> None:
    """SQLite binds a None through an adapter lookup: a column no row of a chunk sets is left to its NULL default."""
    rows_of = [make_event(index, detail="x" if index == 3 else None) for index in range(6)]  # chunks of 4, then 2
    sqlite_encoder = RowEncoder(sqlite.dialect(), record_arguments=False)
    (first, [first_values]), (second, [second_values]) = sqlite_encoder.statements(
        [sqlite_encoder.encode(e) for e in rows_of]
    )
    assert "detail" in first and "detail" not in second and "user_sub" not in first
    assert len(first_values) == 4 * first.partition(" VALUES ")[2].split("), (")[0].count("?")
    assert None not in second_values
    postgres = RowEncoder(asyncpg.dialect(), record_arguments=False)  # type: ignore[no-untyped-call]
    assert all("user_sub" in sql for sql, _ in postgres.statements([postgres.encode(e) for e in rows_of]))


async def test_drop_policy_counts_what_it_drops(store: Store) -> None:
    writer = store.writer(AuditConfig(queue_size=10, when_full="drop"))
    for index in range(25):
        await writer.record(make_event(index))
    assert (writer.queue_depth, writer.dropped) == (10, 15)
    await writer.start()
    await writer.close()
    assert (writer.written, writer.dropped, writer.failed) == (10, 15, 0)
    assert await request_ids(store.engine) == [f"req-{i:05d}" for i in range(10)]


async def fill_until_blocked(writer: AuditWriter, capacity: int) -> asyncio.Task[None]:
    """Record events 0 … `capacity` into a writer that is not started and blocks when full: the last one waits."""
    for index in range(capacity):
        await writer.record(make_event(index))
    blocked = asyncio.create_task(writer.record(make_event(capacity)))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not blocked.done()
    assert writer.queue_depth == capacity
    return blocked


async def test_block_policy_waits_for_room(store: Store) -> None:
    writer = store.writer(AuditConfig(queue_size=5, when_full="block"), max_delay=0.0)
    blocked = await fill_until_blocked(writer, 5)
    await writer.start()
    await asyncio.wait_for(blocked, WAIT_SECONDS)
    await writer.close()
    assert (writer.written, writer.dropped) == (6, 0)
    assert await count_rows(store.engine) == 6


async def test_block_policy_keeps_the_row_of_a_request_cancelled_while_it_waits(store: Store) -> None:
    """A client that hangs up (or a drain that ends) while its row waits for room: the row is kept all the same."""
    writer = store.writer(AuditConfig(queue_size=5, when_full="block"), max_delay=0.0)
    blocked = await fill_until_blocked(writer, 5)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert writer.queue_depth == 6
    await writer.start()
    await writer.close()
    assert (writer.written, writer.dropped) == (6, 0)
    assert await request_ids(store.engine) == [f"req-{i:05d}" for i in range(6)]


async def test_a_reloaded_audit_section_applies_at_once(store: Store) -> None:
    writer = store.writer(AuditConfig(queue_size=5, when_full="block", record_arguments=False), max_delay=0.0)
    blocked = await fill_until_blocked(writer, 5)
    writer.reconfigure(AuditConfig(queue_size=8, when_full="drop", record_arguments=True))
    await asyncio.wait_for(blocked, WAIT_SECONDS)  # the larger queue has room: the blocked event goes in
    for index in range(6, 12):
        await writer.record(make_event(index, arguments={"n": index}))
    assert (writer.queue_depth, writer.dropped) == (8, 4)  # full at 8 now, and full means drop
    await writer.start()
    await writer.flush()
    stored = await query_events(store.engine)
    assert [event.event.request_id for event in stored] == [f"req-{i:05d}" for i in range(8)]
    assert stored[-1].event.arguments == {"n": 7}  # arguments are stored from now on


async def test_a_reload_to_drop_releases_the_calls_blocked_on_a_full_queue(store: Store) -> None:
    writer = store.writer(AuditConfig(queue_size=5, when_full="block"), max_delay=0.0)
    blocked = await fill_until_blocked(writer, 5)
    writer.reconfigure(AuditConfig(queue_size=5, when_full="drop"))
    await asyncio.wait_for(blocked, WAIT_SECONDS)  # no longer waiting: dropped, as the new policy says
    assert (writer.queue_depth, writer.dropped) == (5, 1)


async def test_close_gives_up_on_an_insert_a_lock_holds_and_nothing_is_written_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock past the close budget: the batch in the inserter's thread is counted
    as failed, and interrupted, so that it is not committed once the lock goes."""
    monkeypatch.setattr(audit_inserts, "CLOSE_WAIT", 0.5)
    database = tmp_path / "locked.db"
    url = f"sqlite:///{database}"
    await migrate(url)
    store = await open_store(url)
    writer = store.writer(AuditConfig(), max_delay=0.0)
    await writer.start()
    await asyncio.sleep(0.3)  # the first retention prune is done (a DELETE waiting for the lock would hold close)
    locker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    try:
        locker.execute("BEGIN IMMEDIATE")
        for index in range(100):
            assert writer.offer(make_event(index))
        await asyncio.sleep(0.3)  # the insert now waits for the lock on the thread
        await store.close(timeout=0.5)
        assert (writer.written, writer.failed, writer.queue_depth) == (0, 100, 0)
        await store.close()  # a second close does nothing
    finally:
        locker.execute("COMMIT")
        await asyncio.sleep(0.5)  # time for the interrupted insert to have gone on, were it still running
        assert locker.execute("SELECT count(*) FROM audit_events").fetchone()[0] == 0
        locker.close()


async def test_close_writes_everything_queued(store: Store) -> None:
    writer = store.writer(AuditConfig(), max_batch=500, max_delay=3600.0)
    await writer.start()
    for index in range(1234):
        await writer.record(make_event(index))
    await writer.close()
    assert (writer.written, writer.failed, writer.queue_depth) == (1234, 0, 0)
    assert await count_rows(store.engine) == 1234
    await writer.record(make_event(9999))  # too late: counted, never raised
    assert writer.dropped == 1


async def test_retention_prunes_old_rows(store: Store) -> None:
    now = datetime.now(UTC)
    long_ago = store.writer(AuditConfig(retention_days=90), clock=lambda: now - timedelta(days=3650))
    await long_ago.start()
    for index in range(5):
        await long_ago.record(make_event(index, time=now - timedelta(days=100)))
    for index in range(5, 8):
        await long_ago.record(make_event(index, time=now - timedelta(days=10)))
    await long_ago.flush()
    assert await count_rows(store.engine) == 8

    assert await store.writer(AuditConfig(retention_days=200)).prune() == 0
    periodic = store.writer(AuditConfig(retention_days=90), prune_interval=0.05)
    await periodic.start()

    async def pruned() -> bool:
        return await count_rows(store.engine) == 3

    await eventually(pruned, "the periodic prune")
    assert await request_ids(store.engine) == ["req-00005", "req-00006", "req-00007"]


# ---------------------------------------------------------------- queries


SAMPLE = [  # (index → seconds after T0, user_sub, user_uid, agent, backend, outcome), recorded out of time order
    (3, "ada", "00u-ada", "cursor", "partners", "backend_timeout"),
    (0, "ada", "00u-ada", "cursor", "employees", "ok"),
    (1, "bob", "00u-bob", "claude", "partners", "invalid_token"),
    (2, "ada", "00u-ada", "claude", "employees", "ok"),
    (4, None, None, None, "employees", "invalid_token"),
    (2, "bob", "00u-bob", "cursor", "employees", "ok"),  # same time as index 2: ordered by id
]


async def _record_sample(store: Store) -> None:
    writer = store.writer(AuditConfig())
    await writer.start()
    for n, (index, sub, uid, agent, backend, outcome) in enumerate(SAMPLE):
        event = make_event(index, request_id=f"s{n}", user_sub=sub, user_uid=uid, agent=agent, backend=backend)
        await writer.record(event._replace(outcome=outcome))
    await writer.close()


async def _ids(store: Store, **filters: Any) -> list[str]:
    return [stored.event.request_id for stored in await query_events(store.engine, AuditQuery(**filters))]


async def test_queries_filter_and_order(store: Store) -> None:
    await _record_sample(store)
    assert await _ids(store) == ["s1", "s2", "s3", "s5", "s0", "s4"]  # by time, then id
    assert await _ids(store, last=2) == ["s0", "s4"]
    assert await _ids(store, last=0) == []
    assert await _ids(store, since=T0 + timedelta(seconds=2)) == ["s3", "s5", "s0", "s4"]
    assert await _ids(store, since=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=3)) == ["s2", "s3", "s5"]
    assert await _ids(store, user="ada") == ["s1", "s3", "s0"]
    assert await _ids(store, user="00u-bob") == ["s2", "s5"]
    assert await _ids(store, agent="claude") == ["s2", "s3"]
    assert await _ids(store, backend="partners") == ["s2", "s0"]
    assert await _ids(store, outcome="invalid_token") == ["s2", "s4"]
    assert await _ids(store, user="ada", agent="cursor", last=1) == ["s0"]
    assert await _ids(store, since=T0.replace(tzinfo=None) + timedelta(seconds=4)) == ["s4"]  # naive = UTC
    paged = [s.event.request_id async for s in iter_events(store.engine, AuditQuery(), page_size=2)]
    assert paged == ["s1", "s2", "s3", "s5", "s0", "s4"]


async def test_follow_yields_each_new_matching_row_once(store: Store) -> None:
    await _record_sample(store)
    writer = store.writer(AuditConfig(), max_delay=0.0)
    await writer.start()
    follow = follow_events(store.engine, AuditQuery(last=1, agent="cursor"), poll_interval=0.02)
    async with contextlib.aclosing(follow) as tail:

        async def next_id() -> str:
            stored: StoredEvent = await asyncio.wait_for(anext(tail), WAIT_SECONDS)
            return stored.event.request_id

        assert await next_id() == "s0"  # the latest existing row by time
        await writer.record(make_event(10, request_id="other", agent="claude"))
        await writer.record(make_event(11, request_id="new-1", agent="cursor"))
        await writer.flush()
        assert await next_id() == "new-1"
        # A row committed late below ids already shown (another replica's slower transaction) is still shown once.
        async with store.engine.connect() as connection:
            top = int((await connection.execute(text("SELECT max(id) FROM audit_events"))).scalar_one())
        await _insert_with_id(store, top + 5, "late")
        await _insert_with_id(store, top + 9, "later")
        assert await next_id() == "late"
        assert await next_id() == "later"
        await _insert_with_id(store, top + 7, "committed-late")
        assert await next_id() == "committed-late"
    await writer.close()


async def _insert_with_id(store: Store, row_id: int, request_id: str) -> None:
    event = make_event(request_id=request_id, agent="cursor")
    row = event._asdict() | {"id": row_id}
    async with store.engine.begin() as connection:
        await connection.execute(insert(audit_events), [row])


# ---------------------------------------------------------------- config store


def _config(*, url: str, key: str, password: str, client_secret: str, private_key: str, partners: bool) -> Any:
    backends: dict[str, Any] = {
        "employees": {
            "url": url,
            "paths": ["/employees"],
            "auth_method": "okta-cross-app",
            "auth_config": {
                "target_authorization_server": "https://as.example.com",
                "target_token_endpoint": "https://as.example.com/token",
                "target_client_id": "target-client",
                "target_client_secret": client_secret,
            },
        },
        "psk": {
            "url": "http://127.0.0.1:9001/mcp",
            "paths": ["/psk"],
            "auth_method": "pre-shared-key",
            "auth_config": {"key": key},
        },
    }
    if partners:
        backends["partners"] = {
            "url": "http://127.0.0.1:9002/mcp",
            "paths": ["/partners"],
            "auth_method": "service-account",
            "auth_config": {"username": "svc", "password": password},
        }
    agents = {"cursor": {"client_id": "0oacursor", "private_key": private_key, "backend_access": ["employees"]}}
    return GatewayConfig.model_validate({"backends": backends, "agents": agents})


async def _dump(engine: AsyncEngine) -> str:
    """Every value of every table, as text."""
    parts: list[str] = []
    async with engine.connect() as connection:
        for table in ("backends", "agents", "config_history", "audit_events"):
            for row in await connection.execute(text(f"SELECT * FROM {table}")):
                parts += [str(value) for value in row]
    return "\n".join(parts)


async def test_config_store_records_changes_and_no_secret(store: Store) -> None:
    private_key = pem(rsa_key())
    secrets = {
        "key": "psk-Zq8v1x-known-secret",
        "password": "pw-Hn3k7-known-secret",
        "client_secret": "cs-Lr5m2-known-secret",
    }
    first = _config(url="http://u:url-pass-9t@127.0.0.1:9000/mcp", private_key=private_key, partners=True, **secrets)
    change = await save_config(store.engine, first, file_hash=config_file_hash(b"v1"), source="config.yaml")
    assert change is not None
    assert change.previous_hash is None
    assert {op["path"] for op in change.operations} == {"audit", "backends", "agents", "rate_limits", "front_door"}
    assert await save_config(store.engine, first, file_hash=config_file_hash(b"v1")) is None  # nothing new
    secrets["key"] = "psk-rotated-known-secret"  # a rotated secret: only the file hash shows it
    rotated = _config(url="http://u:url-pass-9t@127.0.0.1:9000/mcp", private_key=private_key, partners=True, **secrets)
    file_only = await save_config(store.engine, rotated, file_hash=config_file_hash(b"v1 # comment"))
    assert file_only is not None
    assert (file_only.operations, file_only.previous_hash) == ([], config_file_hash(b"v1"))

    second = _config(url="http://127.0.0.1:9100/mcp", private_key=private_key, partners=False, **secrets)
    change = await save_config(store.engine, second, file_hash=config_file_hash(b"v2"), replica="gw-1")
    assert change is not None
    operations = {(op["op"], op["path"]) for op in change.operations}
    assert operations == {("remove", "backends.partners"), ("change", "backends.employees.url")}
    assert [c.file_hash for c in await config_changes(store.engine)] == [
        config_file_hash(b"v1"),
        config_file_hash(b"v1 # comment"),
        config_file_hash(b"v2"),
    ]
    async with store.engine.connect() as connection:
        names = set((await connection.execute(text("SELECT name FROM backends"))).scalars())
        agent = (await connection.execute(text("SELECT config FROM agents WHERE name = 'cursor'"))).scalar_one()
    assert names == {"employees", "psk"}
    agent_view = json.loads(agent) if isinstance(agent, str) else agent
    assert set(agent_view["private_key"]) == {"kid", "algorithm"}

    dump = await _dump(store.engine)
    assert SECRET in dump
    for secret in [*secrets.values(), "psk-Zq8v1x-known-secret", "url-pass-9t", *pem_body_chunks(private_key)]:
        assert secret not in dump


async def test_config_is_recorded_once_when_replicas_start_together(store: Store) -> None:
    config = _config(
        url="http://127.0.0.1:9000/mcp",
        key="k",
        password="p",
        client_secret="c",
        private_key=pem(rsa_key()),
        partners=True,
    )
    changes = await asyncio.gather(
        *(save_config(store.engine, config, file_hash="h", replica=f"gw-{n}") for n in range(4))
    )
    assert sum(change is not None for change in changes) == 1
    assert await count_rows(store.engine, "config_history") == 1


# ---------------------------------------------------------------- durability (a writer process, signalled)


async def _start_probe(database_url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.audit_durability",
        database_url,
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def _read_until(process: asyncio.subprocess.Process, key: str) -> dict[str, Any]:
    assert process.stdout is not None
    async with asyncio.timeout(WAIT_SECONDS * 3):
        while True:
            line = await process.stdout.readline()
            if not line:
                raise AssertionError(f"the probe exited (status {await process.wait()}) before reporting {key!r}")
            status: dict[str, Any] = json.loads(line)
            if key in status:
                return status


@contextlib.asynccontextmanager
async def _probe(database_url: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await _start_probe(database_url, *args)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow
async def test_sigterm_writes_every_recorded_event(store: Store, database_url: str) -> None:
    # A long batching delay keeps nearly everything queued at SIGTERM: close() must flush it.
    async with _probe(database_url, "--events", "1000", "--max-delay", "30", "--max-batch", "5000") as process:
        await _read_until(process, "done")
        process.send_signal(signal.SIGTERM)
        closed = await _read_until(process, "closed")
        assert await asyncio.wait_for(process.wait(), WAIT_SECONDS) == 0
    assert (closed["written"], closed["dropped"], closed["failed"]) == (1000, 0, 0)
    assert await request_ids(store.engine) == [f"probe-{i:06d}" for i in range(1000)]


@pytest.mark.slow
async def test_kill_9_loses_at_most_what_was_queued(store: Store, database_url: str) -> None:
    queue_size, max_batch = 2000, 200
    args = ["--events", "0", "--rate", "2000", "--max-batch", str(max_batch), "--queue-size", str(queue_size)]
    latest: dict[str, Any] = {}
    async with _probe(database_url, *args) as process:

        async def follow_status() -> None:
            assert process.stdout is not None
            async for line in process.stdout:
                latest.update(json.loads(line))

        reader = asyncio.create_task(follow_status())
        await eventually(lambda: latest.get("written", 0) >= 500, "the probe's first committed rows")
        process.kill()
        await process.wait()
        await asyncio.wait_for(reader, WAIT_SECONDS)
    ids = await request_ids(store.engine)
    # What survives is exactly a prefix of what was recorded: nothing committed is lost, nothing out of order.
    assert ids == [f"probe-{i:06d}" for i in range(len(ids))]
    assert len(ids) >= latest["written"]
    # What the process held uncommitted (and a crash loses) never exceeds the queue plus the batch being written.
    assert latest["recorded"] - latest["written"] <= queue_size + max_batch
    reopened = await open_store(database_url)  # "restart": every row is still there, and writing goes on
    try:
        assert await count_rows(reopened.engine) == len(ids)
        if reopened.dialect == "sqlite":
            async with reopened.engine.connect() as connection:
                assert (await connection.execute(text("PRAGMA integrity_check"))).scalar_one() == "ok"
        writer = reopened.writer(AuditConfig())
        await writer.start()
        await writer.record(make_event(0, request_id="after-restart"))
        await writer.close()
        assert await count_rows(reopened.engine) == len(ids) + 1
    finally:
        await reopened.close()
