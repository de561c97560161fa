"""The gateway's HTTP server: aiohttp's, with what the gateway needs on top of it (the one adapter to its internals).

aiohttp offers no setting for two things a gateway on the path of every agent needs, so they are added here, and
nowhere else reaches into aiohttp's server:
1. **The answer to a request its HTTP parser refuses** (an oversized or malformed header, a bad request line):
   aiohttp's text quotes the offending bytes — the start of an oversized `Authorization` header, say — where the
   gateway's JSON error body says what happened and quotes nothing.
2. **Slow and idle clients** (`HEADER_READ_TIMEOUT_SECONDS`, `KEEPALIVE_TIMEOUT_SECONDS`, `MAX_CONNECTIONS`): a new
   connection must deliver its first request's headers within the header timeout, and so must a keep-alive
   connection once its next request begins to arrive; an idle keep-alive connection lasts the keep-alive timeout
   (aiohttp's own `keepalive_timeout`). At `MAX_CONNECTIONS` (default 80 % of the open-file limit, leaving
   descriptors for backends, the database and logs), a new connection is admitted by closing the oldest one that
   has not sent a whole request, else the longest idle one — as nginx reuses keep-alive connections — so a flood
   of half-sent requests cannot shut out `/healthz` or a valid client. Only when every connection is busy with a
   request is the new one closed.

How: `GatewayRunner` builds aiohttp's server as usual and gives it the `_GatewayServer` class (aiohttp builds the
server inside `AppRunner._make_server`, a private method, and has no hook for the connection class). The server
then makes `_Connection`s; its public `connection_made`/`connection_lost` hooks and a wrapper around its public
`request_handler` tell `ConnectionGuard` when a connection opens, closes, starts a request and goes idle.
tests/integration/test_slow_clients.py and the parser-refusal test in test_errors.py fail if aiohttp changes any
of this underneath.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from okta_agent_proxy.errors import UnreadableRequest
from okta_agent_proxy.observability.metrics import CONNECTIONS_CLOSED, UNREADABLE_REQUESTS
from okta_agent_proxy.settings import Settings

SWEEP_SECONDS = 0.5  # how often slow connections are looked for: the timeouts are this much late at most


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_read_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 65536

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.HEADER_READ_TIMEOUT_SECONDS, settings.KEEPALIVE_TIMEOUT_SECONDS, settings.max_connections)


class _Connection(RequestHandler):
    """aiohttp's connection handler, with the gateway's answer to unreadable requests and a note of when a request
    began to arrive on an idle connection."""

    __slots__ = ("receiving_since",)

    def __init__(self, manager: _GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.receiving_since: float | None = None

    def data_received(self, data: bytes) -> None:
        if self.receiving_since is None:
            self.receiving_since = -1.0  # "look at me": the guard decides whether a request is in progress
        super().data_received(data)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)  # logs (without content) and closes
        if not 400 <= status < 500:
            return response
        UNREADABLE_REQUESTS.inc()
        error = UnreadableRequest("the request could not be read as HTTP")
        replacement = web.Response(status=status, body=error.body_bytes(), content_type="application/json")
        replacement.force_close()
        return replacement


class ConnectionGuard:
    """Which connections are open, and which of them may be closed: those that have not sent a whole request yet
    (`_waiting`, oldest first) and those idle between requests (`_idle`, longest idle first)."""

    def __init__(self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop) -> None:
        self._limits = limits
        self._loop = loop
        self._open = 0
        self._waiting: dict[_Connection, float] = {}  # → when it opened
        self._idle: dict[_Connection, None] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        return self._open

    def opened(self, connection: _Connection) -> None:
        self._open += 1
        if self._open > self._limits.max_connections and not self._evict_one():
            self._abort(connection, "refused")  # every other connection is busy with a request: it must wait
            return
        self._waiting[connection] = self._loop.time()
        connection.receiving_since = None
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def closed(self, connection: _Connection) -> None:
        self._open -= 1
        self._waiting.pop(connection, None)
        self._idle.pop(connection, None)

    def busy(self, connection: _Connection) -> None:
        self._waiting.pop(connection, None)
        self._idle.pop(connection, None)
        connection.receiving_since = 0.0  # ignored until it is idle again

    def idle(self, connection: _Connection) -> None:
        if connection.transport is not None:
            connection.receiving_since = None
            self._idle[connection] = None

    def wrap(
        self, handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]]
    ) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
        async def handle(request: BaseRequest) -> web.StreamResponse:
            connection = cast(_Connection, request.protocol)  # `_GatewayServer` makes only these
            self.busy(connection)
            try:
                return await handler(request)
            finally:
                self.idle(connection)

        return handle

    def _evict_one(self) -> bool:
        for connections in (self._waiting, self._idle):
            if connections:
                oldest = next(iter(connections))
                self._abort(oldest, "evicted")
                return True
        return False

    def _abort(self, connection: _Connection, reason: str) -> None:
        self._waiting.pop(connection, None)
        self._idle.pop(connection, None)
        CONNECTIONS_CLOSED.labels(reason).inc()
        if connection.transport is not None:
            connection.transport.abort()  # frees the descriptor now; connection_lost follows

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._loop.time()
        deadline = now - self._limits.header_read_timeout
        expired = []
        for connection, opened in self._waiting.items():
            if opened > deadline:
                break  # the rest opened later
            expired.append(connection)
        for connection in expired:
            self._abort(connection, "slow")
        for connection in list(self._idle):
            since = connection.receiving_since
            if since is None:
                continue
            if since < 0:
                connection.receiving_since = now  # a request began to arrive since the last sweep
            elif since <= deadline:
                self._abort(connection, "slow")
        if self._open > 0:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class _GatewayServer(web.Server):
    guard: ConnectionGuard

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if isinstance(handler, _Connection):
            self.guard.opened(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if isinstance(handler, _Connection):
            self.guard.closed(handler)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `_GatewayServer` under `limits`."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits | None = None, **kwargs: Any) -> None:
        self.limits = limits or ConnectionLimits()
        kwargs.setdefault("keepalive_timeout", self.limits.keepalive_timeout)
        super().__init__(app, **kwargs)
        self.guard: ConnectionGuard | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GatewayServer
        assert isinstance(server, _GatewayServer)
        server.guard = self.guard = ConnectionGuard(self.limits, asyncio.get_running_loop())
        server.request_handler = self.guard.wrap(server.request_handler)
        return server

    async def cleanup(self) -> None:
        if self.guard is not None:
            self.guard.close()
        await super().cleanup()
