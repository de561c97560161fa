"""RFC 8707 resource indicators at the front door (DESIGN.md §8, "Resources"): which backend a `resource` names.

A client sends the URL of the MCP server it was configured with — `{GATEWAY_BASE_URL}/employees`, or a URL under it —
and the token it gets carries that resource, normalised, as its `aud`: good only on requests routed to that same
backend. There is no all-backends token: the gateway's origin alone names no backend (unless one owns `/`).

Normalising: scheme and host lower-cased, the scheme's default port dropped, trailing slashes dropped (DESIGN §8;
MCP 2025-11-25, Authorization, "Canonical Server URI": servers SHOULD accept upper-case scheme and host, and the form
without the trailing slash is the canonical one). Nothing else changes: the path keeps its case and its escapes,
because the router matches the raw path — normalising `%65mployees` to `employees` here would name a backend the
request itself never reaches.

Refused with `invalid_target` (RFC 8707 §2): a missing resource; anything but an absolute http(s) URL; a fragment
(§2: "MUST NOT include a fragment component"); a query (§2: "SHOULD NOT include a query component" — and routing
ignores the query, so it could only make two audiences of one backend); userinfo; a `.` or `..` segment, plain or
`%2e` (routing.RouteTable gives such a path no route); an origin other than GATEWAY_BASE_URL's; a path no backend's
prefix covers.

Which backend: the caller passes the router's own matcher (`BackendRouter.match`, reduced to the backend's name), so
a resource and a request to the same path cannot disagree: longest prefix, segment boundaries, disabled backends
left out — one implementation (routing.py), not two.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

INVALID_TARGET = "invalid_target"
MAX_RESOURCE_LENGTH = 2048
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# RFC 3986 §2 characters without "#" and "?" (fragments and queries are refused by name first).
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/\[\]@!$&'()*+,;=%]*\Z")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME_AND_AUTHORITY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/]*)(?P<path>.*)\Z")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~]+\Z")
_PORT = re.compile(r"[0-9]{0,5}\Z")
_DOT = re.compile(r"%2e", re.IGNORECASE)

BackendMatcher = Callable[[str], "str | None"]


class InvalidTarget(Exception):
    """RFC 8707 `invalid_target`; the message says why, in words safe to show the client."""

    error = INVALID_TARGET


@dataclass(frozen=True, slots=True)
class Resource:
    url: str  # normalised: the token's `aud`
    backend: str


def normalize_resource(value: str) -> str:
    """The normalised form of an absolute http(s) URL (see the module docstring); InvalidTarget if it is not one."""
    if len(value) > MAX_RESOURCE_LENGTH:
        raise InvalidTarget("resource is too long")
    if "#" in value:
        raise InvalidTarget("resource must not have a fragment")
    if "?" in value:
        raise InvalidTarget("resource must not have a query")
    found = _SCHEME_AND_AUTHORITY.match(value)
    if found is None or not _URI_CHARS.match(value) or _BAD_ESCAPE.search(value):
        raise InvalidTarget("resource must be an absolute http(s) URL")
    scheme = found["scheme"].lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidTarget("resource must be an absolute http(s) URL")
    authority, path = found["authority"], found["path"]
    if "@" in authority:
        raise InvalidTarget("resource must not have userinfo")
    if any(_DOT.sub(".", segment) in (".", "..") for segment in path.split("/")):
        raise InvalidTarget("resource must not have '.' or '..' segments")
    host, port = _host_and_port(authority)
    netloc = host if port in ("", _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path.rstrip('/')}"


def _host_and_port(authority: str) -> tuple[str, str]:
    """(host lower-cased, port without leading zeros or ""); InvalidTarget for anything else."""
    not_a_url = InvalidTarget("resource must be an absolute http(s) URL")
    if authority.startswith("["):
        literal, bracket, tail = authority[1:].partition("]")
        if not bracket or "%" in literal:
            raise not_a_url
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise not_a_url from None
        host = f"[{literal}]"
    else:
        host = authority.partition(":")[0]
        tail = authority[len(host) :]
        if not _REG_NAME.match(host):
            raise not_a_url
    port = tail[1:]
    if (tail and not tail.startswith(":")) or not _PORT.match(port) or (port and not 0 < int(port) <= 65535):
        raise not_a_url
    return host.lower(), str(int(port)) if port else ""


class ResourceMap:
    """The backend each resource names, under one `GATEWAY_BASE_URL`.

    `match(path)` is the router's: the name of the backend a request to `path` would be routed to, or None. Pass
    one that asks the current router, so a config reload changes both at once."""

    def __init__(self, base_url: str, match: BackendMatcher) -> None:
        try:
            origin = normalize_resource(base_url)
        except InvalidTarget as exc:
            raise ValueError(f"GATEWAY_BASE_URL: {exc}") from None
        if origin.count("/") > 2:
            raise ValueError("GATEWAY_BASE_URL must have no path when the front door is on")
        self.origin = origin
        self._match = match

    def resolve(self, resource: str | None) -> Resource:
        """The normalised resource and its backend; InvalidTarget for a missing or foreign one."""
        if not resource:
            raise InvalidTarget("resource is required: the URL of the MCP server, e.g. " + self.origin + "/name")
        url = normalize_resource(resource)
        if url != self.origin and not url.startswith(self.origin + "/"):
            raise InvalidTarget("resource is not a server behind this gateway")
        backend = self._match(url[len(self.origin) :] or "/")
        if backend is None:
            raise InvalidTarget("resource names no backend of this gateway")
        return Resource(url, backend)
