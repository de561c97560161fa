"""Config reload in a running `okta-agent-proxy serve`: by file change and by SIGHUP (a rotated secret file, which
the file watcher does not see).

A valid change takes effect while a slow request started under the old config completes untouched; an invalid one
is refused with every problem logged, and the old config keeps serving. Each applied change is in config_history.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend

pytestmark = pytest.mark.slow
BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url, data=BODY, headers=HEADERS) as response:
        await response.read()
        return response.status


async def wait_for_status(http: aiohttp.ClientSession, url: str, expected: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    seen = None
    while time.monotonic() < deadline:
        seen = await status_of(http, url)
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} answered {seen}, expected {expected}")


def history_rows(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return int(connection.execute("SELECT count(*) FROM config_history").fetchone()[0])


async def test_reload_by_file_change_keeps_in_flight_requests_and_refuses_a_bad_file(tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    async with running_backend(delay=6.0) as backend, aiohttp.ClientSession() as http:
        first = gateway_config(a=psk_backend(backend.url("/slow"), "/a"))
        second = gateway_config(a=psk_backend(backend.url("/slow"), "/a"), b=psk_backend(backend.url("/mcp"), "/b"))
        with gateway_process(first, settings={"DATABASE_URL": f"sqlite:///{database}"}) as gateway:
            config_path = Path(gateway.argv[gateway.argv.index("--config") + 1])
            assert await status_of(http, gateway.url("/b")) == 404
            in_flight = asyncio.ensure_future(status_of(http, gateway.url("/a")))
            await backend.wait_for_requests(1)
            config_path.write_text(second, encoding="utf-8")
            await wait_for_status(http, gateway.url("/b"), 200)
            assert not in_flight.done()  # the reload happened while the slow request was still running
            assert await in_flight == 200
            assert history_rows(database) == 2

            broken = "backends:\n  a:\n    url: nope\n    paths: [x]\n    auth_method: pre-shared-key\n"
            config_path.write_text(broken + "    auth_config: {key: k}\n", encoding="utf-8")
            deadline = time.monotonic() + 15
            while "config_reload_rejected" not in gateway.output() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert "config_reload_rejected" in gateway.output(), gateway.describe()
            assert "backends.a.paths[0]" in gateway.output() and "backends.a.url" in gateway.output()
            assert await status_of(http, gateway.url("/b")) == 200  # the old config keeps serving
            assert gateway.alive()
            assert history_rows(database) == 2


async def test_reload_on_sighup_applies_a_rotated_secret_file(tmp_path: Path) -> None:
    """SIGHUP, proved by a change the file watcher cannot see: it watches the YAML's bytes, and here only the
    `{file: …}` secret the YAML references changes. The new key must reach the backend."""
    key_file = tmp_path / "a.key"
    key_file.write_text("first-key-0123456789\n")
    async with running_backend() as backend, aiohttp.ClientSession() as http:
        entry = psk_backend(backend.url("/mcp"), "/a")
        entry["auth_config"]["key"] = {"file": str(key_file)}
        with gateway_process(gateway_config(a=entry)) as gateway:
            assert await status_of(http, gateway.url("/a")) == 200
            assert (await backend.last_request()).headers["X-API-Key"] == "first-key-0123456789"
            key_file.write_text("second-key-0123456789\n")
            gateway.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while (await backend.last_request()).headers["X-API-Key"] != "second-key-0123456789":
                assert time.monotonic() < deadline, gateway.describe()
                assert gateway.alive(), gateway.describe()
                await asyncio.sleep(0.1)
                assert await status_of(http, gateway.url("/a")) == 200
