"""The conformance tests' Authorization-injecting proxy (`tests/support/authorizing_proxy.py`) changes only what it
says: `Authorization` set, hop-by-hop headers dropped; everything else — method, raw path and query, header order and
duplicates, `Host`, `Origin`, status, body bytes — passes unchanged, and a streamed answer reaches the client while
the upstream is still writing it (no buffering)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.authorizing_proxy import authorizing_proxy
from tests.support.loopback import serving
from tests.support.processes import LOOPBACK

TOKEN = "header.payload.signature"
BOUND = 5.0


@asynccontextmanager
async def upstream(seen: list[dict[str, Any]], release: asyncio.Event) -> AsyncIterator[str]:
    """Echoes what it received; `/stream` sends one chunk, waits for `release`, then a second."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append({"method": request.method, "path": request.raw_path, "headers": request.raw_headers, "body": body})
        if request.path == "/stream":
            response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: first\n\n")
            await release.wait()
            await response.write(b"data: second\n\n")
            return response
        return web.Response(status=207, body=body[::-1], headers={"X-Upstream": "a", "Content-Type": "text/plain"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    async with serving(app) as url:
        yield url


async def _raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port, family=socket.AF_INET)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(BOUND):
            return await reader.read()
    finally:
        writer.close()


async def test_only_authorization_and_hop_by_hop_headers_change() -> None:
    seen: list[dict[str, Any]] = []
    async with upstream(seen, asyncio.Event()) as base, authorizing_proxy(base, TOKEN) as proxy:
        port = int(proxy.base_url.rsplit(":", 1)[1])
        request = (
            b"PATCH /a/%2e%2e/b?q=1&q=2 HTTP/1.1\r\n"
            b"Host: evil.example.com\r\n"
            b"Origin: http://evil.example.com\r\n"
            b"X-Twice: one\r\n"
            b"Authorization: Bearer caller-supplied\r\n"
            b"X-Twice: two\r\n"
            b"Connection: close, X-Hop\r\n"
            b"X-Hop: dropped\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Content-Length: 5\r\n"
            b"\r\n"
            b"hello"
        )
        answer = await _raw_request(port, request)

    [received] = seen
    names = [name.decode().lower() for name, _ in received["headers"]]
    headers = [(name.decode().lower(), value.decode()) for name, value in received["headers"]]
    assert received["method"] == "PATCH"
    assert received["path"] == "/a/%2e%2e/b?q=1&q=2"
    assert received["body"] == b"hello"
    assert ("host", "evil.example.com") in headers
    assert ("origin", "http://evil.example.com") in headers
    assert [value for name, value in headers if name == "x-twice"] == ["one", "two"]
    assert [value for name, value in headers if name == "authorization"] == [f"Bearer {TOKEN}"]
    assert not {"x-hop", "keep-alive"} & set(names)
    assert not {"user-agent", "accept", "accept-encoding", "content-type"} & set(names)  # nothing added
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 207 ")
    assert b"\r\nX-Upstream: a\r\n" in head
    assert body == b"olleh"


async def test_a_stream_is_relayed_while_it_is_written() -> None:
    seen: list[dict[str, Any]] = []
    release = asyncio.Event()
    async with (
        upstream(seen, release) as base,
        authorizing_proxy(base, TOKEN) as proxy,
        aiohttp.ClientSession() as http,
        http.get(proxy.url("/stream")) as response,
    ):
        async with asyncio.timeout(BOUND):
            first = await response.content.readuntil(b"\n\n")  # arrives before the upstream has finished
        release.set()
        async with asyncio.timeout(BOUND):
            rest = await response.content.read()
    assert (first, rest) == (b"data: first\n\n", b"data: second\n\n")
