"""Client ID Metadata Documents (CIMD): front-door clients that name themselves with an https URL (DESIGN.md §8).

Claude Code and VS Code send `client_id=https://…` instead of registering (MCP 2025-11-25, Authorization, "Client ID
Metadata Documents"); the gateway fetches that URL and takes the client's `redirect_uris` and `client_name` from it.
Rules below cite draft-ietf-oauth-client-id-metadata-document-02 as "CIMD §n". Whoever calls `/oauth/authorize`
chooses the URL, so the fetch is an SSRF surface (CIMD §8.6) and is fenced in:

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

**Response**: 200 only (CIMD §5) — a redirect is refused, never followed ("MUST NOT automatically follow HTTP
redirects"); JSON (`application/json` or `application/*+json`, CIMD §4), UTF-8, no content coding (so 5 KB on the
wire is 5 KB of document, never a decompression bomb); at most 5 KB read, then reading stops (CIMD §8.7: "The
recommended maximum size to read is 5 kilobytes"); the whole exchange, body included, within 5 s (a server that
trickles is cut off). **Document**: a JSON object without duplicate names; `client_id` equal to the URL by simple
string comparison (CIMD §4; RFC 3986 §6.2.1); `redirect_uris` a non-empty list of strings; `client_name` a string if
present — the draft does not require it (the MCP profile asks clients to send it); without one the consent page shows
the host (CIMD §8.5); `token_endpoint_auth_method` absent or `none`: the front door's clients are public, and a
document declaring `private_key_jwt` asks for client authentication the front door does not do (CIMD §8.2: the AS
"MUST require client authentication"), while a shared secret is never allowed (CIMD §4.1).

**Caching** (CIMD §5.2): a document is kept in process for its `Cache-Control: max-age` (less `Age`), bounded to
5 minutes – 24 hours, and 5 minutes without one; errors and invalid documents are never cached (§5.2: "MUST NOT cache
error responses"). Concurrent requests for one URL share one fetch. `ClientMetadata.expires_at` says how long the
caller may keep what it got, should it persist it.

Refusals raise `CimdRefused`: a machine-readable `reason` and a detail written here — never text from the response,
which the attacker controls.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

import aiohttp
import yarl
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy

from okta_agent_proxy.http.bodies import read_at_most

MAX_DOCUMENT_BYTES = 5 * 1024
FETCH_TIMEOUT_SECONDS = 5.0
MIN_CACHE_SECONDS = 5 * 60.0
MAX_CACHE_SECONDS = 24 * 3600.0
MAX_CACHED_DOCUMENTS = 1024  # the URLs are chosen by callers: the cache is bounded
MAX_URL_LENGTH = 2048
USER_AGENT = "okta-agent-proxy (client metadata fetch)"

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
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}\Z")
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.+-]+\+)?json\Z")


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
    written by this module and never quotes the response."""

    def __init__(self, reason: CimdReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _RefusedDestination(OSError):
    """Raised by the socket factory: aiohttp reports an OSError of a connection attempt as the connection's error."""


@dataclass(frozen=True, slots=True)
class ClientMetadata:
    client_id: str
    redirect_uris: tuple[str, ...]
    client_name: str | None
    fetched_at: float  # epoch seconds
    expires_at: float  # epoch seconds: fresh until then

    @property
    def host(self) -> str:
        """The client id's host, which the consent page shows beside the name (CIMD §8.5)."""
        return yarl.URL(self.client_id, encoded=True).raw_host or ""


def is_client_id_url(client_id: str) -> bool:
    """Whether a `client_id` is a metadata document URL rather than an id the front door issued (those never start
    with a scheme: CIMD §7.1)."""
    return client_id.startswith(("https://", "http://"))


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
            raise _RefusedDestination(f"{sockaddr[0]} is not an IP address") from None
        if not _destination_allowed(address, allow_loopback, loopback_only):
            raise _RefusedDestination(f"refused to connect to {address}: not a public address")
        return socket.socket(family=family, type=type_, proto=proto)

    return create


def _fresh_seconds(headers: CIMultiDictProxy[str], minimum: float, maximum: float) -> float:
    """How long a document stays fresh: `max-age` less `Age` (RFC 9111 §4.2), within [minimum, maximum];
    `no-store`/`no-cache`, or no usable `max-age`, give the minimum."""
    max_age: int | None = None
    for directive in ",".join(headers.getall("Cache-Control", [])).split(","):
        name, _, value = directive.strip().partition("=")
        name = name.lower()
        if name in ("no-store", "no-cache"):
            return minimum
        seconds = _delta_seconds(value.strip('"'))
        if name == "max-age" and seconds is not None:
            max_age = seconds if max_age is None else min(max_age, seconds)
    if max_age is None:
        return minimum
    lifetime = max_age - (_delta_seconds(headers.get("Age", "0").strip()) or 0)
    return min(max(float(lifetime), minimum), maximum)


def _delta_seconds(text: str) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds: ASCII digits (not `isdigit`, which takes "²"), a few enough for `int`."""
    return int(text) if _DELTA_SECONDS.match(text) else None


def _no_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate name")
    return document


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _metadata(body: bytes, client_id: str, fetched_at: float, fresh_seconds: float) -> ClientMetadata:
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_names, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CimdRefused(CimdReason.NOT_JSON, "the body is not a JSON document") from None
    if not isinstance(document, dict):
        raise CimdRefused(CimdReason.NOT_JSON, "the body is not a JSON object")
    if document.get("client_id") != client_id:
        raise CimdRefused(CimdReason.CLIENT_ID_MISMATCH, "the document's client_id is not the URL it was fetched from")
    uris = document.get("redirect_uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(uri, str) and uri for uri in uris):
        raise CimdRefused(CimdReason.INVALID_METADATA, "redirect_uris must be a non-empty list of strings")
    name = document.get("client_name")
    if name is not None and not isinstance(name, str):
        raise CimdRefused(CimdReason.INVALID_METADATA, "client_name must be a string")
    if document.get("token_endpoint_auth_method", "none") != "none":
        raise CimdRefused(CimdReason.INVALID_METADATA, "token_endpoint_auth_method must be none (a public client)")
    if "client_secret" in document or "client_secret_expires_at" in document:
        raise CimdRefused(CimdReason.INVALID_METADATA, "a client metadata document must not carry a secret")
    return ClientMetadata(client_id, tuple(uris), name, fetched_at, fetched_at + fresh_seconds)


class ClientMetadataFetcher:
    """Fetches, checks and caches client metadata documents. One per process; not bound to an event loop until used.

    `resolver` (default: aiohttp's ThreadedResolver, the system's getaddrinfo) looks names up; its answers are
    checked here. `ssl_context` replaces the default certificate verification (tests serve https with their own CA);
    verification cannot be turned off. `clock` gives epoch seconds."""

    def __init__(
        self,
        *,
        allow_loopback: bool = False,
        timeout: float = FETCH_TIMEOUT_SECONDS,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        min_cache_seconds: float = MIN_CACHE_SECONDS,
        max_cache_seconds: float = MAX_CACHE_SECONDS,
        max_cached: int = MAX_CACHED_DOCUMENTS,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.allow_loopback = allow_loopback
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._min_cache = min_cache_seconds
        self._max_cache = max_cache_seconds
        self._max_cached = max_cached
        self._resolver = resolver
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._clock = clock
        self._cache: dict[str, ClientMetadata] = {}
        self._inflight: dict[str, asyncio.Task[ClientMetadata]] = {}

    async def get(self, client_id: str) -> ClientMetadata:
        """The client's metadata: from the cache while fresh, else fetched (one fetch per URL at a time)."""
        cached = self._cache.get(client_id)
        if cached is not None:
            if cached.expires_at > self._clock():
                return cached
            del self._cache[client_id]
        task = self._inflight.get(client_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_keep(client_id))
            self._inflight[client_id] = task
            task.add_done_callback(lambda done: self._settled(client_id, done))
        # A caller that gives up does not cancel the fetch others wait for; it is bounded by the timeout anyway.
        return await asyncio.shield(task)

    def forget(self, client_id: str) -> None:
        self._cache.pop(client_id, None)

    def _settled(self, client_id: str, task: asyncio.Task[ClientMetadata]) -> None:
        if self._inflight.get(client_id) is task:
            del self._inflight[client_id]
        if not task.cancelled():
            task.exception()  # retrieved: a refusal nobody waited for any more is not "never retrieved"

    async def _fetch_and_keep(self, client_id: str) -> ClientMetadata:
        metadata = await self.fetch(client_id)
        if len(self._cache) >= self._max_cached:
            now = self._clock()
            for stale in [key for key, value in self._cache.items() if value.expires_at <= now]:
                del self._cache[stale]
            while len(self._cache) >= self._max_cached:
                del self._cache[next(iter(self._cache))]
        self._cache[client_id] = metadata
        return metadata

    async def fetch(self, client_id: str) -> ClientMetadata:
        """Fetch and check the document now, bypassing the cache; CimdRefused if anything is wrong."""
        loopback_only = _checked_scheme(client_id, allow_loopback=self.allow_loopback) == "http"
        connector = aiohttp.TCPConnector(
            resolver=_CheckingResolver(
                self._resolver or aiohttp.ThreadedResolver(),
                allow_loopback=self.allow_loopback,
                loopback_only=loopback_only,
            ),
            use_dns_cache=False,
            force_close=True,
            limit=1,
            ssl=self._ssl,
            socket_factory=checking_socket_factory(allow_loopback=self.allow_loopback, loopback_only=loopback_only),
        )
        try:
            async with asyncio.timeout(self._timeout):
                return await self._get_document(connector, client_id)
        except CimdRefused:
            raise
        except TimeoutError:
            raise CimdRefused(CimdReason.TIMEOUT, f"no complete answer within {self._timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, _RefusedDestination):
                raise CimdRefused(CimdReason.FORBIDDEN_ADDRESS, str(exc.os_error)) from None
            raise CimdRefused(CimdReason.FETCH_FAILED, f"could not connect ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise CimdRefused(CimdReason.FETCH_FAILED, f"the request failed ({type(exc).__name__})") from None
        finally:
            await connector.close()

    async def _get_document(self, connector: aiohttp.TCPConnector, client_id: str) -> ClientMetadata:
        async with (
            aiohttp.ClientSession(
                connector=connector,
                connector_owner=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as session,
            session.get(
                yarl.URL(client_id, encoded=True),
                allow_redirects=False,
                headers={"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": USER_AGENT},
            ) as response,
        ):
            if response.status != 200:
                if 300 <= response.status < 400:
                    raise CimdRefused(CimdReason.REDIRECT, f"HTTP {response.status}: redirects are not followed")
                raise CimdRefused(CimdReason.BAD_STATUS, f"HTTP {response.status}")
            if not _JSON_MEDIA_TYPE.match(response.content_type.lower()):
                raise CimdRefused(CimdReason.NOT_JSON, "the content type is not JSON")
            if response.charset is not None and response.charset.lower() not in ("utf-8", "utf8"):
                raise CimdRefused(CimdReason.NOT_JSON, "the charset is not UTF-8")
            if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
                raise CimdRefused(CimdReason.NOT_JSON, "the body has a content coding")
            if response.content_length is not None and response.content_length > self._max_bytes:
                raise CimdRefused(CimdReason.TOO_LARGE, f"the document is larger than {self._max_bytes} bytes")
            body = await read_at_most(response.content, self._max_bytes)
            if len(body) > self._max_bytes:
                raise CimdRefused(CimdReason.TOO_LARGE, f"the document is larger than {self._max_bytes} bytes")
            fresh = _fresh_seconds(response.headers, self._min_cache, self._max_cache)
        return _metadata(body, client_id, self._clock(), fresh)
