"""`RequestRecord`: what one request did, as its observers see it (DESIGN.md §2).

The pipeline writes the record as the request moves along — each step's result, written by `handle` (or, for the
upstream call, by the step that makes it) — and never reads it back: steps pass what they need to the next one
explicitly. Observers — the audit log, metrics, the request log line and (later) tracing — are told when a step
starts and ends, when the response starts, and when the request is done. The caller's token is never on the record.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the record sits above the steps that fill it
    from okta_agent_proxy.errors import GatewayError
    from okta_agent_proxy.inbound.validator import Principal
    from okta_agent_proxy.mcp.forward import RelayStats
    from okta_agent_proxy.mcp.messages import McpMessage
    from okta_agent_proxy.outbound.base import Credential
    from okta_agent_proxy.routing import Route

Headers = Mapping[str, str]
MutableHeaders = MutableMapping[str, str]
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response was complete"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    code: str  # "ok", the gateway's error code, "upstream_<status>" or "client_closed"


NOT_ANSWERED = Outcome(CLIENT_CLOSED, "client_closed")
_UPSTREAM: dict[int, Outcome] = {}  # one per status a backend answered (three digits: bounded)


def upstream_outcome(status: int) -> Outcome:
    outcome = _UPSTREAM.get(status)
    if outcome is None:
        outcome = _UPSTREAM[status] = Outcome(status, "ok" if status < 400 else f"upstream_{status}")
    return outcome


class Observer:
    """A watcher of requests. Override what you need; every hook is called on the event loop and must not block."""

    def on_start(self, record: RequestRecord, headers: Headers) -> None:
        """The request arrived, with these headers (tracing continues a caller's `traceparent`). Nothing may keep
        them: they hold the caller's token."""

    def on_upstream(self, record: RequestRecord, headers: MutableHeaders) -> None:
        """The request is about to go to the backend with `headers`, which the hook may change (tracing names its
        upstream span in `traceparent`); called for each try, inside the "upstream" step."""

    def on_step_start(self, record: RequestRecord, step: str) -> None:
        """`step` begins: "authenticate" (the token and the agent), "credential" (the backend's credential, again
        after a 401) or "upstream" (sending to the backend, and relaying its answer until the request is done)."""

    def on_step_end(self, record: RequestRecord, step: str) -> None:
        """`step` ended, successfully or not (`record.error` says which, once the request is done)."""

    def on_response_start(self, record: RequestRecord) -> None:
        """The response's status and headers went to the client (`record.response_started_at`)."""

    def on_done(self, record: RequestRecord) -> Awaitable[None] | None:
        """The request is over: answered, refused, failed or abandoned (`record.outcome`). Return an awaitable only
        to hold the request until it is done (the audit log, when its queue is full and the config says wait)."""
        return None


class Observers:
    """The observers of one config generation. Each hook calls only the observers that override it, so a hook no
    one watches costs one call (the header hooks, not even that: `watch_headers`)."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        def overriding(name: str) -> tuple[Observer, ...]:
            return tuple(o for o in observers if getattr(type(o), name) is not getattr(Observer, name))

        self._start = overriding("on_start")
        self._upstream = overriding("on_upstream")
        self._step_start = overriding("on_step_start")
        self._step_end = overriding("on_step_end")
        self._response_start = overriding("on_response_start")
        self._done = overriding("on_done")
        self.watch_steps = bool(self._step_start or self._step_end)
        self.watch_headers = bool(self._start or self._upstream)  # else the pipeline skips those two hooks' calls

    def start(self, record: RequestRecord, headers: Headers) -> None:
        for observer in self._start:
            observer.on_start(record, headers)

    def upstream(self, record: RequestRecord, headers: MutableHeaders) -> None:
        for observer in self._upstream:
            observer.on_upstream(record, headers)

    def step_start(self, record: RequestRecord, step: str) -> None:
        for observer in self._step_start:
            observer.on_step_start(record, step)

    def step_end(self, record: RequestRecord, step: str) -> None:
        for observer in self._step_end:
            observer.on_step_end(record, step)

    def response_start(self, record: RequestRecord) -> None:
        for observer in self._response_start:
            observer.on_response_start(record)

    async def done(self, record: RequestRecord) -> None:
        for observer in self._done:
            waiting = observer.on_done(record)
            if waiting is not None:
                await waiting


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started: float  # perf_counter()
    http_method: str
    path: str  # as the audit row keeps it (see `pipeline.recorded_path`)
    observers: Observers = field(repr=False)
    route: Route | None = None
    principal: Principal | None = None
    agent_id: str | None = None
    agent_evidence: str | None = None  # how the agent was identified (`inbound.agents.Evidence`)
    message: McpMessage | None = None
    bytes_in: int = 0
    credential_method: str | None = None
    credential: Credential | None = field(default=None, repr=False)  # the last one sent; None while fetching
    upstream_status: int | None = None
    upstream_headers_seconds: float | None = None  # from sending to the backend's response headers
    is_stream: bool = False  # the answer is an SSE stream
    response_started_at: float | None = None  # perf_counter() when the headers went to the client
    relay: RelayStats | None = None
    error: GatewayError | None = field(default=None, repr=False)
    outcome: Outcome | None = None
    seconds: float = 0.0  # from arrival to done, set by `finish`
    trace_id: str | None = None  # 32 hex digits, written by the tracing observer when tracing is on
    trace: object = field(default=None, repr=False)  # the tracing observer's own state for this request
    _step: str | None = None

    def step(self, name: str | None) -> None:
        """End the step in progress (if any) and start `name` (None: none), for observers that time steps."""
        observers = self.observers
        if observers.watch_steps:
            if self._step is not None:
                observers.step_end(self, self._step)
            if name is not None:
                observers.step_start(self, name)
        self._step = name

    def finish(self) -> RequestRecord:
        """Close the last step and settle the outcome: a client that hung up once it had the whole answer (the SDK
        closes a POST's stream at its response) was answered; one that hung up while the relay was ending the answer
        for a reason of its own (`RelayStats.failure`: the drain, a stalled backend, a refused list) keeps that
        reason; one that hung up before was not answered (499)."""
        self.step(None)
        self.seconds = time.perf_counter() - self.started
        if self.outcome is None:  # the relay did not return: the client went, or an end the relay chose was cut
            relay = self.relay
            if relay is not None and relay.delivered:
                self.outcome = upstream_outcome(self.upstream_status or 200)
            elif relay is not None and relay.failure is not None:  # e.g. the drain's error event, never written
                self.outcome = Outcome(self.upstream_status or CLIENT_CLOSED, relay.failure)
            else:
                self.outcome = NOT_ANSWERED
        return self

    def response_started(self) -> None:
        self.response_started_at = time.perf_counter()
        self.observers.response_start(self)

    @property
    def delivered(self) -> bool:
        """The client has the whole answer, even if it hung up right after."""
        return self.relay is not None and self.relay.delivered
