"""The gateway as the conformance tests run it: authenticating every request, with a real user token.

`authenticated_gateway(backends)` starts, in the running event loop:
- the devkit Okta emulator with one custom authorization server (`GATEWAY_AS`, audience `AUDIENCE`); it signs the
  caller's token — a user token (`sub` = the user's login, `uid`, `cid` = the agent's client id, `scp` `mcp:read
  mcp:write`), the kind an MCP client gets when a person logs in;
- the gateway (`running_gateway`, the real app) with `OKTA_ISSUER` set, so every request is authenticated, the
  agent is identified from the token and each `Mcp-Session-Id` is bound to the (user, agent) that opened it, and
  one agent (`AGENT`) allowed on every backend given;
- `authorizing_proxy` in front of it, which adds `Authorization: Bearer <token>` to each request, for clients
  that cannot send headers (the conformance suite). The proxy's URL is the gateway's `GATEWAY_BASE_URL`: it is the
  address the client is given, so `Host` and `Origin` checks see what they would see with the client talking to
  the gateway itself (the suite's DNS rebinding scenario sends `Origin: http://<that address>`).

`AuthenticatedGateway.token` is for clients that send their own header (the resumption test); `other_token()` is
a valid token of another user of the same agent (session binding must refuse it a session it did not open).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, OktaEmulator, User

from .authorizing_proxy import AuthorizingProxy, authorizing_proxy
from .gateway import RunningGateway, bound_socket, running_gateway
from .processes import LOOPBACK

__all__ = ["AGENT", "AGENT_CLIENT_ID", "AUDIENCE", "AuthenticatedGateway", "authenticated_gateway"]

GATEWAY_AS = "aus-conformance"
AUDIENCE = "api://okta-agent-proxy-conformance"
AGENT = "conformance-agent"
AGENT_CLIENT_ID = "wlp_conformance_agent"
SCOPES = ("mcp:read", "mcp:write")
USER = User("conformance@example.com")
OTHER_USER = User("someone-else@example.com")


@dataclass(frozen=True)
class AuthenticatedGateway:
    idp: OktaEmulator
    gateway: RunningGateway
    proxy: AuthorizingProxy
    token: str

    def other_token(self) -> str:
        """A valid token of another user, through the same agent."""
        return self.idp.mint_access_token(GATEWAY_AS, user=OTHER_USER, client_id=AGENT_CLIENT_ID, scopes=SCOPES)


@asynccontextmanager
async def authenticated_gateway(backends: Mapping[str, Mapping[str, Any]]) -> AsyncIterator[AuthenticatedGateway]:
    """The emulator, the gateway authenticating against it (`backends`: name → entry) and the proxy in front."""
    config = {
        "backends": {name: dict(entry) for name, entry in backends.items()},
        "agents": {AGENT: {"client_id": AGENT_CLIENT_ID, "backend_access": list(backends), "scopes": list(SCOPES)}},
    }
    with bound_socket() as proxy_socket:
        proxy_url = f"http://{LOOPBACK}:{proxy_socket.getsockname()[1]}"
        async with OktaEmulator(
            auth_servers=[AuthorizationServer(GATEWAY_AS, AUDIENCE)], users=[USER, OTHER_USER]
        ) as idp:
            token = idp.mint_access_token(GATEWAY_AS, user=USER, client_id=AGENT_CLIENT_ID, scopes=SCOPES)
            settings = {
                "OKTA_DOMAIN": idp.base_url,
                "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
                "OKTA_AUDIENCE": AUDIENCE,
                "GATEWAY_BASE_URL": proxy_url,
            }
            async with (
                running_gateway(config, settings=settings) as gateway,
                authorizing_proxy(gateway.base_url, token, sock=proxy_socket) as proxy,
            ):
                yield AuthenticatedGateway(idp, gateway, proxy, token)
