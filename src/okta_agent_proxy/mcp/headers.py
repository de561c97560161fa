"""Which headers cross the gateway, in each direction (DESIGN.md §2, "No token passthrough").

Requests: an allow-list only, so the caller's `Authorization`, cookies and anything unknown never reach a backend;
the backend's own credential is added instead. Responses: everything but hop-by-hop headers, our own `Date` and
`Server`, and the backend's `WWW-Authenticate` (the client authenticates to the gateway, not to the backend —
PROTOCOL.md §4). In both directions the headers a `Connection` header names are hop-by-hop too and are dropped
(RFC 9110 §7.6.1). A backend's `Location` names the backend's own URL, which the client cannot (and must not) reach:
it is rewritten to the gateway's public path for that backend, and any other `Location` is refused (502).
"""

from __future__ import annotations

from collections.abc import Mapping

import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from okta_agent_proxy.errors import BadBackendResponse

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
        "upgrade",
        "proxy-connection",
    }
)
# Response headers the client never gets from a backend: hop-by-hop ones, our own Date/Server, and the backend's
# auth challenge.
_DROPPED_RESPONSE_HEADERS = _HOP_BY_HOP | {"date", "server", "www-authenticate"}
# `Connection` options that name no header (RFC 9112 §9.3, §9.6).
_CONNECTION_OPTIONS = frozenset({"close", "keep-alive"})
_NONE: frozenset[str] = frozenset()
SSE = "text/event-stream"

_MEMO_MAX = 1024  # header names remembered below: names come from clients and backends, so the memo is bounded
_REQUEST_NAMES: dict[str, tuple[str, bool]] = {}  # name as sent → (lower-cased, on the fixed allow-list)
_DROP, _KEEP, _CONNECTION = 0, 1, 2
_RESPONSE_NAMES: dict[str, int] = {}  # name as sent → what becomes of it on the way to the client


def _request_name(name: str) -> tuple[str, bool]:
    lower = name.lower()
    verdict = (lower, lower in FORWARDED_REQUEST_HEADERS or lower.startswith("mcp-param-"))
    if len(_REQUEST_NAMES) < _MEMO_MAX:
        _REQUEST_NAMES[name] = verdict
    return verdict


def _response_name(name: str) -> int:
    lower = name.lower()
    verdict = _CONNECTION if lower == "connection" else _DROP if lower in _DROPPED_RESPONSE_HEADERS else _KEEP
    if len(_RESPONSE_NAMES) < _MEMO_MAX:
        _RESPONSE_NAMES[name] = verdict
    return verdict


def connection_named(connection: str | None) -> frozenset[str]:
    """The (lower-cased) header names a `Connection` header's value lists, besides `close` and `keep-alive`."""
    if connection is None or connection.lower() in _CONNECTION_OPTIONS:
        return _NONE  # the common case: no header, or just `keep-alive` (nginx, aiohttp) or `close`
    names = {token.strip().lower() for token in connection.split(",")}
    return frozenset(names - _CONNECTION_OPTIONS - {""})


def _without(headers: list[tuple[str, str]], names: frozenset[str]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in names] if names else headers


def _joined(first: str | None, value: str) -> str:
    return value if first is None else f"{first}, {value}"


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    extra_allowed: frozenset[str],
    credential_headers: Mapping[str, str],
    request_id: str,
) -> CIMultiDict[str]:
    forwarded = []
    connection = None
    for name, value in incoming.items():
        lower, allowed = _REQUEST_NAMES.get(name) or _request_name(name)
        if allowed or lower in extra_allowed:
            forwarded.append((name, value))
        elif lower == "connection":
            connection = _joined(connection, value)
    headers: CIMultiDict[str] = CIMultiDict(_without(forwarded, connection_named(connection)))
    headers["X-Request-ID"] = request_id
    # The client's Accept-Encoding is not forwarded; ask for identity so bytes relay as they are (no decompression).
    headers["Accept-Encoding"] = "identity"
    headers.update(credential_headers)
    return headers


def relayed_response_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    relayed = []
    connection = None
    for name, value in upstream.items():
        verdict = _RESPONSE_NAMES.get(name)
        if verdict is None:
            verdict = _response_name(name)
        if verdict == _KEEP:
            relayed.append((name, value))
        elif verdict == _CONNECTION:
            connection = _joined(connection, value)
    return _without(relayed, connection_named(connection))


def public_location(location: str, requested: yarl.URL, backend_url: str, public_prefix: str) -> str:
    """The client's view of a backend's `Location`: the same place under the gateway's path for this backend.

    `location` is resolved against the URL the gateway requested (RFC 9110 §10.2.2: it may be relative); if it is
    the backend's `url` or below it, its remainder is appended to `public_prefix` (the gateway's base URL and the
    route's path). Anything else — another host, or a path outside the backend — would send the client somewhere
    the gateway does not guard: BadBackendResponse."""
    try:
        target = requested.join(yarl.URL(location))
    except ValueError:
        raise BadBackendResponse("the backend answered with an unusable Location") from None
    base = yarl.URL(backend_url)
    same_origin = (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port)
    base_path = base.raw_path.rstrip("/")
    path = target.raw_path
    if not same_origin or not (path == base_path or path.startswith(base_path + "/") or (not base_path)):
        raise BadBackendResponse("the backend redirected outside its own URL")
    rest = path[len(base_path) :]
    query = f"?{target.raw_query_string}" if target.raw_query_string else ""
    fragment = f"#{target.raw_fragment}" if target.raw_fragment else ""
    return f"{public_prefix.rstrip('/')}{rest}{query}{fragment}"
