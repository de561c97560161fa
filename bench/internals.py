"""What each private API of a pinned library buys, against the public way, measured in the same run (issue 12).

Each line runs a candidate private path and its public equivalent alternately, `--rounds` times `--calls` calls,
and keeps each side's best round (µs per call): the difference, times how often a request runs the path, is the
private path's worth per request, shown as a share of the gateway's ~110 µs of CPU per request (JWT auth, audit on).
The rule (`src/okta_agent_proxy/internals.py`): keep a private path only if it is worth ≥ 2 % (≈ 2 µs). The private
paths the gateway gave up are rebuilt here as they were, to measure them.

`--gateway` also measures what no micro-benchmark can: the gateway process as it is against the same code with the
garbage collector left at CPython's defaults (`gc.freeze` and `gc.set_threshold` made no-ops before it starts),
behind nginx under wrk, in interleaved rounds, each run's CPU per request read from /proc (see bench/README.md).

Usage: .venv/bin/python bench/internals.py [--rounds 7] [--calls 200000] [--gateway [--audit sqlite]]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import create_engine
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import asyncpg

import okta_agent_proxy
from okta_agent_proxy.internals import requests_parsed
from okta_agent_proxy.observability.logging import configure, json_lines
from okta_agent_proxy.observability.metrics import LATENCY_BUCKETS
from okta_agent_proxy.store.audit_inserts import Statements
from okta_agent_proxy.store.audit_rows import RowEncoder, _insert_statement
from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.models import audit_events

REQUEST_CPU_US = 110.0  # the gateway's CPU per request with a JWT and audit on (bench/README.md)
KEEP_AT = 0.02  # of REQUEST_CPU_US


def round_us(function: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def compare(
    name: str,
    private: Callable[[], object],
    public: Callable[[], object],
    per_request: float,
    calls: int,
    rounds: int,
    per_call: int = 1,
) -> None:
    """Print µs per call of each side (best round), and what the private one saves per request."""
    times: dict[str, list[float]] = {"private": [], "public": []}
    for i in range(rounds):
        sides = [("private", private), ("public", public)]
        for side, function in sides if i % 2 == 0 else reversed(sides):
            times[side].append(round_us(function, calls) / per_call)
    fast, slow = min(times["private"]), min(times["public"])
    saved = (slow - fast) * per_request
    verdict = "keep" if saved >= KEEP_AT * REQUEST_CPU_US else "public"
    print(
        f"{name:<58} {fast:>8.3f} {slow:>8.3f} {slow / fast:>6.2f}× {per_request:>5g} {saved:>7.3f} "
        f"{saved / REQUEST_CPU_US:>6.2%}  {verdict}",
        flush=True,
    )


# ---------------------------------------------------------------- the candidates, private path first


def logging_candidates(calls: int, rounds: int) -> None:
    configure("INFO", "json")
    lines = json_lines()
    assert lines is not None
    live = structlog._config._CONFIG  # what `in_place` read before

    def private_in_place() -> bool:
        return (
            live.default_processors is lines.processors
            and live.logger_factory is lines.logger_factory
            and live.default_wrapper_class is lines.wrapper_class
        )

    compare("request line: structlog._config._CONFIG / get_config()", private_in_place, json_lines, 1, calls, rounds)
    escape, encode = json.encoder.encode_basestring_ascii, json.JSONEncoder().encode
    request_id = "0196c0ffee0000000000000000000001"
    compare(
        "request id as JSON: encode_basestring_ascii / JSONEncoder",
        lambda: escape(request_id),
        lambda: encode(request_id),
        1,
        calls,
        rounds,
    )
    markers: dict[int, Any] = {}
    c_encoder = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        markers, json.JSONEncoder().default, escape, None, ": ", ", ", False, False, True
    )
    event = {"event": "jwks_fetched", "level": "info", "timestamp": "2026-01-01T00:00:00.000001Z", "keys": 2}
    compare(
        "other log lines: c_make_encoder / json.dumps (0 per request)",
        lambda: "".join(c_encoder(event, 0)),
        lambda: json.dumps(event),
        0,
        calls,
        rounds,
    )


def metrics_candidates(calls: int, rounds: int) -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["backend"], registry=registry).labels("b")
    histogram = Histogram("h", "h", ["backend"], buckets=LATENCY_BUCKETS, registry=registry).labels("b")
    value_inc = counter._value.inc
    bounds, total, buckets = list(histogram._upper_bounds), histogram._sum.inc, [b.inc for b in histogram._buckets]

    def private_observe(amount: float) -> None:  # what recorder.py's `_observer` did
        total(amount)
        i = bisect_left(bounds, amount)
        if i < len(buckets):
            buckets[i](1)

    compare("counter: child._value.inc / child.inc()", lambda: value_inc(1), counter.inc, 1, calls, rounds)
    compare(
        "histogram: _sum, _buckets / child.observe() (4 ms)",
        lambda: private_observe(0.004),
        lambda: histogram.observe(0.004),
        2,
        calls,
        rounds,
    )


def aiohttp_candidates(calls: int, rounds: int) -> None:
    """The connection guard's reads (internals.py) against the public way to know about as much: counters of our
    own, set by a wrapper around the server's request factory and an override of `RequestHandler.finish_response`
    (one more coroutine per request). Both sides run what a request runs: one read per data arrival, or the wrapper
    and the extra coroutine."""

    class Connection:
        requests = 0
        busy = False
        idle_since = 0.0

    connection = Connection()

    def factory(message: object) -> object:
        return message

    def counting_factory(message: object) -> object:
        connection.requests += 1
        connection.busy = True
        return factory(message)

    async def finish(request: object) -> object:
        return request

    async def finish_and_stamp(request: object) -> object:
        try:
            return await finish(request)
        finally:
            connection.busy = False
            connection.idle_since = time.monotonic()

    def drive(coroutine: Any) -> object:
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("it did not finish at once")

    async def a_connection() -> web.RequestHandler:
        return web.RequestHandler(web.Server(finish), loop=asyncio.get_running_loop())  # type: ignore[arg-type]

    real = asyncio.run(a_connection())
    compare(
        "connection state: internals reads / own counters (hooks)",
        lambda: (requests_parsed(real), factory(1), drive(finish(1))),
        lambda: (counting_factory(1), drive(finish_and_stamp(1))),
        1,
        calls,
        rounds,
    )


def _event(index: int, mixed: bool) -> AuditEvent:
    """An audit event as the bench sends (pre-shared key, tools/list), or one of a mix of callers and outcomes."""
    plain = AuditEvent(
        datetime.now(UTC),
        f"r{index:031d}",
        "h",
        "POST",
        "/mcp",
        200,
        "ok",
        2.5,
        1.2,
        "bench",
        mcp_method="tools/list",
        jsonrpc_id="1",
        credential_method="pre-shared-key",
        upstream_status=200,
        bytes_in=60,
        bytes_out=40,
    )
    if not mixed:
        return plain
    odd = index % 2 == 1
    return plain._replace(
        user_sub="user" if odd else None,
        user_uid=None if index % 3 else "uid",
        token_jti="jti" if odd else None,
        agent="agent" if odd else None,
        mcp_method="tools/call" if odd else "tools/list",
        mcp_name="echo" if odd else None,
        jsonrpc_id=str(index),
        credential_method="cross-app",
        credential_cache_hit=odd if index % 4 else None,
    )


def sqlite_candidates(rounds: int) -> None:
    """The sqlite3 adapters for None and bool once registered at import, per audit row, in 2000-row batches."""
    none_key, bool_key = (type(None), sqlite3.PrepareProtocol), (bool, sqlite3.PrepareProtocol)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        audit_events.metadata.create_all(create_engine(f"sqlite:///{path}"))
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        encoder = RowEncoder(sqlite.dialect(), record_arguments=False)
        for mixed in (False, True):
            rows = [encoder.encode(_event(i, mixed)) for i in range(2000)]
            statements = encoder.statements(rows)

            def insert(statements: Statements = statements) -> None:
                connection.execute("BEGIN")
                for sql, parameter_sets in statements:
                    for parameters in parameter_sets:
                        connection.execute(sql, parameters)
                connection.execute("COMMIT")
                connection.execute("DELETE FROM audit_events")

            def adapted(insert: Callable[[], None] = insert) -> None:
                sqlite3.register_adapter(type(None), cast(Any, {}.get))  # as it was: no Python frame
                sqlite3.register_adapter(bool, int)
                try:
                    insert()
                finally:
                    sqlite3.adapters.pop(none_key)
                    sqlite3.adapters.pop(bool_key)

            nulls = sum(value is None for _, sets in statements for values in sets for value in values) / len(rows)
            name = f"audit row: sqlite3 adapters / none ({'mixed' if mixed else 'bench'}, {nulls:.1f} NULLs bound)"
            compare(name, adapted, insert, 1, 3, rounds, per_call=len(rows))
        connection.close()


def _renumbered(dialect: Any, rows: int) -> str:
    """The multi-row INSERT as it was built: the one-row statement's VALUES group repeated, `$n` renumbered."""
    head, values, group = _insert_statement(dialect).partition(" VALUES ")
    width = group.count(",") + 1

    def numbered(row: int) -> str:
        return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + row * width}", group)

    return head + values + ", ".join(numbered(row) for row in range(rows))


def insert_candidates() -> None:
    print("\nmulti-row INSERT, compiled once per shape (0 per request): renumbered text / SQLAlchemy's multi-VALUES")
    for dialect in (sqlite.dialect(), asyncpg.dialect()):  # type: ignore[no-untyped-call]
        for rows in (16, 256):
            started = time.perf_counter()
            _renumbered(dialect, rows)
            middle = time.perf_counter()
            _insert_statement(dialect, rows=rows)
            ended = time.perf_counter()
            renumbered, compiled = (middle - started) * 1e3, (ended - middle) * 1e3
            print(f"  {dialect.name:<10} {rows:>3} rows: {renumbered:6.1f} ms / {compiled:6.1f} ms")


# ---------------------------------------------------------------- the garbage collector, in the gateway process

_AS_IS = "import sys\nsys.path.insert(0, {src!r})\n"
_GC_DEFAULTS = _AS_IS + "import gc\ngc.freeze = lambda: None\ngc.set_threshold = lambda *thresholds: None\n"
_RUN = "from okta_agent_proxy.cli import main\nsys.exit(main())\n"


def gateway_gc(rounds: int, duration: float, audit: str | None) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from processes import Service, ensure_tools, free_port, services, wait_ready
    from revisions import current_revision
    from targets import GatewayLauncher, Measurer, nginx_config, probe
    from wrk_runner import Wrk

    src = str(Path(okta_agent_proxy.__file__).parents[1])  # the gateway variants import this same code
    wrk_path, nginx_path = ensure_tools()
    *load_cpus, proxy_cpu = sorted(os.sched_getaffinity(0))
    load_pin = ["taskset", "-c", ",".join(map(str, load_cpus))] if load_cpus else []
    proxy_pin = ["taskset", "-c", str(proxy_cpu)] if load_cpus else []
    current = current_revision()
    with tempfile.TemporaryDirectory(prefix="oap-internals-") as tmp, services() as started:
        workdir = Path(tmp)
        variants = []
        for label, mark, prelude in (("current", "", _AS_IS), ("baseline", " [gc defaults]", _GC_DEFAULTS)):
            script = workdir / f"gateway-{label}"
            script.write_text(f"#!{sys.executable}\n" + prelude.format(src=src) + _RUN)
            script.chmod(0o755)
            variants.append(dataclasses.replace(current, label=label, mark=mark, gateway=script))
        port = free_port()
        (workdir / "nginx.conf").write_text(nginx_config(workdir, port))
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
        wait_ready(nginx, f"http://127.0.0.1:{port}/")
        launcher = GatewayLauncher(workdir, started, port, proxy_pin, {})
        targets = [launcher.start("gateway", variant, audit=audit) for variant in variants]
        measurer = Measurer(Wrk(wrk_path, 1, load_pin), started, 1.0)
        for target in targets:
            wait_ready(target.service, target.ready_url)
            probe(target.service, target.url, target.headers)
            measurer.warm(target)
        print(f"\ngateway (audit={audit or 'off'}) as it is / with the GC at CPython's defaults, wrk -c32:")
        ratios: list[tuple[float, float]] = []
        for i in range(rounds):
            runs = {
                t.name: measurer.measure(t, 32, duration, f"{t.name} #{i + 1}")
                for t in (targets if i % 2 == 0 else reversed(targets))
            }
            as_is, defaults = runs[targets[0].name], runs[targets[1].name]
            if as_is.cpu_us_per_request and defaults.cpu_us_per_request:
                ratios.append((as_is.rps / defaults.rps, defaults.cpu_us_per_request / as_is.cpu_us_per_request))
        rps, cpu = statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)
        print(
            f"GC retuning buys, median of {len(ratios)} rounds: req/s ×{rps:.3f}, CPU per request ×{cpu:.3f} "
            f"(≥ 1.02 to keep)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--gateway", action="store_true", help="also the GC retuning, in the gateway process")
    parser.add_argument("--gateway-rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (--gateway)")
    parser.add_argument("--audit", choices=("sqlite",), default=None, help="the gateway with audit on (--gateway)")
    options = parser.parse_args()
    gc.disable()  # no collection in the middle of a timed loop; nothing here makes cycles
    print(
        f"{'private path / public way':<58} {'private':>8} {'public':>8} {'ratio':>7} {'/req':>5} "
        f"{'µs/req':>7} {'share':>6}  verdict (µs per call, best of {options.rounds} rounds)"
    )
    logging_candidates(options.calls, options.rounds)
    metrics_candidates(options.calls, options.rounds)
    aiohttp_candidates(options.calls, options.rounds)
    sqlite_candidates(options.rounds)
    insert_candidates()
    gc.enable()
    if options.gateway:
        gateway_gc(options.gateway_rounds, options.duration, options.audit)


if __name__ == "__main__":
    main()
