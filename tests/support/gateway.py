"""Start the gateway for a test, from a YAML string (or a dict) plus settings overrides.

Three flavours, same inputs (`config`: YAML text or a mapping with `backends:`/`agents:`; `settings`: values for
`Settings` fields such as `MAX_BODY_BYTES` or `ALLOWED_ORIGINS`):

- `running_gateway(config, settings=…)` — async context manager: the real app (`build_app`) on an aiohttp
  `AppRunner(handler_cancellation=True)` bound to 127.0.0.1:<ephemeral> inside the test's own event loop. Fast
  (milliseconds), so every test can have its own gateway. Clients in the same test must be async.
- `threaded_gateway(config, settings=…)` — sync context manager: the same app in its own event loop on a
  background thread, for sync tests and tools that block (subprocess.run of a Node client, benchmarks).
- `gateway_process(config, settings=…)` — sync context manager: `okta-agent-proxy serve --config … --env-file
  /dev/null --port N` as a subprocess (settings become environment variables), ready once `/healthz` answers 200;
  yields a `tests.support.processes.ServerProcess` (`.url(path)`, `.describe()`, `.output()`).

Unless the caller sets it, `GATEWAY_BASE_URL` is the address actually served (`http://127.0.0.1:PORT`), so the
default `ALLOWED_ORIGINS` is that origin and the default `ALLOWED_HOSTS` (`127.0.0.1`, `localhost`, any port)
accept the test's requests. Only 127.0.0.1 is ever bound.

Helpers build backend entries: `psk_backend(url, "/path", key=…)`, `basic_backend(url, "/path", …)`, and
`gateway_config(name=entry, …)` → YAML text.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from okta_agent_proxy.app import build_app, server_events
from okta_agent_proxy.config.loader import LoadedConfig, load
from okta_agent_proxy.http.server import ConnectionLimits, GatewayRunner

from .processes import LOOPBACK, ServerProcess, start_server

__all__ = [
    "DEFAULT_BASIC",
    "DEFAULT_KEY",
    "RunningGateway",
    "basic_backend",
    "gateway_config",
    "gateway_process",
    "load_config",
    "psk_backend",
    "running_gateway",
    "threaded_gateway",
]

DEFAULT_KEY = "test-backend-key-0123456789"
DEFAULT_BASIC = ("svc-gateway", "test-backend-password")
ConfigInput = str | Mapping[str, Any]


@dataclass(frozen=True)
class RunningGateway:
    """A gateway serving on 127.0.0.1:`port`."""

    port: int
    loaded: LoadedConfig

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path


def psk_backend(
    url: str, *paths: str, key: str = DEFAULT_KEY, header_name: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A `pre-shared-key` backend entry; `extra` adds keys such as `timeout_seconds` or `forward_headers`."""
    auth: dict[str, Any] = {"key": key}
    if header_name is not None:
        auth["header_name"] = header_name
    return {"url": url, "paths": list(paths), "auth_method": "pre-shared-key", "auth_config": auth, **extra}


def basic_backend(
    url: str, *paths: str, username: str = DEFAULT_BASIC[0], password: str = DEFAULT_BASIC[1], **extra: Any
) -> dict[str, Any]:
    """A `service-account` (HTTP Basic) backend entry."""
    auth = {"username": username, "password": password}
    return {"url": url, "paths": list(paths), "auth_method": "service-account", "auth_config": auth, **extra}


def gateway_config(**backends: Mapping[str, Any]) -> str:
    """YAML text with the given backends (name=entry) and no agents."""
    return yaml.safe_dump({"backends": {name: dict(entry) for name, entry in backends.items()}}, sort_keys=False)


def _yaml_text(config: ConfigInput) -> str:
    return config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)


def _with_base_url(settings: Mapping[str, Any] | None, port: int) -> dict[str, Any]:
    values = dict(settings or {})
    values.setdefault("GATEWAY_BASE_URL", f"http://{LOOPBACK}:{port}")
    values.setdefault("GATEWAY_PORT", port)
    return values


def load_config(
    config: ConfigInput,
    directory: Path,
    *,
    settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Write the YAML to `directory/config.yaml` and load it as `serve` would (no `.env`; `settings` win)."""
    path = directory / "config.yaml"
    path.write_text(_yaml_text(config), encoding="utf-8")
    overrides = {"DATA_DIR": str(directory), **(settings or {})}  # session.key there, never in ./data/
    return load(path, environ=dict(environ or {}), env_file=None, overrides=overrides)


def bound_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, for a server to start on (the port is known before it does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


@asynccontextmanager
async def _serve(sock: socket.socket, loaded: LoadedConfig) -> AsyncIterator[None]:
    runner = GatewayRunner(
        build_app(loaded),
        limits=ConnectionLimits.from_settings(loaded.settings),
        events=server_events(),
        handler_cancellation=True,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_gateway(
    config: ConfigInput,
    *,
    settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[RunningGateway]:
    """The gateway in the current event loop; `environ` resolves `${NAME}` references in the YAML."""
    with bound_socket() as sock, tempfile.TemporaryDirectory(prefix="oap-gateway-") as tmp:
        port: int = sock.getsockname()[1]
        loaded = load_config(config, Path(tmp), settings=_with_base_url(settings, port), environ=environ)
        async with _serve(sock, loaded):
            yield RunningGateway(port, loaded)


@contextmanager
def threaded_gateway(
    config: ConfigInput,
    *,
    settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    start_timeout: float = 10.0,
) -> Iterator[RunningGateway]:
    """The gateway in its own event loop on a daemon thread (for sync callers)."""
    with bound_socket() as sock, tempfile.TemporaryDirectory(prefix="oap-gateway-") as tmp:
        port: int = sock.getsockname()[1]
        loaded = load_config(config, Path(tmp), settings=_with_base_url(settings, port), environ=environ)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        stopping: asyncio.Event | None = None
        failure: list[BaseException] = []

        async def main() -> None:
            nonlocal stopping
            stopping = asyncio.Event()
            try:
                async with _serve(sock, loaded):
                    ready.set()
                    await stopping.wait()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready.set()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="gateway", daemon=True)
        thread.start()
        try:
            if not ready.wait(start_timeout) or failure:
                raise RuntimeError(f"the threaded gateway did not start: {failure!r}")
            yield RunningGateway(port, loaded)
        finally:
            if stopping is not None:
                loop.call_soon_threadsafe(stopping.set)
            thread.join(start_timeout)
            if not thread.is_alive():
                loop.close()


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("okta-agent-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "okta_agent_proxy"]


@contextmanager
def gateway_process(
    config: ConfigInput,
    *,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    timeout: float = 30.0,
    open_files: int | None = None,
) -> Iterator[ServerProcess]:
    """`okta-agent-proxy serve` as a subprocess; `settings` are passed as environment variables on top of `env`
    (default: this process's environment), `LOG_LEVEL` defaults to WARNING, `SHUTDOWN_DRAIN_SECONDS` to 0 and
    `DATABASE_URL` to a SQLite file in a temporary directory. `open_files` lowers the process's open-file limit
    (prlimit)."""
    with tempfile.TemporaryDirectory(prefix="oap-gateway-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(_yaml_text(config), encoding="utf-8")
        base_env = dict(os.environ if env is None else env)
        base_env.setdefault("LOG_LEVEL", "WARNING")
        # No load balancer to tell: a test's SIGTERM stops at once (requests in flight still get the grace).
        base_env.setdefault("SHUTDOWN_DRAIN_SECONDS", "0")
        base_env["DATABASE_URL"] = f"sqlite:///{Path(tmp) / 'audit.db'}"  # never the working directory's ./data/
        base_env.setdefault("DATA_DIR", tmp)
        base_env.update({name: str(value) for name, value in (settings or {}).items()})
        set_base_url = "GATEWAY_BASE_URL" not in base_env

        def command(port: int) -> list[str]:
            # The port is only known here, so the base URL travels on the command line (via env(1)).
            prefix = ["env", f"GATEWAY_BASE_URL=http://{LOOPBACK}:{port}"] if set_base_url else []
            if open_files is not None:
                prefix = ["prlimit", f"--nofile={open_files}:{open_files}", "--", *prefix]
            serve = ["serve", "--config", str(path), "--env-file", "/dev/null", "--port", str(port)]
            return [*prefix, *_cli(), *serve, "--workers", str(workers)]

        with start_server(
            command, http_path="/healthz", expect_status=200, env=base_env, timeout=timeout, name="gateway"
        ) as server:
            yield server
