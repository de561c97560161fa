"""Small in-process aiohttp backends for gateway tests: they record what the gateway sent and misbehave on request.

`running_backend()` starts one `RecordingBackend` on 127.0.0.1 (ephemeral port) inside the test's event loop.
Every request is recorded (method, path + query, headers, body) before it is answered, and the record tells when
the backend's handler ended and whether it ended because the peer (the gateway) closed the connection — the way
to observe that an upstream request was cancelled.

The behaviour is chosen by the first segment of the request path, so one backend serves several gateway routes
(`url: http://127.0.0.1:PORT/sse`, `url: …/die-json`, …):

| first segment | behaviour |
|---|---|
| `sse`         | answer as an SSE stream (one `message` event with an id), else like the default |
| `slow`        | wait `delay` seconds, then answer JSON (`slow-sse`: then answer SSE) |
| `die-sse`     | SSE headers, one event, then the connection is closed without ending the stream |
| `die-json`    | JSON with `Content-Length`, part of the body, then the connection is closed |
| `die-chunked` | chunked JSON, part of the body, then the connection is closed |
| `silent`      | reads the request and never answers (until the peer goes away) |
| `hang-sse`    | SSE headers, one event, then nothing more (until the peer goes away) |
| `hang-json`   | JSON with `Content-Length`, part of the body, then nothing more (until the peer goes away) |
| `unauthorized`| 401 with a `WWW-Authenticate` challenge and a `Set-Cookie` |
| `late-get`    | GET: SSE headers at once, one event after `late_event_after` seconds, then the end |
| `answer-hold` | SSE: the JSON-RPC answer as an event, then the stream stays open (until the peer goes away) |
| `gap-sse`     | SSE: a notification, `delay` seconds of silence, then the JSON-RPC answer and the end |
| `redirect`    | 307 to `/redirect/moved?q=1` (a path under its own URL) |
| `redirect-away` | 307 to `http://internal.example:8080/x` (off the backend's URL) |
| `hop-headers` | JSON with `Connection: X-Backend-Hop`, the header it names, and `X-Backend-Kept` |
| anything else | a minimal JSON MCP server (see `mcp_answer`) |

`mcp_answer` is just enough MCP for real clients (the Inspector, the SDK client in legacy mode): `initialize`,
`tools/list` (one `echo` tool), `tools/call` (echoes its arguments), `ping`; notifications get 202; any other
method is echoed back as `{"method", "params", "path"}` (handy for matching answers to requests), except
`server/discover`, which gets the 404 / -32601 a legacy server gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "BACKEND_SESSION_ID",
    "WWW_AUTHENTICATE",
    "RecordedRequest",
    "RecordingBackend",
    "mcp_answer",
    "running_backend",
    "sse_event",
]

WWW_AUTHENTICATE = 'Bearer resource_metadata="http://127.0.0.1/.well-known/oauth-protected-resource"'
BACKEND_SESSION_ID = "backend-session-0123456789abcdef"
PROTOCOL_VERSION = "2025-06-18"
_JSON = "application/json"
_SSE = "text/event-stream"


@dataclass
class RecordedRequest:
    """One request as the backend received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    received_at: float  # time.monotonic()
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    peer_closed: bool = False  # the handler was cancelled because the connection went away
    finished_at: float | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header_names(self) -> set[str]:
        """Every request header name, lower-cased, as it was on the wire."""
        return {name.decode("latin-1").lower() for name, _ in self.raw_headers}

    async def wait_finished(self, timeout: float) -> None:
        """Until the backend's handler for this request has ended (answered, failed or cancelled)."""
        await asyncio.wait_for(self.finished.wait(), timeout)


def sse_event(data: Any, *, event_id: str | None = None, event: str | None = None) -> bytes:
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))))
    return ("\n".join(lines) + "\n\n").encode()


def mcp_answer(message: Any, path: str) -> tuple[int, dict[str, Any] | None]:
    """(HTTP status, JSON body or None) for one JSON-RPC message, as a tiny stateless MCP server would answer."""
    if not isinstance(message, dict) or "method" not in message or "id" not in message:
        return 202, None  # a notification or a response from the client
    method, params, request_id = message["method"], message.get("params") or {}, message["id"]
    result: dict[str, Any]
    if method == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion", PROTOCOL_VERSION),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "recording-backend", "version": "1.0.0"},
        }
    elif method == "tools/list":
        schema = {"type": "object", "properties": {"message": {"type": "string"}}}
        result = {"tools": [{"name": "echo", "description": "Echo the arguments.", "inputSchema": schema}]}
    elif method == "tools/call":
        text = json.dumps(params.get("arguments") or {}, sort_keys=True)
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    elif method == "ping":
        result = {}
    elif method == "server/discover":
        error = {"code": -32601, "message": "Method not found"}
        return 404, {"jsonrpc": "2.0", "id": request_id, "error": error}
    else:
        result = {"method": method, "params": params, "path": path}
    return 200, {"jsonrpc": "2.0", "id": request_id, "result": result}


class RecordingBackend:
    """The backend itself; use `running_backend()` to start one."""

    def __init__(self, *, delay: float = 0.3, late_event_after: float = 1.5) -> None:
        self.delay = delay
        self.late_event_after = late_event_after
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self._changed = asyncio.Condition()
        self._behaviours: dict[str, Callable[[web.Request, RecordedRequest], Any]] = {
            "sse": self._sse,
            "slow": self._slow,
            "slow-sse": self._slow_sse,
            "die-sse": self._die_sse,
            "die-json": self._die_json,
            "die-chunked": self._die_chunked,
            "silent": self._silent,
            "hang-sse": self._hang_sse,
            "hang-json": self._hang_json,
            "unauthorized": self._unauthorized,
            "late-get": self._late_get,
            "answer-hold": self._answer_hold,
            "gap-sse": self._gap_sse,
            "redirect": self._redirect,
            "redirect-away": self._redirect_away,
            "hop-headers": self._hop_headers,
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """The recorded requests once there are at least `count` of them (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    async def last_request(self, timeout: float = 5.0) -> RecordedRequest:
        """The most recent request, waiting for a first one if there is none yet."""
        return (await self.wait_for_requests(1, timeout))[-1]

    # --- the aiohttp handler -------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        record = RecordedRequest(
            method=request.method,
            path_qs=request.raw_path,
            headers=CIMultiDict(request.headers),
            raw_headers=tuple(request.raw_headers),
            body=body,
            received_at=time.monotonic(),
        )
        async with self._changed:
            self.requests.append(record)
            self._changed.notify_all()
        first = request.path.lstrip("/").split("/", 1)[0]
        behaviour = self._behaviours.get(first, self._default)
        try:
            response: web.StreamResponse = await behaviour(request, record)
            return response
        except asyncio.CancelledError:
            record.peer_closed = True
            raise
        finally:
            record.finished_at = time.monotonic()
            record.finished.set()

    # --- behaviours ----------------------------------------------------------------------------------------

    def _answer(self, request: web.Request, record: RecordedRequest) -> tuple[int, dict[str, Any] | None]:
        if request.method == "DELETE":
            return 200, None
        if request.method != "POST":
            return 405, None
        try:
            message = json.loads(record.body)
        except ValueError:
            return 400, {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        return mcp_answer(message, request.path)

    async def _default(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        status, document = self._answer(request, record)
        if document is None:
            return web.Response(status=status)
        # Like a stateful server: initialize's answer carries a session id (the gateway must pass it back).
        is_initialize = isinstance(document.get("result"), dict) and "serverInfo" in document["result"]
        headers = {"Mcp-Session-Id": BACKEND_SESSION_ID} if is_initialize else None
        return web.json_response(document, status=status, headers=headers)

    async def _sse(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        status, document = self._answer(request, record)
        if document is None or status != 200:
            return web.json_response(document, status=status) if document else web.Response(status=status)
        response = web.StreamResponse(headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(sse_event(document, event_id="1"))
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return await self._default(request, record)

    async def _slow_sse(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return await self._sse(request, record)

    async def _open_sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(sse_event({"jsonrpc": "2.0", "method": "notifications/message"}, event_id="1"))
        return response

    @staticmethod
    async def _cut_connection(request: web.Request) -> None:
        """Close the connection after the bytes written so far have left (not a clean end of the message)."""
        transport = request.transport
        assert transport is not None
        transport.close()  # flushes what was written, then closes: no end-of-message marker is ever sent
        # The handler must not return normally (aiohttp would try to finish the message): wait to be cancelled.
        await asyncio.sleep(10)
        raise RuntimeError("the connection was closed but the handler was not cancelled")

    async def _die_sse(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await self._open_sse(request)
        await self._cut_connection(request)
        raise AssertionError("unreachable")

    @staticmethod
    async def _half_json(request: web.Request) -> None:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"text": "x" * 200}}).encode()
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])

    async def _die_json(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await self._half_json(request)
        await self._cut_connection(request)
        raise AssertionError("unreachable")

    async def _hang_json(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await self._half_json(request)
        await asyncio.sleep(3600)
        raise AssertionError("a hanging JSON body was never disconnected")

    async def _die_chunked(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"jsonrpc": "2.0", "id": 1, "result": {"text": "')
        await self._cut_connection(request)
        raise AssertionError("unreachable")

    async def _silent(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("a silent backend was never disconnected")

    async def _hang_sse(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        await self._open_sse(request)
        await asyncio.sleep(3600)
        raise AssertionError("a hanging stream was never disconnected")

    async def _unauthorized(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        headers = {"WWW-Authenticate": WWW_AUTHENTICATE, "Set-Cookie": "backend=secret; Path=/"}
        return web.json_response({"error": "invalid_token"}, status=401, headers=headers)

    async def _late_get(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        if request.method != "GET":
            return await self._default(request, record)
        response = web.StreamResponse(headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)  # aiohttp sends the headers now; then nothing until the event
        await asyncio.sleep(self.late_event_after)
        await response.write(sse_event({"jsonrpc": "2.0", "method": "notifications/late"}, event_id="late-1"))
        await response.write_eof()
        return response

    async def _answer_hold(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        _, document = self._answer(request, record)
        response = web.StreamResponse(headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(sse_event(document, event_id="1"))
        await asyncio.sleep(3600)
        raise AssertionError("a held stream was never disconnected")

    async def _gap_sse(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        _, document = self._answer(request, record)
        response = web.StreamResponse(headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(sse_event({"jsonrpc": "2.0", "method": "notifications/progress"}, event_id="1"))
        await asyncio.sleep(self.delay)
        await response.write(sse_event(document, event_id="2"))
        await response.write_eof()
        return response

    async def _redirect(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "/redirect/moved?q=1"})

    async def _redirect_away(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "http://internal.example:8080/x"})

    async def _hop_headers(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        status, document = self._answer(request, record)
        headers = {"Connection": "X-Backend-Hop", "X-Backend-Hop": "internal", "X-Backend-Kept": "kept"}
        return web.json_response(document, status=status, headers=headers)


@asynccontextmanager
async def running_backend(*, delay: float = 0.3, late_event_after: float = 1.5) -> AsyncIterator[RecordingBackend]:
    """Start a `RecordingBackend` on 127.0.0.1:<ephemeral> in the running loop; stop it on exit."""
    backend = RecordingBackend(delay=delay, late_event_after=late_event_after)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend.port = runner.addresses[0][1]
    try:
        yield backend
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
