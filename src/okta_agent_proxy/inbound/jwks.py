"""The issuer's signing keys (RFC 7517 JWKS), fetched once and kept fresh without a restart.

Where the keys are: `OKTA_JWKS_URI` when set, else the `jwks_uri` of the issuer's metadata, which Okta serves at the
path-appended location `{issuer}/.well-known/oauth-authorization-server` (PROTOCOL.md §2.1), with the OIDC document
as the fallback. The metadata's `issuer` must equal the configured one (RFC 8414 §3.3).

Rotation: a token whose `kid` is unknown triggers one refetch — single-flight (concurrent misses share it) and
rate-limited (at most one miss-driven fetch per `min_refetch_interval` after a *successful* one), so a flood of
made-up `kid`s cannot turn the gateway into a load generator against Okta. Keys are also refreshed in the
background of a request once they are older than `max_age`; a failed refresh keeps the keys we have. While fetches
fail (an outage), a token with an unknown `kid` gets 503 + `Retry-After`, never 401: it may be signed with a new key
we cannot see yet, and a 401 would push the client into a needless re-login. During an outage a fetch is attempted
at most once per `FAILURE_BACKOFF_SECONDS`; a failed one does not use up the refetch window.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from okta_agent_proxy.errors import IdpUnavailable
from okta_agent_proxy.http.bodies import read_at_most
from okta_agent_proxy.observability.tracing import client_span, record_status

log = structlog.get_logger(__name__)
ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512"})
_MAX_DOCUMENT_BYTES = 512 * 1024
# After a failed fetch, answer 503 at once for this long instead of asking the IdP again for every request.
FAILURE_BACKOFF_SECONDS = 1.0


class JwksFetchError(Exception):
    """The keys could not be fetched or parsed; the message is safe to log."""


async def fetch_json(
    session: aiohttp.ClientSession, url: str, timeout: float, span_name: str = "fetch"
) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    try:
        with client_span(span_name, "GET", url, headers) as span:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False, headers=headers
            ) as response:
                record_status(span, response.status)
                if response.status != 200:
                    raise JwksFetchError(f"GET {url} answered {response.status}")
                body = await read_at_most(response.content, _MAX_DOCUMENT_BYTES)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise JwksFetchError(f"GET {url} failed: {type(exc).__name__}") from None
    if len(body) > _MAX_DOCUMENT_BYTES:
        raise JwksFetchError(f"GET {url}: document too large")
    try:
        document = json.loads(body)
    except ValueError:
        raise JwksFetchError(f"GET {url}: not JSON") from None
    if not isinstance(document, dict):
        raise JwksFetchError(f"GET {url}: not a JSON object")
    return document


_EC_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

KeysByAlgorithm = dict[str, PyJWK]


def _algorithms_for(entry: dict[str, Any]) -> tuple[str, ...]:
    """The algorithms a published key may verify: its `alg` if given (RFC 7517 §4.4: optional), else what its type
    allows — RS256/384/512 for RSA, the curve's one ES algorithm for EC."""
    alg = entry.get("alg")
    if isinstance(alg, str):
        return (alg,) if alg in ALLOWED_ALGORITHMS else ()
    if entry.get("kty") == "RSA":
        return ("RS256", "RS384", "RS512")
    curve_alg = _EC_CURVE_ALGORITHMS.get(str(entry.get("crv")))
    return (curve_alg,) if curve_alg else ()


def parse_jwks(document: dict[str, Any]) -> dict[str, KeysByAlgorithm]:
    """Signing keys by kid, then by algorithm; keys without a kid, for encryption, private, or of a disallowed
    algorithm are skipped."""
    keys: dict[str, KeysByAlgorithm] = {}
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise JwksFetchError("JWKS has no 'keys' array")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or entry.get("kty") not in ("RSA", "EC") or "d" in entry:
            continue
        try:
            by_alg = {alg: PyJWK(entry, algorithm=alg) for alg in _algorithms_for(entry)}
        except PyJWKError:
            continue
        if by_alg:
            keys[entry["kid"]] = by_alg
    return keys


class JwksCache:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        issuer: str,
        jwks_uri: str | None = None,
        *,
        fetch_timeout: float = 5.0,
        max_age: float = 3600.0,
        min_refetch_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[str], None] = lambda result: None,
    ) -> None:
        """`on_fetch("ok" | "error")` after each fetch (the composition counts them)."""
        self._session = session
        self._on_fetch = on_fetch
        self._issuer = issuer
        self._jwks_uri = jwks_uri
        self._fetch_timeout = fetch_timeout
        self._max_age = max_age
        self._min_refetch_interval = min_refetch_interval
        self._clock = clock
        self._keys: dict[str, KeysByAlgorithm] = {}
        self._fetched_at: float | None = None
        self._last_miss_fetch = float("-inf")
        self._last_failure = float("-inf")
        self._failing = False  # the last fetch (on demand or in the background) failed
        self._inflight: asyncio.Task[None] | None = None
        self.fetch_count = 0

    @property
    def ready(self) -> bool:
        return self._fetched_at is not None

    def publishes(self, kid: str) -> bool:
        return kid in self._keys

    async def key_for(self, kid: str, alg: str) -> PyJWK | None:
        """The key with this kid, for this algorithm, refetching once if the kid is unknown; None if the IdP does
        not publish it (or publishes it for another algorithm)."""
        by_alg = self._keys.get(kid)
        if by_alg is not None:
            if self._fetched_at is not None and self._clock() - self._fetched_at > self._max_age:
                self._refresh_in_background()
            return by_alg.get(alg)
        now = self._clock()
        if self._failing and now - self._last_failure < FAILURE_BACKOFF_SECONDS:
            raise IdpUnavailable("the identity provider's signing keys cannot be fetched")
        had_keys = self._fetched_at is not None
        recently_refetched = now - self._last_miss_fetch < self._min_refetch_interval
        if had_keys and not self._failing and recently_refetched:
            return None  # an unknown kid right after a successful refetch: not a rotation we missed
        try:
            await self.refresh()
        except JwksFetchError as exc:
            # While the keys cannot be fetched, an unknown kid may well be a rotation we cannot see yet: 503, so
            # the client retries instead of logging the user in again. A failure does not count as a refetch.
            log.warning("jwks_fetch_failed", issuer=self._issuer, reason=str(exc))
            raise IdpUnavailable("the identity provider's signing keys cannot be fetched") from None
        if had_keys:
            self._last_miss_fetch = self._clock()
        return self._keys.get(kid, {}).get(alg)

    async def refresh(self) -> None:
        """Fetch the keys now; concurrent callers share one fetch."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())
        await asyncio.shield(self._inflight)

    def _refresh_in_background(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            return
        task = asyncio.ensure_future(self._fetch())
        task.add_done_callback(_log_background_failure)
        self._inflight = task

    async def _fetch(self) -> None:
        self.fetch_count += 1
        try:
            uri = self._jwks_uri or await self._discover_jwks_uri()
            keys = parse_jwks(await fetch_json(self._session, uri, self._fetch_timeout, "keys"))
            if not keys:
                raise JwksFetchError("JWKS contains no usable signing key")
        except JwksFetchError:
            self._on_fetch("error")
            self._failing = True
            self._last_failure = self._clock()
            raise
        self._on_fetch("ok")
        self._keys = keys
        self._failing = False
        self._fetched_at = self._clock()
        log.info("jwks_fetched", issuer=self._issuer, kids=sorted(keys))

    async def _discover_jwks_uri(self) -> str:
        failures = []
        for suffix in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
            url = self._issuer.rstrip("/") + suffix
            try:
                metadata = await fetch_json(self._session, url, self._fetch_timeout, "metadata")
            except JwksFetchError as exc:
                failures.append(str(exc))
                continue
            if metadata.get("issuer") != self._issuer:
                raise JwksFetchError(f"metadata at {url} names another issuer")
            uri = metadata.get("jwks_uri")
            if not isinstance(uri, str):
                raise JwksFetchError("issuer metadata has no jwks_uri")
            self._jwks_uri = uri
            return uri
        raise JwksFetchError("; ".join(failures))


def _log_background_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("jwks_refresh_failed", reason=str(task.exception()))
