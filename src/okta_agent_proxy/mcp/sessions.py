"""MCP session ↔ principal bindings (DESIGN.md §2, step 6; PROTOCOL.md §4, "Sessions").

A legacy-era backend issues `Mcp-Session-Id` on its InitializeResult; the gateway binds that id to the principal
that created it — (issuer, subject, agent). A request presenting a session id must come from that same principal;
any other principal, and any id the gateway has not seen a backend issue, gets 404 exactly as an unknown session
does, so the client re-initializes and the backend never sees the request. A session id is not a credential: it
only narrows who may continue a conversation that a valid token started (MCP: "sessions MUST NOT stand in for
authentication").

Bindings live in process memory here (bounded, idle entries expire); with several replicas they belong in Redis.
A DELETE of the session, or a backend 404 for it, drops the binding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from okta_agent_proxy.errors import NotFound


class SessionOwner(NamedTuple):
    """Who started a session (made for every request with a token: a tuple is the cheapest immutable record)."""

    issuer: str
    subject: str
    agent: str


class SessionNotFound(NotFound):
    pass


class SessionBindings:
    def __init__(
        self,
        *,
        idle_seconds: float = 24 * 3600,
        max_sessions: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._owners: dict[str, tuple[SessionOwner, float]] = {}
        self._idle = idle_seconds
        self._max = max_sessions
        self._clock = clock

    def bind(self, session_id: str, owner: SessionOwner) -> None:
        existing = self._owners.get(session_id)
        if existing is not None and existing[0] != owner:
            return  # a backend reusing an id must not move it to another principal
        if len(self._owners) >= self._max:
            self._expire()
            if len(self._owners) >= self._max:
                del self._owners[next(iter(self._owners))]
        self._owners[session_id] = (owner, self._clock())

    def check(self, session_id: str, owner: SessionOwner) -> None:
        """Allow the request, or raise SessionNotFound (404) as if the session did not exist."""
        entry = self._owners.get(session_id)
        now = self._clock()
        if entry is None or entry[0] != owner or now - entry[1] > self._idle:
            if entry is not None and now - entry[1] > self._idle:
                del self._owners[session_id]
            raise SessionNotFound("session not found; initialize a new one")
        self._owners[session_id] = (owner, now)

    def admit(self, presented: str | None, owner: SessionOwner) -> None:
        """Before forwarding: a presented session id must be one this owner started (else SessionNotFound)."""
        if presented is not None:
            self.check(presented, owner)

    def track(self, method: str, presented: str | None, status: int, issued: str | None, owner: SessionOwner) -> None:
        """After the backend answered: bind a session id it issued; forget one that was deleted or that it no
        longer knows."""
        if presented is not None and (status == 404 or (method == "DELETE" and 200 <= status < 300)):
            self.drop(presented)
        elif issued is not None and presented is None and status < 400:
            self.bind(issued, owner)

    def drop(self, session_id: str) -> None:
        self._owners.pop(session_id, None)

    def _expire(self) -> None:
        now = self._clock()
        for session_id in [s for s, (_, seen) in self._owners.items() if now - seen > self._idle]:
            del self._owners[session_id]
