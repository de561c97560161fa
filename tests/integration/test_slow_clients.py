"""Slow and idle clients (`HEADER_READ_TIMEOUT_SECONDS`, `KEEPALIVE_TIMEOUT_SECONDS`, `MAX_CONNECTIONS`): a flood
of half-sent requests cannot hold connections, nor shut out `/healthz` or a valid client, even when it is far larger
than the process's open-file limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend, running_gateway
from tests.support.processes import LOOPBACK
from tests.support.raw_http import raw_request

CALL = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
HALF_REQUEST = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: "


async def closed_by_peer(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes this connection within `within` seconds (EOF or reset)."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


@contextlib.asynccontextmanager
async def slow_connection(
    port: int, sent: bytes = HALF_REQUEST
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        if sent:
            writer.write(sent)
            await writer.drain()
        yield reader, writer
    finally:
        writer.close()


async def valid_calls(port: int, stop: asyncio.Event, bound: float) -> list[tuple[str, int, float]]:
    """GET /healthz and POST /echo every 50 ms until `stop`: (path, status, seconds) each."""
    results = []
    head = f"POST /echo HTTP/1.1\nHost: {LOOPBACK}:{port}\nContent-Type: application/json"
    while not stop.is_set():
        for path, call in (
            ("/healthz", raw_request(port, f"GET /healthz HTTP/1.1\nHost: {LOOPBACK}:{port}", timeout=bound)),
            ("/echo", raw_request(port, head, CALL, timeout=bound)),
        ):
            started = time.monotonic()
            try:
                status = (await call).status
            except (TimeoutError, OSError):
                status = 0
            results.append((path, status, time.monotonic() - started))
        await asyncio.sleep(0.05)
    return results


@pytest.mark.slow
async def test_a_flood_of_half_sent_requests_under_a_low_file_limit_never_shuts_out_valid_clients() -> None:
    """3,000 connections that each send half a header, opened 250 at a time, against a gateway limited to 1,024
    open files (so at most 819 client connections): every valid request still gets its answer, promptly, and the
    half-sent ones are closed after the header timeout."""
    async with running_backend() as backend:
        config = gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo"))
        settings = {"HEADER_READ_TIMEOUT_SECONDS": 2, "LOG_LEVEL": "ERROR"}
        with gateway_process(config, settings=settings, open_files=1024) as gateway:
            stop = asyncio.Event()
            calls = asyncio.ensure_future(valid_calls(gateway.port, stop, bound=5.0))
            writers = []
            try:
                for _ in range(12):
                    for _ in range(250):
                        with contextlib.suppress(OSError):
                            reader, writer = await asyncio.open_connection(LOOPBACK, gateway.port)
                            writer.write(HALF_REQUEST)
                            writers.append((reader, writer))
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                results = await calls
            assert gateway.alive()
            failed = [result for result in results if result[1] != 200]
            assert not failed, failed[:10]
            assert len(results) >= 20
            assert max(seconds for _, _, seconds in results) < 3.0
            # Every half-sent request is closed: evicted to admit others, or after the header timeout.
            pending = [closed_by_peer(reader, within=5.0) for reader, _ in writers]
            assert all(await asyncio.gather(*pending))
            for _, writer in writers:
                writer.close()
            metrics = await raw_request(gateway.port, f"GET /metrics HTTP/1.1\nHost: {LOOPBACK}:{gateway.port}")
            text = metrics.body.decode()
            assert 'oap_connections_closed_total{reason="evicted"}' in text
            assert 'oap_connections_closed_total{reason="slow"}' in text


def _settings(**values: Any) -> dict[str, Any]:
    return {"HEADER_READ_TIMEOUT_SECONDS": 1, "KEEPALIVE_TIMEOUT_SECONDS": 1.5, **values}


async def test_a_connection_that_sends_nothing_or_half_a_header_is_closed_after_the_header_timeout() -> None:
    async with running_backend() as backend:
        config = gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo"))
        async with running_gateway(config, settings=_settings()) as gateway:
            started = time.monotonic()
            async with slow_connection(gateway.port, b"") as (silent, _), slow_connection(gateway.port) as (half, _):
                assert await closed_by_peer(silent, within=3.0)
                assert await closed_by_peer(half, within=3.0)
            assert 0.9 < time.monotonic() - started < 3.0
            assert backend.requests == []


async def test_an_idle_keep_alive_connection_lasts_the_keepalive_timeout_and_a_half_sent_next_request_less() -> None:
    async with running_backend() as backend:
        config = gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo"))
        settings = _settings(HEADER_READ_TIMEOUT_SECONDS=1, KEEPALIVE_TIMEOUT_SECONDS=4)
        async with running_gateway(config, settings=settings) as gateway:
            request = f"GET /healthz HTTP/1.1\r\nHost: {LOOPBACK}:{gateway.port}\r\n\r\n".encode()
            # Idle after one request: open past the header timeout, closed at the keep-alive timeout.
            async with slow_connection(gateway.port, request) as (idle, _):
                assert (await idle.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                await idle.readexactly(len(b'{"status": "ok"}'))
                started = time.monotonic()
                assert not await closed_by_peer(idle, within=2.0)
                assert await closed_by_peer(idle, within=4.0)
                assert 3.5 < time.monotonic() - started < 5.5
            # A next request begun but never finished: closed after the header timeout, not the keep-alive one.
            async with slow_connection(gateway.port, request) as (trickle, writer):
                await trickle.readuntil(b"\r\n\r\n")
                await trickle.readexactly(len(b'{"status": "ok"}'))
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: ")
                started = time.monotonic()
                assert await closed_by_peer(trickle, within=3.5)
                assert time.monotonic() - started < 3.0


async def test_at_max_connections_the_oldest_idle_one_makes_room_and_busy_ones_are_kept() -> None:
    async with running_backend(delay=3.0) as backend:
        config = gateway_config(
            echo=psk_backend(backend.url("/mcp"), "/echo"), slow=psk_backend(backend.url("/slow"), "/slow")
        )
        settings = _settings(MAX_CONNECTIONS=3, KEEPALIVE_TIMEOUT_SECONDS=60, HEADER_READ_TIMEOUT_SECONDS=60)
        async with running_gateway(config, settings=settings) as gateway, contextlib.AsyncExitStack() as stack:
            request = f"GET /healthz HTTP/1.1\r\nHost: {LOOPBACK}:{gateway.port}\r\n\r\n".encode()
            idle = []
            for _ in range(3):
                reader, _ = await stack.enter_async_context(slow_connection(gateway.port, request))
                await reader.readuntil(b"\r\n\r\n")
                idle.append(reader)
            # A fourth client is admitted; the longest idle connection is closed for it.
            assert (await raw_request(gateway.port, request.decode().strip())).status == 200
            assert await closed_by_peer(idle[0], within=2.0)
            assert not await closed_by_peer(idle[2], within=0.3)
            # Three connections busy with requests are never closed to admit a fourth: it is refused instead.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                busy = []
                for count in range(1, 4):  # one at a time: a connection whose request is not in yet may be evicted
                    busy.append(
                        asyncio.ensure_future(http.post(gateway.url("/slow"), data=CALL, headers={"Accept": "*/*"}))
                    )
                    await backend.wait_for_requests(count, timeout=5)
                with pytest.raises(ConnectionError):
                    await raw_request(gateway.port, request.decode().strip(), timeout=2.0)
                statuses = [(await response).status for response in busy]
            assert statuses == [200, 200, 200]
            assert (await raw_request(gateway.port, request.decode().strip())).status == 200


async def test_a_body_that_stops_arriving_gets_408_and_one_that_keeps_coming_is_read() -> None:
    async with running_backend() as backend:
        config = gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo"))
        async with running_gateway(config, settings=_settings(HEADER_READ_TIMEOUT_SECONDS=1)) as gateway:
            head = (
                f"POST /echo HTTP/1.1\r\nHost: {LOOPBACK}:{gateway.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(CALL)}\r\nConnection: close\r\n\r\n"
            ).encode()
            async with slow_connection(gateway.port, head + CALL[:10]) as (reader, _):
                started = time.monotonic()
                async with asyncio.timeout(5):
                    answer = await reader.readuntil(b"\r\n\r\n")
                    answer += await reader.readuntil(b"}")
                assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
                assert 0.9 < time.monotonic() - started < 3.0
            # The same body in parts, each within the timeout: read whole and forwarded.
            async with slow_connection(gateway.port, head) as (reader, writer):
                for start in range(0, len(CALL), 12):
                    await asyncio.sleep(0.3)
                    writer.write(CALL[start : start + 12])
                async with asyncio.timeout(5):
                    answer = await reader.readuntil(b"\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200")
            assert [record.body for record in backend.requests] == [CALL]


async def test_clients_that_stop_reading_their_answers_cannot_hold_every_connection() -> None:
    """Requests pipelined without ever reading the answers: once the socket buffers are full the handler waits on
    the client. Such a connection is closed after the header timeout, busy or not, so /healthz still answers."""
    async with running_backend() as backend:
        config = gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo"))
        settings = _settings(MAX_CONNECTIONS=4, HEADER_READ_TIMEOUT_SECONDS=1, KEEPALIVE_TIMEOUT_SECONDS=60)
        async with running_gateway(config, settings=settings) as gateway:
            loop = asyncio.get_running_loop()
            request = f"GET /metrics HTTP/1.1\r\nHost: {LOOPBACK}:{gateway.port}\r\n\r\n".encode()

            async def never_reads() -> None:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (LOOPBACK, gateway.port))
                    with contextlib.suppress(OSError):
                        for _ in range(2000):  # bounded: the gateway closes the connection long before
                            await loop.sock_sendall(sock, request * 50)

            attackers = [asyncio.ensure_future(never_reads()) for _ in range(4)]
            try:
                await asyncio.sleep(1.0)  # every connection slot is taken by a client that does not read
                deadline = time.monotonic() + 6.0
                while True:
                    with contextlib.suppress(OSError):
                        answer = await raw_request(gateway.port, f"GET /healthz HTTP/1.1\nHost: {LOOPBACK}", timeout=2)
                        if answer.status == 200:
                            break
                    assert time.monotonic() < deadline, "/healthz never answered while clients did not read"
                    await asyncio.sleep(0.2)
                async with asyncio.timeout(10):
                    await asyncio.gather(*attackers)  # each ended: the gateway closed its connection
            finally:
                for attacker in attackers:
                    attacker.cancel()
