"""What every request on a backend route leaves behind: metrics and one audit event.

Called once per request, in the pipeline's `finally`, so denials, failures and client disconnects are recorded
like successes; a stream is recorded when it ends. Nothing here blocks: the audit event goes to the writer's queue.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from okta_agent_proxy.config.models import AuditConfig
from okta_agent_proxy.exchange import Exchange
from okta_agent_proxy.observability.logging import RequestLine, get_logger
from okta_agent_proxy.observability.metrics import REQUEST_SECONDS, REQUESTS, TOKEN_EXCHANGES, UPSTREAM_SECONDS
from okta_agent_proxy.store.events import AuditEvent

log = get_logger(__name__)
_from_timestamp, _wall_clock = datetime.fromtimestamp, time.time
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response was complete"


class AuditSink(Protocol):
    def offer(self, event: AuditEvent) -> bool: ...  # queued (or dropped) without waiting; False: call `record`

    async def record(self, event: AuditEvent) -> None: ...

    def reconfigure(self, config: AuditConfig) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    code: str  # "ok", the gateway's error code, "upstream_<status>" or "client_closed"


def _adder(counter: Any) -> Callable[[], None]:
    """`counter.inc` for a labelled child, straight to its value: the child is observable by construction, so
    prometheus-client's per-call checks can go (any other shape of child keeps its own `inc`)."""
    value = getattr(counter, "_value", None)
    if value is None or not callable(getattr(value, "inc", None)):
        return counter.inc  # type: ignore[no-any-return]
    inc = value.inc
    return lambda: inc(1)


def _observer(histogram: Any) -> Callable[[float], None]:
    """`histogram.observe` for a labelled child, as prometheus-client 0.x does it (the sum, then the first bucket
    whose upper bound holds the amount), found by bisection and without the per-call checks."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        return histogram.observe  # type: ignore[no-any-return]
    bounds = list(bounds)
    add_to_sum = total.inc
    add_to_bucket = [bucket.inc for bucket in buckets]

    def observe(amount: float) -> None:
        add_to_sum(amount)
        if amount == amount:  # a NaN lands in no bucket
            i = bisect_left(bounds, amount)
            if i < len(add_to_bucket):
                add_to_bucket[i](1)

    return observe


class RequestRecorder:
    def __init__(self, sink: AuditSink | None, *, replica: str, record_arguments: bool = False) -> None:
        self._sink = sink
        self._replica = replica
        self._record_arguments = record_arguments
        self._line = RequestLine(log)
        # prometheus-client's labels() takes a lock and builds a key on every call: keep the children per label set.
        self._requests: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._by_backend: dict[str, tuple[Callable[[float], None], Callable[[float], None]]] = {}
        self._credentials: dict[tuple[str, bool], Any] = {}

    def _count(self, backend: str, agent: str, status: int, total: float, upstream: float | None) -> None:
        key = (backend, agent, status)
        count = self._requests.get(key)
        if count is None:
            count = self._requests[key] = _adder(REQUESTS.labels(backend, agent, str(status)))
        count()
        histograms = self._by_backend.get(backend)
        if histograms is None:
            histograms = self._by_backend[backend] = (
                _observer(REQUEST_SECONDS.labels(backend)),
                _observer(UPSTREAM_SECONDS.labels(backend)),
            )
        histograms[0](total)
        if upstream is not None:
            histograms[1](upstream)

    def _count_credential(self, backend: str, hit: bool) -> None:
        child = self._credentials.get((backend, hit))
        if child is None:
            child = self._credentials[(backend, hit)] = TOKEN_EXCHANGES.labels(
                backend, "cache_hit" if hit else "cache_miss"
            )
        child.inc()

    async def finish(self, exchange: Exchange, outcome: Outcome) -> None:
        ended = time.perf_counter()
        total = ended - exchange.started
        backend = exchange.route.name if exchange.route is not None else None
        relay = exchange.relay
        self._count(backend or "-", exchange.agent_id or "-", outcome.status, total, relay.upstream_headers_seconds)
        credential = exchange.credential
        if credential is not None and credential.cache_hit is not None:
            self._count_credential(backend or "-", credential.cache_hit)
        elif credential is None and exchange.credential_method is not None and exchange.error is not None:
            # The credential step itself failed: count it under the error's code.
            TOKEN_EXCHANGES.labels(backend or "-", exchange.error.code).inc()
        self._line.write(
            exchange.request_id,
            exchange.http_method,
            exchange.path,
            backend,
            exchange.agent_id,
            outcome.status,
            outcome.code,
            round(total * 10_000) / 10,  # ms to 0.1 (round(x, 1) formats decimals: 4x as costly)
        )
        if self._sink is None:
            return
        principal, message, error = exchange.principal, exchange.message, exchange.error
        headers_ms = (relay.headers_sent_at - exchange.started) * 1000 if relay.headers_sent_at is not None else None
        # Positional, in field order (mypy checks each type): a third of the cost of 26 keyword arguments.
        event = AuditEvent(
            _from_timestamp(_wall_clock() - total, UTC),  # time: when the request arrived
            exchange.request_id,
            self._replica,
            exchange.http_method,
            exchange.path,
            outcome.status,
            outcome.code,
            round(total * 1_000_000) / 1000,  # latency_ms, to the microsecond
            round(headers_ms * 1000) / 1000 if headers_ms is not None else None,
            backend,
            principal.subject if principal else None,
            principal.uid if principal else None,
            principal.jti if principal else None,
            exchange.agent_id,
            principal.client_id if principal else None,
            message.method if message else None,
            message.name if message else None,
            str(message.id) if message and message.id is not None else None,  # jsonrpc_id
            exchange.credential_method,
            credential.cache_hit if credential else None,
            credential.id_jag_jti if credential else None,
            exchange.upstream_status,
            len(exchange.body or b""),  # bytes_in
            relay.bytes_out,
            error.detail if error else None,
            message.arguments if self._record_arguments and message else None,
        )
        if not self._sink.offer(event):
            await self._sink.record(event)
