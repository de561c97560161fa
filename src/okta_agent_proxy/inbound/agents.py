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
from enum import StrEnum
from fnmatch import fnmatchcase

import structlog

from okta_agent_proxy.config.models import Agent, FrontDoorConfig
from okta_agent_proxy.errors import AuthorizationDenied
from okta_agent_proxy.inbound.validator import Principal

log = structlog.get_logger(__name__)


class Evidence(StrEnum):
    """How the agent was identified — kept in the audit row (`agent_evidence`)."""

    TOKEN = "token"  # an Okta token's client, in inbound_client_ids
    CLIENT_METADATA = "client_metadata"  # a front-door client's metadata document URL: fetched, so verified
    CLIENT_ID = "client_id"  # a front-door client registered here, listed by its id
    CLIENT_NAME = "client_name"  # a registered client's name, matched by client_names: declared, not verified
    DEFAULT_AGENT = "default_agent"  # front_door.default_agent: nothing matched
    HEADER = "header"  # AGENT_IDENTIFICATION=header: X-Agent-ID alone


@dataclass(frozen=True, slots=True)
class IdentifiedAgent:
    name: str
    agent: Agent
    evidence: Evidence = Evidence.TOKEN


class AgentDirectory:
    def __init__(
        self, agents: Mapping[str, Agent], *, mode: str = "token", front_door: FrontDoorConfig | None = None
    ) -> None:
        self._agents = dict(agents)
        self._client_names = [(name, agent.client_names) for name, agent in agents.items() if agent.client_names]
        self._default = front_door.default_agent if front_door is not None else None
        self._by_client_id = {cid: name for name, agent in agents.items() for cid in agent.caller_client_ids}
        self._identified = {  # made once
            (name, evidence): IdentifiedAgent(name, agent, evidence)
            for name, agent in agents.items()
            for evidence in Evidence
        }
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
            return self._identified[claimed, Evidence.HEADER]
        client_id = principal.client_id or ""
        name = self._by_client_id.get(client_id)
        evidence = Evidence.TOKEN
        if principal.grant_id is not None:
            if name is not None:
                evidence = Evidence.CLIENT_METADATA if "://" in client_id else Evidence.CLIENT_ID
            else:
                name, evidence = self._front_door_agent(principal.client_name)
        if name is None:
            raise AuthorizationDenied("the token's client is not a configured agent", agent_id=None)
        if claimed is not None and claimed != name:
            raise AuthorizationDenied("X-Agent-ID does not match the agent the token was issued to", agent_id=name)
        return self._identified[name, evidence]

    def _front_door_agent(self, client_name: str | None) -> tuple[str | None, Evidence]:
        if client_name is not None:
            for name, globs in self._client_names:
                if any(fnmatchcase(client_name, glob) for glob in globs):
                    return name, Evidence.CLIENT_NAME
        return self._default, Evidence.DEFAULT_AGENT
