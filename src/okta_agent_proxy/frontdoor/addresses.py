"""Which client id URLs the front door may fetch, and which addresses that fetch may reach (DESIGN.md §8).

A client id URL is chosen by whoever calls `/oauth/authorize`, so fetching its metadata document (`cimd.py`) is an
SSRF surface (draft-ietf-oauth-client-id-metadata-document-02 §8.6, "CIMD §n" below). This module is the fence:
the rules for the URL and for every address it resolves to, and `fenced_connector`, the aiohttp connector through
which `cimd.py` makes its one request — it can reach nothing the rules refuse. `CimdRefused`, raised here and in
`cimd.py` alike, is defined here (and importable from `cimd.py`).

**URL** (CIMD §3): `https` only; no userinfo; a path; no `.` or `..` segment, plain or `%2e`; no fragment; and no
query — the draft says SHOULD NOT, and no known client uses one, so the front door narrows it to MUST NOT (CIMD §4:
an AS may restrict further). Any port (CIMD §3: "MAY contain a port"): the address check, not the port, keeps the
fetch off internal services, and `https://a/c` and `https://a:443/c` are two different client ids (§3). The host is
an IP literal or a DNS name whose last label starts with a letter — so `2130706433`, `127.1` or `0x7f.1`, which
resolvers read as 127.0.0.1, are refused before any lookup.

**Addresses** (CIMD §8.6: the AS "MUST NOT fetch … URLs … that resolve to special-use IP addresses as defined in
RFC6890"): global unicast only. Refused: loopback (unless `allow_loopback`), private (10/8, 172.16/12, 192.168/16,
fc00::/7), shared (100.64/10), link-local (169.254/16 — the cloud metadata service at 169.254.169.254 — and
fe80::/10), multicast, unspecified, the documentation, benchmarking and reserved ranges of the IANA special-purpose
registries, site-local fec0::/10, and the 6to4, Teredo and IPv4-compatible forms of IPv6. An IPv4 address written
IPv4-mapped (::ffff:0:0/96) or NAT64 (64:ff9b::/96) is judged as that IPv4 address. A name is resolved once and
refused if any of its addresses is (one public and one private address is a rebinding attempt, not a
misconfiguration). The connection then goes to exactly the addresses checked: the resolver aiohttp connects through
*is* the check, so no second lookup exists for an attacker's DNS to answer differently (no TOCTOU), while TLS (SNI,
certificate verification) and `Host` use the name. Each socket's destination is checked once more just before it
connects, so a path that skips the resolver (an IP literal, a future aiohttp) is still fenced.

`allow_loopback` — CIMD §8.6: an AS "MAY relax this restriction to allow fetching from loopback addresses when the
authorization server itself is also running on a loopback address". Set it only when GATEWAY_BASE_URL is loopback
(tests, the demo): it admits loopback addresses, and plain http to a loopback host (`localhost` or a loopback IP),
which must then resolve to loopback only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from enum import StrEnum
from typing import NoReturn

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = [
    "MAX_URL_LENGTH",
    "CimdReason",
    "CimdRefused",
    "IPAddress",
    "RefusedDestination",
    "address_allowed",
    "check_client_id_url",
    "checking_socket_factory",
    "fenced_connector",
]

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The IANA IPv4 and IPv6 special-purpose address registries (RFC 6890 and its updates), multicast and the reserved
# blocks: refused even where Python's `is_global` (which differs between patch releases) would say otherwise.
_REFUSED_V4 = tuple(
    ipaddress.IPv4Network(block)
    for block in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_REFUSED_V6 = tuple(
    ipaddress.IPv6Network(block)
    for block in (
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible addresses (RFC 4291 §2.5.5.1)
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",  # Teredo 2001::/32, benchmarking, ORCHID and other special-purpose blocks
        "2001:db8::/32",
        "2002::/16",  # 6to4
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# RFC 3986 §2 characters, "#" and "?" excepted (fragments and queries are refused by name first).
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/\[\]@!$&'()*+,;=%]*\Z")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_DOT = re.compile(r"%2e", re.IGNORECASE)


class CimdReason(StrEnum):
    INVALID_URL = "invalid_url"
    FORBIDDEN_ADDRESS = "forbidden_address"
    FETCH_FAILED = "fetch_failed"  # name lookup, connection, TLS or HTTP failed
    TIMEOUT = "timeout"
    REDIRECT = "redirect"
    BAD_STATUS = "bad_status"
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    INVALID_METADATA = "invalid_metadata"


class CimdRefused(Exception):
    """The client id URL or its document is refused. `reason` is for code and the security event; `detail` is
    written here or in `cimd.py`, and never quotes the response."""

    def __init__(self, reason: CimdReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RefusedDestination(OSError):
    """Raised by the socket factory: aiohttp reports an OSError of a connection attempt as the connection's error."""


def address_allowed(address: IPAddress, *, allow_loopback: bool = False) -> bool:
    """Whether the fetch may connect to `address` (see "Addresses" in the module docstring)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        if address.ipv4_mapped is not None:
            return address_allowed(address.ipv4_mapped, allow_loopback=allow_loopback)
        if address in _NAT64:
            return address_allowed(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), allow_loopback=allow_loopback)
    if address.is_loopback:
        return allow_loopback
    refused: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        _REFUSED_V4 if isinstance(address, ipaddress.IPv4Address) else _REFUSED_V6
    )
    return address.is_global and not any(address in block for block in refused)


def _invalid(detail: str) -> NoReturn:
    raise CimdRefused(CimdReason.INVALID_URL, detail)


def check_client_id_url(url: str, *, allow_loopback: bool = False) -> None:
    """Return if `url` may be fetched as a client id (URL and, for an IP literal, address); else CimdRefused."""
    _checked_scheme(url, allow_loopback=allow_loopback)


def _checked_scheme(url: str, *, allow_loopback: bool) -> str:
    if len(url) > MAX_URL_LENGTH:
        _invalid(f"longer than {MAX_URL_LENGTH} characters")
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in (("https", "http") if allow_loopback else ("https",)):
        _invalid("the scheme must be https")
    if "#" in url:
        _invalid("a client id URL must not have a fragment")
    if "?" in url:
        _invalid("a client id URL must not have a query")
    if not _URI_CHARS.match(url) or _BAD_ESCAPE.search(url):
        _invalid("characters outside a plain URI")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        _invalid("a client id URL must not have userinfo")
    if not slash:
        _invalid("a client id URL must have a path")
    if any(_DOT.sub(".", segment) in (".", "..") for segment in path.split("/")):
        _invalid("a client id URL must not have '.' or '..' segments")
    host, literal = _host(authority)
    is_loopback_host = host.lower() == "localhost" or (literal is not None and literal.is_loopback)
    if scheme == "http" and not is_loopback_host:
        _invalid("plain http is allowed only to a loopback host")
    if literal is not None and not address_allowed(literal, allow_loopback=allow_loopback):
        raise CimdRefused(CimdReason.FORBIDDEN_ADDRESS, f"the URL names {literal}, not a public address")
    return scheme


def _host(authority: str) -> tuple[str, IPAddress | None]:
    literal: IPAddress | None
    if authority.startswith("["):
        host, bracket, tail = authority[1:].partition("]")
        if not bracket or "%" in host:
            _invalid("not an IPv6 literal")
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            _invalid("not an IPv6 literal")
    else:
        host = authority.partition(":")[0]
        tail = authority[len(host) :]
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = None
            labels = host.split(".")
            if len(host) > 253 or not all(_LABEL.match(label) for label in labels) or not labels[-1][0].isalpha():
                _invalid("the host must be a DNS name or an IP address")
    if tail and (not tail.startswith(":") or not _PORT.match(tail[1:]) or not 0 < int(tail[1:]) <= 65535):
        _invalid("the port must be a number from 1 to 65535")
    return host, literal


class _CheckingResolver(AbstractResolver):
    """Resolves through `inner` and refuses the whole name if any address is refused; aiohttp connects only to the
    addresses this returns."""

    def __init__(self, inner: AbstractResolver, *, allow_loopback: bool, loopback_only: bool) -> None:
        self._inner = inner
        self._allow_loopback = allow_loopback
        self._loopback_only = loopback_only

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise OSError(f"{host} has no address")
        for result in results:
            try:
                address = ipaddress.ip_address(result["host"])
            except ValueError:
                raise CimdRefused(CimdReason.FORBIDDEN_ADDRESS, f"{host} resolves to a non-IP address") from None
            if not _destination_allowed(address, self._allow_loopback, self._loopback_only):
                raise CimdRefused(CimdReason.FORBIDDEN_ADDRESS, f"{host} resolves to {address}")
        return results

    async def close(self) -> None:
        """The inner resolver belongs to whoever made it."""


def _destination_allowed(address: IPAddress, allow_loopback: bool, loopback_only: bool) -> bool:
    if loopback_only and not address.is_loopback:
        return False
    return address_allowed(address, allow_loopback=allow_loopback)


def checking_socket_factory(
    *, allow_loopback: bool, loopback_only: bool = False
) -> Callable[[AddrInfoType], socket.socket]:
    """aiohttp's `socket_factory`: a socket only for an allowed destination (the last check before connecting)."""

    def create(addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        try:
            address = ipaddress.ip_address(sockaddr[0])
        except ValueError:
            raise RefusedDestination(f"{sockaddr[0]} is not an IP address") from None
        if not _destination_allowed(address, allow_loopback, loopback_only):
            raise RefusedDestination(f"refused to connect to {address}: not a public address")
        return socket.socket(family=family, type=type_, proto=proto)

    return create


def fenced_connector(
    client_id: str, *, allow_loopback: bool, resolver: AbstractResolver | None, ssl_context: ssl.SSLContext | bool
) -> aiohttp.TCPConnector:
    """A connector for one fetch of `client_id` that reaches only addresses the rules allow (CimdRefused if the URL
    itself is refused): names go through `resolver` (None: aiohttp's ThreadedResolver, the system's getaddrinfo),
    checked; every socket is checked again before it connects. A refusal at connect time comes out of aiohttp as a
    `ClientConnectorError` whose `os_error` is a `RefusedDestination`."""
    loopback_only = _checked_scheme(client_id, allow_loopback=allow_loopback) == "http"
    return aiohttp.TCPConnector(
        resolver=_CheckingResolver(
            resolver or aiohttp.ThreadedResolver(), allow_loopback=allow_loopback, loopback_only=loopback_only
        ),
        use_dns_cache=False,
        force_close=True,
        limit=1,
        ssl=ssl_context,
        socket_factory=checking_socket_factory(allow_loopback=allow_loopback, loopback_only=loopback_only),
    )
