"""RFC 9728 Protected Resource Metadata and the RFC 6750 challenges that point to it.

Each backend route is its own protected resource: a request to `{base}/employees/mcp` is resource
`{base}/employees/mcp`, whose metadata lives at the path-inserted location
`{base}/.well-known/oauth-protected-resource/employees/mcp` (RFC 9728 §3.1) — the URL MCP clients try first, and the
one every 401 and 403 challenge names, so a client never has to guess. The root document describes the gateway.
The authorization server is the Okta custom AS that issues the tokens the gateway accepts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(base_url: str, path: str) -> str:
    return f"{base_url}{WELL_KNOWN}{path if path != '/' else ''}"


def protected_resource_metadata(
    base_url: str, path: str, issuer: str | None, scopes: Iterable[str], resource_name: str | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "resource": f"{base_url}{path if path != '/' else ''}",
        "authorization_servers": [issuer] if issuer else [],
        "scopes_supported": sorted(set(scopes)),
        "bearer_methods_supported": ["header"],
    }
    if resource_name:
        document["resource_name"] = resource_name
    return document


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def bearer_challenge(
    resource_metadata: str, *, error: str | None = None, scopes: Iterable[str] = (), description: str | None = None
) -> str:
    """`Bearer resource_metadata="…"[, error="…"][, scope="…"]` — no error code when no token was sent."""
    parts = [f'resource_metadata="{_quote(resource_metadata)}"']
    if error:
        parts.append(f'error="{error}"')
    scope = " ".join(scopes)
    if scope:
        parts.append(f'scope="{_quote(scope)}"')
    if description:
        parts.append(f'error_description="{_quote(description)}"')
    return "Bearer " + ", ".join(parts)
