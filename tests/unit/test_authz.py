"""policy/authz.py: deny by default; every scope the operation needs is listed in one challenge."""

from __future__ import annotations

from typing import Any

import pytest

from okta_agent_proxy.config.models import Agent, PreSharedKeyBackend
from okta_agent_proxy.errors import AuthorizationDenied, InsufficientScope
from okta_agent_proxy.policy.authz import authorize, required_scopes


def backend(**extra: Any) -> PreSharedKeyBackend:
    return PreSharedKeyBackend.model_validate(
        {"url": "http://127.0.0.1:9/mcp", "paths": ["/b"], "auth_method": "pre-shared-key", "auth_config": {"key": "k"}}
        | extra
    )


def agent(**extra: Any) -> Agent:
    return Agent.model_validate({"client_id": "0oa_a", "backend_access": ["b"]} | extra)


def test_allowed_with_default_scope() -> None:
    authorize("a", agent(), "b", backend(), {"mcp:read"}, "tools/list")


def test_backend_not_in_access_list_is_denied() -> None:
    with pytest.raises(AuthorizationDenied) as caught:
        authorize("a", agent(backend_access=["other"]), "b", backend(), {"mcp:read"}, "tools/list")
    assert caught.value.status == 403
    assert caught.value.agent_id == "a"


def test_disabled_agent_is_denied() -> None:
    with pytest.raises(AuthorizationDenied):
        authorize("a", agent(enabled=False), "b", backend(), {"mcp:read"}, None)


def test_missing_agent_scope() -> None:
    with pytest.raises(InsufficientScope) as caught:
        authorize("a", agent(scopes=["mcp:read", "mcp:write"]), "b", backend(), {"mcp:read"}, None)
    assert caught.value.scopes == ("mcp:read", "mcp:write")


def test_method_scopes_apply_only_to_their_method() -> None:
    b = backend(method_scopes={"tools/call": ["mcp:write"]}, required_scopes=["hr:read"])
    authorize("a", agent(), "b", b, {"mcp:read", "hr:read"}, "tools/list")
    with pytest.raises(InsufficientScope) as caught:
        authorize("a", agent(), "b", b, {"mcp:read", "hr:read"}, "tools/call")
    assert caught.value.scopes == ("mcp:read", "hr:read", "mcp:write")


def test_required_scopes_deduplicated_in_order() -> None:
    b = backend(required_scopes=["mcp:read", "x"], method_scopes={"m": ["x", "y"]})
    assert required_scopes(agent(), b, "m") == ("mcp:read", "x", "y")
