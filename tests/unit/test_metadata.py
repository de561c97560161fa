"""inbound/metadata.py: RFC 9728 documents and RFC 6750 challenges."""

from __future__ import annotations

from okta_agent_proxy.inbound.metadata import bearer_challenge, metadata_url, protected_resource_metadata


def test_path_inserted_metadata_url() -> None:
    assert metadata_url("https://gw.example.com", "/mcp/jira") == (
        "https://gw.example.com/.well-known/oauth-protected-resource/mcp/jira"
    )
    assert metadata_url("https://gw.example.com", "/") == "https://gw.example.com/.well-known/oauth-protected-resource"


def test_document_fields() -> None:
    doc = protected_resource_metadata(
        "https://gw", "/employees", "https://idp/oauth2/aus1", ["b", "a", "a"], "employees"
    )
    assert doc == {
        "resource": "https://gw/employees",
        "authorization_servers": ["https://idp/oauth2/aus1"],
        "scopes_supported": ["a", "b"],
        "bearer_methods_supported": ["header"],
        "resource_name": "employees",
    }


def test_challenge_without_token_has_no_error() -> None:
    assert bearer_challenge("https://gw/m") == 'Bearer resource_metadata="https://gw/m"'


def test_insufficient_scope_challenge() -> None:
    value = bearer_challenge("https://gw/m", error="insufficient_scope", scopes=["mcp:read", "mcp:write"])
    assert value == 'Bearer resource_metadata="https://gw/m", error="insufficient_scope", scope="mcp:read mcp:write"'
