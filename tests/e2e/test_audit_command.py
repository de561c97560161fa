"""`okta-agent-proxy audit` as a user runs it: a subprocess, in a folder of its own, with a clean environment.

The command opens the store read-only. A database it cannot read — no SQLite file (the default one, one named by
`DATABASE_URL`, one in a folder that does not exist), a URL it cannot use (unsupported scheme, bad port, unknown
query parameter), a PostgreSQL server that is not listening, a database never migrated, a database dropped while
`--follow` runs — is exit code 2 and one `error: …` line on stderr: no traceback, no password, and no file or folder
created. A database that can be read is printed, and `--follow` sees rows committed while it runs. Assertions are on
exit codes, the line count and the files on disk, not on wording.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from okta_agent_proxy.config.models import AuditConfig
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.store.db import Store, StoreFileMissingError, migrate, open_store
from okta_agent_proxy.store.events import AuditEvent
from tests.support.processes import free_port
from tests.support.stacks import DATABASES, database_url, postgres_database

SECRET = "s3cr3t-Value-that-must-never-print-4c3b2a"
EXIT_UNAVAILABLE = 2
TIMEOUT = 60
WAIT_SECONDS = 20.0


def _environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without the gateway's variables (a DATABASE_URL there would win)."""
    env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    env["PYTHONUNBUFFERED"] = "1"
    return env | dict(extra or {})


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "okta_agent_proxy", "audit", "--env-file", os.devnull, *args]


def audit(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(*args), cwd=cwd, env=_environment(env), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def tree(directory: Path) -> set[Path]:
    return set(directory.rglob("*"))


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2, nothing on stdout, exactly one `error: ` line on stderr; no traceback, no password."""
    assert result.returncode == EXIT_UNAVAILABLE, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    return lines[0]


def make_event(index: int) -> AuditEvent:
    return AuditEvent(
        time=datetime.now(UTC) - timedelta(minutes=10) + timedelta(seconds=index),
        request_id=f"req-{index:05d}",
        replica="replica-a",
        http_method="POST",
        path="/a/mcp",
        status=200,
        outcome="ok",
        latency_ms=1.5,
    )


async def write_events(store: Store, indexes: Sequence[int]) -> None:
    writer = store.writer(AuditConfig())
    await writer.start()
    try:
        for index in indexes:
            await writer.record(make_event(index))
    finally:
        await writer.close()


@contextlib.asynccontextmanager
async def migrated(kind: str, directory: Path) -> AsyncIterator[str]:
    """A migrated database (SQLite file in `directory`, or a PostgreSQL database of its own): its URL."""
    async with database_url(kind, directory) as url:
        await migrate(url)
        yield url


# ---------------------------------------------------------------- a store that cannot be read


@pytest.mark.parametrize("follow", [False, True], ids=["once", "follow"])
def test_no_database_file_is_one_line_and_creates_nothing(tmp_path: Path, follow: bool) -> None:
    """The default URL is a SQLite file under ./data/: neither it nor ./data is created."""
    result = audit(tmp_path, *(["--follow"] if follow else []))
    line = assert_one_error_line(result)
    assert str(tmp_path / "data" / "okta-agent-proxy.db") in line
    assert tree(tmp_path) == set()


def test_database_url_from_the_environment_naming_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "audit.db"
    result = audit(tmp_path, env={"DATABASE_URL": f"sqlite:///{missing}"})
    assert str(missing) in assert_one_error_line(result)
    assert tree(tmp_path) == set()


@pytest.mark.parametrize("follow", [False, True], ids=["once", "follow"])
def test_sqlite_file_in_a_missing_folder_creates_no_folder(tmp_path: Path, follow: bool) -> None:
    database = tmp_path / "nonexistent" / "x.db"
    result = audit(tmp_path, "--database-url", f"sqlite:///{database}", *(["--follow"] if follow else []))
    assert_one_error_line(result)
    assert tree(tmp_path) == set()


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://audit:{SECRET}@127.0.0.1:3306/audit",
        f"postgresql://audit:{SECRET}@127.0.0.1:not-a-port/audit",
        f"postgresql://audit:{SECRET}@127.0.0.1:5432/audit?no_such_parameter=1",
        f"sqlite://audit:{SECRET}@localhost/audit.db",
    ],
    ids=["unsupported-scheme", "bad-port", "unknown-query-parameter", "sqlite-with-a-host"],
)
def test_unusable_url_is_one_line_without_the_password(tmp_path: Path, url: str) -> None:
    result = audit(tmp_path, "--database-url", url)
    assert_one_error_line(result)
    assert tree(tmp_path) == set()


def test_postgresql_not_listening_is_one_line_without_the_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: a stopped server
    result = audit(tmp_path, "--database-url", f"postgresql://audit:{SECRET}@127.0.0.1:{port}/audit")
    line = assert_one_error_line(result)
    assert f"127.0.0.1:{port}" in line
    assert tree(tmp_path) == set()


def test_empty_sqlite_file_is_one_line_and_stays_empty(tmp_path: Path) -> None:
    """A zero-byte file is a valid, empty SQLite database: never migrated, and not written to."""
    database = tmp_path / "audit.db"
    database.touch()
    result = audit(tmp_path, "--database-url", f"sqlite:///{database}")
    assert_one_error_line(result)
    assert database.stat().st_size == 0
    assert tree(tmp_path) == {database}


def test_sqlite_database_without_the_audit_table_is_one_line(tmp_path: Path) -> None:
    database = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE something_else (x INTEGER)")
        connection.commit()
    before = database.read_bytes()
    result = audit(tmp_path, "--database-url", f"sqlite:///{database}")
    assert_one_error_line(result)
    assert database.read_bytes() == before


async def test_postgresql_database_never_migrated_is_one_line(tmp_path: Path) -> None:
    async with postgres_database() as url:
        result = await asyncio.to_thread(audit, tmp_path, "--database-url", url)
    assert_one_error_line(result)


# ---------------------------------------------------------------- a store that can be read


@pytest.mark.parametrize("kind", DATABASES)
async def test_read_only_store_refuses_writes(kind: str, tmp_path: Path) -> None:
    """Read-only is enforced by the database: SQLite's `mode=ro`, PostgreSQL's READ ONLY transactions. The same
    statement on the store opened as `serve` opens it succeeds."""
    create = text("CREATE TABLE written_by_the_test (x INTEGER)")
    async with migrated(kind, tmp_path) as url:
        store = await open_store(url, read_only=True)
        try:
            with pytest.raises(DBAPIError):
                async with store.engine.begin() as connection:
                    await connection.execute(create)
        finally:
            await store.close()
        writable = await open_store(url)
        try:
            async with writable.engine.begin() as connection:
                await connection.execute(create)
        finally:
            await writable.close()


async def test_read_only_open_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    """`serve` opens the same URL and creates the folder and the file; a read-only open does not."""
    url = f"sqlite:///{tmp_path / 'store' / 'audit.db'}"
    with pytest.raises(StoreFileMissingError):
        await open_store(url, read_only=True)
    assert tree(tmp_path) == set()
    store = await open_store(url)
    await store.close()
    assert (tmp_path / "store").is_dir()


@pytest.mark.parametrize("kind", DATABASES)
async def test_audit_prints_the_rows(kind: str, tmp_path: Path) -> None:
    async with migrated(kind, tmp_path) as url:
        store = await open_store(url)
        try:
            await write_events(store, range(3))
        finally:
            await store.close()
        result = await asyncio.to_thread(audit, tmp_path, "--json", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["request_id"] for line in result.stdout.splitlines()] == [
        "req-00000",
        "req-00001",
        "req-00002",
    ]


@pytest.mark.parametrize("kind", DATABASES)
async def test_follow_sees_rows_committed_while_it_runs(kind: str, tmp_path: Path) -> None:
    async with migrated(kind, tmp_path) as url:
        store = await open_store(url)
        try:
            await write_events(store, [0])
            process = await _follow(url, tmp_path)
            try:
                assert process.stdout is not None
                seen = [await _next_request_id(process.stdout)]
                await write_events(store, [1, 2])
                seen += [await _next_request_id(process.stdout) for _ in range(2)]
                assert seen == ["req-00000", "req-00001", "req-00002"]
                process.send_signal(signal.SIGINT)
                assert await asyncio.wait_for(process.wait(), WAIT_SECONDS) == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        finally:
            await store.close()


async def _follow(url: str, cwd: Path) -> asyncio.subprocess.Process:
    """`audit --json --follow` against `url`, as a subprocess whose output the test reads."""
    return await asyncio.create_subprocess_exec(
        *_argv("--json", "--follow", "--database-url", url),
        cwd=cwd,
        env=_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _next_request_id(stdout: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(stdout.readline(), WAIT_SECONDS)
    assert line, "audit --follow ended"
    request_id: str = json.loads(line)["request_id"]
    return request_id


async def test_follow_ends_with_one_line_when_the_database_goes_away(tmp_path: Path) -> None:
    async with postgres_database() as url:
        await migrate(url)
        process = await _follow(url, tmp_path)
        try:
            store = await open_store(url)
            try:
                await write_events(store, [0])
            finally:
                await store.close()
            assert process.stdout is not None
            assert await _next_request_id(process.stdout) == "req-00000"
        except BaseException:
            process.kill()
            await process.wait()
            raise
    # The database is dropped (WITH (FORCE): the reader's connections are closed too).
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), WAIT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    assert_one_error_line(subprocess.CompletedProcess([], process.returncode, stdout.decode(), stderr.decode()))
