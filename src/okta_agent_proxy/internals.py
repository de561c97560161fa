"""The one module that reads a pinned library's private state; everything else uses public APIs only.

Each entry says what it buys; tests/unit/test_internals.py fails if the pinned library changes underneath it. For
speed, a private path must be worth ≥ 2 % of the gateway's throughput (≈ 2 µs of its ~110 µs of CPU per request
with a JWT and audit on). `bench/internals.py` measures each candidate against the public way in one run (µs per
call, best of 7 rounds, times the calls per request). None was worth it, and each went for the public way: the C
JSON encoder made by hand (0 per request: the request line does not use it), structlog's live configuration object
(0.23 µs per request), prometheus-client's `_value`, `_sum` and `_buckets` (0.09 + 2 × 0.14 µs), the sqlite3
adapters for None and bool (0.3 µs per audit row in the bench's traffic, 0.9 µs with 3 NULLs bound per row), and
the multi-row INSERT built by renumbering compiled SQL (0 per request; SQLAlchemy compiles its own multi-row
statement in 4-84 ms once per shape instead of 1-6 ms). aiohttp's server class is no longer swapped:
`http/server.py` builds a `web.Server` of its own with public arguments and runs it with a `web.ServerRunner`.

What is left is aiohttp's per-connection bookkeeping, which the connection limits of `http/server.py`
(`HEADER_READ_TIMEOUT_SECONDS`, `KEEPALIVE_TIMEOUT_SECONDS`, `MAX_CONNECTIONS`) read when data arrives, when they
sweep and when they must evict, and which the graceful drain (`http/drain.py`) reads once per connection at
shutdown. These stay for what they mean, not for speed: counters of our own, kept by public
hooks (a wrapper around the server's request factory, an override of `RequestHandler.finish_response`), would cost
only 0.2 µs more per request (0.18 %), but would count a pipelined request only once its handling starts, and would
depend on aiohttp calling `finish_response` for every response, which it does not document.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

__all__ = ["connection_task", "handling_request", "keepalive_ends_at", "multi_row_insert", "requests_parsed"]

_PARAMETER = re.compile(r"\$(\d+)")  # a numbered parameter ($1: asyncpg's style)


def requests_parsed(connection: web.RequestHandler) -> int:
    """How many requests' headers have come in on `connection` so far (aiohttp counts one as its parser emits it).

    Buys: the guard tells a connection that has sent no whole request yet, or has begun sending a next one, from
    one that is idle — read when data arrives (once per request) and when the guard sweeps."""
    return connection._request_count


def handling_request(connection: web.RequestHandler) -> bool:
    """Whether a request on `connection` is being handled: from its headers' arrival until its response is
    written to the end (after the handler returned, too).

    Buys: the guard never closes, nor evicts, a connection whose request is in progress — read only when it
    sweeps or must evict."""
    return connection._request_in_progress


def keepalive_ends_at(connection: web.RequestHandler) -> float:
    """When aiohttp's keep-alive timer would close `connection` (its last response's end plus the keep-alive
    timeout, in the event loop's clock).

    Buys: at `MAX_CONNECTIONS` the guard evicts the connection idle the longest — read only then."""
    return connection._next_keepalive_close_time


def connection_task(connection: web.RequestHandler) -> asyncio.Task[None] | None:
    """The task that serves `connection`'s requests one after the other (None once it has ended). While a request is
    handled, it awaits the task that runs the handler, so cancelling it with a message cancels the handler with
    that message (Python ≥ 3.11 carries it on the `CancelledError`).

    Buys: at the end of the shutdown grace, the drain cancels each request still in flight with a message of its
    own, which the forwarder tells from aiohttp's cancellation of a request whose client left — read once per
    connection, at shutdown. The public way, a wrapper around the request handler noting each request's task, costs
    1.0 µs per request (≈ 1 % of the gateway's CPU per request; `current_task`, a try/finally and a coroutine frame,
    timed with `time.perf_counter` over 200 000 calls on this machine) to be read once."""
    return connection._task_handler


def multi_row_insert(single: str, rows: int) -> str:
    """`single`, a one-row `INSERT … VALUES (…)` as SQLAlchemy compiles it, extended to `rows` rows: the VALUES
    group repeated, numbered parameters renumbered for each row (`?` parameters need nothing) — the text SQLAlchemy
    compiles for `insert().values([…])` of `rows` rows, which tests/unit/test_internals.py checks it equals.

    Buys: 1-6 ms to make a statement instead of 67-105 ms for SQLAlchemy to compile it (for 256 rows; 200 ms for
    the 9 batch sizes of one column set), measured with `time.perf_counter` on this machine — each a stall of the
    event loop (PostgreSQL) or of the GIL (SQLite's writer thread) the first time a batch of that size is written,
    which is under load. Relies on SQLAlchemy's compiled text, not on its API."""
    head, values, group = single.partition(" VALUES ")
    if not values or not (group.startswith("(") and group.endswith(")")):
        raise RuntimeError("an INSERT of an unexpected shape")
    width = group.count(",") + 1

    def renumbered(row: int) -> str:
        return _PARAMETER.sub(lambda m: f"${int(m.group(1)) + row * width}", group)

    return head + values + ", ".join(renumbered(row) for row in range(rows))
