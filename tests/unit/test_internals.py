"""`internals.py`: each read of aiohttp's private connection state means what the connection guard takes it to mean.

A real `web.Server` on loopback, a raw client socket, and a handler held until the test lets it answer: if the
pinned aiohttp renames a field or changes when it is set, one of these fails (the guard's own behaviour is
tests/integration/test_slow_clients.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from okta_agent_proxy.internals import connection_task, handling_request, keepalive_ends_at, requests_parsed

KEEPALIVE_SECONDS = 30.0
WAIT_SECONDS = 5.0
REQUEST = b"GET /%d HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass
class HeldServer:
    """A server whose handler answers only when `release` is set; `entered` is set as each request reaches it, and
    `cancelled` holds the `CancelledError` a cancelled handler got."""

    server: web.Server
    port: int
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: list[asyncio.CancelledError] = field(default_factory=list)

    def connection(self) -> web.RequestHandler:
        (connection,) = self.server.connections
        return connection


@asynccontextmanager
async def held_server() -> AsyncIterator[HeldServer]:
    async def handler(request: web.BaseRequest) -> web.Response:
        held.entered.set()
        try:
            await held.release.wait()
        except asyncio.CancelledError as cancelled:
            held.cancelled.append(cancelled)
            raise
        return web.Response(text="ok")

    server = web.Server(handler, keepalive_timeout=KEEPALIVE_SECONDS, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    held = HeldServer(server, runner.addresses[0][1])
    try:
        yield held
    finally:
        held.release.set()
        await runner.cleanup()


@asynccontextmanager
async def client(held: HeldServer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", held.port)
    try:
        await until(lambda: len(held.server.connections) == 1, "the connection is open")
        yield reader, writer
    finally:
        writer.close()


async def until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while not check():
            await asyncio.sleep(0.001)
    assert check(), what


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return await reader.readexactly(int(lengths[0]))


async def test_requests_parsed_counts_each_request_whose_headers_came_in() -> None:
    async with held_server() as held, client(held) as (reader, writer):
        assert requests_parsed(held.connection()) == 0
        writer.write(REQUEST % 1 + REQUEST[:20] % 2)  # a whole request and the start of a second one
        await held.entered.wait()
        assert requests_parsed(held.connection()) == 1
        writer.write(REQUEST[20:])  # the rest of the second, pipelined behind the first (still being handled)
        await until(lambda: requests_parsed(held.connection()) == 2, "the second request counted once parsed")
        held.release.set()
        assert await read_response(reader) == b"ok"
        assert await read_response(reader) == b"ok"
        assert requests_parsed(held.connection()) == 2


async def test_handling_request_lasts_from_the_headers_to_the_end_of_the_response() -> None:
    async with held_server() as held, client(held) as (reader, writer):
        assert not handling_request(held.connection())
        writer.write(REQUEST % 1)
        await held.entered.wait()
        assert handling_request(held.connection())
        held.release.set()
        assert await read_response(reader) == b"ok"
        await until(lambda: not handling_request(held.connection()), "not handling once the response is written")


async def test_keepalive_ends_at_is_the_last_response_end_plus_the_keepalive_timeout() -> None:
    loop = asyncio.get_running_loop()
    async with held_server() as held, client(held) as (reader, writer):
        writer.write(REQUEST % 1)
        await held.entered.wait()
        answered_after = loop.time()
        held.release.set()
        assert await read_response(reader) == b"ok"
        await until(lambda: not handling_request(held.connection()), "the response is finished")
        ends_at = keepalive_ends_at(held.connection())
        assert answered_after + KEEPALIVE_SECONDS <= ends_at <= loop.time() + KEEPALIVE_SECONDS


@pytest.mark.parametrize("dialect", ["postgresql+asyncpg", "sqlite"])
@pytest.mark.parametrize("rows", [2, 3, 17])
def test_multi_row_insert_is_the_text_sqlalchemy_compiles(dialect: str, rows: int) -> None:
    """If the pinned SQLAlchemy compiles a multi-row INSERT differently from the one-row statement repeated (its
    VALUES group, its parameter numbering), the audit log's statements must be rebuilt the public way."""
    from sqlalchemy.engine import make_url

    from okta_agent_proxy.internals import multi_row_insert
    from okta_agent_proxy.store.audit_rows import _insert_statement

    def uncast(sql: str) -> str:  # SQLAlchemy casts PostgreSQL parameters in the first row only; ours in each
        return re.sub(r"::[A-Z][A-Z ]*[A-Z]", "", sql)

    compiled_for = make_url(f"{dialect}://").get_dialect()()
    columns = ("time", "request_id", "replica", "status", "agent")
    ours, theirs = multi_row_insert(_insert_statement(compiled_for), rows), _insert_statement(compiled_for, rows=rows)
    assert uncast(ours) == uncast(theirs) and ours.count("VALUES") == 1
    single = _insert_statement(compiled_for, columns)
    assert uncast(multi_row_insert(single, rows)) == uncast(_insert_statement(compiled_for, columns, rows))


async def test_connection_task_serves_the_connection_and_cancelling_it_cancels_the_handler_with_the_message() -> None:
    """The drain (`http/drain.py`) cancels a request in flight through its connection's task, with a message the
    forwarder must find on the handler's `CancelledError`."""
    async with held_server() as held, client(held) as (_, writer):
        task = connection_task(held.connection())
        assert task is not None and not task.done()
        writer.write(REQUEST % 1)
        await held.entered.wait()
        assert connection_task(held.connection()) is task
        task.cancel("a message of our own")
        await until(lambda: bool(held.cancelled), "the handler was cancelled")
        assert held.cancelled[0].args == ("a message of our own",)
        await until(task.done, "the connection's task ended with its handler")
