"""The bench's processes and tools: subprocesses with a log file, loopback HTTP without proxies, wrk and nginx.

Every process the bench starts is a `Service`: its output goes to a file in the run's temporary directory (shown
when it dies), and `services()` stops them all at the end, newest first, also on an error or Ctrl-C. Readiness is
polled with a deadline, never slept for. `machine()` is the line that says where the figures come from.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from email.message import Message
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STARTUP_SECONDS = 30.0
STOP_SECONDS = 15.0


class BenchError(Exception):
    """Something is broken (a tool, a process, a misconfigured target): the run's figures would mean nothing."""


# --- tools -------------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/local/sbin") / name) if p.exists()), None
    )


def ensure_tools() -> tuple[str, str]:
    wrk, nginx = find_tool("wrk"), find_tool("nginx")
    if wrk and nginx:
        return wrk, nginx
    missing = " and ".join(n for n, p in (("wrk", wrk), ("nginx", nginx)) if not p)
    if os.geteuid() != 0:
        raise BenchError(
            f"{missing} not found. Install them (Debian/Ubuntu: sudo apt-get install -y wrk nginx-light) "
            "or run this as root, which installs them."
        )
    print(f"bench: {missing} not found; installing wrk and nginx-light with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk", "nginx-light"]):
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise BenchError(f"`{' '.join(command)}` failed")
    wrk, nginx = find_tool("wrk"), find_tool("nginx")
    if not (wrk and nginx):
        raise BenchError("wrk or nginx is still missing after apt-get install")
    return wrk, nginx


def tool_version(command: Sequence[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def git_describe(revision: str | None = None) -> str:
    """`git describe --always` of `revision`, or of the working tree (`--dirty`) when None; "" when unknown."""
    command = ["git", "-C", str(HERE.parent), "describe", "--always"]
    command += [revision] if revision is not None else ["--dirty"]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for package in ("okta-agent-proxy", "aiohttp", "uvloop"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "?"
    return {
        "revision": git_describe() or "?",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0)),  # the affinity set: what this process may run on
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


# --- processes -----------------------------------------------------------------------------------------------------


def ephemeral_ports() -> range:
    """The ports the kernel hands to `bind(0)` and to outgoing connections (Linux's default when unknown)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port below the ephemeral range, never the same twice in one run.

    Not `bind(0)`: that takes a port from the ephemeral range, where any process's next outgoing connection or
    `bind(0)` (a test suite running meanwhile, our own load) can take it before the target binds it. The target then
    exits while whatever holds the port answers in its place.
    """
    low = ephemeral_ports().start
    candidates = [port for port in range(max(1024, low - 12000), low) if port not in _handed_out]
    random.shuffle(candidates)
    for port in candidates[:500]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # an unusual ip_local_port_range leaves no room below it
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A subprocess with its output in a log file; `stop` ends it (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self, name: str, command: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{name.replace(' ', '_').replace('=', '-')}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_SECONDS)


@contextmanager
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy from the env


def http(method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    status, _, text = http_exchange(method, url, body, headers)
    return status, text


def http_exchange(
    method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Message, str]:
    """One request: the status, the response headers and the body."""
    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _DIRECT.open(request, timeout=5) as response:
            return int(response.status), response.headers, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode(errors="replace")


def wait_ready(service: Service, url: str) -> None:
    """Poll `url` until it answers (any status), the process dies, or the deadline passes."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        service.check_alive()
        try:
            http("GET", url)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{service.name} did not answer at {url} within {STARTUP_SECONDS:.0f} s")
        time.sleep(0.05)
