"""The metrics observer: request counts and durations per backend, credentials handed out, open SSE streams."""

from __future__ import annotations

from typing import Any

from okta_agent_proxy.observability.metrics import (
    OPEN_STREAMS,
    REQUEST_SECONDS,
    REQUESTS,
    TOKEN_EXCHANGES,
    UPSTREAM_SECONDS,
)
from okta_agent_proxy.record import NOT_ANSWERED, Observer, RequestRecord


class MetricsObserver(Observer):
    def __init__(self) -> None:
        # prometheus-client's labels() takes a lock and builds a key on every call: keep the children per label set.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._by_backend: dict[str, tuple[Any, Any]] = {}
        self._credentials: dict[tuple[str, str], Any] = {}

    def on_response_start(self, record: RequestRecord) -> None:
        if record.is_stream:
            OPEN_STREAMS.inc()

    def on_done(self, record: RequestRecord) -> None:
        if record.is_stream and record.response_started_at is not None:
            OPEN_STREAMS.dec()
        backend = record.route.name if record.route is not None else "-"
        status = (record.outcome or NOT_ANSWERED).status
        key = (backend, record.agent_id or "-", status)
        count = self._requests.get(key)
        if count is None:
            count = self._requests[key] = REQUESTS.labels(backend, key[1], str(status))
        count.inc()
        histograms = self._by_backend.get(backend)
        if histograms is None:
            histograms = self._by_backend[backend] = (REQUEST_SECONDS.labels(backend), UPSTREAM_SECONDS.labels(backend))
        histograms[0].observe(record.seconds)
        if record.upstream_headers_seconds is not None:
            histograms[1].observe(record.upstream_headers_seconds)
        credential = record.credential
        if credential is not None and credential.cache_hit is not None:
            self._count_credential(backend, "cache_hit" if credential.cache_hit else "cache_miss")
        elif credential is None and record.credential_method is not None and record.error is not None:
            self._count_credential(backend, record.error.code)  # the credential step itself failed

    def _count_credential(self, backend: str, result: str) -> None:
        child = self._credentials.get((backend, result))
        if child is None:
            child = TOKEN_EXCHANGES.labels(backend, result)
            if len(self._credentials) < 1024:  # error codes are a fixed set; bounded all the same
                self._credentials[(backend, result)] = child
        child.inc()
