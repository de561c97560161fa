"""Cache backend credentials until shortly before they expire, with one exchange in flight per key (DESIGN.md §3).

Key: (backend, agent, issuer, subject) — never the raw token; a provider is per backend, so its scopes and resource
are fixed by the key's backend. An entry lives until the earlier of the credential's expiry and the caller's token
expiry, minus `skew`: a backend token must not outlive the user's session that justified it. Concurrent requests
for a missing key wait for the one exchange in flight instead of starting their own (single-flight). A refusal
(`token_exchange_failed`) is remembered for `denial_ttl` seconds so a client retrying in a loop does not hammer the
IdP; an unavailable IdP is not remembered. After a backend rejects a credential with 401, the flow drops the entry
and yields a fresh one, once. Only `refreshable` credentials are cached (ID-JAGs themselves never are: the provider
never returns one).

With `shared` (Redis, `outbound.shared_cache`) this in-process cache is the L1 in front of an L2 that every replica
shares: an L1 miss looks there, then takes the cross-replica lock or waits for the replica holding it; an exchange's
result goes to both; a 401 deletes the entry everywhere. `namespace` names the provider's configuration there, so
replicas share entries only when their YAML for the backend and its agents agrees (and a reload that changes them
starts afresh). Denials stay per process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping

from okta_agent_proxy.errors import TokenExchangeFailed
from okta_agent_proxy.outbound.base import AuthFlow, Credential, CredentialRequest, Exchanger, Subject
from okta_agent_proxy.outbound.shared_cache import NO_LOCK, Lock, SharedCredentials, SharedEntry, entry_name

CacheKey = tuple[str, str | None, str | None, str | None]


def cache_key(request: CredentialRequest) -> CacheKey:
    return (request.backend, request.agent, request.issuer, request.subject)


class CachingProvider:
    def __init__(
        self,
        inner: Exchanger,
        *,
        shared: SharedCredentials | None = None,
        namespace: str = "",
        skew: float = 60.0,
        denial_ttl: float = 10.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.method = inner.method
        self._inner = inner
        self._shared = shared
        self._namespace = namespace  # names this provider's configuration in the shared cache
        self._skew = skew
        self._denial_ttl = denial_ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[CacheKey, tuple[Credential, float, str | None]] = {}  # credential, until, shared name
        self._names: dict[str, CacheKey] = {}  # shared name → key, for exactly the L1 entries that have one
        self._denials: dict[CacheKey, tuple[TokenExchangeFailed, float]] = {}
        self._inflight: dict[CacheKey, asyncio.Future[Credential]] = {}
        self.exchanges = 0
        if shared is not None:
            shared.attach(self)

    def auth_flow(self, caller: Subject | None, headers: Mapping[str, str]) -> AuthFlow:
        return _CachedFlow(self, self._inner.request_for(caller, headers))

    async def get(self, request: CredentialRequest) -> Credential:
        key = cache_key(request)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if now < entry[1]:
                return dataclasses.replace(entry[0], cache_hit=True)
            self._drop(key)
        denial = self._denials.get(key)
        if denial is not None:
            if now < denial[1]:
                raise denial[0]
            del self._denials[key]
        inflight = self._inflight.get(key)
        if inflight is None:
            inflight = asyncio.ensure_future(self._fetch(key, request))
            self._inflight[key] = inflight
            inflight.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(inflight)

    def _finished(self, key: CacheKey, done: asyncio.Future[Credential]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so an exchange whose waiters all left is not reported as unhandled

    async def _fetch(self, key: CacheKey, request: CredentialRequest) -> Credential:
        """The credential for a key missing from the L1: from the shared cache, or after waiting for the replica
        that is exchanging for it, or from an exchange of our own."""
        shared = self._shared
        if shared is None:
            return await self._exchange(key, request, None)
        name = entry_name(self._namespace, key)
        found = await shared.get(name)
        if found is None:
            lock = await shared.lock(name)
            if lock is not None:
                try:
                    return await self._exchange(key, request, name, lock)
                finally:
                    await shared.unlock(name, lock)
            found = await shared.wait(name)
            if found is None:
                return await self._exchange(key, request, name, NO_LOCK)
        self._keep(key, found.credential, found.until, name)
        return found.credential

    async def _exchange(
        self, key: CacheKey, request: CredentialRequest, name: str | None, lock: Lock = NO_LOCK
    ) -> Credential:
        self.exchanges += 1
        try:
            credential = await self._inner.get(request)
        except TokenExchangeFailed as refusal:
            self._denials[key] = (refusal, self._clock() + self._denial_ttl)
            raise
        credential = dataclasses.replace(credential, cache_hit=False)
        expiries = [t for t in (credential.expires_at, request.subject_token_expires_at) if t is not None]
        if expiries and credential.refreshable:
            until = min(expiries) - self._skew
            if until > self._clock():
                self._keep(key, credential, until, name)
                if self._shared is not None and name is not None:
                    await self._shared.put(name, SharedEntry(credential, until), lock)
        return credential

    def _keep(self, key: CacheKey, credential: Credential, until: float, name: str | None) -> None:
        self._drop(key)
        if len(self._entries) >= self._max:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (credential, until, name)
        if name is not None:
            self._names[name] = key

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry[2] is not None:
            self._names.pop(entry[2], None)

    async def invalidate(self, request: CredentialRequest) -> None:
        key = cache_key(request)
        self._drop(key)
        if self._shared is not None:
            name = entry_name(self._namespace, key)
            await self._shared.invalidate(name, self)
        await self._inner.invalidate(request)

    def forget(self, name: str) -> None:
        """Another replica saw the backend refuse this entry's credential."""
        key = self._names.get(name)
        if key is not None:
            self._drop(key)

    def forget_all(self) -> None:
        """Invalidations may have been missed (the subscription was down): start the L1 afresh."""
        self._entries.clear()
        self._names.clear()


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
