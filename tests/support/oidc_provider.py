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

Cross App Access (`cross_app=CrossApp(agents, target)`, `tests/node/oidc_provider_xaa.mjs`): the server then plays
Okta's org authorization server for the agents — token endpoint at Okta's `/oauth2/v1/token` (where the gateway
sends step 1: `{OKTA_DOMAIN}/oauth2/v1/token`), the RFC 8693 exchange of an access token (its `aud` must be the
agent's `resource`, its client the agent or one that delegates to it) for an ID-JAG, the agent authenticated with
private_key_jwt — and a second oidc-provider at `/oauth2/<target.id>` (`OidcProvider.target_issuer`) is the backend's
authorization server, redeeming those ID-JAGs (RFC 7523) for JWT access tokens audience-restricted to the backend.
`OidcProvider.log()` has one line per ID-JAG issued or redeemed and per refused token request (never a token).

The OAuth front door (`front_door=FrontDoor(app, users)`, DESIGN.md §8): the server then plays an Okta org for the
gateway's own OIDC web app — issuer the bare base URL, Okta's `/oauth2/v1/authorize`, `/token`, `/keys` — with a
sign-in form (`username`, `password`, checked against `users`) and consent granted without asking, as for an org's
first-party app; authorization_code with PKCE and refresh_token (rotated on every use) for the app, authenticated
with client_secret_basic; ID tokens (RS256, `FrontDoor.id_token_ttl`) carrying `name`, `preferred_username`,
`email` and, for the `groups` scope, `groups`. With `cross_app` too, the app exchanges its users' ID tokens for
ID-JAGs naming it as `client_id` (`subject_token_type=…:id_token`) and redeems them at the target as itself; `agents`
may then be empty, and `resources` and `clients` too. The log adds `sign-in sub=…`, `sign-in refused` and `token
issued grant_type=… client_id=… sub=…` for the app.

`client_credentials_token(base, client_id, secret, resource, scope)` gets a token from it (`TokenRequestError`
carries the OAuth error when it refuses). A missing Node 22 or package skips the calling test, or fails it under
`OAP_REQUIRE_SERVICES=1`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest

from .node_tools import CACHE_DIR, REPO_ROOT, env_with_node22, require_node_tool, services_required
from .processes import ServerProcess, start_server

__all__ = [
    "OIDC_PROVIDER_VERSION",
    "ORG_TOKEN_PATH",
    "SERVER_SCRIPT",
    "SUPPORTED_SCOPES",
    "CrossApp",
    "CrossAppAgent",
    "CrossAppTarget",
    "FrontDoor",
    "FrontDoorApp",
    "IdpUser",
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
ORG_TOKEN_PATH = "/oauth2/v1/token"  # Okta's org authorization server's token endpoint
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class OidcClient:
    """A confidential client (client_credentials, client_secret_basic)."""

    client_id: str
    client_secret: str
    okta_cid: bool = False  # also put the client id in an Okta-style `cid` claim


@dataclass(frozen=True)
class CrossAppAgent:
    """An AI agent at the IdP: a private_key_jwt client (its public JWK) that may exchange access tokens whose `aud`
    is its `resource` and whose client is itself or one of `delegating_client_ids` (Okta's delegation link)."""

    client_id: str
    public_jwk: dict[str, Any]
    resource: str
    delegating_client_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class CrossAppTarget:
    """The backend's authorization server, served at `/oauth2/<id>`: its resources (audiences) and scopes."""

    id: str
    resources: tuple[str, ...]
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class CrossApp:
    agents: tuple[CrossAppAgent, ...]
    target: CrossAppTarget

    def environment(self) -> str:
        agents = [
            {
                "client_id": a.client_id,
                "jwk": a.public_jwk,
                "resource": a.resource,
                "delegating_client_ids": list(a.delegating_client_ids),
            }
            for a in self.agents
        ]
        target = {"id": self.target.id, "resources": list(self.target.resources), "scopes": list(self.target.scopes)}
        return json.dumps({"agents": agents, "target": target})


@dataclass(frozen=True)
class FrontDoorApp:
    """The gateway's own OIDC web app at the org (`OKTA_CLIENT_ID`, `OKTA_CLIENT_SECRET`, its callback)."""

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str


@dataclass(frozen=True)
class IdpUser:
    """A person who can sign in at the org: `sub` is the ID token's subject (an Okta `00u…` id)."""

    login: str
    sub: str
    password: str = field(repr=False)
    name: str = ""
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class FrontDoor:
    app: FrontDoorApp
    users: tuple[IdpUser, ...]
    id_token_ttl: int = 3600  # seconds; the gateway refreshes a held ID token within 300 s of its expiry

    def environment(self) -> str:
        app = {
            "client_id": self.app.client_id,
            "client_secret": self.app.client_secret,
            "redirect_uri": self.app.redirect_uri,
        }
        users = [
            {"login": u.login, "sub": u.sub, "password": u.password, "name": u.name, "groups": list(u.groups)}
            for u in self.users
        ]
        return json.dumps({"app": app, "users": users, "id_token_ttl": self.id_token_ttl})


@dataclass(frozen=True)
class OidcProvider:
    """A running oidc-provider."""

    server: ServerProcess
    resources: tuple[str, ...]
    clients: tuple[OidcClient, ...]
    token_path: str = "/token"
    cross_app: CrossApp | None = None
    front_door: FrontDoor | None = None

    @property
    def issuer(self) -> str:
        return self.server.base_url

    @property
    def token_endpoint(self) -> str:
        return self.server.url(self.token_path)

    @property
    def target_issuer(self) -> str:
        """The backend authorization server's issuer (Cross App Access only)."""
        assert self.cross_app is not None, "started without cross_app"
        return self.server.url(f"/oauth2/{self.cross_app.target.id}")

    @property
    def target_token_endpoint(self) -> str:
        return self.target_issuer + "/token"

    def client(self, client_id: str) -> OidcClient:
        return next(c for c in self.clients if c.client_id == client_id)

    def log(self) -> list[str]:
        """The server's own lines (`oidc-provider: …`): ID-JAGs issued and redeemed, refused token requests."""
        return [line for line in self.server.output().splitlines() if line.startswith("oidc-provider: ")]

    async def token(self, client_id: str, resource: str, scope: str = "mcp:read mcp:write") -> str:
        """A token for one of this provider's clients."""
        client = self.client(client_id)
        return await client_credentials_token(
            self.issuer, client.client_id, client.client_secret, resource, scope, token_endpoint=self.token_endpoint
        )


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
    cross_app: CrossApp | None = None,
    front_door: FrontDoor | None = None,
    timeout: float = 30.0,
) -> Iterator[OidcProvider]:
    """oidc-provider on 127.0.0.1:<free port>, ready once its OIDC discovery document answers 200. With
    `cross_app` or `front_door`, its token endpoint is at Okta's `/oauth2/v1/token`; `cross_app`: it does Cross App
    Access; `front_door`: it signs users in for the gateway's app (module doc)."""
    require_oidc_provider()
    node = require_node_tool("node")
    token_path = ORG_TOKEN_PATH if cross_app is not None or front_door is not None else "/token"
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
            "OIDC_TOKEN_PATH": token_path,
            "OIDC_CROSS_APP": cross_app.environment() if cross_app is not None else "",
            "OIDC_FRONT_DOOR": front_door.environment() if front_door is not None else "",
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
        yield OidcProvider(server, tuple(resources), tuple(clients), token_path, cross_app, front_door)


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
