"""The one binding of the gateway's HTTP seam (`http/interface.py`) to aiohttp's server.

`AiohttpRequest` is an `HttpRequest` over aiohttp's request: the request line and headers as parsed, the body read
whole within its size and time bounds, and a response started on demand. `Dispatcher` finds the endpoint (a function
of an `HttpRequest` that returns an `Answer`, or None once it has streamed one) for each request — exact paths, then
prefixes, then the last route — and is what aiohttp's server calls: aiohttp's router, which costs ~2.7 µs per
request to find the same endpoint, is not on the request path (`GatewayRunner` serves `DISPATCHER` directly). The
application `application` returns routes everything to the dispatcher too, so it also serves under a plain
`web.AppRunner`; it carries the gateway's start and stop hooks.

Reading a body: whole (it is inspected, and resent on a retry), bounded in size and in time. `MAX_BODY_BYTES`
bounds the size (413 as soon as it is passed, never buffering more). A body still arriving when its headers are in
must keep coming: no pause between its parts may be longer than `HEADER_READ_TIMEOUT_SECONDS` (408) — without that,
a client that sends headers and then trickles its body would hold a handler forever. A body that arrived with its
headers (nearly every MCP message) is read without any timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy

from okta_agent_proxy.errors import PayloadTooLarge, RequestTimeout
from okta_agent_proxy.http.interface import Answer, Endpoint

CLIENT_CLOSED = 499  # answered to aiohttp when the client left before any answer: nothing is sent
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_READ_CHUNK = 64 * 1024


class _Streamed(web.StreamResponse):
    """aiohttp's streamed response, as a `ResponseStream`."""

    async def end(self, tail: bytes = b"") -> None:
        await self.write_eof(tail)


class AiohttpRequest:
    __slots__ = ("_request", "headers", "method", "path", "raw_path", "response")

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self.method = request.method
        self.path = request.path
        self.raw_path = request.raw_path
        self.headers: CIMultiDictProxy[str] = request.headers
        self.response: web.StreamResponse | None = None  # once started

    @property
    def query_string(self) -> str:
        return self._request.rel_url.raw_query_string

    @property
    def remote(self) -> str | None:
        return self._request.remote

    def query_names(self) -> Iterable[str]:
        return self._request.query.keys()

    async def read_body(self, limit: int, gap: float) -> bytes:
        request = self._request
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        content = request.content
        if content.is_eof():  # all of it arrived with the headers (nearly every MCP message)
            return await _read(content, limit, None, gap)
        try:
            async with asyncio.timeout(gap) as deadline:
                return await _read(content, limit, deadline, gap)
        except TimeoutError:
            raise RequestTimeout("the request body stopped arriving") from None

    async def start_response(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> _Streamed:
        response = _Streamed(status=status, reason=reason, headers=headers)
        await response.prepare(self._request)
        self.response = response
        return response

    def client_gone(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


async def _read(content: StreamReader, limit: int, deadline: asyncio.Timeout | None, gap: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if deadline is not None:
            deadline.reschedule(asyncio.get_running_loop().time() + gap)
    return b"".join(chunks)


def to_response(answer: Answer) -> web.Response:
    return web.Response(
        status=answer.status, body=answer.body, content_type=answer.content_type, headers=answer.headers
    )


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # "*" for any
    path: str  # exact, or a prefix when `prefix` (then anything below it, decoded CR LF included)
    endpoint: Endpoint
    prefix: bool = False


class Dispatcher:
    """aiohttp's request handler for the gateway: the first route whose path and method match, as aiohttp's router
    would find it (a path served for other methods only falls through to the routes after it)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._exact: dict[str, dict[str, Endpoint]] = {}
        self._prefixed: list[Route] = []
        self._last: Endpoint | None = None
        for route in routes:
            if route.prefix and route.path == "/" and route.method == "*":
                self._last = route.endpoint
            elif route.prefix:
                self._prefixed.append(route)
            else:
                self._exact.setdefault(route.path, {}).setdefault(route.method, route.endpoint)

    def find(self, method: str, path: str) -> Endpoint | None:
        methods = self._exact.get(path)
        if methods is not None:
            endpoint = methods.get(method) or methods.get("*")
            if endpoint is not None:
                return endpoint
        for route in self._prefixed:
            if path.startswith(route.path) and route.method in (method, "*"):
                return route.endpoint
        return self._last

    async def handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        request = AiohttpRequest(raw)
        endpoint = self.find(request.method, request.path)
        if endpoint is None:
            return web.Response(status=404)
        if "Expect" in request.headers:
            await _expect(raw)
        answer = await endpoint(request)
        if answer is not None:
            return to_response(answer)
        # Streamed; or nothing was answered because the client left (aiohttp then sends nothing).
        response = request.response
        return response if response is not None else web.Response(status=CLIENT_CLOSED)


async def _expect(raw: web.BaseRequest) -> None:
    """RFC 9110 §10.1.1: a client waiting to send its body until told to goes on at once (any other expectation is
    ignored, which the RFC allows)."""
    if raw.version == (1, 1) and raw.headers.get("Expect", "").lower() == "100-continue":
        await raw.writer.write(_CONTINUE)
        raw.writer.output_size = 0  # the interim response is not part of the answer's size


DISPATCHER = web.AppKey("dispatcher", Dispatcher)


def application(
    routes: Sequence[Route],
    *,
    client_max_size: int,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_cleanup: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """An aiohttp application serving `routes` through one `Dispatcher` (also at `app[DISPATCHER]`), with start
    and stop hooks."""
    app = web.Application(client_max_size=client_max_size)
    dispatcher = app[DISPATCHER] = Dispatcher(routes)
    app.router.add_route("*", "/{tail:[\\s\\S]*}", dispatcher.handle)
    if on_startup is not None:
        start = on_startup

        async def started(app: web.Application) -> None:
            await start()

        app.on_startup.append(started)
    if on_cleanup is not None:
        cleanup = on_cleanup

        async def cleaned(app: web.Application) -> None:
            await cleanup()

        app.on_cleanup.append(cleaned)
    return app
