"""Forward one MCP Streamable HTTP request to its backend and stream the answer back (DESIGN.md §2, step 8).

Both protocol generations pass through untranslated (PROTOCOL.md §4): POST answered with JSON, an SSE stream or
202; GET streams; DELETE; session, version, method and `Last-Event-ID` headers. Request headers go upstream by
allow-list only, so the caller's `Authorization`, cookies and anything unknown never reach a backend; the backend's
own credential is added instead, and `Host` is the backend's. Response bytes go to the client as they arrive —
nothing is buffered — and SSE responses carry `X-Accel-Buffering: no` for any buffering proxy in front of us.

Timeouts: `timeout_seconds` bounds the connect and every wait for the next byte of a POST's answer (JSON or SSE),
so a long stream that keeps talking is never cut. A GET stream is the server's idle channel by design, so after
its headers arrive it has no read timeout. A client that goes away cancels the handler, which closes the upstream
connection, so the backend sees the cancellation too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from okta_agent_proxy.config import Backend
from okta_agent_proxy.errors import (
    BackendRejectedCredential,
    BackendTimeout,
    BackendUnavailable,
)
from okta_agent_proxy.observability.metrics import OPEN_STREAMS

# DESIGN.md §2: request headers a backend may see. Mcp-Param-* is matched by prefix.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "content-type",
        "accept",
        "accept-language",
        "user-agent",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
        "traceparent",
        "tracestate",
    }
)
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    }
    | {"upgrade", "proxy-connection"}
)
# Response headers the client never gets from a backend: hop-by-hop ones, our own Date/Server, and the backend's
# auth challenge (the client authenticates to the gateway, not to the backend — PROTOCOL.md §4).
_DROPPED_RESPONSE_HEADERS = _HOP_BY_HOP | {"date", "server", "www-authenticate"}
_SSE = "text/event-stream"


class UpstreamPool:
    """One pooled aiohttp client session per backend, opened at start and closed at shutdown."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = dict(backends)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        # Per backend, built once: (for POST and DELETE: connect and between-bytes; for GET streams: connect only).
        self.timeouts = {
            name: (
                aiohttp.ClientTimeout(total=None, sock_connect=b.timeout_seconds, sock_read=b.timeout_seconds),
                aiohttp.ClientTimeout(total=None, sock_connect=b.timeout_seconds, sock_read=None),
            )
            for name, b in backends.items()
        }

    async def start(self) -> None:
        for name in self._backends:
            connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=30, enable_cleanup_closed=True)
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookies to another
                auto_decompress=False,  # bytes pass through as the backend sent them
                timeout=aiohttp.ClientTimeout(total=None),
            )

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(session.close() for session in sessions.values()))

    def session(self, backend_name: str) -> aiohttp.ClientSession:
        return self._sessions[backend_name]


_MEMO_MAX = 1024  # header names remembered below: names come from clients and backends, so the memo is bounded
_REQUEST_NAMES: dict[str, tuple[str, bool]] = {}  # name as sent → (lower-cased, on the fixed allow-list)
_RESPONSE_NAMES: dict[str, bool] = {}  # name as sent → passed to the client


def _request_name(name: str) -> tuple[str, bool]:
    lower = name.lower()
    verdict = (lower, lower in FORWARDED_REQUEST_HEADERS or lower.startswith("mcp-param-"))
    if len(_REQUEST_NAMES) < _MEMO_MAX:
        _REQUEST_NAMES[name] = verdict
    return verdict


def _response_name(name: str) -> bool:
    verdict = name.lower() not in _DROPPED_RESPONSE_HEADERS
    if len(_RESPONSE_NAMES) < _MEMO_MAX:
        _RESPONSE_NAMES[name] = verdict
    return verdict


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    extra_allowed: frozenset[str],
    credential_headers: Mapping[str, str],
    request_id: str,
) -> CIMultiDict[str]:
    forwarded = []
    for name, value in incoming.items():
        lower, allowed = _REQUEST_NAMES.get(name) or _request_name(name)
        if allowed or lower in extra_allowed:
            forwarded.append((name, value))
    headers: CIMultiDict[str] = CIMultiDict(forwarded)
    headers["X-Request-ID"] = request_id
    # The client's Accept-Encoding is not forwarded; ask for identity so bytes relay as they are (no decompression).
    headers["Accept-Encoding"] = "identity"
    headers.update(credential_headers)
    return headers


def _relayed_response_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    relayed = []
    for name, value in upstream.items():
        allowed = _RESPONSE_NAMES.get(name)
        if allowed is None:
            allowed = _response_name(name)
        if allowed:
            relayed.append((name, value))
    return relayed


def response_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(_relayed_response_headers(upstream))
    headers["X-Request-ID"] = request_id
    if headers.get("Content-Type", "").startswith(_SSE):
        headers["X-Accel-Buffering"] = "no"
    return headers


def sse_error_event(code: str, message: str) -> bytes:
    """An SSE event telling a client why a stream ended early; not a JSON-RPC message, so never mistaken for one."""
    return f'event: error\ndata: {{"error":"{code}","message":"{message}"}}\n\n'.encode()


@dataclass(slots=True)
class RelayStats:
    """What the relay saw, for metrics and the audit record."""

    headers_sent_at: float | None = None  # perf_counter() when the response headers went to the client
    bytes_out: int = 0
    upstream_headers_seconds: float | None = None
    failure: str | None = None  # the error code when the backend failed after the response started


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
        session = self._pool.session(backend_name)
        timeouts = self._pool.timeouts[backend_name]
        target = yarl.URL(url, encoded=True) if isinstance(url, str) else url
        try:
            if method == "GET":
                # A GET stream idles by design: bound only the wait for its headers, not the gaps between events.
                async with asyncio.timeout(backend.timeout_seconds):
                    response = await session.request(
                        method, target, headers=headers, timeout=timeouts[1], allow_redirects=False
                    )
            else:
                response = await session.request(
                    method, target, headers=headers, data=body, timeout=timeouts[0], allow_redirects=False
                )
        except TimeoutError as exc:
            _drop_tracebacks(exc)
            raise BackendTimeout(f"backend {backend_name} did not answer in time") from None
        except aiohttp.ClientError as exc:
            _drop_tracebacks(exc)
            raise BackendUnavailable(f"backend {backend_name} is unreachable") from None
        return response

    async def relay(
        self,
        request: web.Request,
        response: aiohttp.ClientResponse,
        backend_name: str,
        request_id: str,
        stats: RelayStats,
    ) -> web.StreamResponse:
        """Stream the backend's response to the client as it arrives; returns once the client has it all."""
        if response.status == 401:
            response.close()
            raise BackendRejectedCredential(f"backend {backend_name} rejected the gateway's credential")
        # As `response_headers`, without a copy: the relayed headers go straight into the response's own.
        out = web.StreamResponse(status=response.status, reason=response.reason)
        headers = out.headers
        headers.extend(_relayed_response_headers(response.headers))
        headers["X-Request-ID"] = request_id
        is_sse = headers.get("Content-Type", "").startswith(_SSE)
        if is_sse:
            headers["X-Accel-Buffering"] = "no"
            OPEN_STREAMS.inc()
        tail = b""
        try:
            await out.prepare(request)
            stats.headers_sent_at = time.perf_counter()
            content = response.content
            if content.is_eof():
                # The whole body came in with the headers (a short JSON answer): it goes out with the end of the
                # response, in one write. Nothing waits for data that has not arrived.
                tail = content.read_nowait()
                stats.bytes_out += len(tail)
            else:
                async for chunk in content.iter_any():
                    stats.bytes_out += len(chunk)
                    await out.write(chunk)
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            _drop_tracebacks(exc)
            response.close()
            stats.failure = "backend_timeout" if isinstance(exc, TimeoutError) else "backend_unavailable"
            if is_sse:
                if isinstance(exc, TimeoutError):
                    event = sse_error_event("backend_timeout", "the backend stopped sending within its timeout")
                else:
                    event = sse_error_event("backend_unavailable", "the backend stream ended abnormally")
                await out.write(event)
                await out.write_eof()
            elif request.transport is not None:
                # A JSON body cut short must not look complete: end the connection instead of the message.
                request.transport.abort()
            return out
        except BaseException:
            response.close()  # client gone or handler cancelled: the backend's request is cancelled with it
            raise
        finally:
            if is_sse:
                OPEN_STREAMS.dec()
        response.release()
        await out.write_eof(tail)
        return out
