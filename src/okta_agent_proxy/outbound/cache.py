"""Cache backend credentials until shortly before they expire, with one exchange in flight per key (DESIGN.md §3).

Key: (backend, agent, issuer, subject) — never the raw token; a provider is per backend, so its scopes and resource
are fixed by the key's backend. An entry lives until the earlier of the credential's expiry and the caller's token
expiry, minus `skew`: a backend token must not outlive the user's session that justified it. Concurrent requests
for a missing key wait for the one exchange in flight instead of starting their own (single-flight). A refusal
(`token_exchange_failed`) is remembered for `denial_ttl` seconds so a client retrying in a loop does not hammer the
IdP; an unavailable IdP is not remembered. After a backend rejects a credential with 401, the flow drops the entry
and yields a fresh one, once. Only `refreshable` credentials are cached (ID-JAGs themselves never are: the provider
never returns one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping

from okta_agent_proxy.errors import TokenExchangeFailed
from okta_agent_proxy.outbound.base import AuthFlow, Credential, CredentialRequest, Exchanger, Subject

CacheKey = tuple[str, str | None, str | None, str | None]


def cache_key(request: CredentialRequest) -> CacheKey:
    return (request.backend, request.agent, request.issuer, request.subject)


class CachingProvider:
    def __init__(
        self,
        inner: Exchanger,
        *,
        skew: float = 60.0,
        denial_ttl: float = 10.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.method = inner.method
        self._inner = inner
        self._skew = skew
        self._denial_ttl = denial_ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[CacheKey, tuple[Credential, float]] = {}
        self._denials: dict[CacheKey, tuple[TokenExchangeFailed, float]] = {}
        self._inflight: dict[CacheKey, asyncio.Future[Credential]] = {}
        self.exchanges = 0

    def auth_flow(self, caller: Subject | None, headers: Mapping[str, str]) -> AuthFlow:
        return _CachedFlow(self, self._inner.request_for(caller, headers))

    async def get(self, request: CredentialRequest) -> Credential:
        key = cache_key(request)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if now < entry[1]:
                return dataclasses.replace(entry[0], cache_hit=True)
            del self._entries[key]
        denial = self._denials.get(key)
        if denial is not None:
            if now < denial[1]:
                raise denial[0]
            del self._denials[key]
        inflight = self._inflight.get(key)
        if inflight is None:
            inflight = asyncio.ensure_future(self._exchange(key, request))
            self._inflight[key] = inflight
            inflight.add_done_callback(lambda done: self._finished(key, done))
        credential = await asyncio.shield(inflight)
        return dataclasses.replace(credential, cache_hit=False)

    def _finished(self, key: CacheKey, done: asyncio.Future[Credential]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so an exchange whose waiters all left is not reported as unhandled

    async def _exchange(self, key: CacheKey, request: CredentialRequest) -> Credential:
        self.exchanges += 1
        try:
            credential = await self._inner.get(request)
        except TokenExchangeFailed as refusal:
            self._denials[key] = (refusal, self._clock() + self._denial_ttl)
            raise
        expiries = [t for t in (credential.expires_at, request.subject_token_expires_at) if t is not None]
        if expiries and credential.refreshable:
            until = min(expiries) - self._skew
            if until > self._clock():
                if len(self._entries) >= self._max:
                    del self._entries[next(iter(self._entries))]
                self._entries[key] = (credential, until)
        return credential

    async def invalidate(self, request: CredentialRequest) -> None:
        key = cache_key(request)
        self._entries.pop(key, None)
        await self._inner.invalidate(request)


class _CachedFlow:
    """The cached credential for one request; after a 401, the rejected one dropped and a fresh one, once."""

    def __init__(self, cache: CachingProvider, request: CredentialRequest) -> None:
        self._cache = cache
        self._request = request
        self._refreshable = False  # the last credential given may be replaced (and has not been yet)

    async def credential(self) -> Credential:
        credential = await self._cache.get(self._request)
        self._refreshable = credential.refreshable
        return credential

    async def retry(self, status: int) -> Credential | None:
        if status != 401 or not self._refreshable:
            return None
        self._refreshable = False  # one retry only
        await self._cache.invalidate(self._request)
        return await self._cache.get(self._request)
