"""Find a backend's authorization server (`id_jag_mode: dynamic`): RFC 9728, then RFC 8414 (PROTOCOL.md §3).

1. The backend's Protected Resource Metadata: first the path-inserted location for its resource URL, then the
   root document; its `resource` must equal the URL asked about (RFC 9728 §3.3), else it is ignored.
2. The first of its `authorization_servers`, whose metadata is tried where servers publish it — RFC 8414
   path insertion, OIDC path insertion, OIDC path append (Okta's place) — and whose `issuer` must equal the
   issuer identifier asked about (RFC 8414 §3.3), so a document cannot redirect the gateway to another server.
Results are cached for `ttl` seconds; a failure is not cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from okta_agent_proxy.outbound.oauth_client import TokenEndpointClient, TokenEndpointError


@dataclass(frozen=True)
class AuthorizationServerInfo:
    issuer: str
    token_endpoint: str
    grant_types: tuple[str, ...]


def _well_known(url: str, suffix: str, *, insert: bool) -> str:
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if insert:
        return f"{parts.scheme}://{parts.netloc}/.well-known/{suffix}{path}"
    return f"{parts.scheme}://{parts.netloc}{path}/.well-known/{suffix}"


class AuthServerDiscovery:
    def __init__(
        self, client: TokenEndpointClient, *, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[AuthorizationServerInfo, float]] = {}

    async def for_resource(self, resource: str) -> AuthorizationServerInfo:
        cached = self._cache.get(resource)
        if cached is not None and self._clock() - cached[1] < self._ttl:
            return cached[0]
        issuer = await self._issuer_of(resource)
        info = await self.authorization_server(issuer)
        self._cache[resource] = (info, self._clock())
        return info

    async def _issuer_of(self, resource: str) -> str:
        root = _well_known(resource, "oauth-protected-resource", insert=True)
        parts = urlsplit(resource)
        candidates = [root, f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource"]
        for url in dict.fromkeys(candidates):
            try:
                document = await self._client.fetch_metadata(url)
            except TokenEndpointError:
                continue
            servers = document.get("authorization_servers")
            if document.get("resource") != resource or not isinstance(servers, list) or not servers:
                continue
            if isinstance(servers[0], str):
                return servers[0]
        raise TokenEndpointError(404, "invalid_metadata", f"no protected resource metadata names {resource}")

    async def authorization_server(self, issuer: str) -> AuthorizationServerInfo:
        candidates = [
            _well_known(issuer, "oauth-authorization-server", insert=True),
            _well_known(issuer, "openid-configuration", insert=True),
            _well_known(issuer, "openid-configuration", insert=False),
            _well_known(issuer, "oauth-authorization-server", insert=False),
        ]
        for url in dict.fromkeys(candidates):
            try:
                document = await self._client.fetch_metadata(url)
            except TokenEndpointError:
                continue
            if document.get("issuer") != issuer:
                continue
            token_endpoint = document.get("token_endpoint")
            if not isinstance(token_endpoint, str):
                continue
            grants = document.get("grant_types_supported")
            grant_types = tuple(g for g in grants if isinstance(g, str)) if isinstance(grants, list) else ()
            return AuthorizationServerInfo(issuer, token_endpoint, grant_types)
        raise TokenEndpointError(404, "invalid_metadata", f"no authorization server metadata for {issuer}")
