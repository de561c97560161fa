"""May this agent, with this token, do this on this backend? (DESIGN.md §2, step 5) — pure functions, no I/O.

Deny by default: the agent must be enabled and list the backend in `backend_access`; the caller's token must carry
every scope the agent requires, every scope the backend requires, and the scopes configured for the called MCP
method. A missing scope is reported with all the scopes the operation needs (the 2026-07-28 authorization rule:
one challenge listing everything, so the client can ask for it all at once).
"""

from __future__ import annotations

from collections.abc import Iterable

from okta_agent_proxy.config.models import Agent, Backend
from okta_agent_proxy.errors import AuthorizationDenied, InsufficientScope
from okta_agent_proxy.policy.tools import step_up_scopes


def required_scopes(agent: Agent, backend: Backend, method: str | None, tool: str | None = None) -> tuple[str, ...]:
    """Every scope the operation needs, in a stable order without repeats: the agent's, the backend's, the method's
    and, for a `tools/call`, the step-up scopes of the tool (`tool_scopes`, DESIGN.md §7)."""
    needed: dict[str, None] = {}
    for scope in (*agent.scopes, *backend.required_scopes, *backend.method_scopes.get(method or "", ())):
        needed[scope] = None
    if tool is not None and method == "tools/call" and backend.tool_scopes:
        needed.update(dict.fromkeys(step_up_scopes(backend.tool_scopes, tool)))
    return tuple(needed)


def authorize(
    agent_name: str,
    agent: Agent,
    backend_name: str,
    backend: Backend,
    granted: Iterable[str],
    method: str | None,
    tool: str | None = None,
) -> None:
    """Return if allowed; raise AuthorizationDenied or InsufficientScope otherwise."""
    if not agent.enabled:
        raise AuthorizationDenied(f"agent {agent_name} is disabled", agent_id=agent_name)
    if backend_name not in agent.backend_access:
        raise AuthorizationDenied(f"Not authorized to access backend '{backend_name}'", agent_id=agent_name)
    needed = required_scopes(agent, backend, method, tool)
    granted_set = frozenset(granted)
    if any(scope not in granted_set for scope in needed):
        raise InsufficientScope("the access token lacks a required scope", scopes=needed, agent_id=agent_name)


class Decisions:
    """`authorize`, with the allowed combinations remembered per config generation (the agent and backend behind a
    name do not change within one); a denial is worked out each time, so its error is fresh."""

    MAX = 1024

    def __init__(self) -> None:
        self._allowed: set[tuple[str, str, frozenset[str], str | None, str | None]] = set()

    def check(
        self,
        agent_name: str,
        agent: Agent,
        backend_name: str,
        backend: Backend,
        granted: frozenset[str],
        method: str | None,
        tool: str | None = None,
    ) -> None:
        tool = tool if backend.tool_scopes and method == "tools/call" else None  # only then does the tool matter
        key = (agent_name, backend_name, granted, method, tool)
        if key not in self._allowed:
            authorize(agent_name, agent, backend_name, backend, granted, method, tool)
            if len(self._allowed) < self.MAX:
                self._allowed.add(key)
