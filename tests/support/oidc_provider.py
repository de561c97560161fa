"""A certified third-party authorization server for the tests: npm `oidc-provider` 9.13.3 (TESTING.md).

`running_oidc_provider(resources, clients)` starts `tests/node/oidc_provider_server.mjs` under Node 22 on a free
loopback port (issuer `http://127.0.0.1:PORT`) and stops it on exit. It issues RFC 9068 JWT access tokens
(`typ: at+jwt`, RS256 unless `access_token_alg` says RS384/RS512; `kid` = the key's RFC 7638 thumbprint, and
the published JWK has no `alg`, as is usual for oidc-provider) through the client_credentials grant with RFC 8707
resource indicators: each listed resource is its own audience, scopes `mcp:read mcp:write`. oidc-provider names
the client in the `client_id` claim; a client with `okta_cid=True` also gets Okta's `cid` claim (added through
oidc-provider's `extraTokenClaims` hook), so both ways the gateway identifies an agent are exercised.

It publishes its metadata at both `/.well-known/openid-configuration` and the RFC 8414 location
`/.well-known/oauth-authorization-server`; `hide_rfc8414=True` answers 404 on the latter, so discovery has to fall
back to the OIDC document.

`client_credentials_token(base, client_id, secret, resource, scope)` gets a token from it (`TokenRequestError`
carries the OAuth error when it refuses). A missing Node 22 or package skips the calling test, or fails it under
`OAP_REQUIRE_SERVICES=1`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest

from .node_tools import CACHE_DIR, REPO_ROOT, env_with_node22, require_node_tool, services_required
from .processes import ServerProcess, start_server

__all__ = [
    "OIDC_PROVIDER_VERSION",
    "SERVER_SCRIPT",
    "SUPPORTED_SCOPES",
    "OidcClient",
    "OidcProvider",
    "TokenRequestError",
    "client_credentials_token",
    "require_oidc_provider",
    "running_oidc_provider",
]

OIDC_PROVIDER_VERSION = "9.13.3"
SERVER_SCRIPT = REPO_ROOT / "tests" / "node" / "oidc_provider_server.mjs"
NPM_DIR = CACHE_DIR / "npm"
SUPPORTED_SCOPES = frozenset({"mcp:read", "mcp:write"})
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class OidcClient:
    """A confidential client (client_credentials, client_secret_basic)."""

    client_id: str
    client_secret: str
    okta_cid: bool = False  # also put the client id in an Okta-style `cid` claim


@dataclass(frozen=True)
class OidcProvider:
    """A running oidc-provider."""

    server: ServerProcess
    resources: tuple[str, ...]
    clients: tuple[OidcClient, ...]

    @property
    def issuer(self) -> str:
        return self.server.base_url

    @property
    def token_endpoint(self) -> str:
        return self.server.url("/token")

    def client(self, client_id: str) -> OidcClient:
        return next(c for c in self.clients if c.client_id == client_id)

    async def token(self, client_id: str, resource: str, scope: str = "mcp:read mcp:write") -> str:
        """A token for one of this provider's clients."""
        client = self.client(client_id)
        return await client_credentials_token(self.issuer, client.client_id, client.client_secret, resource, scope)


class TokenRequestError(Exception):
    """The token endpoint refused; `status` and `error` are the HTTP status and OAuth error code."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.error = body.get("error") if isinstance(body, dict) else None
        super().__init__(f"token request failed with {status}: {body!r}")


def require_oidc_provider() -> None:
    """Skip the calling test unless Node 22 and oidc-provider are installed (fail under OAP_REQUIRE_SERVICES=1)."""
    require_node_tool("node")
    manifest = NPM_DIR / "node_modules" / "oidc-provider" / "package.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        version = None
    if version != OIDC_PROVIDER_VERSION:
        reason = (
            f"oidc-provider {OIDC_PROVIDER_VERSION} is not installed in {NPM_DIR.relative_to(REPO_ROOT)} "
            f"(found {version}); run scripts/install-node-tools"
        )
        if services_required():
            pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(reason)


@contextmanager
def running_oidc_provider(
    resources: Sequence[str],
    clients: Sequence[OidcClient],
    *,
    hide_rfc8414: bool = False,
    access_token_alg: str = "RS256",
    timeout: float = 30.0,
) -> Iterator[OidcProvider]:
    """oidc-provider on 127.0.0.1:<free port>, ready once its OIDC discovery document answers 200."""
    require_oidc_provider()
    node = require_node_tool("node")
    client_specs = json.dumps(
        [{"client_id": c.client_id, "client_secret": c.client_secret, "okta_cid": c.okta_cid} for c in clients]
    )

    def env(port: int) -> dict[str, str]:
        return {
            **env_with_node22(),
            "PORT": str(port),
            "OIDC_RESOURCES": " ".join(resources),
            "OIDC_CLIENTS": client_specs,
            "OIDC_HIDE_RFC8414": "1" if hide_rfc8414 else "",
            "OIDC_ACCESS_TOKEN_ALG": access_token_alg,
            "OAP_NPM_DIR": str(NPM_DIR),
        }

    with start_server(
        lambda port: [str(node), str(SERVER_SCRIPT)],
        http_path="/.well-known/openid-configuration",
        expect_status=200,
        env=env,
        timeout=timeout,
        name="oidc-provider",
    ) as server:
        yield OidcProvider(server, tuple(resources), tuple(clients))


async def client_credentials_token(
    base: str, client_id: str, secret: str, resource: str, scope: str, *, token_endpoint: str | None = None
) -> str:
    """An access token from the client_credentials grant (client_secret_basic, RFC 8707 `resource`).

    The token endpoint is `token_endpoint` (e.g. from the server's metadata), else oidc-provider's `{base}/token`.
    The credentials are form-urlencoded before Basic encoding, as RFC 6749 §2.3.1 asks.
    """
    basic = base64.b64encode(f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()).decode("ascii")
    url = token_endpoint or base.rstrip("/") + "/token"
    headers = {"Authorization": f"Basic {basic}", "Accept": "application/json"}
    form = {"grant_type": "client_credentials", "resource": resource, "scope": scope}
    async with (
        aiohttp.ClientSession(timeout=_HTTP_TIMEOUT) as session,
        session.post(url, data=form, headers=headers) as response,
    ):
        body = await response.json(content_type=None)
        if response.status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise TokenRequestError(response.status, body)
        token: str = body["access_token"]
        return token
