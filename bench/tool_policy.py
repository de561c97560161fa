"""What the per-tool policy (DESIGN.md §7, issue 15) adds to a `tools/list` of 100 tools, JSON and SSE, at c=1.

    .venv/bin/python bench/tool_policy.py [--rounds 5] [--requests 400] [--warmup 100] [--no-pin] [--json out.json]

Three processes on 127.0.0.1, started as the other benches start theirs (`processes.Service`):

- **backend**: this file run with `--serve-backend PORT`: a few lines of aiohttp on uvloop that answer every POST
  `tools/list` with one fixed JSON-RPC result of 100 tools (10 verbs x 10 nouns, each with a title, a description,
  an `inputSchema` of two to four properties and annotations: 51.5 KB), the request's id echoed. Paths starting
  with `/sse` answer as an SDK server does with SSE (`text/event-stream`, chunked, one `event: message` whose `data`
  is the result); the others as `application/json`. Like the nginx backend of the other benches it checks what the
  gateway forwards: the caller's `Authorization` must not arrive (400), the pre-shared key must (403);
- **IdP**: the bench's Okta emulator (`bench/idp.py`, `targets.start_idp`) and its access token for the agent;
- **gateway**: `okta-agent-proxy serve` of this checkout with `OKTA_ISSUER`/`OKTA_AUDIENCE`/`OKTA_JWKS_URI` of the
  IdP, `LOG_LEVEL=INFO`, `AUDIT_ENABLED=false`, a clean environment, and four pre-shared-key backends on the one
  backend process: `/json-norules`, `/sse-norules` (the agent has no rules there: answers stream untouched) and
  `/json-rules`, `/sse-rules`, where the agent has `tool_access` allow `RULE_ALLOW`, deny `RULE_DENY`, which keeps
  18 of the 100 tools (the JSON answer is read whole and filtered; the SSE one event by event).

The client is this process: one aiohttp session (uvloop, one keep-alive connection), the jwt bench's token and
headers plus `MCP-Protocol-Version: 2025-06-18`, `tools/list` with id 1. After `--warmup` cycles, `--rounds` rounds
of `--requests` cycles; a cycle is one request to each route, in an order rotated every cycle, so a slow window of
the machine hits the four routes alike and each route follows each other one as often. Timed per request: from
before `post` until the whole answer is read. Printed: p50/p90/p99 per route over all rounds, the **added p50** of
rules over no rules for JSON and for SSE (pooled, and per round with their median) against issue 15's 0.3 ms, and
the gateway's CPU per request by route (`/proc/<pid>/task/*/schedstat`, read once before each request: the
gateway's CPU from the start of one request to the start of the next, so its work after the answer counts too).

Every answer is checked, outside the timed span: status 200 and the route's content type; on the no-rules routes
the exact bytes the backend sent (untouched), on the rules routes a JSON-RPC result with id 1 whose `tools` are
exactly the backend's entries that the rules let through, in order and unchanged (the set computed here with
`fnmatchcase`, independently of the gateway's code). A wrong answer stops the run (exit 1); missing the target is
reported, not an error.

With 2+ CPUs the gateway is pinned to the last CPU and this client, the backend and the IdP to the others
(`--no-pin`: none). The load average and the cores other processes used during the rounds are printed: on a busy
machine the p50s move, the added p50 (a difference of interleaved samples) much less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from processes import BenchError, Service, free_port, http_exchange, machine, services, wait_ready
from revisions import current_revision
from targets import JWT_AUDIENCE, PSK_HEADER, PSK_VALUE, start_idp
from wrk_runner import REQUEST_HEADERS, machine_cpu_seconds, own_cpu_seconds, tree_cpu_seconds

TARGET_ADDED_P50_MS = 0.3  # issue 15: a tools/list of 100 tools with rules on, JSON and SSE
ROUTES = ("/json-norules", "/json-rules", "/sse-norules", "/sse-rules")
PAIRS = (("JSON", "/json-norules", "/json-rules"), ("SSE", "/sse-norules", "/sse-rules"))
RULE_ALLOW = ("get_*", "list_*")  # what a read-only agent is given ...
RULE_DENY = ("*_salary",)  # ... except the salaries: 18 of the 100 tools stay visible
PROTOCOL_VERSION = "2025-06-18"
REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
REQUEST_TIMEOUT_SECONDS = 10.0

# --- the backend's answer ------------------------------------------------------------------------------------------

VERBS = {
    "get": ("Get one {noun} by id.", True),
    "list": ("List {noun}s, newest first, a page at a time.", True),
    "search": ("Search {noun}s by free text and filters.", True),
    "create": ("Create a {noun}; returns its id.", False),
    "update": ("Change fields of a {noun}; fields not given are kept.", False),
    "delete": ("Delete a {noun}. Irreversible: archived copies are deleted too.", False),
    "export": ("Export {noun}s as CSV or JSON to the caller's drive.", True),
    "archive": ("Archive a {noun}: hidden from lists, kept for audit.", False),
    "approve": ("Approve a {noun} waiting for a decision.", False),
    "sync": ("Synchronise {noun}s with the system of record.", False),
}
NOUNS = ("employee", "salary", "invoice", "order", "ticket", "document", "project", "customer", "payment", "report")


def _properties(verb: str, noun: str) -> tuple[dict[str, Any], list[str]]:
    """A few realistic parameters per kind of tool."""
    noun_id = {"type": "string", "description": f"The {noun}'s id, e.g. {noun[:3].upper()}-1042.", "minLength": 1}
    if verb in ("get", "delete", "archive", "approve"):
        extra = {"reason": {"type": "string", "description": "Why, for the audit trail.", "maxLength": 500}}
        return {"id": noun_id, **extra}, ["id"]
    if verb in ("list", "search", "export"):
        properties: dict[str, Any] = {
            "query": {"type": "string", "description": f"Words to look for in the {noun}'s fields."},
            "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
            "cursor": {"type": "string", "description": "From the previous page's nextCursor."},
            "status": {"type": "string", "enum": ["open", "closed", "all"], "default": "open"},
        }
        return properties, ([] if verb == "list" else ["query"])
    fields = {"type": "object", "description": f"The {noun}'s fields to set.", "additionalProperties": True}
    return {"id": noun_id, "fields": fields, "dry_run": {"type": "boolean", "default": False}}, ["fields"]


def tools() -> list[dict[str, Any]]:
    made = []
    for noun in NOUNS:
        for verb, (description, read_only) in VERBS.items():
            properties, required = _properties(verb, noun)
            made.append(
                {
                    "name": f"{verb}_{noun}",
                    "title": f"{verb.capitalize()} {noun}",
                    "description": description.format(noun=noun) + " Requires access to the HR and finance systems.",
                    "inputSchema": {"type": "object", "properties": properties, "required": required},
                    "annotations": {"readOnlyHint": read_only, "destructiveHint": verb == "delete"},
                }
            )
    return made


TOOLS = tools()
RESULT = json.dumps({"tools": TOOLS}, separators=(",", ":")).encode()


def answer(request_id: Any) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b',"result":' + RESULT + b"}"


def sse_event(body: bytes) -> bytes:
    return b"event: message\r\ndata: " + body + b"\r\n\r\n"  # as the MCP SDK's servers frame it


def permitted(name: str) -> bool:
    """The rules as DESIGN.md §7 states them (deny wins, then some allow glob must match), for the check."""
    return not any(fnmatchcase(name, g) for g in RULE_DENY) and any(fnmatchcase(name, g) for g in RULE_ALLOW)


async def _backend_handler(request: web.Request) -> web.StreamResponse:
    if "Authorization" in request.headers:
        return web.json_response({"bench": "the caller's Authorization reached the backend"}, status=400)
    if request.headers.get(PSK_HEADER) != PSK_VALUE:
        return web.json_response({"bench": "the pre-shared key did not reach the backend"}, status=403)
    message = json.loads(await request.read())
    if message.get("method") != "tools/list":
        return web.json_response({"bench": "only tools/list is served"}, status=400)
    body = answer(message.get("id"))
    if not request.path.startswith("/sse"):
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(sse_event(body))
    await response.write_eof()
    return response


async def serve_backend(port: int) -> None:
    app = web.Application()
    app.router.add_post("/{path:.*}", _backend_handler)
    app.router.add_get("/healthz", _healthy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until SIGTERM


async def _healthy(_: web.Request) -> web.Response:
    return web.Response(text="ok")


# --- the gateway ---------------------------------------------------------------------------------------------------


def gateway_config(backend_port: int, agent_client_id: str) -> str:
    names = [route.strip("/") for route in ROUTES]
    config = "backends:\n"
    for name in names:
        config += f"""  {name}:
    url: http://127.0.0.1:{backend_port}/{name}
    paths: [/{name}]
    auth_method: pre-shared-key
    auth_config:
      key: ${{BENCH_PSK}}
      header_name: {PSK_HEADER}
"""
    rule = f"{{allow: {json.dumps(list(RULE_ALLOW))}, deny: {json.dumps(list(RULE_DENY))}}}"
    config += f"""agents:
  bench-agent:
    client_id: {agent_client_id}
    backend_access: [{", ".join(names)}]
    tool_access:
"""
    return config + "".join(f"      {name}: {rule}\n" for name in names if name.endswith("-rules"))


def start_gateway(workdir: Path, started: list[Service], idp: dict[str, str], backend_port: int, pin: list[str]) -> str:
    config = workdir / "tool-policy.yaml"
    config.write_text(gateway_config(backend_port, idp["client_id"]))
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LOG_LEVEL": "INFO",
        "BENCH_PSK": PSK_VALUE,
        "AUDIT_ENABLED": "false",
        "DATABASE_URL": f"sqlite:///{workdir / 'gateway.db'}",
        "DATA_DIR": str(workdir / "gateway-data"),
        "OKTA_ISSUER": idp["issuer"],
        "OKTA_AUDIENCE": idp["audience"],
        "OKTA_JWKS_URI": idp["jwks_uri"],
    }
    command = [*pin, str(current_revision().gateway), "serve", "--config", str(config), "--env-file", "/dev/null"]
    service = Service("gateway", [*command, "--host", "127.0.0.1", "--port", str(port)], workdir, env=env)
    started.append(service)
    base = f"http://127.0.0.1:{port}"
    wait_ready(service, base + "/healthz")
    return base


# --- the checks ----------------------------------------------------------------------------------------------------


def sse_data(body: bytes) -> bytes:
    """The `data` of the one event of an SSE answer (any line ends); an error if there is not exactly one."""
    events: list[list[bytes]] = [[]]
    for line in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if line:
            events[-1].append(line)
        elif events[-1]:
            events.append([])
    events = [event for event in events if event]
    if len(events) != 1:
        raise ValueError(f"{len(events)} events instead of one")
    data = [line.partition(b":")[2].removeprefix(b" ") for line in events[0] if line.startswith(b"data:")]
    return b"\n".join(data)


class AnswerCheck:
    """Each answer as the route must give it; a byte string once found right is not parsed again."""

    def __init__(self) -> None:
        self.visible = [tool for tool in TOOLS if permitted(tool["name"])]
        self.checked: dict[str, set[bytes]] = {route: set() for route in ROUTES}
        self.tool_counts: dict[str, int] = {}

    def check(self, route: str, status: int, content_type: str, body: bytes) -> None:
        sse = route.startswith("/sse")
        expected_type = "text/event-stream" if sse else "application/json"
        if status != 200 or not content_type.startswith(expected_type):
            raise BenchError(f"{route}: {status} {content_type!r} {body[:300]!r} instead of 200 {expected_type}")
        if body in self.checked[route]:
            return
        if route.endswith("-norules"):
            sent = sse_event(answer(1)) if sse else answer(1)
            if body != sent:
                raise BenchError(f"{route}: the answer is not the backend's bytes, untouched ({len(body)} bytes)")
            self.tool_counts[route] = len(TOOLS)
        else:
            try:
                document = json.loads(sse_data(body) if sse else body)
            except ValueError as error:
                raise BenchError(f"{route}: unreadable answer ({error}): {body[:300]!r}") from None
            result = document.get("result") if isinstance(document, dict) else None
            listed = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(document, dict) or document.get("id") != 1 or listed != self.visible:
                names = [tool.get("name") for tool in listed] if isinstance(listed, list) else listed
                raise BenchError(
                    f"{route}: the tools listed are {names}, not the {len(self.visible)} the rules let through "
                    f"({[tool['name'] for tool in self.visible]}), unchanged"
                )
            self.tool_counts[route] = len(listed)
        self.checked[route].add(body)


# --- the measurement -----------------------------------------------------------------------------------------------


def gateway_cpu_ns(pid: int) -> int:
    """CPU time of all the gateway's threads so far, in ns (the first field of each thread's schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total


@dataclass
class Samples:
    latency_ns: dict[str, list[list[int]]] = field(default_factory=lambda: {route: [] for route in ROUTES})
    cpu_ns: dict[str, list[int]] = field(default_factory=lambda: {route: [] for route in ROUTES})
    answer_bytes: dict[str, int] = field(default_factory=dict)


async def cycles(
    session: aiohttp.ClientSession,
    base: str,
    headers: dict[str, str],
    count: int,
    pid: int,
    check: AnswerCheck,
    samples: Samples | None,
) -> None:
    """`count` cycles of one request per route (order rotated each cycle); recorded into `samples` unless None."""
    round_latency: dict[str, list[int]] = {route: [] for route in ROUTES}
    previous: tuple[str, int] | None = None
    for cycle in range(count):
        shift = cycle % len(ROUTES)
        for route in ROUTES[shift:] + ROUTES[:shift]:
            cpu = gateway_cpu_ns(pid)
            if previous is not None and samples is not None:
                samples.cpu_ns[previous[0]].append(cpu - previous[1])
            previous = (route, cpu)
            start = time.perf_counter_ns()
            async with session.post(base + route, data=REQUEST, headers=headers) as response:
                body = await response.read()
            elapsed = time.perf_counter_ns() - start
            check.check(route, response.status, response.headers.get("Content-Type", ""), body)
            round_latency[route].append(elapsed)
            if samples is not None:
                samples.answer_bytes[route] = len(body)
    if samples is not None and previous is not None:
        samples.cpu_ns[previous[0]].append(gateway_cpu_ns(pid) - previous[1])
        for route in ROUTES:
            samples.latency_ns[route].append(round_latency[route])


async def measure(base: str, token: str, pid: int, rounds: int, requests: int, warmup: int) -> Samples:
    headers = {**REQUEST_HEADERS, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": PROTOCOL_VERSION}
    check = AnswerCheck()
    samples = Samples()
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for every request
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await cycles(session, base, headers, warmup, pid, check, None)
        for number in range(rounds):
            gc.collect()
            gc.disable()  # the client's collector would add its pauses to whichever request it hit
            try:
                await cycles(session, base, headers, requests, pid, check, samples)
            finally:
                gc.enable()
            p50 = {route: statistics.median(samples.latency_ns[route][-1]) / 1e6 for route in ROUTES}
            print(f"  round {number + 1}: p50 " + ", ".join(f"{r} {v:.3f} ms" for r, v in p50.items()), flush=True)
    if check.tool_counts != {route: 100 if route.endswith("-norules") else len(check.visible) for route in ROUTES}:
        raise BenchError(f"tools per answer {check.tool_counts}")
    return samples


# --- the report ----------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(samples: Samples, load: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {"routes": {}, "added_p50_ms": {}, "load": load}
    visible = sum(permitted(tool["name"]) for tool in TOOLS)
    print("\nroute          answers  tools   bytes   p50 ms   p90 ms   p99 ms   gateway CPU us/req (mean)")
    for route in ROUTES:
        pooled = [v / 1e6 for block in samples.latency_ns[route] for v in block]
        cpu_us = statistics.fmean(samples.cpu_ns[route]) / 1000
        row = {
            "answers": len(pooled),
            "tools": 100 if route.endswith("-norules") else visible,
            "bytes": samples.answer_bytes[route],
            "p50_ms": round(percentile(pooled, 50), 4),
            "p90_ms": round(percentile(pooled, 90), 4),
            "p99_ms": round(percentile(pooled, 99), 4),
            "gateway_cpu_us": round(cpu_us, 1),
        }
        figures["routes"][route] = row
        print(
            f"{route:14} {row['answers']:>7} {row['tools']:>6} {row['bytes']:>7} {row['p50_ms']:>8.3f} "
            f"{row['p90_ms']:>8.3f} {row['p99_ms']:>8.3f}   {cpu_us:>8.1f}"
        )
    print(f"\nadded p50, rules - no rules (issue 15: <= {TARGET_ADDED_P50_MS} ms):")
    for label, plain, ruled in PAIRS:
        per_round = [
            (statistics.median(r) - statistics.median(p)) / 1e6
            for p, r in zip(samples.latency_ns[plain], samples.latency_ns[ruled], strict=True)
        ]
        added = figures["routes"][ruled]["p50_ms"] - figures["routes"][plain]["p50_ms"]
        cpu = figures["routes"][ruled]["gateway_cpu_us"] - figures["routes"][plain]["gateway_cpu_us"]
        verdict = "met" if added <= TARGET_ADDED_P50_MS else "NOT met"
        rounds_text = ", ".join(f"{v:+.3f}" for v in per_round)
        print(
            f"  {label:4} {added:+.3f} ms ({verdict}); per round {rounds_text} (median "
            f"{statistics.median(per_round):+.3f}); gateway CPU {cpu:+.1f} us/req"
        )
        figures["added_p50_ms"][label] = {
            "pooled": round(added, 4),
            "per_round": [round(v, 4) for v in per_round],
            "gateway_cpu_us": round(cpu, 1),
            "met": added <= TARGET_ADDED_P50_MS,
        }
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--requests", type=int, default=400, help="requests per route and round (default 400)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per route (default 100)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="pin nothing to CPUs")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--serve-backend", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve_backend is not None:
        uvloop.run(serve_backend(options.serve_backend))
        return 0
    if min(options.rounds, options.requests) < 1 or options.warmup < 0:
        parser.error("--rounds and --requests must be at least 1, --warmup at least 0")

    cpus = sorted(os.sched_getaffinity(0))
    pin = options.pin and len(cpus) >= 2
    gateway_pin = ["taskset", "-c", str(cpus[-1])] if pin else []
    info = machine()  # before the pinning below, which would halve its usable cores
    if pin:
        os.sched_setaffinity(0, cpus[:-1])  # this client, and the backend and IdP it starts (they inherit it)
    info |= {"pinning": f"gateway on CPU {cpus[-1]}, the rest on {cpus[:-1]}" if pin else "none"}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="oap-tool-policy-") as tmp, services() as started:
        workdir = Path(tmp)
        idp = start_idp(workdir, started, [])
        if idp["audience"] != JWT_AUDIENCE:
            raise BenchError(f"the IdP's audience is {idp['audience']!r}")
        backend_port = free_port()
        backend = Service(
            "backend",
            [sys.executable, __file__, "--serve-backend", str(backend_port)],
            workdir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        started.append(backend)
        wait_ready(backend, f"http://127.0.0.1:{backend_port}/healthz")
        base = start_gateway(workdir, started, idp, backend_port, gateway_pin)
        gateway = started[-1]
        probe = {**REQUEST_HEADERS, "Authorization": f"Bearer {idp['token']}"}
        for route in ROUTES:  # one request each before any timing: a misconfigured route fails here, with its log
            status, headers, body = http_exchange("POST", base + route, REQUEST.decode(), probe)
            try:
                AnswerCheck().check(route, status, headers.get("Content-Type", ""), body.encode())
            except BenchError as error:
                raise BenchError(f"{error}\n{gateway.log_tail()}") from None
        print(
            f"routes {', '.join(ROUTES)}: 100 tools, {sum(map(permitted, (t['name'] for t in TOOLS)))} with the rules "
            f"(allow {list(RULE_ALLOW)}, deny {list(RULE_DENY)}); {options.rounds} rounds x {options.requests} "
            f"requests per route after {options.warmup} per route",
            flush=True,
        )
        ours = [service.process.pid for service in started]
        load_before = os.getloadavg()
        busy0, ours0, own0, wall0 = machine_cpu_seconds(), _cpu_of(ours), own_cpu_seconds(), time.monotonic()
        samples = uvloop.run(
            measure(base, idp["token"], gateway.process.pid, options.rounds, options.requests, options.warmup)
        )
        busy1, ours1, own1, wall1 = machine_cpu_seconds(), _cpu_of(ours), own_cpu_seconds(), time.monotonic()
        gateway.check_alive()
        load: dict[str, Any] = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        if busy0 and busy1:
            elsewhere = (busy1[0] - busy0[0]) - (ours1 - ours0) - (own1 - own0)
            load["elsewhere_cores"] = round(max(0.0, elsewhere) / (wall1 - wall0), 2)
            load["steal_cores"] = round((busy1[1] - busy0[1]) / (wall1 - wall0), 2)
        print(
            "load: average "
            + " / ".join(f"{a:.2f}" for a in load_before)
            + " before, "
            + " / ".join(f"{a:.2f}" for a in load["loadavg_after"])
            + f" after; other processes used {load.get('elsewhere_cores', '?')} cores during the rounds, "
            f"steal {load.get('steal_cores', '?')}",
            flush=True,
        )
        figures = report(samples, load)
    if options.json is not None:
        options.json.write_text(json.dumps({"machine": info, **figures}, indent=2) + "\n")
    return 0


def _cpu_of(pids: Sequence[int]) -> float:
    return sum(tree_cpu_seconds(pid) or 0.0 for pid in pids)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(1)
