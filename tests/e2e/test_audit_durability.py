"""Audit durability of `okta-agent-proxy serve` as a process (issue 5): what a clean stop keeps, what a crash can lose.

- 1,000 requests (20 at a time), then SIGTERM right after the last answer → exactly those 1,000 rows in the SQLite
  file once the process has exited (`close()` flushed the queue). SIGTERM under load: every answer has its row.
- `kill -9` under load: every row whose batch was committed survives; what is lost is at most what was still
  queued. The writer `serve` starts is `AuditWriter`'s defaults (store/audit.py): a batch is committed when
  `MAX_BATCH` events wait or `MAX_DELAY` seconds after the first of them arrived. So the bound asserted is
  `MAX_BATCH + queue_size` (the queue cannot hold more, and one batch may be in the middle of its INSERT), and in time:
  every request answered more than `SETTLE_SECONDS` before the kill has its row. The measured loss is printed and
  recorded as test properties (`lost`, `answered`, `answered_in_last_max_delay`, …).
- A restart on the same file keeps every row written before the crash and adds the new ones.
- `okta-agent-proxy audit --json --last 5` on that file prints the 5 most recent rows as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from okta_agent_proxy.store.audit import MAX_DELAY
from okta_agent_proxy.store.audit_inserts import ThreadInserter
from okta_agent_proxy.store.events import AuditEvent
from tests.support.backends import running_backend
from tests.support.gateway import DEFAULT_KEY, gateway_config, gateway_process, psk_backend
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow
REQUESTS = 1000
CONCURRENCY = 20
MAX_BATCH = ThreadInserter.max_batch  # the writer `serve` starts on a SQLite file uses it, and MAX_DELAY
QUEUE_SIZE = 2000  # audit.queue_size for these tests (with when_full: block, nothing is dropped)
LOAD_SECONDS = 2.5  # how long the load runs before the kill -9 (several SETTLE_SECONDS, so old rows are checked)
SETTLE_SECONDS = 1.0  # MAX_DELAY plus a generous allowance for the INSERT and a busy 2-core machine
BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}).encode()
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
Answered = dict[str, float]  # request id → time.monotonic() when its answer was complete


def config(backend_url: str) -> str:
    text = gateway_config(a=psk_backend(backend_url, "/a"))
    return text + f"audit:\n  queue_size: {QUEUE_SIZE}\n  when_full: block\n"


def stored_ids(database: Path) -> Counter[str]:
    """Request ids of the rows in the SQLite file (a fresh connection: it recovers the WAL of a killed writer)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return Counter(row[0] for row in connection.execute("SELECT request_id FROM audit_events"))


async def drive(
    url: str, next_id: Callable[[], str | None], answered: Answered, *, concurrency: int = CONCURRENCY
) -> None:
    """`concurrency` clients sending requests with the ids `next_id()` gives until it gives None; a request counts
    as answered once its whole 200 response is in. Transport errors end a client (the server went away)."""

    async def client(http: aiohttp.ClientSession) -> None:
        while (request_id := next_id()) is not None:
            try:
                async with http.post(url, data=BODY, headers={**HEADERS, "X-Request-ID": request_id}) as response:
                    await response.read()
                    if response.status == 200:
                        answered[request_id] = time.monotonic()
            except (TimeoutError, aiohttp.ClientError):
                return

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))


class Ids:
    """`prefix-000000`, `prefix-000001`, … up to `count` (None: until `stopped`); `issued` counts them."""

    def __init__(self, prefix: str, count: int | None = None) -> None:
        self.prefix, self.count = prefix, count
        self.issued = 0
        self.stopped = False

    def __call__(self) -> str | None:
        if self.stopped or (self.count is not None and self.issued >= self.count):
            return None
        self.issued += 1
        return f"{self.prefix}-{self.issued - 1:06d}"


async def stop(gateway: ServerProcess) -> int:
    """SIGTERM (graceful: the audit queue is flushed before exit) and the exit code; off the event loop, which
    keeps serving the backend meanwhile."""
    return await asyncio.to_thread(gateway.stop, 30.0)


def cli() -> list[str]:
    script = Path(sys.executable).with_name("okta-agent-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "okta_agent_proxy"]


async def test_sigterm_after_1000_requests_keeps_1000_rows(tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    async with running_backend() as backend:
        settings = {"DATABASE_URL": f"sqlite:///{database}"}
        with gateway_process(config(backend.url("/mcp")), settings=settings) as gateway:
            answered: Answered = {}
            await drive(gateway.url("/a"), Ids("term", REQUESTS), answered)
            assert len(answered) == REQUESTS, gateway.describe()
            queued = REQUESTS - sum(stored_ids(database).values())  # likely the last batch: it is not written yet
            assert await stop(gateway) == 0, gateway.describe()  # at once
            print(f"SIGTERM with about {queued} of {REQUESTS} rows not yet written")
        assert all(record.headers["X-API-Key"] == DEFAULT_KEY for record in backend.requests)
    rows = stored_ids(database)
    assert sum(rows.values()) == REQUESTS
    assert rows == Counter(answered.keys())


async def test_sigterm_under_load_keeps_a_row_for_every_answer(tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    async with running_backend() as backend:
        settings = {"DATABASE_URL": f"sqlite:///{database}"}
        with gateway_process(config(backend.url("/mcp")), settings=settings) as gateway:
            answered: Answered = {}
            ids = Ids("busy")
            load = asyncio.create_task(drive(gateway.url("/a"), ids, answered))
            deadline = time.monotonic() + 30
            while len(answered) < REQUESTS and not load.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert len(answered) >= REQUESTS, gateway.describe()
            assert await stop(gateway) == 0, gateway.describe()  # while requests are in flight
            ids.stopped = True
            await asyncio.wait_for(load, 30)
    rows = stored_ids(database)
    assert max(rows.values()) == 1
    assert set(answered) <= set(rows), f"{len(set(answered) - set(rows))} answered requests have no row"
    assert set(rows) <= {f"busy-{i:06d}" for i in range(ids.issued)}  # at most the in-flight ones besides


async def test_kill_9_loses_at_most_the_queue_and_a_restart_keeps_every_row(
    tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    database = tmp_path / "audit.db"
    settings = {"DATABASE_URL": f"sqlite:///{database}"}
    async with running_backend() as backend:
        answered: Answered = {}
        with gateway_process(config(backend.url("/mcp")), settings=settings) as gateway:
            ids = Ids("crash")
            load = asyncio.create_task(drive(gateway.url("/a"), ids, answered))
            started = time.monotonic()
            while time.monotonic() < started + LOAD_SECONDS and not load.done():
                await asyncio.sleep(0.01)
            assert not load.done() and len(answered) >= CONCURRENCY, gateway.describe()
            killed_at = time.monotonic()
            os.killpg(gateway.process.pid, signal.SIGKILL)  # mid-load: requests are in flight
            ids.stopped = True
            await asyncio.wait_for(load, 30)
            assert await asyncio.to_thread(gateway.process.wait, 10) == -signal.SIGKILL
        rows = stored_ids(database)
        lost = sorted(set(answered) - set(rows))
        rate = len(answered) / (killed_at - started)
        measured = {
            "answered": len(answered),
            "rows": sum(rows.values()),
            "lost": len(lost),
            "answered_per_second": round(rate),
            "answered_in_last_max_delay": sum(1 for t in answered.values() if t > killed_at - MAX_DELAY),
            "answered_in_last_settle": sum(1 for t in answered.values() if t > killed_at - SETTLE_SECONDS),
            "oldest_lost_before_kill_ms": round((killed_at - min(answered[i] for i in lost)) * 1000) if lost else 0,
            "bound": MAX_BATCH + QUEUE_SIZE,
        }
        for name, value in measured.items():
            record_property(name, value)
        print(f"kill -9 durability: {json.dumps(measured)}")
        assert max(rows.values()) == 1  # never a row twice
        assert set(rows) <= {f"crash-{i:06d}" for i in range(ids.issued)}
        assert len(lost) <= MAX_BATCH + QUEUE_SIZE
        assert len(answered) - measured["answered_in_last_settle"] >= 500  # the check below has rows to look at
        old_lost = [i for i in lost if answered[i] < killed_at - SETTLE_SECONDS]
        assert not old_lost, f"rows lost for requests answered over {SETTLE_SECONDS}s before the crash: {measured}"

        # A restart on the same file keeps every row written before the crash and adds the new ones.
        with gateway_process(config(backend.url("/mcp")), settings=settings) as gateway:
            after: Answered = {}
            await drive(gateway.url("/a"), Ids("restart", 10), after, concurrency=1)
            assert len(after) == 10
            assert await stop(gateway) == 0, gateway.describe()
        assert stored_ids(database) == rows + Counter(after.keys())

    result = await asyncio.to_thread(
        subprocess.run,
        [
            *cli(),
            "audit",
            "--json",
            "--last",
            "5",
            "--database-url",
            f"sqlite:///{database}",
            "--env-file",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5, result.stdout
    events = [json.loads(line) for line in lines]
    fields = {"id", *AuditEvent._fields}
    assert all(set(event) == fields for event in events), events[0]
    assert [event["request_id"] for event in events] == [f"restart-{i:06d}" for i in range(5, 10)]  # oldest first
    for event in events:
        assert (event["http_method"], event["path"], event["backend"]) == ("POST", "/a", "a")
        assert (event["status"], event["outcome"], event["upstream_status"]) == (200, "ok", 200)
        assert (event["credential_method"], event["mcp_method"], event["jsonrpc_id"]) == ("pre-shared-key", "ping", "1")
        assert event["bytes_in"] == len(BODY) and event["bytes_out"] > 0 and event["latency_ms"] > 0
        assert datetime.fromisoformat(event["time"]).utcoffset() is not None
        assert event["replica"]
    assert [event["id"] for event in events] == sorted(event["id"] for event in events)
