"""`serve --workers 2`: two processes on one port, and /metrics counts every request whichever worker served it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import BACKEND_SESSION_ID, running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend

pytestmark = pytest.mark.slow
BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}})
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
REQUESTS = 60
MAX_REQUESTS = 2000


def requests_total(text: str, family_name: str = "oap_requests", sample_name: str = "oap_requests_total") -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == family_name
        for sample in family.samples
        if sample.name == sample_name and sample.labels.get("backend") == "a"
    )


def durations_counted(text: str) -> float:
    return requests_total(text, "oap_request_duration_seconds", "oap_request_duration_seconds_count")


def replicas(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        return {row[0] for row in connection.execute("SELECT replica FROM audit_events")}


async def test_two_workers_share_the_port_and_their_metrics(tmp_path: Path) -> None:
    database, data = tmp_path / "audit.db", tmp_path / "data"
    stale = data / "metrics" / "counter_99999.db"  # a crashed run's samples: must not count again
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 64)
    async with running_backend() as backend:
        config = gateway_config(a=psk_backend(backend.url("/mcp"), "/a"))
        settings = {"DATABASE_URL": f"sqlite:///{database}", "DATA_DIR": str(data)}
        with gateway_process(config, settings=settings, workers=2) as gateway:
            # Fresh connections each time, so the kernel spreads them over both workers; the second worker may
            # still be starting when the first answers /healthz, so keep going (bounded) until both have served.
            sent = 0
            while sent < MAX_REQUESTS and (sent < REQUESTS or len(replicas(database)) < 2):
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
                    http.post(gateway.url("/a"), data=BODY, headers=HEADERS) as response,
                ):
                    assert response.status == 200
                sent += 1
            assert len({record.headers.get("X-Request-ID") for record in backend.requests}) == sent
            totals, durations = set(), set()
            for _ in range(6):
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
                    http.get(gateway.url("/metrics")) as response,
                ):
                    text = await response.text()
                    totals.add(requests_total(text))
                    durations.add(durations_counted(text))
                await asyncio.sleep(0)
            assert totals == {sent} and durations == {sent}  # counters and histograms, summed over both
            assert len(replicas(database)) == 2  # both workers served, each writing its own audit rows
            # The samples live in DATA_DIR/metrics, one file per worker and kind, emptied of older runs' at start.
            files = {path.name for path in (data / "metrics").iterdir()}
            assert stale.name not in files
            assert len({name for name in files if name.startswith("counter_")}) == 2, files


SESSION_REQUESTS = 200
INITIALIZE = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}
)


async def test_a_session_continues_on_any_of_four_workers_without_shared_state(tmp_path: Path) -> None:
    """Issue 13: no Redis, no SESSION_SECRET: the workers seal and open session ids with the key the first of them
    generated into DATA_DIR, so a session begun on one worker continues on every other."""
    database, data = tmp_path / "audit.db", tmp_path / "data"
    async with running_backend() as backend:
        config = gateway_config(a=psk_backend(backend.url("/mcp"), "/a"))
        settings = {"DATABASE_URL": f"sqlite:///{database}", "DATA_DIR": str(data)}
        with gateway_process(config, settings=settings, workers=4) as gateway:
            async with (
                aiohttp.ClientSession() as http,
                http.post(gateway.url("/a"), data=INITIALIZE, headers=HEADERS) as response,
            ):
                assert response.status == 200
                session = response.headers["Mcp-Session-Id"]
            statuses: list[int] = []
            # Fresh connections, so the kernel spreads them over the workers; some may still be starting when the
            # first answers, so keep going (bounded) until at least three have served the session.
            while len(statuses) < MAX_REQUESTS and (len(statuses) < SESSION_REQUESTS or len(replicas(database)) < 3):
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
                    http.post(gateway.url("/a"), data=BODY, headers={**HEADERS, "Mcp-Session-Id": session}) as answer,
                ):
                    statuses.append(answer.status)
            served_by = replicas(database)
    assert statuses == [200] * len(statuses) and len(statuses) >= SESSION_REQUESTS
    assert len(served_by) >= 3, served_by  # the session went on on workers other than the one that began it
    posts = [r for r in backend.requests if r.method == "POST"][1:]
    assert [r.headers.get("Mcp-Session-Id") for r in posts] == [BACKEND_SESSION_ID] * len(statuses)
    assert (data / "session.key").is_file()
