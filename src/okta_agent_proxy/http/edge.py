"""The edge: what every request passes before anything reads it (DESIGN.md §2, "Edge order"), and its request id.

In this order, on every endpoint, before routing, authentication or any other check:
1. **400 `bad_request`** — a security header sent more than once (`Authorization`, `Mcp-Session-Id`, `X-Agent-ID`,
   `Origin`, `Host`, `Mcp-Method`, `Mcp-Name`, `MCP-Protocol-Version`, `Last-Event-ID`): with two copies, the copy a
   check reads and the copy a backend acts on can differ, so neither is trusted. An `access_token` in the query
   string (RFC 6750 §2.3; MCP clients send tokens only in `Authorization`): it would be logged and forwarded. A
   path with control characters (it would reach headers and logs).
2. **421 `misdirected_request`** — a `Host` not in `ALLOWED_HOSTS` (DNS-rebinding protection: backends no longer see
   the client's `Host`, so the gateway checks it for them).
3. **403 `forbidden_origin`** — an `Origin` not in `ALLOWED_ORIGINS`, when the header is present.

What differs by kind of endpoint is written once, in `EdgeRules`: the public metadata under `/.well-known/` takes any
`Origin` (browser-based MCP clients read it cross-origin, and answer CORS preflights); the operational endpoints
(`/healthz`, `/readyz`, `/metrics`) also take a `Host` that is an IP literal, or none — probes and scrapers address a
pod by its IP (HAProxy's default health check is HTTP/1.0 without a `Host`), and DNS rebinding always presents the
attacker's host *name*: a browser never sends an IP literal it was not given, nor no `Host` at all.
"""

from __future__ import annotations

import ipaddress
import random
import re
import time
from dataclasses import dataclass

from multidict import CIMultiDict, istr

from okta_agent_proxy.config.settings import Settings, normalize_origin
from okta_agent_proxy.errors import BadRequest, ForbiddenOrigin, MisdirectedRequest
from okta_agent_proxy.http.interface import HttpRequest

# DESIGN.md §2: the headers whose every copy must agree — so the gateway accepts exactly one.
SECURITY_HEADERS = tuple(
    istr(name)
    for name in (
        "Authorization",
        "Mcp-Session-Id",
        "X-Agent-ID",
        "Origin",
        "Host",
        "Mcp-Method",
        "Mcp-Name",
        "MCP-Protocol-Version",
        "Last-Event-ID",
    )
)
# multidict's keys view lists each name once, case-insensitively: `len(keys())` < `len(headers)` tells a repeat.
# Checked here, so that a multidict that lists every copy only makes the check slower, never wrong.
_KEYS_ARE_DISTINCT = len(CIMultiDict([("a", "1"), ("A", "2")]).keys()) == 1
_MEMO_MAX = 1024  # Host values remembered: they come from clients, so the memo is bounded
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class EdgeRules:
    """What one kind of endpoint accepts beyond the defaults."""

    any_origin: bool = False  # any Origin (public metadata, read by browser-based clients)
    ip_hosts: bool = False  # a Host that is an IP literal, besides ALLOWED_HOSTS (probes, scrapers)


MCP_ROUTES = EdgeRules()
PUBLIC_METADATA = EdgeRules(any_origin=True)
OPERATIONS = EdgeRules(ip_hosts=True)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    host = host.lower()
    if host in allowed:
        return True
    # An entry without a port accepts the host on any port: "localhost" accepts "localhost:8000".
    name, sep, port = host.rpartition(":")
    return bool(sep) and port.isdigit() and name in allowed


def is_ip_literal(host: str) -> bool:
    """`10.0.0.5`, `10.0.0.5:8000`, `[::1]`, `[::1]:8000`."""
    name = host
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Edge:
    """The edge checks for one process's settings (which never change while it runs)."""

    def __init__(self, settings: Settings) -> None:
        self._allowed_hosts = settings.allowed_hosts
        self._allowed_origins = settings.allowed_origins
        self._hosts: dict[str, bool] = {}  # Host value → allowed by ALLOWED_HOSTS

    def check(self, request: HttpRequest, rules: EdgeRules = MCP_ROUTES) -> None:
        """Raise the edge's refusal for this request, if any (in the order of the module docstring)."""
        headers = request.headers
        # A header name repeated at all (rare) shows as fewer distinct names than headers: only then look closer.
        if len(headers) != len(headers.keys()) or not _KEYS_ARE_DISTINCT:
            for name in SECURITY_HEADERS:
                if len(headers.getall(name, ())) > 1:
                    raise BadRequest(f"the {name} header was sent more than once")
        raw = request.raw_path
        if "?" in raw and any(name.lower() == "access_token" for name in request.query_names()):
            raise BadRequest("an access token must be sent in the Authorization header, never in the URL")
        if not raw.isprintable() or ("%" in raw and not request.path.isprintable()):
            raise BadRequest("the request path contains control characters")
        host = headers.get("Host", "")
        if not self._host_allowed(host) and not (rules.ip_hosts and (not host or is_ip_literal(host))):
            raise MisdirectedRequest("this gateway does not serve the requested host")
        origin = headers.get("Origin")
        if origin is not None and not rules.any_origin and normalize_origin(origin) not in self._allowed_origins:
            raise ForbiddenOrigin("requests from this origin are not allowed")

    def _host_allowed(self, host: str) -> bool:
        allowed = self._hosts.get(host)
        if allowed is None:
            allowed = host_allowed(host, self._allowed_hosts)
            if len(self._hosts) < _MEMO_MAX:
                self._hosts[host] = allowed
        return allowed


_random_bits = random.getrandbits  # request ids must be unique, not secret: a client may choose its own
_now_ns = time.time_ns


def request_id(request: HttpRequest) -> str:
    """The client's `X-Request-ID` if it is sane; else 32 hex digits, time-ordered as a UUIDv7 is (milliseconds
    since the epoch, then 80 random bits): unique, sortable, and appended at the end of the audit log's request-id
    index rather than at random places in it (random keys made each audit insert 2-3x as costly)."""
    supplied = request.headers.get("X-Request-ID")
    if supplied and _REQUEST_ID.match(supplied):
        return supplied
    return f"{_now_ns() // 1_000_000:012x}{_random_bits(80):020x}"
