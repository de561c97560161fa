"""Where the audit targets write, and the check that they wrote what they served.

A SQLite target writes a file in the run's temporary folder; a PostgreSQL target a scratch database of its own
(`oap_bench_…`, one per gateway revision, since two revisions may not share a schema), created on the server at
`--postgres-url` and dropped at the end. After the rounds each audit target's table must hold a row per request
served, minus what the writer reported dropping (`oap_audit_dropped_events` on its /metrics), and an audit-off
gateway's none: a fast target that does not write is not a result.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from processes import BenchError, http
from wrk_runner import Run

WRITER_SETTLE_SECONDS = 1.0  # the writer's batching delay is 0.2 s


class ScratchPostgres:
    """A database of its own on the PostgreSQL server at `admin_url`, dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"oap_bench_{uuid.uuid4().hex[:12]}"
        parts = urllib.parse.urlsplit(admin_url)
        self.url = urllib.parse.urlunsplit(parts._replace(path="/" + self.name))

    @staticmethod
    async def _scalar(url: str, sql: str) -> Any:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        from okta_agent_proxy.store.db import async_database_url

        engine = create_async_engine(async_database_url(url), isolation_level="AUTOCOMMIT", connect_args={"timeout": 5})
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text(sql))
                return result.scalar() if result.returns_rows else None
        finally:
            await engine.dispose()

    def create(self) -> None:
        asyncio.run(self._scalar(self.admin_url, f'CREATE DATABASE "{self.name}"'))

    def drop(self) -> None:
        try:
            asyncio.run(self._scalar(self.admin_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        except Exception as error:  # reported, not fatal: the figures are already in
            print(f"bench: warning: could not drop database {self.name}: {error}", file=sys.stderr)

    def count_audit_rows(self) -> int:
        return int(asyncio.run(self._scalar(self.url, "SELECT count(*) FROM audit_events")))


def create_scratch_databases(admin_url: str, revisions: Sequence[str]) -> dict[str, ScratchPostgres] | None:
    """One scratch database per revision; None (with a warning) when the server is not usable."""
    created: dict[str, ScratchPostgres] = {}
    try:
        for revision in revisions:
            database = ScratchPostgres(admin_url)
            database.create()
            created[revision] = database
    except Exception as error:
        for database in created.values():
            database.drop()
        print(
            f"bench: warning: PostgreSQL at {admin_url} is not usable ({type(error).__name__}: "
            f"{error}); skipping audit=postgresql",
            file=sys.stderr,
        )
        return None
    return created


def sqlite_audit_rows(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as connection:
        return int(connection.execute("SELECT count(*) FROM audit_events").fetchone()[0])


def audit_dropped(metrics_url: str) -> int:
    """The audit writer's drop counter, from the gateway's /metrics."""
    status, text = http("GET", metrics_url)
    for line in text.splitlines():
        if line.startswith("oap_audit_dropped_events "):
            return int(float(line.split()[1]))
    raise BenchError(f"{metrics_url} ({status}) has no oap_audit_dropped_events")


class AuditedTarget(Protocol):
    name: str
    audit_on: bool
    audit_rows: Callable[[], int] | None
    runs: list[Run]


def check_audit_rows(targets: Sequence[AuditedTarget]) -> dict[str, int]:
    """Rows per target; a BenchError when an audit target lost rows or an audit-off one wrote any."""
    time.sleep(WRITER_SETTLE_SECONDS)
    found: dict[str, int] = {}
    for target in targets:
        if target.audit_rows is None:
            continue
        rows = target.audit_rows()
        found[target.name] = rows
        served = sum(r.requests for r in target.runs)
        dropped = sum(r.audit_dropped or 0 for r in target.runs)
        if target.audit_on and rows < served - dropped:
            raise BenchError(f"{target.name}: {rows} audit rows for {served} requests served")
        if not target.audit_on and rows:
            raise BenchError(f"{target.name}: AUDIT_ENABLED=false, yet {rows} audit rows")
    return found
