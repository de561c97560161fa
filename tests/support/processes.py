"""Run a server as a subprocess on a free loopback port, wait until it answers, and always clean it up.

Used by every test that drives real software (the gateway CLI, SDK fixture backends, Node peers):
- the port is ephemeral (`free_port()`); the command is a function of the port so a lost bind race (another
  process took the port between our probe and the server's bind) is retried on a fresh port;
- readiness is polled against a deadline (TCP connect, or any HTTP answer on a path) — never a fixed sleep;
- the server runs in its own process group, which is terminated (then killed) on exit, so grandchildren such
  as `npx`-spawned node processes go too; an `atexit` hook covers interrupted runs;
- stdout and stderr go to a temporary file whose tail is put into every failure message.
Only 127.0.0.1 is ever targeted.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "ServerProcess",
    "ServerStartError",
    "free_port",
    "start_server",
    "wait_for_http",
    "wait_for_tcp",
]

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL_SECONDS = 0.05
_live: set[ServerProcess] = set()


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message carries its output tail."""


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(eq=False)
class ServerProcess:
    """A started server: its port, process and captured output."""

    argv: list[str]
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_owned: bool = field(default=True, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, path: str = "") -> str:
        """`http://127.0.0.1:PORT` + `path`."""
        return self.base_url + path

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """Everything the server has written to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output_tail(self, max_chars: int = 4000) -> str:
        text = self.output()
        return text if len(text) <= max_chars else "…" + text[-max_chars:]

    def describe(self) -> str:
        """A multi-line summary for assertion messages: command, exit status and output tail."""
        status = "running" if self.alive() else f"exited with {self.process.returncode}"
        return f"{' '.join(self.argv)} (port {self.port}, {status})\n--- output tail ---\n{self.output_tail()}"

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate the whole process group (SIGTERM, then SIGKILL after `timeout`); return the exit code."""
        _live.discard(self)
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(timeout)
        else:
            # The leader is gone; children it left in the group must not outlive the test.
            _signal_group(self.process, signal.SIGKILL)
        return self.process.returncode

    def close(self) -> None:
        """Stop the server and delete its log file (when the log was a temporary one)."""
        self.stop()
        if self._log_owned:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader, so its pgid is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.stop(timeout=2.0)


def wait_for_tcp(port: int, deadline: float, *, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll until 127.0.0.1:`port` accepts a connection (True) or `deadline` (monotonic) passes or `alive()`
    turns false (False)."""
    while alive() and time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(_POLL_INTERVAL_SECONDS)
    return False


def wait_for_http(
    port: int,
    path: str,
    deadline: float,
    *,
    expect_status: int | None = None,
    alive: Callable[[], bool] = lambda: True,
) -> int | None:
    """Poll `GET http://127.0.0.1:port{path}` until the server answers (with `expect_status` when given).

    Returns the status, or None when no (matching) answer came before `deadline` or `alive()` turned false.
    Any answer counts by default: an MCP endpoint answers a bare GET with 400/405/406, which still proves the
    HTTP stack is up.
    """
    while alive() and time.monotonic() < deadline:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
        try:
            conn.request("GET", path, headers={"Accept": "*/*"})
            status = conn.getresponse().status
            if expect_status is None or status == expect_status:
                return status
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(_POLL_INTERVAL_SECONDS)
    return None


def start_server(
    command: Callable[[int], Sequence[str]],
    *,
    http_path: str | None = None,
    expect_status: int | None = None,
    env: Mapping[str, str] | Callable[[int], Mapping[str, str]] | None = None,
    cwd: Path | None = None,
    timeout: float = 30.0,
    log_dir: Path | None = None,
    name: str = "server",
    attempts: int = 3,
) -> ServerProcess:
    """Start `command(port)` on a free port and wait until it is ready.

    `env` (default: inherit) may also be a function of the port, for servers configured by environment
    (`lambda port: {**env_with_node22(), "PORT": str(port)}`).

    Ready means: a TCP connect succeeds, or — with `http_path` — a GET on that path gets an HTTP answer
    (`expect_status` when given). If the process exits before it is ready (typically: the port was taken in
    the meantime), it is retried on a new port up to `attempts` times. Raises `ServerStartError` with the
    output tail when it never becomes ready. The caller owns the returned process; it is a context manager:
    `with start_server(lambda port: [...], http_path="/mcp") as server: ...`.
    """
    failures: list[str] = []
    for _ in range(attempts):
        port = free_port()
        argv = [str(arg) for arg in command(port)]
        port_env = env(port) if callable(env) else env
        server = _spawn(argv, port, env=port_env, cwd=cwd, log_dir=log_dir, name=name)
        deadline = time.monotonic() + timeout
        if http_path is None:
            ready = wait_for_tcp(port, deadline, alive=server.alive)
        else:
            status = wait_for_http(port, http_path, deadline, expect_status=expect_status, alive=server.alive)
            ready = status is not None
        if ready and server.alive():
            return server
        exited = not server.alive()
        failures.append(server.describe())
        server.close()
        if not exited:
            raise ServerStartError(f"{name} not ready after {timeout:.0f}s: {failures[-1]}")
    raise ServerStartError(f"{name} exited before it was ready ({attempts} attempts); last: {failures[-1]}")


def _spawn(
    argv: list[str],
    port: int,
    *,
    env: Mapping[str, str] | None,
    cwd: Path | None,
    log_dir: Path | None,
    name: str,
) -> ServerProcess:
    fd, log_name = tempfile.mkstemp(prefix=f"oap-{name}-{port}-", suffix=".log", dir=log_dir)
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    server = ServerProcess(argv, port, process, Path(log_name), _log_owned=log_dir is None)
    _live.add(server)
    return server
