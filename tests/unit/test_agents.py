"""inbound/agents.py: the agent comes from the verified token; X-Agent-ID is only a consistency check."""

from __future__ import annotations

import pytest

from okta_agent_proxy.config.models import Agent
from okta_agent_proxy.errors import AuthorizationDenied
from okta_agent_proxy.inbound.agents import AgentDirectory
from okta_agent_proxy.inbound.validator import Principal

AGENTS = {
    "cursor": Agent(client_id="0oa_cursor", backend_access=("employees",)),
    "claude-code": Agent(client_id="wlp_claude", inbound_client_ids=("0oa_claude_app", "0oa_claude_cli")),
}


def principal(cid: str | None) -> Principal:
    return Principal(
        "https://idp/oauth2/x", "alice@example.com", "00u1", cid, frozenset({"mcp:read"}), 2e9, "AT.1", "h"
    )


def test_agent_from_token_client_id() -> None:
    assert AgentDirectory(AGENTS).identify(principal("0oa_cursor"), None).name == "cursor"


def test_two_inbound_client_ids_and_not_the_signing_client_id() -> None:
    directory = AgentDirectory(AGENTS)
    assert directory.identify(principal("0oa_claude_app"), None).name == "claude-code"
    assert directory.identify(principal("0oa_claude_cli"), "claude-code").name == "claude-code"
    with pytest.raises(AuthorizationDenied):
        directory.identify(principal("wlp_claude"), None)  # inbound_client_ids replaces the default


def test_matching_header_accepted_spoofed_header_denied() -> None:
    directory = AgentDirectory(AGENTS)
    assert directory.identify(principal("0oa_cursor"), "cursor").name == "cursor"
    with pytest.raises(AuthorizationDenied) as caught:
        directory.identify(principal("0oa_cursor"), "claude-code")
    assert caught.value.status == 403


@pytest.mark.parametrize("cid", ["0oa_unknown", None])
def test_unknown_client_denied(cid: str | None) -> None:
    with pytest.raises(AuthorizationDenied):
        AgentDirectory(AGENTS).identify(principal(cid), "cursor")


def test_header_mode_trusts_header_only_for_configured_agents() -> None:
    directory = AgentDirectory(AGENTS, mode="header")
    assert directory.identify(principal("0oa_unknown"), "cursor").name == "cursor"
    with pytest.raises(AuthorizationDenied):
        directory.identify(principal("0oa_cursor"), None)
    with pytest.raises(AuthorizationDenied):
        directory.identify(principal("0oa_cursor"), "nobody")
