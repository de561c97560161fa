"""Which agent is calling (DESIGN.md §2, step 3): decided by the verified token, never by a header alone.

The agent is the configured one whose `inbound_client_ids` (default: its `client_id`) contains the token's client
(`cid`, else `client_id` or `azp`). `X-Agent-ID` is only a consistency check: if sent, it must name that same agent.
A front-door token (DESIGN.md §8) names its MCP client: a client metadata document's URL, matched exactly against
`inbound_client_ids` (verified: the gateway fetched that document), or a registered client, matched by its
`client_name` against `client_names` globs (declared: anyone may register any name), else
`front_door.default_agent`, else nobody (403).
`AGENT_IDENTIFICATION=header` trusts the header instead — for experiments only, and loudly logged on every use,
because anyone can send any header.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import structlog

from okta_agent_proxy.config.models import Agent, FrontDoorConfig
from okta_agent_proxy.errors import AuthorizationDenied
from okta_agent_proxy.inbound.validator import Principal

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class IdentifiedAgent:
    name: str
    agent: Agent


class AgentDirectory:
    def __init__(
        self, agents: Mapping[str, Agent], *, mode: str = "token", front_door: FrontDoorConfig | None = None
    ) -> None:
        self._agents = dict(agents)
        self._client_names = [(name, agent.client_names) for name, agent in agents.items() if agent.client_names]
        self._default = front_door.default_agent if front_door is not None else None
        self._by_client_id = {cid: name for name, agent in agents.items() for cid in agent.caller_client_ids}
        self._identified = {name: IdentifiedAgent(name, agent) for name, agent in agents.items()}  # made once
        self._mode = mode

    @property
    def from_token(self) -> bool:
        """True when the verified token decides the agent (the default), False in header mode."""
        return self._mode != "header"

    def identify(self, principal: Principal, claimed: str | None) -> IdentifiedAgent:
        if self._mode == "header":
            log.warning("agent_identified_by_header", agent=claimed, subject_client=principal.client_id)
            if claimed is None or claimed not in self._agents:
                raise AuthorizationDenied("X-Agent-ID must name a configured agent", agent_id=claimed)
            return self._identified[claimed]
        name = self._by_client_id.get(principal.client_id or "")
        if name is None and principal.grant_id is not None:
            name = self._front_door_agent(principal.client_name)
        if name is None:
            raise AuthorizationDenied("the token's client is not a configured agent", agent_id=None)
        if claimed is not None and claimed != name:
            raise AuthorizationDenied("X-Agent-ID does not match the agent the token was issued to", agent_id=name)
        return self._identified[name]

    def _front_door_agent(self, client_name: str | None) -> str | None:
        if client_name is not None:
            for name, globs in self._client_names:
                if any(fnmatchcase(client_name, glob) for glob in globs):
                    return name
        return self._default
