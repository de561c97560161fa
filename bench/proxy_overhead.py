"""What the gateway costs on the request path, measured against a bare aiohttp pass-through, in one run.

Targets, all on 127.0.0.1 and all in front of the same fixed-JSON backend (nginx `return 200 '{…}'`):

- nginx direct: the backend alone, the ceiling;
- bare: `bench/bare_proxy.py`, ~30 lines of aiohttp on uvloop (read body, forward with one pooled session,
  stream the answer back), one process;
- gateway: `okta-agent-proxy serve` with a pre-shared-key backend and no `OKTA_ISSUER` (so no inbound token
  validation), one process;
- gateway --workers N (extra line, default N=2; `--workers 0` skips it): N processes on one port, compared with the
  one-process bare proxy.

Load comes from wrk (POST, MCP `tools/list` body, a Lua `done` hook printing the numbers). Bare and gateway are
measured as interleaved pairs at `-c32`, so drift on the machine hits both alike; the figure of merit is the
median of the per-pair gateway/bare req/s ratios. Latency at concurrency 1 gives the added median latency.

On a machine with 2+ CPUs the proxy under test is pinned to the last CPU and wrk + nginx to the others
(`--no-pin` turns this off), so each proxy gets a core of its own instead of being moved around. Each run also
records, from /proc, the CPU time the target spent per request (a cost measure that other load on the machine
disturbs much less than req/s) and how many cores other processes or the hypervisor took meanwhile; when that
is high, the run's req/s is not trustworthy and the bench says so.

The backend checks what it receives on the gateway's route: the caller's `Authorization` must not arrive and the
pre-shared key must. A non-2xx answer there means the gateway forwarded something it must not, or is
misconfigured; the bench then fails. Missing the speed targets is reported, not an error.

Usage: ./run bench [--duration 5] [--connections 32] [--pairs 3] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
STARTUP_SECONDS = 20.0
STOP_SECONDS = 15.0
ISSUE_RATIO = 0.85
ISSUE_ADDED_MS = 1.0
NOISY_CORES = 0.2  # other work on the machine above this (in cores) makes a run's req/s unreliable

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
WRK_SCRIPT = (
    "\n".join(
        ['wrk.method = "POST"', f"wrk.body = '{REQUEST_BODY}'"]
        + [f'wrk.headers["{name}"] = "{value}"' for name, value in REQUEST_HEADERS.items()]
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
        self.log = log_dir / f"{name.replace(' ', '_')}.log"
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


def probe(service: Service, url: str) -> None:
    """One request as wrk sends it; anything but the backend's exact answer is a misconfiguration."""
    status, body = http("POST", url, REQUEST_BODY, REQUEST_HEADERS)
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


def gateway_config(backend_port: int) -> str:
    return f"""backends:
  bench:
    url: http://127.0.0.1:{backend_port}{GATEWAY_BACKEND_PATH}
    paths: [/mcp]
    auth_method: pre-shared-key
    auth_config:
      key: ${{BENCH_PSK}}
      header_name: {PSK_HEADER}
"""


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
    def __init__(self, executable: str, script: Path, threads: int, prefix: Sequence[str] = ()) -> None:
        self.executable = executable
        self.script = script
        self.threads = threads
        self.prefix = list(prefix)  # e.g. `taskset -c 0`

    def run(self, target: str, url: str, connections: int, seconds: float) -> Run:
        threads = min(self.threads, connections)
        command = [
            *self.prefix,
            self.executable,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "-s",
            str(self.script),
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
    pairs: int
    workers: int
    pin: bool
    json_path: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run (default 5)")
    parser.add_argument("--latency-duration", type=float, default=5.0, help="seconds per c=1 run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per target (default 1)")
    parser.add_argument("--connections", "-c", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved bare/gateway pairs (default 3, min 1)")
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure `serve --workers N` as an extra line (0: skip; default 2)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the proxy under test to the last CPU and wrk + nginx to the others (pinning needs >= 2 "
        "CPUs and taskset)",
    )
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.connections < 1 or args.threads < 1 or args.duration < 1:
        parser.error("--pairs, --connections, --threads must be >= 1 and --duration >= 1")
    return Options(
        duration=args.duration,
        latency_duration=args.latency_duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        pairs=args.pairs,
        workers=args.workers,
        pin=args.pin and shutil.which("taskset") is not None,
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
            "(on the gateway: it forwarded the caller's Authorization or lost the pre-shared key)"
        )


def ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: Sequence[Run]) -> None:
    header = (
        f"{'target':<24} {'conns':>5} {'req/s':>8} {'p50':>9} {'p99':>9} {'non-2xx':>7} {'sockerr':>7} "
        f"{'cpu us/req':>10} {'elsewhere':>9} {'steal':>5}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        errors = sum(run.socket_errors.values())
        print(
            f"{run.target:<24} {run.connections:>5} {run.rps:>8.0f} {ms(run.p50_ms):>9} {ms(run.p99_ms):>9} "
            f"{run.non_2xx:>7} {errors:>7} {optional(run.cpu_us_per_request, '.0f'):>10} "
            f"{optional(run.busy_elsewhere_cores, '.2f'):>9} {optional(run.steal_cores, '.2f'):>5}"
        )
    print(
        "cpu us/req: CPU time of the target's processes per request served. elsewhere / steal: CPU cores busy "
        "meanwhile\nwith processes outside this bench / taken by the hypervisor (both should be ~0 for clean figures)."
    )


def bench(options: Options) -> dict[str, Any]:
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
    info["pinning"] = f"proxy under test on CPU {proxy_cpu}, wrk and nginx on CPU {load_cpus}" if pin else "none"
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="oap-bench-") as tmp, services() as started:
        workdir = Path(tmp)
        script = workdir / "mcp_post.lua"
        script.write_text(WRK_SCRIPT)
        wrk = Wrk(wrk_path, script, options.threads, load_pin)

        def measure(target: str, service: Service, url: str, connections: int, seconds: float) -> Run:
            meter = CpuMeter(service.process.pid, [s.process.pid for s in started if s.process.poll() is None])
            before = meter.sample()
            run = wrk.run(target, url, connections, seconds)
            CpuMeter.apply(run, before, meter.sample())
            report_errors(run)
            runs.append(run)
            print(
                f"  {target:<34} {run.rps:>9.0f} req/s  p50 {ms(run.p50_ms)}  p99 {ms(run.p99_ms)}",
                flush=True,
            )
            return run

        def warm(target: str, url: str) -> None:
            if options.warmup > 0:
                report_errors(wrk.run(target + " (warm-up)", url, options.connections, options.warmup))

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
        probe(nginx, nginx_url + "/mcp")

        # The bare pass-through and the gateway.
        bare_port = free_port()
        bare = Service(
            "bare", [*proxy_pin, sys.executable, str(HERE / "bare_proxy.py"), str(bare_port), nginx_url], workdir
        )
        started.append(bare)
        bare_url = f"http://127.0.0.1:{bare_port}/mcp"

        config = workdir / "gateway.yaml"
        config.write_text(gateway_config(nginx_port))
        # A clean environment: an OKTA_ISSUER, ALLOWED_HOSTS, REDIS_URL, … in ours would change what is measured.
        gateway_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_LEVEL": "WARNING", "BENCH_PSK": PSK_VALUE}

        def start_gateway(name: str, workers: int) -> tuple[Service, str]:
            port = free_port()
            command = [
                *(proxy_pin if workers == 1 else []),
                str(gateway_exe),
                "serve",
                "--config",
                str(config),
                "--env-file",
                "/dev/null",
            ]
            command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
            service = Service(name, command, workdir, env=gateway_env)
            started.append(service)
            wait_ready(service, f"http://127.0.0.1:{port}/healthz")
            url = f"http://127.0.0.1:{port}/mcp"
            probe(service, url)
            return service, url

        wait_ready(bare, f"http://127.0.0.1:{bare_port}/")
        probe(bare, bare_url)
        gateway, gateway_url = start_gateway("gateway", 1)

        c = options.connections
        print(f"\nthroughput: wrk -t{options.threads} -c{c} -d{options.duration:g}s, POST tools/list", flush=True)
        warm("nginx direct", nginx_url + "/mcp")
        direct = measure("nginx direct", nginx, nginx_url + "/mcp", c, options.duration)
        warm("bare", bare_url)
        warm("gateway", gateway_url)
        pairs: list[tuple[Run, Run]] = []
        for i in range(1, options.pairs + 1):
            bare_run = measure(f"bare #{i}", bare, bare_url, c, options.duration)
            gateway_run = measure(f"gateway #{i}", gateway, gateway_url, c, options.duration)
            pairs.append((bare_run, gateway_run))

        print(f"\nlatency: wrk -t1 -c1 -d{options.latency_duration:g}s", flush=True)
        bare_c1 = measure("bare c=1", bare, bare_url, 1, options.latency_duration)
        gateway_c1 = measure("gateway c=1", gateway, gateway_url, 1, options.latency_duration)

        workers_run: Run | None = None
        if options.workers > 1:
            gateway.stop()  # its idle event loop would otherwise share the cores with the workers
            print(f"\nextra: gateway --workers {options.workers} (the bare proxy is one process)", flush=True)
            workers, workers_url = start_gateway(f"gateway-workers-{options.workers}", options.workers)
            target = f"gateway --workers {options.workers}"
            warm(target, workers_url)
            workers_run = measure(target, workers, workers_url, c, options.duration)

    ratios = [round(g.rps / b.rps, 3) for b, g in pairs]
    median_ratio = statistics.median(ratios)
    median_bare = statistics.median(b.rps for b, _ in pairs)
    added_ms = round(gateway_c1.p50_ms - bare_c1.p50_ms, 3)
    # The same comparison by CPU cost: bare's CPU per request / the gateway's. Less sensitive than req/s to other
    # work on the machine, since it does not count the time a process waits for a core.
    cpu_ratios = [
        round(b.cpu_us_per_request / g.cpu_us_per_request, 3)
        for b, g in pairs
        if b.cpu_us_per_request and g.cpu_us_per_request
    ]
    busy = [r.busy_elsewhere_cores for pair in pairs for r in pair if r.busy_elsewhere_cores is not None]
    busy += [r.steal_cores for pair in pairs for r in pair if r.steal_cores is not None]

    print("\n== results (" + ", ".join(f"{k} {v}" for k, v in info.items()) + ")")
    print_table(runs)
    print("\ngateway/bare req/s per pair: " + ", ".join(f"#{i} {r:.3f}" for i, r in enumerate(ratios, 1)))
    verdict = "met" if median_ratio >= ISSUE_RATIO else "NOT met"
    print(f"median ratio: {median_ratio:.3f}  (target >= {ISSUE_RATIO}: {verdict})")
    if cpu_ratios:
        print(
            "bare/gateway CPU per request per pair: "
            + ", ".join(f"#{i} {r:.3f}" for i, r in enumerate(cpu_ratios, 1))
            + f"; median {statistics.median(cpu_ratios):.3f}"
        )
    if busy and max(busy) > NOISY_CORES:
        print(
            f"warning: other work took up to {max(busy):.2f} cores during the pairs (see elsewhere/steal): req/s "
            "figures are noisy; rerun on a quiet machine or with more --pairs"
        )
    print(f"bare / nginx direct req/s: {median_bare / direct.rps:.3f}")
    verdict = "met" if added_ms <= ISSUE_ADDED_MS else "NOT met"
    print(
        f"added median latency at c=1: {added_ms:+.3f} ms  (gateway p50 {gateway_c1.p50_ms:.3f} ms - bare p50 "
        f"{bare_c1.p50_ms:.3f} ms; target <= {ISSUE_ADDED_MS:g} ms: {verdict})"
    )
    if workers_run is not None:
        print(
            f"gateway --workers {options.workers}: {workers_run.rps:.0f} req/s = {workers_run.rps / median_bare:.3f}x "
            f"the median bare run (bare is one process; wrk and nginx share the same {info['cores']} cores)"
        )
    return {
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "runs": [asdict(run) for run in runs],
        "pair_ratios": ratios,
        "median_ratio": median_ratio,
        "pair_cpu_ratios": cpu_ratios,
        "median_cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
        "added_median_latency_ms_c1": added_ms,
        "targets": {
            "ratio_min": ISSUE_RATIO,
            "ratio_met": median_ratio >= ISSUE_RATIO,
            "added_ms_max": ISSUE_ADDED_MS,
            "added_ms_met": added_ms <= ISSUE_ADDED_MS,
        },
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
