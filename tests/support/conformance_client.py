"""The conformance suite's client under test: the project's own OAuth code driving the suite's auth scenarios.

`conformance client --command "python -m tests.support.conformance_client" --scenario NAME` (conformance 0.1.16,
run from the repository root) starts a mock authorization server and MCP server (and, for Cross App Access, a
mock IdP), appends the MCP server's URL to the command and passes the credentials in `MCP_CONFORMANCE_CONTEXT`
(JSON, with the scenario's `name`). This harness then does what the gateway does:

1. discovery — an unauthenticated MCP request gets 401 whose `WWW-Authenticate` names the RFC 9728 protected
   resource metadata; that document's `resource` must be the server URL, and its first authorization server's RFC
   8414 metadata is read by the project's `AuthServerDiscovery` (which checks `issuer`);
2. the token — only through the project's `TokenEndpointClient`:
   - `auth/client-credentials-jwt`: `client_credentials` with `ClientAuth.private_key_jwt` (the context's PEM key,
     loaded by `load_signing_key`; the assertion `aud` is the AS issuer — `client_assertion_audience: issuer`,
     the only audience this suite accepts);
   - `auth/client-credentials-basic`: `client_credentials` with `ClientAuth.client_secret_basic`;
   - `auth/cross-app-access-complete-flow`: `exchange_for_id_jag` at the mock IdP (the context's ID token as an
     `id_token` subject, the AS issuer as `audience`, the PRM `resource`; the IdP takes a public client, so
     `client_id` only), then `redeem_id_jag` at the AS with `client_secret_basic`;
3. MCP with `Authorization: Bearer <token>` through the `mcp` SDK client: initialize, `tools/list`, `tools/call
   test-tool` (what the suite's own reference client does).

`--assertion-audience token_endpoint` signs the client assertion for the token endpoint URL instead (the project's
default, Okta's rule); this suite rejects that, which the test uses as a negative control.

Exit 0 on success; otherwise 1 with one line on stderr naming the step that failed (2 for a usage error). No token,
secret, key or assertion is ever printed. Every connection goes to the loopback address over IPv4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent
from pydantic import SecretStr

from okta_agent_proxy.keys import InvalidKeyError, load_signing_key
from okta_agent_proxy.outbound.discovery import AuthorizationServerInfo, AuthServerDiscovery
from okta_agent_proxy.outbound.id_jag import ID_TOKEN_TYPE, JWT_BEARER, exchange_for_id_jag, redeem_id_jag
from okta_agent_proxy.outbound.oauth_client import (
    ClientAuth,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenResponse,
)

__all__ = [
    "CLIENT_CREDENTIALS_BASIC",
    "CLIENT_CREDENTIALS_JWT",
    "CROSS_APP_ACCESS",
    "SCENARIOS",
    "HarnessError",
    "main",
    "run",
]

CLIENT_CREDENTIALS_JWT = "auth/client-credentials-jwt"
CLIENT_CREDENTIALS_BASIC = "auth/client-credentials-basic"
CROSS_APP_ACCESS = "auth/cross-app-access-complete-flow"
SCENARIOS = (CLIENT_CREDENTIALS_JWT, CLIENT_CREDENTIALS_BASIC, CROSS_APP_ACCESS)

TEST_TOOL = "test-tool"  # the one tool the suite's auth MCP server offers; it answers the text "test"
_TIMEOUT = 10.0
_RESOURCE_METADATA = re.compile(r'resource_metadata="(?P<url>[^"]+)"')
_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "okta-agent-proxy-conformance-probe", "version": "0"},
    },
}


class HarnessError(Exception):
    """A step of the flow went wrong; the message names it and carries no secret."""


@dataclass(frozen=True)
class Discovered:
    resource: str
    authorization_server: AuthorizationServerInfo


def _context() -> dict[str, Any]:
    raw = os.environ.get("MCP_CONFORMANCE_CONTEXT")
    if not raw:
        raise HarnessError("MCP_CONFORMANCE_CONTEXT is not set (run this command from `conformance client`)")
    try:
        context = json.loads(raw)
    except ValueError:
        raise HarnessError("MCP_CONFORMANCE_CONTEXT is not JSON") from None
    if not isinstance(context, dict):
        raise HarnessError("MCP_CONFORMANCE_CONTEXT is not a JSON object")
    return context


def _text(context: dict[str, Any], name: str) -> str:
    value = context.get(name)
    if not isinstance(value, str) or not value:
        raise HarnessError(f"MCP_CONFORMANCE_CONTEXT has no {name!r}")
    return value


async def _discover(session: aiohttp.ClientSession, client: TokenEndpointClient, server_url: str) -> Discovered:
    """401 → RFC 9728 protected resource metadata → RFC 8414 authorization server metadata."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
    async with session.post(server_url, json=_INITIALIZE, headers=headers, timeout=timeout) as response:
        status = response.status
        challenge = response.headers.get("WWW-Authenticate", "")
    if status != 401:
        raise HarnessError(f"discovery: an unauthenticated request got {status}, not 401")
    match = _RESOURCE_METADATA.search(challenge)
    if match is None:
        raise HarnessError("discovery: the 401 has no WWW-Authenticate resource_metadata parameter")
    prm = await client.fetch_metadata(match["url"])
    resource = prm.get("resource")
    servers = prm.get("authorization_servers")
    if resource != server_url:  # RFC 9728 §3.3; the MCP spec requires it too
        raise HarnessError(f"discovery: the protected resource metadata names {resource!r}, not {server_url}")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
        raise HarnessError("discovery: the protected resource metadata lists no authorization server")
    info = await AuthServerDiscovery(client).authorization_server(servers[0])
    return Discovered(resource, info)


async def _client_credentials(
    client: TokenEndpointClient, context: dict[str, Any], found: Discovered, scenario: str, assertion_audience: str
) -> TokenResponse:
    client_id = _text(context, "client_id")
    if scenario == CLIENT_CREDENTIALS_JWT:
        try:
            key = load_signing_key(_text(context, "private_key_pem"))
        except InvalidKeyError as exc:
            raise HarnessError(f"the context's private key: {exc}") from None
        expected_alg = context.get("signing_algorithm")
        if expected_alg is not None and expected_alg != key.algorithm:
            raise HarnessError(f"the key signs with {key.algorithm}, the scenario expects {expected_alg}")
        target = found.authorization_server
        audience = target.issuer if assertion_audience == "issuer" else None  # None: the token endpoint URL
        auth = ClientAuth.private_key_jwt(client_id, key, assertion_audience=audience)
    else:
        auth = ClientAuth.client_secret_basic(client_id, SecretStr(_text(context, "client_secret")))
    params = {"grant_type": "client_credentials", "resource": found.resource}
    return await client.request_token(found.authorization_server.token_endpoint, params, auth)


async def _cross_app_access(client: TokenEndpointClient, context: dict[str, Any], found: Discovered) -> TokenResponse:
    target = found.authorization_server
    if JWT_BEARER not in target.grant_types:
        raise HarnessError("the authorization server does not list the jwt-bearer grant")
    idp_token_endpoint = _text(context, "idp_token_endpoint")
    idp = await AuthServerDiscovery(client).authorization_server(_text(context, "idp_issuer"))
    if idp.token_endpoint != idp_token_endpoint:
        raise HarnessError("the IdP's metadata names another token endpoint than the context")
    grant = await exchange_for_id_jag(
        client,
        token_endpoint=idp.token_endpoint,
        auth=ClientAuth("none", _text(context, "idp_client_id")),
        subject_token=_text(context, "idp_id_token"),
        subject_token_type=ID_TOKEN_TYPE,
        audience=target.issuer,
        resource=found.resource,
    )
    return await redeem_id_jag(
        client,
        token_endpoint=target.token_endpoint,
        auth=ClientAuth.client_secret_basic(_text(context, "client_id"), SecretStr(_text(context, "client_secret"))),
        id_jag=grant.access_token,
    )


async def _use_mcp(server_url: str, token: str) -> None:
    """initialize, tools/list, tools/call with the token — a 2025-era handshake, as the suite's TS server speaks."""
    transport = httpx2.AsyncHTTPTransport(local_address="0.0.0.0")  # IPv4: `localhost` is 127.0.0.1
    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, transport=transport, timeout=httpx2.Timeout(_TIMEOUT)
        ) as http,
        Client(streamable_http_client(server_url, http_client=http), mode="legacy") as session,
    ):
        tools = await session.list_tools()
        if TEST_TOOL not in {tool.name for tool in tools.tools}:
            raise HarnessError(f"tools/list does not offer {TEST_TOOL}")
        result = await session.call_tool(TEST_TOOL, {})
        if result.is_error or not any(isinstance(c, TextContent) for c in result.content):
            raise HarnessError(f"tools/call {TEST_TOOL} did not return text")


async def run(server_url: str, context: dict[str, Any], *, assertion_audience: str = "issuer") -> None:
    scenario = context.get("name") or os.environ.get("MCP_CONFORMANCE_SCENARIO")
    if scenario not in SCENARIOS:
        raise HarnessError(f"unsupported scenario {scenario!r}; this harness runs {', '.join(SCENARIOS)}")
    connector = aiohttp.TCPConnector(family=socket.AF_INET)  # IPv4 only: `localhost` is 127.0.0.1
    async with aiohttp.ClientSession(connector=connector) as session:
        client = TokenEndpointClient(session, timeout=_TIMEOUT)
        found = await _discover(session, client, server_url)
        if scenario == CROSS_APP_ACCESS:
            token = await _cross_app_access(client, context, found)
        else:
            token = await _client_credentials(client, context, found, scenario, assertion_audience)
    if token.token_type is not None and token.token_type.lower() != "bearer":
        raise HarnessError(f"the authorization server issued a {token.token_type!r} token, not Bearer")
    await _use_mcp(server_url, token.access_token)


def _describe(exc: BaseException) -> str:
    """One line for a failure — the project's errors carry no secret; the SDK's task groups wrap theirs."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    if isinstance(exc, HarnessError):
        return str(exc)
    if isinstance(exc, TokenEndpointError):
        return f"refused: {exc}" + (f" ({exc.description})" if exc.description else "")
    if isinstance(exc, TokenEndpointUnavailable):
        return f"unavailable: {exc}"
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.conformance_client",
        description="The MCP conformance suite's client, driven by the project's OAuth code.",
    )
    parser.add_argument(
        "--assertion-audience",
        choices=("issuer", "token_endpoint"),
        default="issuer",
        help="the private_key_jwt assertion's aud, as the `client_assertion_audience` setting (default: issuer)",
    )
    parser.add_argument("server_url", help="the MCP server URL (the suite appends it)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.server_url, _context(), assertion_audience=args.assertion_audience))
    except Exception as exc:  # every failure becomes one line and exit code 1
        print(f"conformance client: {_describe(exc)}", file=sys.stderr)
        return 1
    print(f"conformance client: {os.environ.get('MCP_CONFORMANCE_SCENARIO', 'scenario')} completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
