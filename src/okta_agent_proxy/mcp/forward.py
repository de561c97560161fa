"""Forward one MCP Streamable HTTP request to its backend and stream the answer back (DESIGN.md §2, step 8).

Both protocol generations pass through untranslated (PROTOCOL.md §4): POST answered with JSON, an SSE stream or
202; GET streams; DELETE; session, version, method and `Last-Event-ID` headers. Which headers cross, and how a
backend's `Location` is rewritten, is `mcp/headers.py`. Response bytes go to the client as they arrive — nothing is
buffered — and SSE responses carry `X-Accel-Buffering: no` for any buffering proxy in front of us.

Capacity and time (DESIGN.md §9, "Timeouts and streams"):
- Each backend has two connection pools: one for request/response calls (POST, DELETE) and one for GET streams, so
  streams — idle by design, and held as long as a client likes — can never take the connections calls need.
- No request waits for a pooled connection (see `UpstreamPool`); `timeout_seconds` bounds name lookup, connect,
  send and the wait for the response headers together, for every method (504 `backend_timeout`). After the headers,
  each gap in the body is bounded: by `timeout_seconds` for a JSON answer, by `stream_idle_timeout_seconds` for an
  SSE stream. The gap also covers handing each chunk to the client, so a client that stops reading cannot hold a
  stream open either.
- A client that goes away cancels the handler, which closes the upstream connection: the backend sees it too.

At the end of a shutdown's grace (DESIGN.md §9, "Graceful drain"; `http/drain.py`) the handler is cancelled with the
drain's message, which only the forwarder acts on: a stream ends cleanly with an SSE `error` event
(`gateway_shutdown`) — or, cut in the middle of an event, with the end of the body alone, so that the client
discards the partial event as SSE requires — a JSON body under way is cut, and a request whose answer has not begun
gets 503 `gateway_shutdown`. Any other cancellation goes on as before.

Whether the client got the answer (`RelayStats.delivered`) matters when it hangs up at the very end: a client that
closes as soon as it has what it asked for — the SDK client closes a POST's SSE stream once the JSON-RPC response
arrives — was answered, and is not recorded as a 499.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl
from multidict import CIMultiDict

from okta_agent_proxy.config.models import Backend
from okta_agent_proxy.errors import BackendTimeout, BackendUnavailable, BadBackendResponse
from okta_agent_proxy.http.bodies import read_at_most
from okta_agent_proxy.http.drain import SHUTDOWN, GatewayShuttingDown, ended_by_shutdown, is_shutdown, only_cancellation
from okta_agent_proxy.http.interface import HttpRequest, ResponseStream
from okta_agent_proxy.mcp.headers import public_location, relayed_response_headers
from okta_agent_proxy.mcp.sse import SseEvents, is_response_to

_NO_TIMEOUT = aiohttp.ClientTimeout(total=None)
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")  # a blank line: the end of an SSE event (WHATWG HTML §9.2.6)


class UpstreamPool:
    """Per backend: a pooled aiohttp client session for calls and one for GET streams; opened at start, closed at
    shutdown (or when a reloaded config's last request ends).

    No request ever waits for a pooled connection: a request in flight holds one client connection, and the calls
    pool may hold as many connections as the gateway admits clients (`call_connections`, `MAX_CONNECTIONS`), so a wait
    would need more calls in flight than connections. GET streams, bounded by the stream caps instead, have a pool of
    their own without a limit. So `timeout_seconds` needs to bound only what comes after: the connect and the wait
    for the headers."""

    def __init__(self, backends: Mapping[str, Backend], *, call_connections: int) -> None:
        self._names = tuple(backends)
        self._call_connections = call_connections
        self._calls: dict[str, aiohttp.ClientSession] = {}
        self._streams: dict[str, aiohttp.ClientSession] = {}

    async def start(self) -> None:
        for name in self._names:
            self._calls[name] = _client_session(self._call_connections)
            self._streams[name] = _client_session(0)

    async def close(self) -> None:
        sessions = [*self._calls.values(), *self._streams.values()]
        self._calls, self._streams = {}, {}
        await asyncio.gather(*(session.close() for session in sessions))

    def session(self, backend_name: str, method: str) -> aiohttp.ClientSession:
        return (self._streams if method == "GET" else self._calls)[backend_name]


def _client_session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=30, enable_cleanup_closed=True),
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookies to another
        auto_decompress=False,  # bytes pass through as the backend sent them
        timeout=_NO_TIMEOUT,
    )


def sse_error_event(code: str, message: str) -> bytes:
    """An SSE event telling a client why a stream ended early; not a JSON-RPC message, so never mistaken for one."""
    return f'event: error\ndata: {{"error":"{code}","message":"{message}"}}\n\n'.encode()


@dataclass(slots=True)
class RelayStats:
    """What the relay saw, for metrics and the audit record."""

    bytes_out: int = 0
    failure: str | None = None  # the error code when the stream failed after the response started
    delivered: bool = False  # the client has the whole answer (see the module docstring)
    tail: bytes = b""  # the last bytes sent (up to 4): whether an SSE event was left unfinished


class ResponseTransformer(Protocol):
    """The one seam where an answer can be rewritten on its way to the client (the tool policy filters list answers
    here). Made per response, so it may keep state across chunks; a response without one is streamed untouched. One
    that sets a `failure` attribute (an outcome code) ends the answer there: nothing more is relayed."""

    def feed(self, chunk: bytes) -> bytes:
        """The backend's next bytes in; what to send to the client now (b"" to hold them back)."""
        ...

    def end(self) -> bytes:
        """The backend's answer is complete; what is left to send."""
        ...


def _drop_tracebacks(error: BaseException) -> None:
    """Let go of the frames behind a client error we replace with our own: aiohttp's tracebacks and the frames in
    them form reference cycles that hold the request (and its body) until the cyclic collector runs."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += (current.__cause__, current.__context__)


class _Refused(Exception):
    """The transformer ended the answer (it sent why, as an SSE error event): the rest is not relayed."""

    def __init__(self, failure: str) -> None:
        super().__init__(failure)
        self.failure = failure


class _Stalled(Exception):
    """A gap in the body longer than its bound; `on_client`: the client was not taking the bytes."""

    def __init__(self, on_client: bool) -> None:
        self.on_client = on_client


class Forwarder:
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def open(
        self,
        backend_name: str,
        backend: Backend,
        method: str,
        url: str | yarl.URL,
        headers: CIMultiDict[str],
        body: bytes | None,
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response once its headers are in, or raise a GatewayError. A `str` URL is
        taken as encoded: the path and query go upstream byte for byte, as the client sent them."""
        session = self._pool.session(backend_name, method)
        target = yarl.URL(url, encoded=True) if isinstance(url, str) else url
        # One timer for name lookup, connect, send and the wait for the headers together: at its end the task is
        # cancelled, and that cancellation (only that one) becomes a 504. `asyncio.timeout` does the same with
        # several µs of bookkeeping per request; aiohttp's own timeouts bound each phase or each gap, not the sum.
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(backend.timeout_seconds, expire)
        try:
            return await session.request(
                method, target, headers=headers, data=body if method != "GET" else None, allow_redirects=False
            )
        except asyncio.CancelledError as exc:
            shutdown = is_shutdown(exc)  # the drain's, at the end of its grace
            if (shutdown or expired) and only_cancellation():  # ours, and nobody else cancelled the request
                _drop_tracebacks(exc)
                if shutdown:
                    raise GatewayShuttingDown("the gateway shut down before the backend answered") from None
                raise BackendTimeout(f"backend {backend_name} did not answer in time") from None
            raise
        except aiohttp.ClientError as exc:
            _drop_tracebacks(exc)
            raise BackendUnavailable(f"backend {backend_name} is unreachable") from None
        finally:
            timer.cancel()

    async def relay(
        self,
        request: HttpRequest,
        response: aiohttp.ClientResponse,
        backend_name: str,
        backend: Backend,
        public_prefix: str,
        request_id: str,
        stats: RelayStats,
        is_sse: bool,
        answer_id: str | int | None,
        session_id: str | None,
        on_start: Callable[[], None],
        transform: ResponseTransformer | None = None,
    ) -> int:
        """Stream the backend's response to the client as it arrives; returns its status once the client has it
        all.
        `public_prefix` is the gateway's URL for this backend route (for `Location`); `is_sse` whether the answer is
        an SSE stream; `answer_id` the JSON-RPC id of the POSTed request, whose response ends what the client is
        waiting for; `session_id` the client's for the backend's session id; `on_start` is called once the headers
        are out; `transform`, if any, rewrites the body."""
        headers = _client_headers(response, backend, public_prefix, request_id, session_id)
        if is_sse:
            headers["X-Accel-Buffering"] = "no"
        if transform is not None:
            headers.popall("Content-Length", None)  # the body's length changes with it
        tail = b""
        out: ResponseStream | None = None
        try:
            out = await request.start_response(response.status, response.reason, headers)
            on_start()
            content = response.content
            if content.is_eof():
                # The whole body came in with the headers (a short JSON answer): it goes out with the end of the
                # response, in one write. Nothing waits for data that has not arrived.
                tail = content.read_nowait()
                if transform is not None:
                    tail = transform.feed(tail) + transform.end()
                    stats.failure = getattr(transform, "failure", None)
                stats.bytes_out += len(tail)
            else:
                if is_sse:
                    # A GET stream has no answer the client waits for: one it closes stays a 499 (it ended it).
                    watch = SseEvents() if answer_id is not None else None
                    gap, length = backend.stream_idle_timeout_seconds, None
                else:
                    watch, gap, length = None, backend.timeout_seconds, response.content_length
                await _copy(content, out, gap, stats, watch, answer_id, length, transform)
                if transform is not None:
                    tail = transform.end()
                    stats.bytes_out += len(tail)
        except _Refused as refused:
            response.close()
            stats.failure = refused.failure
            assert out is not None  # raised only while copying
            await out.end()
            return response.status
        except (_Stalled, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            _drop_tracebacks(exc)
            response.close()
            assert out is not None  # raised only while copying
            await _end_abnormally(request, out, exc, is_sse, stats)
            return response.status
        except asyncio.CancelledError as exc:
            response.close()  # client gone or handler cancelled: the backend's request is cancelled with it
            if not ended_by_shutdown(exc):
                raise
            _drop_tracebacks(exc)
            await _end_for_shutdown(request, out, is_sse, stats)
            return response.status
        except BaseException:
            response.close()
            raise
        response.release()
        await out.end(tail)
        stats.delivered = True
        return response.status

    async def whole(
        self,
        response: aiohttp.ClientResponse,
        backend: Backend,
        public_prefix: str,
        request_id: str,
        session_id: str | None,
        limit: int,
        rewrite: Callable[[bytes], bytes],
        stats: RelayStats,
    ) -> tuple[int, CIMultiDict[str], bytes]:
        """Read a JSON answer whole (at most `limit` bytes, within the backend's timeout, else 502 / 504) and
        `rewrite` it, before anything is sent: (status, headers, body) for the client."""
        try:
            headers = _client_headers(response, backend, public_prefix, request_id, session_id)
            async with asyncio.timeout(backend.timeout_seconds):
                body = await read_at_most(response.content, limit + 1)
            if len(body) > limit:
                raise BadBackendResponse(f"the backend's answer is larger than {limit} bytes")
            body = rewrite(body)
        except TimeoutError:
            raise BackendTimeout("the backend did not finish its answer in time") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            raise BackendUnavailable("the backend's answer ended abnormally") from None
        except asyncio.CancelledError as exc:
            if ended_by_shutdown(exc):
                _drop_tracebacks(exc)
                raise GatewayShuttingDown("the gateway shut down before the backend answered") from None
            raise
        finally:
            response.close()
        headers.popall("Content-Length", None)  # the body's length changes with it
        stats.bytes_out = len(body)
        stats.delivered = True
        return response.status, headers, body


def _client_headers(
    response: aiohttp.ClientResponse, backend: Backend, public_prefix: str, request_id: str, session_id: str | None
) -> CIMultiDict[str]:
    """The backend's response headers as the client gets them: hop-by-hop and its own session id dropped, a
    `Location` made public, the request id and the client's session id added."""
    headers = CIMultiDict(relayed_response_headers(response.headers))
    location = response.headers.get("Location")
    if location is not None:
        try:
            headers["Location"] = public_location(location, response.url, backend.url, public_prefix)
        except BaseException:
            response.close()
            raise
    headers["X-Request-ID"] = request_id
    headers.popall("Mcp-Session-Id", None)  # the backend's own id never reaches the client
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
    return headers


async def _copy(
    content: aiohttp.StreamReader,
    out: ResponseStream,
    gap: float,
    stats: RelayStats,
    watch: SseEvents | None,
    answer_id: str | int | None,
    content_length: int | None,
    transform: ResponseTransformer | None,
) -> None:
    """Copy the body as it arrives (through `transform`, if any); no wait — for the backend's next bytes, or for
    the client to take the last ones — may last longer than `gap` (else `_Stalled`)."""
    loop = asyncio.get_running_loop()
    on_client = False
    try:
        async with asyncio.timeout(gap) as deadline:
            async for received in content.iter_any():
                on_client = True
                deadline.reschedule(loop.time() + gap)
                chunk = received if transform is None else transform.feed(received)
                stats.bytes_out += len(chunk)
                if chunk:
                    # Noted before the write: a cancellation while it waits for the client finds the bytes sent.
                    stats.tail = chunk[-4:] if len(chunk) >= 4 else (stats.tail + chunk)[-4:]
                    await out.write(chunk)
                on_client = False
                refused = getattr(transform, "failure", None)  # a transformer may end the answer (SseListFilter)
                if refused is not None:
                    raise _Refused(refused)
                deadline.reschedule(loop.time() + gap)
                if watch is not None and answer_id is not None and not stats.delivered:
                    stats.delivered = any(is_response_to(data, answer_id) for data in watch.feed(chunk))
                elif content_length is not None and transform is None and stats.bytes_out >= content_length:
                    stats.delivered = True
    except TimeoutError as exc:
        _drop_tracebacks(exc)
        raise _Stalled(on_client) from None


async def _end_for_shutdown(request: HttpRequest, out: ResponseStream | None, is_sse: bool, stats: RelayStats) -> None:
    """End a response the drain cut at the end of the shutdown grace (see the module docstring)."""
    stats.failure = SHUTDOWN
    if out is None or not is_sse:
        request.abort()  # its headers may be half sent, or a JSON body cut short must not look complete
        return
    if stats.bytes_out == 0 or stats.tail.endswith(_EVENT_ENDS):
        await out.write(sse_error_event(SHUTDOWN, "the gateway is shutting down"))
    await out.end()  # in the middle of an event: the client drops the part it has (WHATWG HTML §9.2.6)


async def _end_abnormally(
    request: HttpRequest, out: ResponseStream, exc: BaseException, is_sse: bool, stats: RelayStats
) -> None:
    """End a response that started but cannot be completed, so that it never looks complete."""
    if isinstance(exc, _Stalled) and exc.on_client:
        stats.failure = "client_timeout"
        request.abort()  # the client is not reading: nothing more can be written to it
        return
    stats.failure = "backend_timeout" if isinstance(exc, _Stalled) else "backend_unavailable"
    if is_sse:
        if isinstance(exc, _Stalled):
            event = sse_error_event("backend_timeout", "the backend stopped sending within its timeout")
        else:
            event = sse_error_event("backend_unavailable", "the backend stream ended abnormally")
        await out.write(event)
        await out.end()
    else:
        # A JSON body cut short must not look complete: end the connection instead of the message.
        request.abort()
