"""One wrk run and what it cost: requests, latency percentiles, and the target's CPU time per request.

wrk sends `POST` with an MCP `tools/list` body and the headers a real client sends, from a Lua script whose `done`
hook prints the figures as one JSON line (wrk's own summary is not meant to be parsed). Around each run,
`CpuMeter` reads /proc: the CPU time of the target's processes (all threads, and their children) divided by the
requests served — a cost that other load on the machine disturbs much less than req/s — and how many cores other
processes and the hypervisor used meanwhile, which says whether the run's req/s can be trusted.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import BenchError

REQUEST_BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
REQUEST_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "Authorization": "Bearer x",  # the caller's token: the gateway must not pass it on
}

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
    credential_hits: int | None = None  # backend credentials served from the gateway's cache during the run
    credential_misses: int | None = None  # … and fetched anew (a token exchange): 0 once warmed up
    redis_commands: int | None = None  # commands the Redis server processed during the run (from all its clients)


def ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_errors(run: Run) -> None:
    if run.socket_errors:
        print(f"  warning: {run.target}: wrk socket errors {run.socket_errors}", file=sys.stderr)
    if run.non_2xx:
        raise BenchError(
            f"{run.target}: {run.non_2xx} of {run.requests} answers had a status >= 400 — the target is misconfigured "
            "(on the gateway: it forwarded the caller's Authorization, lost the pre-shared key, or refused the token)"
        )


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
                    with suppress(FileNotFoundError):  # a thread that ended meanwhile
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
