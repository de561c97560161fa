"""Prometheus metrics (prometheus-client), served at `/metrics`.

Labels are bounded by configuration — backend and agent names, HTTP status — never by user input. With
`serve --workers N` every process writes its samples to `PROMETHEUS_MULTIPROC_DIR` (set by the parent before the
workers start) and `/metrics` on any worker aggregates all of them, so the numbers are right whichever process the
scrape lands on.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("oap_requests", "Requests on backend routes, by outcome.", ["backend", "agent", "status"])
REQUEST_SECONDS = Histogram(
    "oap_request_duration_seconds",
    "Time from request to the end of the response.",
    ["backend"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_SECONDS = Histogram(
    "oap_upstream_headers_seconds",
    "Time from sending to a backend to its response headers.",
    ["backend"],
    buckets=LATENCY_BUCKETS,
)
TOKEN_EXCHANGES = Counter(
    "oap_backend_credentials",
    "Backend credentials handed out, by result (cache_hit, cache_miss, error code).",
    ["backend", "result"],
)
JWKS_REFRESHES = Counter("oap_jwks_fetches", "JWKS fetches, by result.", ["result"])
AUDIT_QUEUE_DEPTH = Gauge("oap_audit_queue_depth", "Audit events waiting to be written.", multiprocess_mode="livesum")
AUDIT_DROPPED = Gauge(
    "oap_audit_dropped_events",
    "Audit events dropped since start (queue full under when_full: drop).",
    multiprocess_mode="livesum",
)
UNREADABLE_REQUESTS = Counter(
    "oap_unreadable_requests", "Requests the HTTP parser refused before any handler (answered 400 bad_request)."
)
CONNECTIONS_CLOSED = Counter(
    "oap_connections_closed",
    "Client connections the gateway closed: too slow to send a request (slow), or to admit another at "
    "MAX_CONNECTIONS (evicted, refused).",
    ["reason"],
)
REDIS_ERRORS = Counter(
    "oap_redis_errors",
    "Redis commands that failed or were too slow (the request carried on without Redis), and values in Redis that "
    "did not open (operation=open), by operation.",
    ["operation"],
)
RATE_LIMITED = Counter(
    "oap_rate_limited",
    "Requests refused with 429 for a request budget (rate_limits per_user, per_agent, per_user_backend, backends).",
    ["backend", "agent"],
)
OPEN_STREAMS = Gauge("oap_open_sse_streams", "SSE responses being relayed right now.", multiprocess_mode="livesum")


def render() -> tuple[bytes, str]:
    """The exposition text and its content type; aggregated across workers in multi-process mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
