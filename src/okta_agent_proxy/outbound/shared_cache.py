"""The credential cache shared by replicas through Redis (DESIGN.md §4): the L2 behind each process's `CachingProvider`.

- **Entries**: `oap:cred:<sha256 of the provider's namespace and cache key>`, the value sealed with AES-256-GCM under a
  key derived from the session keys (so from `SESSION_SECRET`, the same on every replica): a Redis dump shows no usable
  token. The Redis key is the AAD, so a value copied under another key does not open. A value that does not open or
  parse — written by someone else, or sealed with a retired secret — is ignored (counted as `open` errors) and
  overwritten by the next exchange: never served. TTL: the entry's own `until`, as in the L1.
- **Single-flight**: `SET oap:lock:<…> <token> NX PX <LOCK_MS>` before exchanging. Whoever does not get the lock polls
  for the value (and for the lock, so a holder that failed frees the others at once), for at most `WAIT_SECONDS`,
  then proceeds on its own. The holder writes the value before it releases the lock (compare-and-delete, in Lua);
  both are tried even while Redis is held back after a failure, so nobody is left waiting on a lock we could free.
- **Invalidation**: a backend 401 deletes the entry and publishes its name on `oap:cred:invalidate`; every replica
  drops it from its L1 on receipt (`LocalCache.forget`), and drops its whole L1 whenever its subscription restarts,
  since invalidations may have been missed meanwhile. The process's other caches (another config generation) are
  told directly.
When Redis is away every method answers "nothing shared" and the caller carries on in process (`store.redis`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from okta_agent_proxy.outbound.base import Credential
from okta_agent_proxy.sealing import Sealer, derive_key
from okta_agent_proxy.store.redis import RedisLink

CHANNEL = "oap:cred:invalidate"
LOCK_MS = 25_000  # two token-endpoint round trips of at most 10 s each, and some
WAIT_SECONDS = 5.0  # then a waiter exchanges on its own: a holder that died must not stall the others for LOCK_MS
_POLL_SECONDS = (0.01, 0.02, 0.05, 0.1)  # then every 0.1 s
_HKDF_INFO = b"okta-agent-proxy credential cache v1"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class LocalCache(Protocol):
    """A process's own cache of the entries (the L1), told when another replica invalidates one."""

    def forget(self, name: str) -> None: ...

    def forget_all(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Lock:
    token: str
    held: bool  # taken in Redis (False: Redis was away, and the exchange goes ahead without one)


NO_LOCK = Lock("", held=False)


@dataclass(frozen=True, slots=True)
class SharedEntry:
    credential: Credential
    until: float  # epoch seconds: when the entry stops being served


def cache_keys(session_keys: Sequence[bytes]) -> list[bytes]:
    """The keys that seal cache values, derived from the session keys (the sealing one first)."""
    return [derive_key(key, _HKDF_INFO) for key in session_keys]


def entry_name(namespace: str, key: tuple[str | None, ...]) -> str:
    digest = hashlib.sha256(json.dumps([namespace, *key]).encode()).hexdigest()
    return f"oap:cred:{digest}"


class SharedCredentials:
    def __init__(self, link: RedisLink, keys: Sequence[bytes]) -> None:
        self._link = link
        self._sealer = Sealer(keys)
        self._origin = secrets.token_hex(8)  # this process, so it ignores its own invalidations
        self._locals: weakref.WeakSet[LocalCache] = weakref.WeakSet()
        self._release = link.client.register_script(_RELEASE)  # run on whichever client the link has then

    def attach(self, local: LocalCache) -> None:
        """Tell `local` of invalidations from now on (held weakly: a retired config generation's cache goes away)."""
        self._locals.add(local)

    async def get(self, name: str) -> SharedEntry | None:
        value = await self._link.run("get", lambda client: client.get(name))
        return self._open(name, value) if isinstance(value, bytes) else None

    async def put(self, name: str, entry: SharedEntry, lock: Lock) -> None:
        """Share an exchange's result; tried even while held back when others wait for it (we hold the lock)."""
        ttl_ms = int((entry.until - time.time()) * 1000)
        if ttl_ms > 0:
            value = self._seal(name, entry)
            await self._link.run("set", lambda client: client.set(name, value, px=ttl_ms), always=lock.held)

    async def lock(self, name: str) -> Lock | None:
        """The go-ahead to exchange for `name`: holding the lock in Redis, or not (Redis is away, and nobody can);
        None when another process holds it."""
        token = secrets.token_hex(16)

        async def take(client: Redis) -> bool:
            return bool(await client.set(_lock_name(name), token, nx=True, px=LOCK_MS))

        taken = await self._link.run("lock", take)
        return None if taken is False else Lock(token, held=taken is True)

    async def unlock(self, name: str, lock: Lock) -> None:
        if lock.held:  # tried even while held back: the others wait on it
            keys, args = [_lock_name(name)], [lock.token]
            await self._link.run(
                "unlock", lambda client: self._release(keys=keys, args=args, client=client), always=True
            )

    async def wait(self, name: str) -> SharedEntry | None:
        """The value another process is fetching, once it is there; None when its lock goes without a value, Redis
        goes away, or `WAIT_SECONDS` pass."""
        deadline = time.monotonic() + WAIT_SECONDS
        for attempt in range(1_000_000):  # bounded by the deadline long before the count
            await asyncio.sleep(_POLL_SECONDS[min(attempt, len(_POLL_SECONDS) - 1)])
            found = await self._link.run("wait", lambda client: client.mget(name, _lock_name(name)))
            if not (isinstance(found, list) and len(found) == 2):
                return None
            value, lock = found
            if value is not None:
                return self._open(name, value) if isinstance(value, bytes) else None
            if lock is None or time.monotonic() >= deadline:
                return None
        return None

    async def invalidate(self, name: str, by: LocalCache) -> None:
        """Delete the entry in Redis and have every other cache drop it from its L1: those of this process (another
        config generation may share the name) at once, those of other replicas through the channel."""
        for local in list(self._locals):
            if local is not by:
                local.forget(name)
        await self._link.run("delete", lambda client: client.delete(name), always=True)
        await self._link.publish(CHANNEL, f"{self._origin} {name}")

    async def listen(self) -> None:
        """Apply other replicas' invalidations to this process's caches, until cancelled."""
        await self._link.listen(CHANNEL, self._received, self._gap)

    def _received(self, message: str) -> None:
        origin, _, name = message.partition(" ")
        if origin != self._origin:
            for local in list(self._locals):
                local.forget(name)

    def _gap(self) -> None:
        for local in list(self._locals):
            local.forget_all()

    def _seal(self, name: str, entry: SharedEntry) -> bytes:
        credential = entry.credential
        payload = {
            "h": dict(credential.headers),
            "e": credential.expires_at,
            "u": entry.until,
            "j": credential.id_jag_jti,
        }
        return self._sealer.seal(json.dumps(payload).encode(), name.encode())

    def _open(self, name: str, value: bytes) -> SharedEntry | None:
        plain = self._sealer.open(value, name.encode())
        if plain is None:
            self._link.failed("open", ValueError("a value that does not open"), hold_back=False)
            return None
        try:
            payload = json.loads(plain)
            headers, expires_at, until, jti = payload["h"], payload["e"], payload["u"], payload["j"]
            if not (isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())):
                raise TypeError("headers")
            credential = Credential(headers, expires_at, cache_hit=True, refreshable=True, id_jag_jti=jti)
            entry = SharedEntry(credential, float(until))
        except (KeyError, TypeError, ValueError):
            self._link.failed("open", ValueError("a value that does not parse"), hold_back=False)
            return None
        return entry if entry.until > time.time() else None


def _lock_name(name: str) -> str:
    return "oap:lock:" + name.removeprefix("oap:cred:")
