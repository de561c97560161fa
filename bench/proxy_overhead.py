"""What the gateway costs on the request path, measured against a bare aiohttp pass-through, in one run.

Targets, all on 127.0.0.1 and all in front of the same fixed-JSON backend (nginx `return 200 '{…}'`):

- nginx direct: the backend alone, the ceiling;
- bare: `bench/bare_proxy.py`, ~30 lines of aiohttp on uvloop (read body, forward with one pooled session,
  stream the answer back), one process;
- gateway: `okta-agent-proxy serve` with a pre-shared-key backend, no `OKTA_ISSUER` (no inbound token
  validation), the production log level INFO (one JSON request line per request), `AUDIT_ENABLED=false`;
- gateway log=WARNING: the same without the request line, so the cost of the request log shows;
- gateway jwt: with `OKTA_ISSUER` (the devkit Okta emulator, `bench/idp.py`) and a valid `Authorization: Bearer`
  on every request: validated, then cached;
- gateway audit=sqlite / audit=postgresql: the gateway with its audit writer on (a SQLite file; a scratch
  database on the PostgreSQL server, created and dropped by the bench);
- gateway --workers N (extra line, default N=2; `--workers 0` skips it): N processes on one port, compared with the
  one-process bare proxy.

Load comes from wrk (POST, MCP `tools/list` body, a Lua `done` hook printing the numbers). The targets are measured
in `--rounds` interleaved rounds at `-c32` (bare, gateway, the audit targets, jwt, log=WARNING, one after the
other), so drift on the machine hits all of them alike; each figure of merit is the median of per-round ratios:
gateway/bare (issue 2: ≥ 0.85), jwt/bare (issue 3: ≥ 0.8), audit on/off (issue 5: ≥ 0.90, i.e. audit costs at most
10%). Each comparison also shows the ratio of the two targets' best rounds, which a transient slowdown of the
machine (on a shared VM, invisible in steal time) disturbs less. Latency at concurrency 1 gives the added median
latency (issue 2: ≤ 1 ms). The cost of one uncached RS256 verification is measured without the network
(`bench/jwt_verify.py`).

On a machine with 2+ CPUs the proxy under test is pinned to the last CPU and wrk, nginx and the IdP to the others
(`--no-pin` turns this off). Each run also records, from /proc, the CPU time the target spent per request (a cost
measure that other load on the machine disturbs much less than req/s) and how many cores other processes or the
hypervisor took meanwhile; when that is high, the run's req/s is not trustworthy and the bench says so.

The backend checks what it receives on the gateway's route: the caller's `Authorization` must not arrive and the
pre-shared key must. A non-2xx answer there means the gateway forwarded something it must not, or is
misconfigured; the bench then fails. So does an audit target that wrote fewer rows than it served requests, or an
audit-off target that wrote any. Missing the speed targets is reported, not an error.

Usage: ./run bench [--parts core,jwt,audit,latency,workers] [--rounds 3] [--duration 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv's bin when run as `.venv/bin/python bench/proxy_overhead.py`
BACKEND_BODY = '{"jsonrpc":"2.0","id":1,"result":{}}'
REQUEST_BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
REQUEST_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "Authorization": "Bearer x",  # the caller's token: the gateway must not pass it on
}
PSK_HEADER = "X-API-Key"
PSK_VALUE = "bench-pre-shared-key"
GATEWAY_BACKEND_PATH = "/gateway/mcp"  # the nginx location that checks what the gateway forwards
JWT_AUDIENCE = "api://oap-bench"
STARTUP_SECONDS = 30.0
STOP_SECONDS = 15.0
CORE_RATIO = 0.85  # issue 2: gateway / bare req/s
JWT_RATIO = 0.8  # issue 3: gateway with a JWT on every request / bare
AUDIT_RATIO = 0.9  # issue 5: audit on / audit off (audit costs at most 10%)
ISSUE_ADDED_MS = 1.0  # issue 2: added median latency at c=1
NOISY_CORES = 0.2  # other work on the machine above this (in cores) makes a run's req/s unreliable
PARTS = ("core", "jwt", "audit", "latency", "workers")
AUDIT_DATABASES = ("sqlite", "postgresql")
DEFAULT_POSTGRES_URL = os.environ.get("OAP_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")

# wrk's Lua: the request, then a `done` hook that prints the figures as one JSON line (latencies in microseconds).
WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,' ..
    '"max_us":%.1f,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_script(headers: dict[str, str]) -> str:
    return (
        "\n".join(
            ['wrk.method = "POST"', f"wrk.body = '{REQUEST_BODY}'"]
            + [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
        )
        + WRK_DONE
    )


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
    try:
        revision = subprocess.run(
            ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        revision = ""
    return {
        "revision": revision or "?",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


# --- processes -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
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


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy from the env


def http(method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _DIRECT.open(request, timeout=5) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


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


def probe(service: Service, url: str, headers: dict[str, str]) -> None:
    """One request as wrk sends it; anything but the backend's exact answer is a misconfiguration."""
    status, body = http("POST", url, REQUEST_BODY, headers)
    if status != 200 or body != BACKEND_BODY:
        raise BenchError(
            f"{service.name} at {url} answered {status} {body[:300]!r} instead of 200 {BACKEND_BODY!r}\n"
            f"{service.log_tail()}"
        )


def nginx_config(workdir: Path, port: int) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  default_type application/json;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 '{BACKEND_BODY}'; }}
    location = {GATEWAY_BACKEND_PATH} {{
      if ($http_authorization) {{ return 400 '{{"bench":"the caller Authorization header reached the backend"}}'; }}
      if ($http_{PSK_HEADER.lower().replace("-", "_")} != "{PSK_VALUE}") {{
        return 403 '{{"bench":"the pre-shared key did not reach the backend"}}';
      }}
      return 200 '{BACKEND_BODY}';
    }}
  }}
}}
"""


def gateway_config(backend_port: int, agent_client_id: str | None = None) -> str:
    config = f"""backends:
  bench:
    url: http://127.0.0.1:{backend_port}{GATEWAY_BACKEND_PATH}
    paths: [/mcp]
    auth_method: pre-shared-key
    auth_config:
      key: ${{BENCH_PSK}}
      header_name: {PSK_HEADER}
"""
    if agent_client_id is not None:  # the agent whose app the IdP's token was issued to; default scopes [mcp:read]
        config += f"""agents:
  bench-agent:
    client_id: {agent_client_id}
    backend_access: [bench]
"""
    return config


# --- databases for the audit targets ---------------------------------------------------------------------------


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


# --- wrk -----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    cpu_us_per_request: float | None = None  # CPU time of the target's processes / requests served
    busy_elsewhere_cores: float | None = None  # CPU used meanwhile by processes that are not part of the bench
    steal_cores: float | None = None  # CPU the hypervisor gave to other guests
    audit_dropped: int | None = None  # audit events the writer dropped during the run (queue full)


# --- CPU accounting (Linux /proc; everything is None elsewhere) -------------------------------------------------


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and its live descendants."""
    ticks = 0
    pending = [pid]
    try:
        while pending:
            current = pending.pop()
            try:
                fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
                for task in Path(f"/proc/{current}/task").iterdir():
                    pending += [int(child) for child in (task / "children").read_text().split()]
            except FileNotFoundError:
                if current == pid:
                    raise
    except (OSError, IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def own_cpu_seconds() -> float:
    """This process and its reaped children (wrk runs to completion, so it is counted here)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuMeter:
    """Around one wrk run: the target's CPU per request, and how busy the rest of the machine was."""

    def __init__(self, target_pid: int, our_pids: Sequence[int]) -> None:
        self.target_pid = target_pid
        self.our_pids = list(our_pids)

    def sample(self) -> tuple[float | None, float | None, tuple[float, float] | None, float, float]:
        ours = [tree_cpu_seconds(pid) for pid in self.our_pids]
        known = None if any(x is None for x in ours) else sum(x for x in ours if x is not None)
        return tree_cpu_seconds(self.target_pid), known, machine_cpu_seconds(), own_cpu_seconds(), time.monotonic()

    @staticmethod
    def apply(run: Run, before: Any, after: Any) -> None:
        (t0, k0, m0, o0, w0), (t1, k1, m1, o1, w1) = before, after
        if t0 is not None and t1 is not None and run.requests:
            run.cpu_us_per_request = round((t1 - t0) / run.requests * 1e6, 1)
        wall = w1 - w0
        if k0 is not None and k1 is not None and m0 is not None and m1 is not None and wall > 0:
            elsewhere = (m1[0] - m0[0]) - (k1 - k0) - (o1 - o0)
            run.busy_elsewhere_cores = round(max(0.0, elsewhere) / wall, 2)
            run.steal_cores = round((m1[1] - m0[1]) / wall, 2)


class Wrk:
    def __init__(self, executable: str, threads: int, prefix: Sequence[str] = ()) -> None:
        self.executable = executable
        self.threads = threads
        self.prefix = list(prefix)  # e.g. `taskset -c 0`

    def run(self, target: str, url: str, script: Path, connections: int, seconds: float) -> Run:
        threads = min(self.threads, connections)
        command = [
            *self.prefix,
            self.executable,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "-s",
            str(script),
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if result.returncode != 0 or line is None:
            raise BenchError(f"wrk failed on {target} ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        data = json.loads(line.removeprefix("WRKJSON "))
        seconds_run = data["duration_us"] / 1e6
        # wrk's `status` errors are answers >= 400; `probe` checked for an exact 200 before any load.
        return Run(
            target=target,
            connections=connections,
            requests=data["requests"],
            seconds=round(seconds_run, 3),
            rps=round(data["requests"] / seconds_run, 1) if seconds_run else 0.0,
            p50_ms=data["p50_us"] / 1000,
            p90_ms=data["p90_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            mean_ms=round(data["mean_us"] / 1000, 3),
            max_ms=data["max_us"] / 1000,
            non_2xx=data["status"],
            socket_errors={k: data[k] for k in ("connect", "read", "write", "timeout") if data[k]},
        )


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    latency_duration: float
    warmup: float
    connections: int
    threads: int
    rounds: int
    workers: int
    pin: bool
    parts: tuple[str, ...]
    audit_databases: tuple[str, ...]
    postgres_url: str
    json_path: Path | None


def _choices(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        type=lambda v: _choices(v, PARTS, "part"),
        default=PARTS,
        help="what to measure, comma-separated (default: all of " + ",".join(PARTS) + "). core: nginx direct, bare, "
        "gateway at INFO and WARNING; jwt: gateway with a JWT + the RS256 microbenchmark; audit: audit on/off; "
        "latency: c=1; workers: serve --workers N",
    )
    parser.add_argument(
        "--audit-db",
        dest="audit_databases",
        type=lambda v: _choices(v, AUDIT_DATABASES, "database"),
        default=AUDIT_DATABASES,
        help="audit stores for the audit part (default: sqlite,postgresql)",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL database the bench may connect to and create a scratch database from "
        "(default: $OAP_TEST_POSTGRES_URL or postgresql://127.0.0.1:5432/test)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run (default 5)")
    parser.add_argument("--latency-duration", type=float, default=5.0, help="seconds per c=1 run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per target (default 1)")
    parser.add_argument("--connections", "-c", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--rounds", "--pairs", type=int, default=3, help="interleaved rounds over the targets (default 3, min 1)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="N for the workers part: `serve --workers N` (0: skip; default 2)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the proxy under test to the last CPU and wrk, nginx and the IdP to the others (pinning "
        "needs >= 2 CPUs and taskset)",
    )
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.connections < 1 or args.threads < 1 or args.duration < 1:
        parser.error("--rounds, --connections, --threads must be >= 1 and --duration >= 1")
    parts = tuple(p for p in args.parts if p != "workers" or args.workers > 1)
    if not parts:
        parser.error("nothing to measure")
    return Options(
        duration=args.duration,
        latency_duration=args.latency_duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        rounds=args.rounds,
        workers=args.workers,
        pin=args.pin and shutil.which("taskset") is not None,
        parts=parts,
        audit_databases=args.audit_databases,
        postgres_url=args.postgres_url,
        json_path=args.json_path,
    )


@contextmanager
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()


def report_errors(run: Run) -> None:
    if run.socket_errors:
        print(f"  warning: {run.target}: wrk socket errors {run.socket_errors}", file=sys.stderr)
    if run.non_2xx:
        raise BenchError(
            f"{run.target}: {run.non_2xx} of {run.requests} answers had a status >= 400 — the target is misconfigured "
            "(on the gateway: it forwarded the caller's Authorization, lost the pre-shared key, or refused the token)"
        )


def ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: Sequence[Run]) -> None:
    header = (
        f"{'target':<28} {'conns':>5} {'req/s':>8} {'p50':>9} {'p99':>9} {'non-2xx':>7} {'sockerr':>7} "
        f"{'cpu us/req':>10} {'elsewhere':>9} {'steal':>5}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        errors = sum(run.socket_errors.values())
        print(
            f"{run.target:<28} {run.connections:>5} {run.rps:>8.0f} {ms(run.p50_ms):>9} {ms(run.p99_ms):>9} "
            f"{run.non_2xx:>7} {errors:>7} {optional(run.cpu_us_per_request, '.0f'):>10} "
            f"{optional(run.busy_elsewhere_cores, '.2f'):>9} {optional(run.steal_cores, '.2f'):>5}"
        )
    print(
        "cpu us/req: CPU time of the target's processes per request served. elsewhere / steal: CPU cores busy "
        "meanwhile\nwith processes outside this bench / taken by the hypervisor (both should be ~0 for clean figures)."
    )


@dataclass
class Target:
    name: str
    service: Service
    url: str
    script: Path
    headers: dict[str, str]
    metrics_url: str | None = None  # audit on: where to read the drop counter
    audit_rows: Any = None  # () -> rows in its audit table, for the check after the runs
    audit_on: bool = False
    runs: list[Run] = field(default_factory=list)


@dataclass
class Comparison:
    """The per-round ratios of `numerator` to `denominator` (req/s, and the inverse ratio of CPU per request)."""

    label: str
    numerator: str
    denominator: str
    target: float | None
    issue: str
    ratios: list[float]
    cpu_ratios: list[float]
    best: float  # the best req/s of the numerator over the best of the denominator, across the rounds

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.median >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "issue": self.issue,
            "target_min": self.target,
            "ratios": self.ratios,
            "median": self.median,
            "cpu_ratios": self.cpu_ratios,
            "median_cpu": statistics.median(self.cpu_ratios) if self.cpu_ratios else None,
            "best_of_rounds": self.best,
            "met": self.met,
        }


def compare(
    rounds: Sequence[dict[str, Run]], label: str, num: str, den: str, target: float | None, issue: str
) -> Comparison | None:
    pairs = [(r[num], r[den]) for r in rounds if num in r and den in r]
    if not pairs:
        return None
    ratios = [round(n.rps / d.rps, 3) for n, d in pairs]
    cpu = [
        round(d.cpu_us_per_request / n.cpu_us_per_request, 3)
        for n, d in pairs
        if n.cpu_us_per_request and d.cpu_us_per_request
    ]
    best = round(max(n.rps for n, _ in pairs) / max(d.rps for _, d in pairs), 3)
    return Comparison(label, num, den, target, issue, ratios, cpu, best)


def verify_microbench(proxy_pin: Sequence[str]) -> dict[str, Any]:
    result = subprocess.run(
        [*proxy_pin, sys.executable, str(HERE / "jwt_verify.py")], capture_output=True, text=True, timeout=120
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("{")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"jwt_verify.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    figures: dict[str, Any] = json.loads(line)
    return figures


def wait_for_idp(service: Service) -> dict[str, str]:
    """The JSON line `bench/idp.py` prints once it serves."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        service.check_alive()
        for line in service.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"token"' in line:
                facts: dict[str, str] = json.loads(line)
                return facts
        time.sleep(0.05)
    raise BenchError(f"the IdP did not start within {STARTUP_SECONDS:.0f} s:\n{service.log_tail()}")


def bench(options: Options) -> dict[str, Any]:
    parts = set(options.parts)
    wrk_path, nginx_path = ensure_tools()
    gateway_exe = BIN / "okta-agent-proxy"
    if not gateway_exe.exists():
        raise BenchError(f"{gateway_exe} not found: run this with the project's venv (./run bench)")
    info = machine()
    info["wrk"] = tool_version([wrk_path, "-v"]).split(" [")[0].replace("debian/", "").removeprefix("wrk ")
    info["nginx"] = tool_version([nginx_path, "-v"]).removeprefix("nginx version: nginx/")

    # On a small machine wrk, nginx and the proxy fight for the cores and the scheduler moves them around, which
    # makes runs noisy. Pinned, the proxy under test owns one CPU and the load generator and backend share the rest.
    cpus = sorted(os.sched_getaffinity(0))
    pin = options.pin and len(cpus) >= 2
    load_cpus, proxy_cpu = ",".join(map(str, cpus[:-1])), str(cpus[-1])
    load_pin = ["taskset", "-c", load_cpus] if pin else []
    proxy_pin = ["taskset", "-c", proxy_cpu] if pin else []
    info["pinning"] = (
        f"proxy under test on CPU {proxy_cpu}, wrk, nginx and the IdP on CPU {load_cpus}" if pin else "none"
    )
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    verify: dict[str, Any] | None = None
    if "jwt" in parts:
        print("\nuncached vs cached token validation (bench/jwt_verify.py, no network):", flush=True)
        verify = verify_microbench(proxy_pin)
        print(
            f"  uncached validate {verify['uncached_validate_us']:.0f} us/op (jwt.decode RS256 alone "
            f"{verify['jwt_decode_rs256_us']:.0f} us), cached validate {verify['cached_validate_us']:.1f} us/op",
            flush=True,
        )

    postgres: ScratchPostgres | None = None
    audit_databases = list(options.audit_databases) if "audit" in parts else []
    if "postgresql" in audit_databases:
        postgres = ScratchPostgres(options.postgres_url)
        try:
            postgres.create()
        except Exception as error:
            print(
                f"bench: warning: PostgreSQL at {options.postgres_url} is not usable ({type(error).__name__}: "
                f"{error}); skipping audit=postgresql",
                file=sys.stderr,
            )
            postgres = None
            audit_databases.remove("postgresql")

    runs: list[Run] = []
    rounds: list[dict[str, Run]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="oap-bench-") as tmp, services() as started:
            workdir = Path(tmp)
            scripts = {"plain": workdir / "mcp_post.lua"}
            scripts["plain"].write_text(wrk_script(REQUEST_HEADERS))
            wrk = Wrk(wrk_path, options.threads, load_pin)

            def measure(target: Target, connections: int, seconds: float, label: str | None = None) -> Run:
                service = target.service
                meter = CpuMeter(service.process.pid, [s.process.pid for s in started if s.process.poll() is None])
                dropped_before = audit_dropped(target.metrics_url) if target.metrics_url else None
                before = meter.sample()
                run = wrk.run(label or target.name, target.url, target.script, connections, seconds)
                CpuMeter.apply(run, before, meter.sample())
                if target.metrics_url and dropped_before is not None:
                    run.audit_dropped = audit_dropped(target.metrics_url) - dropped_before
                report_errors(run)
                runs.append(run)
                target.runs.append(run)
                dropped = f"  audit events dropped {run.audit_dropped}" if run.audit_dropped else ""
                print(
                    f"  {run.target:<34} {run.rps:>9.0f} req/s  p50 {ms(run.p50_ms)}  p99 {ms(run.p99_ms)}  "
                    f"cpu {optional(run.cpu_us_per_request, '.0f')} us/req{dropped}",
                    flush=True,
                )
                return run

            def warm(target: Target) -> None:
                if options.warmup > 0:
                    run = wrk.run(target.name + " (warm-up)", target.url, target.script, 32, options.warmup)
                    report_errors(run)

            # The backend.
            nginx_port = free_port()
            (workdir / "nginx.conf").write_text(nginx_config(workdir, nginx_port))
            nginx = Service(
                "nginx",
                [
                    *load_pin,
                    nginx_path,
                    "-p",
                    str(workdir),
                    "-c",
                    str(workdir / "nginx.conf"),
                    "-e",
                    str(workdir / "nginx-error.log"),
                ],
                workdir,
            )
            started.append(nginx)
            nginx_url = f"http://127.0.0.1:{nginx_port}"
            wait_ready(nginx, nginx_url + "/")
            probe(nginx, nginx_url + "/mcp", REQUEST_HEADERS)
            direct = Target("nginx direct", nginx, nginx_url + "/mcp", scripts["plain"], REQUEST_HEADERS)

            # The IdP, for the JWT target.
            idp_facts: dict[str, str] | None = None
            if "jwt" in parts:
                idp = Service("idp", [*load_pin, sys.executable, str(HERE / "idp.py"), JWT_AUDIENCE], workdir)
                started.append(idp)
                idp_facts = wait_for_idp(idp)

            # The proxies under test, started together, then checked one by one.
            pending: list[tuple[Target, str]] = []
            bare: Target | None = None
            if parts & {"core", "jwt", "latency"}:
                bare_port = free_port()
                bare_service = Service(
                    "bare",
                    [*proxy_pin, sys.executable, str(HERE / "bare_proxy.py"), str(bare_port), nginx_url],
                    workdir,
                )
                started.append(bare_service)
                bare = Target(
                    "bare", bare_service, f"http://127.0.0.1:{bare_port}/mcp", scripts["plain"], REQUEST_HEADERS
                )
                pending.append((bare, f"http://127.0.0.1:{bare_port}/"))

            plain_config = workdir / "gateway.yaml"
            plain_config.write_text(gateway_config(nginx_port))

            def start_gateway(
                name: str,
                *,
                log_level: str = "INFO",
                audit: str | None = None,
                workers: int = 1,
                idp: dict[str, str] | None = None,
            ) -> Target:
                port = free_port()
                slug = name.replace(" ", "-").replace("=", "-")
                # A clean environment: an OKTA_ISSUER, ALLOWED_HOSTS, REDIS_URL, … in ours would change what is
                # measured. Without audit the store is still opened (config history), in a file of its own.
                sqlite_path = workdir / f"{slug}.db"
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "LOG_LEVEL": log_level,
                    "BENCH_PSK": PSK_VALUE,
                    "AUDIT_ENABLED": "true" if audit else "false",
                    "DATABASE_URL": f"sqlite:///{sqlite_path}",
                }
                config, script, headers = plain_config, scripts["plain"], REQUEST_HEADERS
                if idp is not None:
                    env |= {"OKTA_ISSUER": idp["issuer"], "OKTA_AUDIENCE": idp["audience"]}
                    env["OKTA_JWKS_URI"] = idp["jwks_uri"]
                    config = workdir / "gateway-jwt.yaml"
                    config.write_text(gateway_config(nginx_port, idp["client_id"]))
                    headers = {**REQUEST_HEADERS, "Authorization": f"Bearer {idp['token']}"}
                    script = scripts.setdefault("jwt", workdir / "mcp_post_jwt.lua")
                    script.write_text(wrk_script(headers))

                def count_rows() -> int:
                    return sqlite_audit_rows(sqlite_path)

                if audit == "postgresql":
                    assert postgres is not None
                    env["DATABASE_URL"] = postgres.url
                    count_rows = postgres.count_audit_rows
                command = [*(proxy_pin if workers == 1 else []), str(gateway_exe), "serve", "--config", str(config)]
                command += ["--env-file", "/dev/null", "--host", "127.0.0.1", "--port", str(port)]
                command += ["--workers", str(workers)]
                service = Service(name, command, workdir, env=env)
                started.append(service)
                target = Target(name, service, f"http://127.0.0.1:{port}/mcp", script, headers)
                target.audit_on = audit is not None
                target.audit_rows = count_rows if workers == 1 else None
                target.metrics_url = f"http://127.0.0.1:{port}/metrics" if audit else None
                pending.append((target, f"http://127.0.0.1:{port}/healthz"))
                return target

            gateway = None
            if parts & {"core", "audit", "latency"}:
                gateway = start_gateway("gateway")
            audit_targets = [start_gateway(f"gateway audit={db}", audit=db) for db in audit_databases]
            jwt_target = start_gateway("gateway jwt", idp=idp_facts) if idp_facts is not None else None
            # The JWT target's requests carry an ~850-byte token: the bare proxy gets the same requests too, so that
            # the JWT ratio measures what the gateway adds, not what receiving a bigger request costs any proxy.
            bare_jwt = None
            if bare is not None and jwt_target is not None:
                bare_jwt = Target("bare jwt-request", bare.service, bare.url, jwt_target.script, jwt_target.headers)
            quiet = start_gateway("gateway log=WARNING", log_level="WARNING") if "core" in parts else None
            for target, ready_url in pending:
                wait_ready(target.service, ready_url)
                probe(target.service, target.url, target.headers)

            c = options.connections
            order = [t for t in (bare, bare_jwt, gateway, *audit_targets, jwt_target, quiet) if t is not None]
            if "core" not in parts and "jwt" not in parts:
                order = [t for t in order if t is not bare]
            if "core" not in parts and not audit_targets:
                order = [t for t in order if t is not gateway]
            print(f"\nthroughput: wrk -t{options.threads} -c{c} -d{options.duration:g}s, POST tools/list", flush=True)
            if "core" in parts:
                warm(direct)
                measure(direct, c, options.duration)
            for target in order:
                warm(target)
            for i in range(1, options.rounds + 1):
                rounds.append({t.name: measure(t, c, options.duration, f"{t.name} #{i}") for t in order})

            latency: tuple[Run, Run] | None = None
            if "latency" in parts and bare is not None and gateway is not None:
                print(f"\nlatency: wrk -t1 -c1 -d{options.latency_duration:g}s", flush=True)
                latency = (
                    measure(bare, 1, options.latency_duration, "bare c=1"),
                    measure(gateway, 1, options.latency_duration, "gateway c=1"),
                )

            # Audit checks: every request served with audit on left a row (none dropped); audit off wrote none.
            audit_rows: dict[str, int] = {}
            if audit_targets:
                time.sleep(1.0)  # the writer's batching delay is 0.2 s
                for target in [*audit_targets, *([gateway] if gateway is not None else [])]:
                    rows = target.audit_rows()
                    audit_rows[target.name] = rows
                    served = sum(r.requests for r in target.runs)
                    dropped = sum(r.audit_dropped or 0 for r in target.runs)
                    if target.audit_on and rows < served - dropped:
                        raise BenchError(f"{target.name}: {rows} audit rows for {served} requests served")
                    if not target.audit_on and rows:
                        raise BenchError(f"{target.name}: AUDIT_ENABLED=false, yet {rows} audit rows")

            workers_run: Run | None = None
            if "workers" in parts:
                for target in order:
                    if bare is None or target.service is not bare.service:
                        target.service.stop()  # idle event loops would otherwise share the cores with the workers
                print(f"\nextra: gateway --workers {options.workers} (the bare proxy is one process)", flush=True)
                workers = start_gateway(f"gateway --workers {options.workers}", workers=options.workers)
                wait_ready(workers.service, pending[-1][1])
                probe(workers.service, workers.url, workers.headers)
                warm(workers)
                workers_run = measure(workers, c, options.duration)
    finally:
        if postgres is not None:
            postgres.drop()

    comparisons = [
        compare(rounds, "gateway / bare", "gateway", "bare", CORE_RATIO, "issue 2"),
        compare(rounds, "gateway log=WARNING / bare", "gateway log=WARNING", "bare", None, ""),
        compare(rounds, "gateway / gateway log=WARNING", "gateway", "gateway log=WARNING", None, "request log"),
        compare(rounds, "gateway jwt / bare (same request)", "gateway jwt", "bare jwt-request", JWT_RATIO, "issue 3"),
        compare(rounds, "gateway jwt / bare", "gateway jwt", "bare", None, ""),
        *(
            compare(rounds, f"audit={db} on / off", f"gateway audit={db}", "gateway", AUDIT_RATIO, "issue 5")
            for db in AUDIT_DATABASES
        ),
    ]
    found = [comparison for comparison in comparisons if comparison is not None]
    busy = [r.busy_elsewhere_cores for rnd in rounds for r in rnd.values() if r.busy_elsewhere_cores is not None]
    busy += [r.steal_cores for rnd in rounds for r in rnd.values() if r.steal_cores is not None]

    print("\n== results (" + ", ".join(f"{k} {v}" for k, v in info.items()) + ")")
    print_table(runs)
    print()
    for comparison in found:
        goal = ""
        if comparison.target is not None:
            verdict = "met" if comparison.met else "NOT met"
            goal = f"  ({comparison.issue} target >= {comparison.target:g}: {verdict})"
        cpu = f"; by CPU per request {statistics.median(comparison.cpu_ratios):.3f}" if comparison.cpu_ratios else ""
        print(
            f"{comparison.label:<32} per round {', '.join(f'{r:.3f}' for r in comparison.ratios)}"
            f" -> median {comparison.median:.3f}{cpu}; best of rounds {comparison.best:.3f}{goal}"
        )
    if busy and max(busy) > NOISY_CORES:
        print(
            f"warning: other work took up to {max(busy):.2f} cores during the rounds (see elsewhere/steal): req/s "
            "figures are noisy; rerun on a quiet machine or with more --rounds"
        )
    drops = {t.name: sum(r.audit_dropped or 0 for r in t.runs) for t in audit_targets}
    if any(drops.values()):
        print(f"warning: the audit writer dropped events (queue full): {drops}")
    if audit_rows:
        print("audit rows written: " + ", ".join(f"{name} {rows}" for name, rows in audit_rows.items()))
    median_bare = statistics.median(r["bare"].rps for r in rounds) if rounds and "bare" in rounds[0] else None
    if median_bare and direct.runs:
        print(f"bare / nginx direct req/s: {median_bare / direct.runs[0].rps:.3f}")
    added_ms = None
    if latency is not None:
        bare_c1, gateway_c1 = latency
        added_ms = round(gateway_c1.p50_ms - bare_c1.p50_ms, 3)
        verdict = "met" if added_ms <= ISSUE_ADDED_MS else "NOT met"
        print(
            f"added median latency at c=1: {added_ms:+.3f} ms  (gateway p50 {gateway_c1.p50_ms:.3f} ms - bare p50 "
            f"{bare_c1.p50_ms:.3f} ms; issue 2 target <= {ISSUE_ADDED_MS:g} ms: {verdict})"
        )
    if verify is not None:
        print(
            f"token validation: uncached {verify['uncached_validate_us']:.0f} us/op (RS256 jwt.decode alone "
            f"{verify['jwt_decode_rs256_us']:.0f} us), cached {verify['cached_validate_us']:.1f} us/op"
        )
    if workers_run is not None and median_bare:
        print(
            f"gateway --workers {options.workers}: {workers_run.rps:.0f} req/s = {workers_run.rps / median_bare:.3f}x "
            f"the median bare run (bare is one process; wrk and nginx share the same {info['cores']} cores)"
        )
    return {
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "runs": [asdict(run) for run in runs],
        "comparisons": [comparison.as_dict() for comparison in found],
        "added_median_latency_ms_c1": added_ms,
        "added_ms_max": ISSUE_ADDED_MS,
        "token_validation": verify,
        "audit_rows": audit_rows,
        "audit_dropped": drops,
    }


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        result = bench(options)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {options.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
