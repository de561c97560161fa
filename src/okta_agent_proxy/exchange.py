"""`Exchange`: one request's state as it moves through the pipeline (DESIGN.md §2).

Each field has exactly one writer, the step named beside it; later steps and the recorder only read. The caller's
token is kept for the credential step (it is the Cross App Access subject token) and never printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from okta_agent_proxy.errors import GatewayError
from okta_agent_proxy.inbound.agents import IdentifiedAgent
from okta_agent_proxy.inbound.validator import Principal
from okta_agent_proxy.mcp.forward import RelayStats
from okta_agent_proxy.mcp.messages import McpMessage
from okta_agent_proxy.mcp.sessions import SessionOwner
from okta_agent_proxy.outbound.base import Credential
from okta_agent_proxy.routing import Route


@dataclass(slots=True)
class Exchange:
    request_id: str  # edge
    started: float  # edge: perf_counter()
    http_method: str  # edge
    path: str  # edge
    route: Route | None = None  # route
    token: str | None = field(default=None, repr=False)  # authenticate
    principal: Principal | None = None  # authenticate
    agent: IdentifiedAgent | None = None  # identify agent
    agent_id: str | None = None  # identify agent
    body: bytes | None = field(default=None, repr=False)  # inspect
    message: McpMessage | None = None  # inspect
    session_owner: SessionOwner | None = None  # bind session
    credential_method: str | None = None  # credential
    credential: Credential | None = field(default=None, repr=False)  # credential (the last one used)
    upstream_status: int | None = None  # forward
    relay: RelayStats = field(default_factory=RelayStats)  # forward
    error: GatewayError | None = field(default=None, repr=False)  # any step
