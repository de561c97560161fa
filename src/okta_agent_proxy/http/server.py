"""The gateway's HTTP server: aiohttp's, with what the gateway needs on top of it (the one adapter to its internals).

aiohttp offers no setting for three things a gateway on the path of every agent needs, so they are added here, and
nowhere else reaches into aiohttp's server:
1. **The answer to a request its HTTP parser refuses** (an oversized or malformed header, a bad request line):
   aiohttp's text quotes the offending bytes — the start of an oversized `Authorization` header, say — where the
   gateway's JSON error body says what happened and quotes nothing.
2. **Slow and idle clients** (`HEADER_READ_TIMEOUT_SECONDS`, `KEEPALIVE_TIMEOUT_SECONDS`, `MAX_CONNECTIONS`): a new
   connection must deliver its first request's headers within the header timeout, and so must a keep-alive
   connection once its next request begins to arrive; a client that stops taking what the gateway sends it (its
   transport's buffer stays full) is closed after as long, even mid-request — else it would hold its handler. An
   idle keep-alive connection lasts the keep-alive timeout (aiohttp's own `keepalive_timeout`). At
   `MAX_CONNECTIONS` (default 80 % of the open-file limit, leaving descriptors for backends, the database and logs),
   a new connection is admitted by closing one whose client is not reading, else the oldest one that has not sent a
   whole request, else the longest idle one — as nginx reuses keep-alive connections — so a flood of half-sent
   requests or of unread answers cannot shut out `/healthz` or a valid client. Only when every connection is busy
   with a request is the new one closed.
3. **A graceful drain** (`http/drain.py`): once the guard is `draining`, the response to every request that arrives
   says `Connection: close` (`_closing_while_draining`, around the request factory), and every connection closes
   after its response, one begun before the drain too (`_Connection.finish_response`) — an attribute check per
   request in each, ≈ 0.15 µs together — so clients take their next request elsewhere; `GatewayRunner.stop_listening`
   closes the listening sockets while the connections open go on; the guard closes idle connections, and cancels
   the requests still in flight with a message (through each connection's task: `internals.py`).

How, with aiohttp's public API: `GatewayRunner` is a `web.ServerRunner` over a `web.Server` of our own,
`_GatewayServer`, which serves the application with the request handler and factory of the server aiohttp builds for
it (a `web.AppRunner`, kept for the application's start-up and clean-up, whose own server never listens). The server
makes `_Connection`s; its `connection_made`/`connection_lost` hooks tell `ConnectionGuard` when a connection opens
and closes, and the guard reads four fields of aiohttp's own connection state (whether a request is in progress,
how many have come, when keep-alive would end, the task serving it; `internals.py`, the one adapter to private
state) when it sweeps, evicts or drains — never per request, so the guard costs the request path only a check in
`data_received`.
tests/integration/test_slow_clients.py, test_drain.py, the parser-refusal test in test_errors.py and
tests/unit/test_internals.py fail if aiohttp changes any of this underneath.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage

from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import UnreadableRequest
from okta_agent_proxy.http.aiohttp_binding import DISPATCHER
from okta_agent_proxy.internals import connection_task, handling_request, keepalive_ends_at, requests_parsed

# What makes a request out of its parsed head: (message, payload, connection, writer, the connection's task) → request.
RequestFactory = Callable[
    [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"], web.BaseRequest
]
SWEEP_SECONDS = 0.5  # how often slow connections are looked for: the timeouts are this much late at most


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_read_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 65536

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.HEADER_READ_TIMEOUT_SECONDS, settings.KEEPALIVE_TIMEOUT_SECONDS, settings.max_connections)


def _ignore(*args: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ServerEvents:
    """What the server reports (the composition counts them in metrics): a connection it closed, and why ("slow",
    "evicted", "refused"); a request its parser refused."""

    connection_closed: Callable[[str], None] = _ignore
    unreadable_request: Callable[[], None] = _ignore


_finish_response = web.RequestHandler.finish_response  # called directly: `super()` would cost as much as the check


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, with the gateway's answer to unreadable requests, a note of when data last
    began to arrive after a whole request had come in — what `ConnectionGuard` needs to find a request that is being
    sent too slowly: nothing is called per request for it, two attribute writes when data comes — and, while the
    gateway drains, a close after each response."""

    __slots__ = ("events", "guard", "opened_at", "partial_count", "partial_since", "stalled_since")

    def __init__(self, manager: _GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = manager.guard
        self.events = manager.guard.events
        self.opened_at = 0.0
        self.partial_since: float | None = None  # -1: data came, the guard's next sweep stamps the time
        self.partial_count = 0  # requests parsed on this connection when that data came
        self.stalled_since: float | None = None  # -1: the client stopped taking our bytes, not yet stamped

    def data_received(self, data: bytes) -> None:
        parsed = requests_parsed(self)
        if self.partial_since is None or self.partial_count != parsed:
            self.partial_since, self.partial_count = -1.0, parsed
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()  # the transport's buffer is full: the client is not taking what we send
        self.stalled_since = -1.0

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stalled_since = None

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        """aiohttp's, except while the gateway drains: then the connection closes after the response — one made
        before the drain began, too, whose headers said keep-alive (see `_closing_while_draining` for the others).
        Should aiohttp stop calling this for every response, such a connection would stay open until the end of the
        grace, which tests/integration/test_drain.py notices."""
        if self.guard.draining:
            resp.force_close()
        return _finish_response(self, request, resp, start_time)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)  # logs (without content) and closes
        if not 400 <= status < 500:
            return response
        self.events.unreadable_request()
        error = UnreadableRequest("the request could not be read as HTTP")
        replacement = web.Response(status=status, body=error.body_bytes(), content_type="application/json")
        replacement.force_close()
        return replacement

    # aiohttp's own bookkeeping (`internals.py`), read by the guard only when it sweeps or must evict.
    @property
    def busy(self) -> bool:
        """A request is being handled (its response not yet finished)."""
        return handling_request(self)

    @property
    def requests_parsed(self) -> int:
        """Requests whose headers have come in on this connection."""
        return requests_parsed(self)

    @property
    def idle_until(self) -> float:
        """When aiohttp's keep-alive timer would close it (the last response's end + KEEPALIVE_TIMEOUT_SECONDS)."""
        return keepalive_ends_at(self)

    @property
    def serving(self) -> asyncio.Task[None] | None:
        """The task serving this connection's requests, while it runs (read by the drain only)."""
        task = connection_task(self)
        return task if task is not None and not task.done() else None


class ConnectionGuard:
    """The open connections, and which of them to close: a sweep every `SWEEP_SECONDS` closes those too slow to send a
    request, and at `max_connections` a new connection is admitted by closing the one that has waited longest without
    sending a whole request, else the longest idle one (both found by a scan, which happens only at the limit)."""

    def __init__(self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop, events: ServerEvents) -> None:
        self._limits = limits
        self.events = events
        self._loop = loop
        self._connections: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._emptied: asyncio.Event | None = None  # made by `until_all_closed`, set when the last one closes
        self.draining = False  # set by `drain()`: from then on, each response closes its connection

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        """Connections with a request being handled (a scan: for the drain's log lines, not the request path)."""
        return sum(1 for connection in self._connections if connection.busy)

    def opened(self, connection: _Connection) -> None:
        connection.opened_at = self._loop.time()
        self._connections.add(connection)
        if len(self._connections) > self._limits.max_connections and not self._evict_one(connection):
            self._abort(connection, "refused")  # every other connection is busy with a request: it must wait
            return
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._emptied is not None:
            self._emptied.set()

    def _evict_one(self, newcomer: _Connection) -> bool:
        waiting = idle = None
        for connection in self._connections:
            if connection is newcomer:
                continue
            if connection.stalled_since is not None:  # its client is not reading: the first to go
                self._abort(connection, "evicted")
                return True
            if connection.busy:
                continue
            if connection.requests_parsed == 0:
                if waiting is None or connection.opened_at < waiting.opened_at:
                    waiting = connection
            elif idle is None or connection.idle_until < idle.idle_until:
                idle = connection
        victim = waiting or idle
        if victim is None:
            return False
        self._abort(victim, "evicted")
        return True

    def _abort(self, connection: _Connection, reason: str) -> None:
        self.closed(connection)
        self.events.connection_closed(reason)
        if connection.transport is not None:
            connection.transport.abort()  # frees the descriptor now; connection_lost follows

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._loop.time()
        deadline = now - self._limits.header_read_timeout
        slow = []
        for connection in self._connections:
            stalled = connection.stalled_since
            if stalled is not None:  # busy or not: a client that stops reading holds its handler
                if stalled < 0:
                    connection.stalled_since = now
                elif stalled <= deadline:
                    slow.append(connection)
                    continue
            if connection.busy:
                continue
            parsed = connection.requests_parsed
            if parsed == 0:
                if connection.opened_at <= deadline:
                    slow.append(connection)  # its first request's headers did not come in time
                continue
            since = connection.partial_since
            if since is None:
                continue
            if connection.partial_count != parsed:
                connection.partial_since = None  # that data was a request, and it came in whole
            elif since < 0:
                connection.partial_since = now  # part of a next request came since the last sweep
            elif since <= deadline:
                slow.append(connection)
        for connection in slow:
            self._abort(connection, "slow")
        if self._connections:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def drain(self) -> None:
        """From now on every response closes its connection (see `_Connection.finish_response`)."""
        self.draining = True

    async def close_idle(self) -> int:
        """Close every connection without a request in flight (each with one closes once its response ends: see
        `drain`); how many are left, each with a request in flight."""
        self.draining = True
        idle = [connection for connection in self._connections if not connection.busy]
        for connection in idle:
            connection.close()  # aiohttp's: its wait for a next request is cancelled, and its serving task ends
        # A request whose headers came in just before is picked up on the loop's next turn: its connection goes on,
        # and closes after its response.
        await asyncio.sleep(0)
        left = 0
        for connection in list(self._connections):
            if connection.serving is not None:
                left += 1
            elif connection in idle:
                connection.force_close()  # connection_lost follows, on the loop's next turn
        return left

    async def until_all_closed(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for every connection to close; whether they all did."""
        if self._connections:
            self._emptied = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._emptied.wait()
            except TimeoutError:
                pass
            finally:
                self._emptied = None
        return not self._connections

    def cancel_in_flight(self, message: str) -> set[asyncio.Task[None]]:
        """Cancel, with `message`, each request still being handled, and close any other connection; the tasks
        cancelled (each ends once its handler has dealt with the cancellation and its connection is closed)."""
        cancelled = set()
        for connection in list(self._connections):
            task = connection.serving
            if task is not None and connection.busy:
                task.cancel(message)
                cancelled.add(task)
            else:
                connection.force_close()
        return cancelled

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


async def _not_started(request: web.BaseRequest) -> web.StreamResponse:
    raise RuntimeError("GatewayRunner.setup() has not run")


def _closing_while_draining(factory: RequestFactory, guard: ConnectionGuard) -> RequestFactory:
    """aiohttp's request factory, except that a request made while the gateway drains is taken as one whose client
    asked to close (`should_close`, as `BaseRequest.clone` replaces fields): its response, streamed or not, says
    `Connection: close`. One attribute check per request."""

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if guard.draining:
            message = message._replace(should_close=True)
        return factory(message, payload, protocol, writer, task)

    return make_request


class _GatewayServer(web.Server):
    """aiohttp's low-level server, making `_Connection`s with `options` (`web.RequestHandler`'s keyword arguments)
    and telling the guard when one opens and closes. It serves what `adopt` gives it."""

    def __init__(
        self, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop, handler_cancellation: bool, **options: Any
    ) -> None:
        super().__init__(_not_started, handler_cancellation=handler_cancellation, loop=loop, **options)
        self.guard = guard
        self.event_loop = loop
        self.options = options

    def adopt(self, built: web.Server, app: web.Application) -> None:
        """Serve requests as `built` (the server aiohttp built for `app`) would — through the app's `Dispatcher`
        itself when it has one, without aiohttp's router (`http/aiohttp_binding.py`)."""
        dispatcher = app.get(DISPATCHER)
        self.request_handler = dispatcher.handle if dispatcher is not None else built.request_handler
        self.request_factory = _closing_while_draining(built.request_factory, self.guard)

    def __call__(self) -> web.RequestHandler:
        return _Connection(self, loop=self.event_loop, **self.options)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if isinstance(handler, _Connection):
            self.guard.opened(handler)

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if isinstance(handler, _Connection):
            self.guard.closed(handler)


class GatewayRunner(web.ServerRunner):
    """Serves `app` as `web.AppRunner(app, **options)` would, on a `_GatewayServer` under `limits`. Must be made in
    a running event loop. `options` are `web.RequestHandler`'s keyword arguments (`access_log`, `keepalive_timeout`:
    default `limits.keepalive_timeout`, …)."""

    def __init__(
        self,
        app: web.Application,
        *,
        limits: ConnectionLimits | None = None,
        events: ServerEvents | None = None,
        handle_signals: bool = False,
        shutdown_timeout: float = 60.0,
        handler_cancellation: bool = False,
        **options: Any,
    ) -> None:
        self.limits = limits or ConnectionLimits()
        options.setdefault("keepalive_timeout", self.limits.keepalive_timeout)
        loop = asyncio.get_running_loop()
        self.guard = ConnectionGuard(self.limits, loop, events or ServerEvents())
        self.gateway_server = _GatewayServer(self.guard, loop, handler_cancellation, **options)
        # The application's start-up, clean-up and the server aiohttp builds for it, which never listens.
        self.app_runner = web.AppRunner(app)
        super().__init__(self.gateway_server, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout)

    async def setup(self) -> None:
        await self.app_runner.setup()  # the application's on_startup
        built = self.app_runner.server
        assert built is not None
        self.gateway_server.adopt(built, self.app_runner.app)
        await super().setup()

    async def stop_listening(self) -> None:
        """Close the listening sockets (a new connection is refused); the connections open go on."""
        for site in list(self.sites):
            await site.stop()

    async def cleanup(self) -> None:
        """Stop listening, close idle connections, give the others `shutdown_timeout` to finish, then run the
        application's on_shutdown and on_cleanup."""
        self.guard.close()
        await super().cleanup()
        await self.app_runner.cleanup()
