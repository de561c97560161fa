"""One audit record per request handled on a backend route (DESIGN.md §4, "Audit semantics").

It answers "which user, through which agent, did what on which backend, with which credential, and what
happened". It carries no secret: no token, key, assertion or credential header — only identifiers (`jti`s, ids)
and, when `audit.record_arguments` is on, the tool-call arguments the caller sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple


class AuditEvent(NamedTuple):
    """A tuple, so that one is cheap to make on the request path and, holding only plain values, is no work for
    the cyclic garbage collector while it waits in the writer's queue. The fields are in `audit_events`' column
    order, which the writer's INSERT follows."""

    time: datetime  # when the request arrived (UTC)
    request_id: str
    replica: str  # the gateway process that handled it
    http_method: str
    path: str
    status: int  # the status the client got
    outcome: str  # "ok", or the gateway's error code ("invalid_token", "backend_timeout", …), or "upstream_<status>"
    latency_ms: float  # total, until the response ended (a stream's row is written when it ends)
    headers_ms: float | None = None  # until the response headers were sent
    backend: str | None = None
    user_sub: str | None = None
    user_uid: str | None = None
    token_jti: str | None = None
    agent: str | None = None
    client_id: str | None = None  # the token's cid
    mcp_method: str | None = None
    mcp_name: str | None = None  # tool or prompt name, or resource URI
    jsonrpc_id: str | None = None
    credential_method: str | None = None
    credential_cache_hit: bool | None = None
    id_jag_jti: str | None = None
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    detail: str | None = None  # e.g. the IdP's error description — for operators, never shown to the client
    arguments: Any = None  # only with audit.record_arguments
    agent_evidence: str | None = None  # how the agent was identified (`inbound.agents.Evidence`)
    trace_id: str | None = None  # the request's OpenTelemetry trace, when tracing is on
