"""Graceful drain on SIGTERM (DESIGN.md §9; `http/drain.py`), on real `okta-agent-proxy serve` processes.

One SIGTERM, watched from outside as a load balancer, a client and an auditor would: `/readyz` turns 503 at once
(`/healthz` stays 200), connections are still taken during the drain window (each answer then says `Connection:
close`), then refused; a 10-second SSE stream (the devkit's real MCP SDK server, `slow_report`) in flight at the
signal completes whole; the process exits once it has, and every request made before or during the drain has its
audit row (SQLite, read after the process exited). With a short grace, what is still running at its end ends
cleanly: a stream with an SSE `error` event and the end of its body, a request still waiting for its backend or
still sending its body with 503, each audited `gateway_shutdown` — a client that stopped reading too. And the same
under `--workers 2`, signalled as Kubernetes does: the parent only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.conftest import SampleBackends
from tests.integration.sse import MCP_ACCEPT, SseEvent, iter_sse
from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend
from tests.support.loopback import serving
from tests.support.processes import LOOPBACK, ServerProcess

pytestmark = pytest.mark.slow
BOUND = 15.0  # seconds: the most any single wait in this module may take
READY_WITHIN = 0.1  # DESIGN.md §9: /readyz turns 503 "at once"
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
HEADERS = {"Accept": MCP_ACCEPT, "MCP-Protocol-Version": "2025-11-25"}


def slow_report(steps: int, interval_ms: int) -> dict[str, Any]:
    """The sample server's `slow_report`: a progress event every `interval_ms`, then the answer (id 7)."""
    arguments = {"steps": steps, "interval_ms": interval_ms}
    params = {"name": "slow_report", "arguments": arguments, "_meta": {"progressToken": "drain"}}
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}


def audit_rows(database: Path) -> dict[str, tuple[int, str]]:
    """request_id → (status, outcome), read once the gateway has exited."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT request_id, status, outcome FROM audit_events").fetchall()
    return {request_id: (status, outcome) for request_id, status, outcome in rows}


async def exit_code(gateway: ServerProcess, timeout: float = BOUND) -> int | None:
    """Wait (off the event loop, which serves the test's backends) for the gateway to exit by itself; None if it
    did not in time (it is killed on leaving `gateway_process`)."""
    try:
        return await asyncio.to_thread(gateway.process.wait, timeout)
    except subprocess.TimeoutExpired:
        return None


async def ping(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    async with http.post(url, json=PING, headers=HEADERS) as response:
        await response.read()
        return response


async def pings(url: str, count: int) -> list[tuple[int, str | None, str | None]]:
    """`count` pings, each on a new connection: (status, `Connection`, request id); (0, the error, None) for one
    that found no gateway."""
    answers: list[tuple[int, str | None, str | None]] = []
    for _ in range(count):
        try:
            async with aiohttp.ClientSession() as http:  # keep-alive, as a client would pool it
                answer = await ping(http, url)
        except aiohttp.ClientError as exc:
            answers.append((0, repr(exc), None))
        else:
            answers.append((answer.status, answer.headers.get("Connection"), answer.headers["X-Request-ID"]))
    return answers


async def first_503(gateway: ServerProcess, signalled: float, within: float = 1.0) -> tuple[float, Any]:
    """Poll `/readyz` on fresh connections until it answers 503: (seconds after the signal, the body); (inf, what
    it answered last) if it did not within `within` seconds."""
    connector = aiohttp.TCPConnector(force_close=True)
    last: Any = None
    async with aiohttp.ClientSession(connector=connector) as http:
        while time.monotonic() - signalled < within:
            try:
                async with http.get(gateway.url("/readyz")) as response:
                    last = json.loads(await response.read())
                    if response.status == 503:
                        return time.monotonic() - signalled, last
            except aiohttp.ClientError as exc:
                last = repr(exc)
    return float("inf"), last


async def status_of(url: str) -> int:
    """GET `url` on a new connection: its status (0: no gateway there)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Connection": "close"}) as response:
            return response.status
    except aiohttp.ClientError:
        return 0


async def refused_at_connect(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@asynccontextmanager
async def idle_keepalive(port: int) -> AsyncIterator[asyncio.StreamReader]:
    """A connection that made one request (`/healthz`, keep-alive) and then waits: its reader."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower(), head
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the gateway closed it first
            await writer.wait_closed()


@dataclass
class Stream:
    """An SSE answer read to its end: the events and how the body ended."""

    status: int = 0
    events: list[SseEvent] = field(default_factory=list)
    first_event: asyncio.Event = field(default_factory=asyncio.Event)
    request_id: str = ""
    ended: str = "not yet"  # "cleanly", or the exception that ended the read

    def messages(self) -> list[Any]:
        return [event.json() for event in self.events if event.event != "error" and event.data]

    def progress(self) -> list[int]:
        return [m["params"]["progress"] for m in self.messages() if m.get("method") == "notifications/progress"]

    def answer(self) -> Any:
        answers = [message for message in self.messages() if message.get("id") == 7]
        return answers[0] if len(answers) == 1 else None


async def read_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: Stream) -> None:
    try:
        async with http.post(url, json=body, headers=HEADERS) as response:
            stream.status = response.status
            stream.request_id = response.headers["X-Request-ID"]
            async for event in iter_sse(response.content):
                stream.events.append(event)
                stream.first_event.set()
        stream.ended = "cleanly"
    except aiohttp.ClientError as exc:  # a reset, an incomplete chunked body: not a clean end
        stream.ended = repr(exc)
    finally:
        stream.first_event.set()


# --- one SIGTERM, drain 1 s, grace 30 s, a 10-second stream in flight ------------------------------------------------


@dataclass
class DrainRun:
    stream: Stream = field(default_factory=Stream)
    readyz_after: float = 0.0  # seconds from SIGTERM to the first 503
    readyz_body: Any = None
    healthz_while_draining: int = 0
    served_while_draining: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Connection)
    within_the_window: bool = False  # those requests were all made inside the drain window
    keepalive_closed_at_window_end: bool = False
    refused_after_window: bool = False
    exit_code: int | None = None
    exited_after_stream: float = 0.0  # seconds from the stream's end to the process's exit
    request_ids: list[str] = field(default_factory=list)  # every request made before or during the drain
    rows: dict[str, tuple[int, str]] = field(default_factory=dict)


DRAIN, GRACE = 1.0, 30.0
STEPS = 20  # of half a second: a 10-second stream


async def sigterm_during_a_long_stream(sample: SampleBackends, database: Path) -> DrainRun:
    run = DrainRun()
    settings = {
        "DATABASE_URL": f"sqlite:///{database}",
        "SHUTDOWN_DRAIN_SECONDS": DRAIN,
        "SHUTDOWN_GRACE_SECONDS": GRACE,
    }
    with gateway_process(sample.config(), settings=settings) as gateway:
        url = gateway.url("/employees")
        async with aiohttp.ClientSession() as http, idle_keepalive(gateway.port) as idle:
            for _ in range(5):
                run.request_ids.append((await ping(http, url)).headers["X-Request-ID"])
            reading = asyncio.create_task(read_stream(http, url, slow_report(STEPS, interval_ms=500), run.stream))
            async with asyncio.timeout(BOUND):
                await run.stream.first_event.wait()
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            run.readyz_after, run.readyz_body = await first_503(gateway, signalled)
            for status, connection, request_id in await pings(url, 5):  # new connections, in the drain window
                run.served_while_draining.append((status, connection))
                run.request_ids += [request_id] if request_id else []
            run.healthz_while_draining = await status_of(gateway.url("/healthz"))
            run.within_the_window = time.monotonic() - signalled < DRAIN
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(DRAIN + 1.0):
                    run.keepalive_closed_at_window_end = await idle.read() == b""
            await asyncio.sleep(max(0.0, signalled + DRAIN + 0.3 - time.monotonic()))
            run.refused_after_window = await refused_at_connect(gateway.port)
            async with asyncio.timeout(BOUND):
                await reading
            stream_ended = time.monotonic()
            run.request_ids.append(run.stream.request_id)
            # The client keeps its connection for a next request; the gateway closes it, and exits.
            run.exit_code = await exit_code(gateway)
            run.exited_after_stream = time.monotonic() - stream_ended
    run.rows = audit_rows(database)
    return run


@pytest.fixture(scope="module")
def drain_run(sample_backends: SampleBackends, tmp_path_factory: pytest.TempPathFactory) -> DrainRun:
    database = tmp_path_factory.mktemp("drain") / "audit.db"
    return asyncio.run(sigterm_during_a_long_stream(sample_backends, database))


def test_a_stream_in_flight_at_sigterm_completes_whole(drain_run: DrainRun) -> None:
    stream = drain_run.stream
    assert stream.status == 200 and stream.ended == "cleanly", stream.ended
    assert stream.progress() == list(range(1, STEPS + 1))
    assert stream.answer()["result"]["content"][0]["text"] == f"report ready after {STEPS} steps"
    assert not [event for event in stream.events if event.event == "error"]
    # Then the process stops by itself, without waiting for the rest of the grace.
    assert drain_run.exit_code == 0
    assert drain_run.exited_after_stream < 5.0


def test_readyz_turns_503_at_once_and_healthz_stays_200(drain_run: DrainRun) -> None:
    assert drain_run.readyz_after <= READY_WITHIN, drain_run.readyz_after
    assert drain_run.readyz_body == {"status": "draining"}
    assert drain_run.healthz_while_draining == 200


def test_the_drain_window_serves_new_connections_then_the_port_is_closed(drain_run: DrainRun) -> None:
    # During the window: served, each answer telling the client to take its next request elsewhere.
    assert drain_run.within_the_window
    assert drain_run.served_while_draining == [(200, "close")] * 5
    # At its end: idle keep-alive connections are closed, and a new connection is refused at connect.
    assert drain_run.keepalive_closed_at_window_end
    assert drain_run.refused_after_window


def test_every_request_made_before_or_during_the_drain_has_its_audit_row(drain_run: DrainRun) -> None:
    assert len(drain_run.request_ids) == 11
    assert {request_id: drain_run.rows.get(request_id) for request_id in drain_run.request_ids} == dict.fromkeys(
        drain_run.request_ids, (200, "ok")
    )


# --- a short grace: what is still running at its end ends cleanly ----------------------------------------------------


@dataclass
class OddBackend:
    """`/half`: an SSE stream whose first event stops half-way, then silence (`half_sent` once that half is out);
    `/flood`: SSE events of 64 KB as fast as they can go (`flooding` once the first is out)."""

    url: str
    half_sent: asyncio.Event = field(default_factory=asyncio.Event)
    flooding: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def odd_backend() -> AsyncIterator[OddBackend]:
    state = OddBackend("")

    async def half(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"jsonrpc": "2.0", "method": "notifications/mess')
        state.half_sent.set()
        await asyncio.sleep(3600)
        return response

    async def flood(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b"data: " + b"x" * 65536 + b"\n\n"
        for _ in range(2000):  # 128 MB at most: far more than the sockets between here and the client hold
            await response.write(event)
            state.flooding.set()
        return response

    app = web.Application()
    app.router.add_post("/half", half)
    app.router.add_post("/flood", flood)
    async with serving(app, handler_cancellation=True) as url:
        state.url = url
        yield state


async def post_half_a_body(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST whose body (announced as 200 bytes) stops after 20: the connection, its answer still to come."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nContent-Type: application/json\r\n"
    head += f"Accept: {MCP_ACCEPT}\r\nContent-Length: 200\r\n\r\n"
    writer.write(head.encode() + b'{"jsonrpc": "2.0", ')
    await writer.drain()
    return reader, writer


async def post_and_never_read(port: int, path: str) -> asyncio.StreamWriter:
    """A POST whose client never reads the answer: the connection."""
    body = json.dumps(PING).encode()
    _, writer = await asyncio.open_connection(LOOPBACK, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nContent-Type: application/json\r\n"
    head += f"Accept: {MCP_ACCEPT}\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 answer with a Content-Length: its status, headers (lower-case names) and body. Not read to the
    end of the connection: aiohttp keeps reading a request body it did not take for a while before it closes."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, await reader.readexactly(int(headers["content-length"]))


async def test_at_the_end_of_the_grace_streams_end_cleanly_and_are_audited(tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    async with running_backend() as backend, odd_backend() as odd:
        config = gateway_config(
            hang=psk_backend(backend.url("/hang-sse"), "/hang"),  # one event, then silence
            silent=psk_backend(backend.url("/silent"), "/silent", timeout_seconds=60),  # never answers
            half=psk_backend(f"{odd.url}/half", "/half"),
            flood=psk_backend(f"{odd.url}/flood", "/flood", timeout_seconds=60),
        )
        settings = {"DATABASE_URL": f"sqlite:///{database}", "SHUTDOWN_DRAIN_SECONDS": 0.2, "SHUTDOWN_GRACE_SECONDS": 1}
        with gateway_process(config, settings=settings) as gateway:
            async with aiohttp.ClientSession() as http:
                stream, broken = Stream(), Stream()
                reading = asyncio.create_task(read_stream(http, gateway.url("/hang"), PING, stream))
                reading_broken = asyncio.create_task(read_stream(http, gateway.url("/half"), PING, broken))
                waiting = asyncio.create_task(http.post(gateway.url("/silent"), json=PING, headers=HEADERS))
                body_reader, body_writer = await post_half_a_body(gateway.port, "/silent")
                deaf = await post_and_never_read(gateway.port, "/flood")
                async with asyncio.timeout(BOUND):
                    await stream.first_event.wait()
                    await backend.wait_for_requests(2)
                    await odd.half_sent.wait()
                    await odd.flooding.wait()
                signalled = time.monotonic()
                gateway.process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(BOUND):
                    await reading
                    await reading_broken
                    answer = await waiting
                    refusal = await answer.json()
                    answer.release()
                    cut_after = time.monotonic() - signalled
                    half_status, half_headers, half_rest = await read_answer(body_reader)
                half_after = time.monotonic() - signalled
                for writer in (body_writer, deaf):
                    writer.close()
            assert await exit_code(gateway) == 0
        for record in backend.requests:
            await record.wait_finished(BOUND)
    # The stream: its event, then the gateway's error event, then the end of the chunked body — no reset.
    assert stream.status == 200 and stream.ended == "cleanly", stream.ended
    assert [event.event for event in stream.events] == [None, "error"]
    assert stream.events[-1].json()["error"] == "gateway_shutdown"
    assert 0.2 + 1 <= cut_after < 0.2 + 1 + 2.0  # at the end of the grace, which began after the drain window
    # A stream cut in the middle of an event: the end of the body alone (an event of ours would be read as part of
    # the backend's), and the client drops the half it has.
    assert (broken.status, broken.ended, broken.events) == (200, "cleanly", [])
    # The request still waiting for its backend: 503 gateway_shutdown (the backend saw it cancelled).
    assert (answer.status, refusal["error"]) == (503, "gateway_shutdown")
    assert all(record.peer_closed for record in backend.requests)
    # The request whose body was still arriving: 503 gateway_shutdown too, not a reset.
    assert half_status == 503 and json.loads(half_rest)["error"] == "gateway_shutdown", (half_status, half_rest)
    assert half_after < 0.2 + 1 + 2.0, (cut_after, half_after)
    rows = audit_rows(database)
    assert rows[stream.request_id] == (200, "gateway_shutdown")
    assert rows[answer.headers["X-Request-ID"]] == (503, "gateway_shutdown")
    assert rows[broken.request_id] == (200, "gateway_shutdown")
    assert rows[half_headers["x-request-id"]] == (503, "gateway_shutdown")
    # The client that never read its flood: the drain's end could not be written to it, and its row says so still.
    assert sorted(rows.values()).count((200, "gateway_shutdown")) == 3, rows


# --- --workers 2, signalled as Kubernetes does: the parent only ------------------------------------------------------


async def test_under_two_workers_each_drains_itself(sample_backends: SampleBackends, tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    settings = {"DATABASE_URL": f"sqlite:///{database}", "SHUTDOWN_DRAIN_SECONDS": 0.5, "SHUTDOWN_GRACE_SECONDS": 10}
    with gateway_process(sample_backends.config(), settings=settings, workers=2) as gateway:
        async with aiohttp.ClientSession() as http:
            stream = Stream()
            body = slow_report(steps=6, interval_ms=500)
            reading = asyncio.create_task(read_stream(http, gateway.url("/employees"), body, stream))
            async with asyncio.timeout(BOUND):
                await stream.first_event.wait()
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)  # the parent passes it on to each worker
            readyz_after, _ = await first_503(gateway, signalled)
            # Whichever worker a new connection reaches is draining.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                statuses = []
                for _ in range(8):
                    async with fresh.get(gateway.url("/readyz")) as response:
                        statuses.append(response.status)
            async with asyncio.timeout(BOUND):
                await reading
            stream_ended = time.monotonic()
        assert await exit_code(gateway) == 0
        exited_after_stream = time.monotonic() - stream_ended
    assert readyz_after <= READY_WITHIN, readyz_after
    assert statuses == [503] * 8
    assert stream.ended == "cleanly" and stream.progress() == list(range(1, 7)), stream.ended
    assert stream.answer()["result"]["content"][0]["text"] == "report ready after 6 steps"
    assert exited_after_stream < 5.0
    assert audit_rows(database)[stream.request_id] == (200, "ok")
