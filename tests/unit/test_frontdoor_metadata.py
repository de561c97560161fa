"""`frontdoor.metadata`: the RFC 8414 document, checked against what the MCP SDK's client reads from it."""

from __future__ import annotations

from mcp.shared.auth import OAuthMetadata

from okta_agent_proxy.frontdoor.metadata import authorization_server_metadata

ISSUER = "https://gateway.example.com"


def test_the_document_parses_as_the_sdk_reads_it_and_names_our_endpoints() -> None:
    document = authorization_server_metadata(ISSUER, ["mcp:write", "mcp:read", "mcp:read"], cimd=True)
    parsed = OAuthMetadata.model_validate(document)
    assert str(parsed.issuer).rstrip("/") == ISSUER
    assert str(parsed.authorization_endpoint) == f"{ISSUER}/oauth/authorize"
    assert str(parsed.token_endpoint) == f"{ISSUER}/oauth/token"
    assert str(parsed.registration_endpoint) == f"{ISSUER}/oauth/register"
    assert parsed.code_challenge_methods_supported == ["S256"]
    assert document["scopes_supported"] == ["mcp:read", "mcp:write"]
    assert document["authorization_response_iss_parameter_supported"] is True
    assert document["client_id_metadata_document_supported"] is True
    assert authorization_server_metadata(ISSUER, [], cimd=False)["client_id_metadata_document_supported"] is False
