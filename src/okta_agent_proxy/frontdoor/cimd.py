"""Client ID Metadata Documents (CIMD): front-door clients that name themselves with an https URL (DESIGN.md §8).

Claude Code and VS Code send `client_id=https://…` instead of registering (MCP 2025-11-25, Authorization, "Client ID
Metadata Documents"); the gateway fetches that URL and takes the client's `redirect_uris` and `client_name` from it.
Rules below cite draft-ietf-oauth-client-id-metadata-document-02 as "CIMD §n". Whoever calls `/oauth/authorize`
chooses the URL, so the fetch is an SSRF surface (CIMD §8.6), fenced in by `addresses.py`: which client id URLs
are fetched at all, and which addresses the fetch may reach (IP ranges, DNS rebinding, `allow_loopback`); the one
request goes through its `fenced_connector`. This module holds the rest: the request, the checks of the response
and of the document, and the cache.

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

Refusals raise `CimdRefused` (defined in `addresses.py`, importable from here): a machine-readable `reason` and a
detail written by the front door — never text from the response, which the attacker controls.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDictProxy

from okta_agent_proxy.frontdoor.addresses import CimdReason, CimdRefused, RefusedDestination, fenced_connector
from okta_agent_proxy.http.bodies import read_at_most

__all__ = [
    "FETCH_TIMEOUT_SECONDS",
    "MAX_CACHED_DOCUMENTS",
    "MAX_CACHE_SECONDS",
    "MAX_DOCUMENT_BYTES",
    "MIN_CACHE_SECONDS",
    "USER_AGENT",
    "CimdReason",
    "CimdRefused",
    "ClientMetadata",
    "ClientMetadataFetcher",
    "is_client_id_url",
]

MAX_DOCUMENT_BYTES = 5 * 1024
FETCH_TIMEOUT_SECONDS = 5.0
MIN_CACHE_SECONDS = 5 * 60.0
MAX_CACHE_SECONDS = 24 * 3600.0
MAX_CACHED_DOCUMENTS = 1024  # the URLs are chosen by callers: the cache is bounded
USER_AGENT = "okta-agent-proxy (client metadata fetch)"
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}\Z")
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.+-]+\+)?json\Z")


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
        connector = fenced_connector(
            client_id,
            allow_loopback=self.allow_loopback,
            resolver=self._resolver,
            ssl_context=self._ssl,
        )
        try:
            async with asyncio.timeout(self._timeout):
                return await self._get_document(connector, client_id)
        except CimdRefused:
            raise
        except TimeoutError:
            raise CimdRefused(CimdReason.TIMEOUT, f"no complete answer within {self._timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedDestination):
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
