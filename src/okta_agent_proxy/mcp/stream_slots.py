"""Caps on open SSE streams, per (user, agent) and per backend, in this process (DESIGN.md §9).

A GET stream is idle by design and lasts as long as the client keeps it, so without a cap one caller could hold
every connection a backend (or the gateway) has. A GET is admitted only while both of its counts are under
`rate_limits.streams` (else 429 `rate_limited`, `Retry-After: 5`). A POST whose answer turns out to be an SSE stream
is counted too — it takes room from GET streams — but never cut: the backend is already working on the call, and
refusing its answer would only invite a retry that runs the call twice. A POST's stream ends with its answer, bounded
by `stream_idle_timeout_seconds` between events.

Counts are per process (each replica and each `--workers` process has the whole cap); the user is the token's `uid`,
else its `sub` (DESIGN.md §2). Without an issuer there is no user, and only the per-backend cap applies.
"""

from __future__ import annotations

from typing import TypeVar

from okta_agent_proxy.config.limits import StreamLimits
from okta_agent_proxy.errors import RateLimited

RETRY_AFTER_SECONDS = 5
Caller = tuple[str, str]  # (user, agent)
K = TypeVar("K")


class StreamSlot:
    """One open stream's place in the counts; `release` (idempotent) when the stream ends."""

    __slots__ = ("_backend", "_caller", "_slots")

    def __init__(self, slots: StreamSlots, backend: str, caller: Caller | None) -> None:
        self._slots: StreamSlots | None = slots
        self._backend = backend
        self._caller = caller

    def release(self) -> None:
        if self._slots is not None:
            self._slots._release(self._backend, self._caller)
            self._slots = None


class StreamSlots:
    def __init__(self) -> None:
        self._by_backend: dict[str, int] = {}
        self._by_caller: dict[Caller, int] = {}

    def admit(self, backend: str, caller: Caller | None, limits: StreamLimits) -> StreamSlot:
        """A place for a GET stream, or RateLimited."""
        if self._by_backend.get(backend, 0) >= limits.per_backend:
            raise RateLimited("too many open streams to this backend", retry_after=RETRY_AFTER_SECONDS)
        if caller is not None and self._by_caller.get(caller, 0) >= limits.per_user_agent:
            raise RateLimited("too many open streams for this user and agent", retry_after=RETRY_AFTER_SECONDS)
        return self.count(backend, caller)

    def count(self, backend: str, caller: Caller | None) -> StreamSlot:
        """Count a stream that has already begun (a POST answered as SSE), whatever the caps."""
        self._by_backend[backend] = self._by_backend.get(backend, 0) + 1
        if caller is not None:
            self._by_caller[caller] = self._by_caller.get(caller, 0) + 1
        return StreamSlot(self, backend, caller)

    def _release(self, backend: str, caller: Caller | None) -> None:
        _decrement(self._by_backend, backend)
        if caller is not None:
            _decrement(self._by_caller, caller)


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
