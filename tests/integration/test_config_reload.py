"""ConfigReloader driving a served gateway (the real app on loopback, a recording backend behind it).

- A config whose `${NAME}` secrets came from the environment given at start (as the demo passes them) reloads after
  an edit: a reload resolves against the same snapshot, not against the process environment of the moment.
- A refused file (a duplicate key too) is logged once however many times the watcher polls it; SIGHUP always tries
  and logs.
- A rotated `{file: …}` secret applies on SIGHUP although the YAML's bytes did not change.
- The log of an applied reload names what changed, never a value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp import web

from okta_agent_proxy.app import GATEWAY, build_app
from okta_agent_proxy.config.loader import LoadedConfig, load
from okta_agent_proxy.gateway import Gateway
from okta_agent_proxy.reload import ConfigReloader
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import bound_socket

POLL = 0.02
START_SECRET = "partners-key-given-at-start-only-5e1f"
BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
Events = list[MutableMapping[str, Any]]


@asynccontextmanager
async def served(loaded: LoadedConfig, sock: Any) -> AsyncIterator[Gateway]:
    app = build_app(loaded)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield app[GATEWAY]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def reloading_gateway(
    path: Path, text: str, environ: dict[str, str]
) -> AsyncIterator[tuple[str, ConfigReloader]]:
    """The gateway serving `text` (written to `path`): its URL, and its reloader, watching the file."""
    path.write_text(text)
    with bound_socket() as sock:
        port = sock.getsockname()[1]
        settings = {"GATEWAY_BASE_URL": f"http://127.0.0.1:{port}", "GATEWAY_PORT": port, "OKTA_ISSUER": None}
        loaded = load(path, environ=environ, env_file=None, overrides=settings)
        async with served(loaded, sock) as gateway:
            reloader = ConfigReloader(gateway, loaded, None, poll_seconds=POLL, settle_seconds=POLL)
            watcher = asyncio.ensure_future(reloader.watch())
            try:
                yield f"http://127.0.0.1:{port}", reloader
            finally:
                watcher.cancel()


def partners_config(backend: RecordingBackend, *paths: str, key: Any = "${DEMO_PARTNERS_KEY}") -> str:
    auth = {"key": key}
    entry = {"url": backend.url("/mcp"), "paths": list(paths), "auth_method": "pre-shared-key", "auth_config": auth}
    return yaml.safe_dump({"backends": {"partners": entry}}, sort_keys=False)


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url, data=BODY, headers=HEADERS) as response:
        await response.read()
        return response.status


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(POLL)


def named(events: Events, name: str) -> Events:
    return [event for event in events if event["event"] == name]


async def test_secrets_given_at_start_resolve_again_on_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEMO_PARTNERS_KEY", raising=False)  # only the start-time environ has it, as in the demo
    path = tmp_path / "config.yaml"
    async with (
        running_backend() as backend,
        aiohttp.ClientSession() as http,
        reloading_gateway(path, partners_config(backend, "/partners"), {"DEMO_PARTNERS_KEY": START_SECRET}) as (
            base,
            _,
        ),
    ):
        with structlog.testing.capture_logs() as events:
            path.write_text(partners_config(backend, "/partners", "/partners2"))
            deadline = time.monotonic() + 10
            while await status_of(http, base + "/partners2") != 200:
                assert time.monotonic() < deadline, [str(e) for e in named(events, "config_reload_rejected")]
                await asyncio.sleep(POLL)
        assert (await backend.last_request()).headers["X-API-Key"] == START_SECRET
        assert named(events, "config_reload_rejected") == []
        [changed] = named(events, "config_changed")
        assert changed["backends_changed"] == ["partners"]
        assert changed["backends_added"] == changed["backends_removed"] == []
        assert START_SECRET not in repr(events)


async def test_a_refused_file_is_logged_once_per_content_and_on_every_sighup(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    async with (
        running_backend() as backend,
        reloading_gateway(path, partners_config(backend, "/partners"), {"DEMO_PARTNERS_KEY": "k"}) as (_, reloader),
    ):
        good = path.read_text()
        with structlog.testing.capture_logs() as events:
            path.write_text(good.replace("/partners", "no-slash"))
            await until(lambda: len(named(events, "config_reload_rejected")) == 1)
            # Absence needs a window: some 25 polls of the same refused content, none of them logged again.
            await asyncio.sleep(25 * POLL)
            assert len(named(events, "config_reload_rejected")) == 1

            # Another content, logged once: a second `partners:` (PyYAML alone would keep the last, a valid one).
            path.write_text(good.replace("backends:\n", "backends:\n  partners: {url: http://elsewhere/mcp}\n", 1))
            await until(lambda: len(named(events, "config_reload_rejected")) == 2)
            problems = named(events, "config_reload_rejected")[1]["problems"]
            assert {p.split(": ")[1] for p in problems if p.startswith("error: ")} == {"backends.partners"}
            assert await reloader.reload("SIGHUP") is False
            assert await reloader.reload("SIGHUP") is False
            assert len(named(events, "config_reload_rejected")) == 4

            path.write_text(good)  # back to what is serving: nothing to apply
            await until(lambda: len(named(events, "config_reload_unchanged")) == 1)
            await asyncio.sleep(25 * POLL)
        assert len(named(events, "config_reload_rejected")) == 4
        assert named(events, "config_changed") == []


async def test_a_rotated_secret_file_applies_on_sighup(tmp_path: Path) -> None:
    key_file = tmp_path / "partners.key"
    key_file.write_text("first-key-0123456789\n")
    path = tmp_path / "config.yaml"
    async with (
        running_backend() as backend,
        aiohttp.ClientSession() as http,
        reloading_gateway(path, partners_config(backend, "/partners", key={"file": str(key_file)}), {}) as (
            base,
            reloader,
        ),
    ):
        assert await status_of(http, base + "/partners") == 200
        assert (await backend.last_request()).headers["X-API-Key"] == "first-key-0123456789"
        key_file.write_text("second-key-0123456789\n")
        with structlog.testing.capture_logs() as events:
            assert await reloader.reload("SIGHUP") is True
        assert await status_of(http, base + "/partners") == 200
        assert (await backend.last_request()).headers["X-API-Key"] == "second-key-0123456789"
        [changed] = named(events, "config_changed")
        assert changed["backends_changed"] == ["partners"]
        assert "second-key" not in repr(events)
