"""What every request on a backend route leaves behind: metrics and one audit event.

Called once per request, in the pipeline's `finally`, so denials, failures and client disconnects are recorded
like successes; a stream is recorded when it ends. Nothing here blocks: the audit event goes to the writer's queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from okta_agent_proxy.exchange import Exchange
from okta_agent_proxy.observability.logging import get_logger
from okta_agent_proxy.observability.metrics import REQUEST_SECONDS, REQUESTS, TOKEN_EXCHANGES, UPSTREAM_SECONDS
from okta_agent_proxy.store.events import AuditEvent

log = get_logger(__name__)
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response was complete"


class AuditSink(Protocol):
    async def record(self, event: AuditEvent) -> None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    code: str  # "ok", the gateway's error code, "upstream_<status>" or "client_closed"


class RequestRecorder:
    def __init__(self, sink: AuditSink | None, *, replica: str, record_arguments: bool = False) -> None:
        self._sink = sink
        self._replica = replica
        self._record_arguments = record_arguments
        # prometheus-client's labels() takes a lock and builds a key on every call: keep the children per label set.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._by_backend: dict[str, tuple[Any, Any]] = {}
        self._credentials: dict[tuple[str, bool], Any] = {}

    def _count(self, backend: str, agent: str, status: int, total: float, upstream: float | None) -> None:
        key = (backend, agent, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = REQUESTS.labels(backend, agent, str(status))
        counter.inc()
        histograms = self._by_backend.get(backend)
        if histograms is None:
            histograms = self._by_backend[backend] = (
                REQUEST_SECONDS.labels(backend),
                UPSTREAM_SECONDS.labels(backend),
            )
        histograms[0].observe(total)
        if upstream is not None:
            histograms[1].observe(upstream)

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
        log.info(
            "request",
            request_id=exchange.request_id,
            method=exchange.http_method,
            path=exchange.path,
            backend=backend,
            agent=exchange.agent_id,
            status=outcome.status,
            outcome=outcome.code,
            ms=round(total * 1000, 1),
        )
        if self._sink is None:
            return
        principal, message = exchange.principal, exchange.message
        headers_ms = (relay.headers_sent_at - exchange.started) * 1000 if relay.headers_sent_at is not None else None
        await self._sink.record(
            AuditEvent(
                time=datetime.now(UTC) - timedelta(seconds=total),
                request_id=exchange.request_id,
                replica=self._replica,
                http_method=exchange.http_method,
                path=exchange.path,
                status=outcome.status,
                outcome=outcome.code,
                latency_ms=round(total * 1000, 3),
                headers_ms=round(headers_ms, 3) if headers_ms is not None else None,
                backend=backend,
                user_sub=principal.subject if principal else None,
                user_uid=principal.uid if principal else None,
                token_jti=principal.jti if principal else None,
                agent=exchange.agent_id,
                client_id=principal.client_id if principal else None,
                mcp_method=message.method if message else None,
                mcp_name=message.name if message else None,
                jsonrpc_id=str(message.id) if message and message.id is not None else None,
                credential_method=exchange.credential_method,
                credential_cache_hit=credential.cache_hit if credential else None,
                id_jag_jti=credential.id_jag_jti if credential else None,
                upstream_status=exchange.upstream_status,
                bytes_in=len(exchange.body or b""),
                bytes_out=relay.bytes_out,
                detail=exchange.error.detail if exchange.error else None,
                arguments=message.arguments if self._record_arguments and message else None,
            )
        )
