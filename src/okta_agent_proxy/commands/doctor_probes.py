"""The probes behind `okta-agent-proxy doctor`: each asks Okta, a backend or an authorization server what the gateway
will ask it, and returns a `Result` (`commands/doctor.py` runs them, prints them and picks the exit code).

- `check_issuer`: the inbound issuer's RFC 8414 / OpenID Connect metadata, then its JWKS.
- `check_backend_mcp`: one MCP request with the backend's credential, in the 2026-07-28 era first, then the legacy
  one (PROTOCOL.md §4).
- `check_backend_as`: an okta-cross-app backend's authorization server, configured or discovered (RFC 9728), and
  whether its metadata advertises the jwt-bearer grant (RFC 7523).
- `check_agent_at_okta`: whether Okta holds the agent's public key, asked of Okta itself: one token-exchange request
  signed with the agent's key and carrying a dummy subject token. Okta authenticates the client first, so
  `invalid_client` means the key (or `kid`) is not the one registered, and a refusal of the subject token means it
  is; the request cannot succeed, and only uses up one assertion `jti`.
- `check_redis`: whether `REDIS_URL` answers PING; a warning, not a failure, when it does not: the gateway serves
  without it (DESIGN.md §4).
- The front door's Okta app: `doctor_front_door.py`.

What a result never holds: secrets, keys, tokens, response bodies.
"""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from okta_agent_proxy import __version__
from okta_agent_proxy.config.models import Agent, Backend, CrossAppBackend, PreSharedKeyBackend, ServiceAccountBackend
from okta_agent_proxy.http.bodies import read_at_most
from okta_agent_proxy.inbound.jwks import JwksFetchError, fetch_json, parse_jwks
from okta_agent_proxy.outbound.cross_app import org_base_url
from okta_agent_proxy.outbound.discovery import AuthorizationServerInfo, AuthServerDiscovery
from okta_agent_proxy.outbound.id_jag import ACCESS_TOKEN_TYPE, ID_TOKEN_TYPE, JWT_BEARER, exchange_for_id_jag
from okta_agent_proxy.outbound.oauth_client import (
    ClientAuth,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
)

LEGACY_VERSION, MODERN_VERSION = "2025-06-18", "2026-07-28"
CLIENT_INFO = {"name": "okta-agent-proxy-doctor", "version": __version__}
_ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
_MAX_BODY = 1024 * 1024
_PROBE_SUBJECT_TOKEN = "okta-agent-proxy-doctor-probe"  # deliberately not a token
_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
}
_INITIALIZE = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
# The 2026-07-28 era first, then the legacy one (PROTOCOL.md §4, "Era"): (method, params, extra headers).
_PROBES: tuple[tuple[str, dict[str, Any], dict[str, str]], ...] = (
    ("server/discover", {"_meta": _META}, {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "server/discover"}),
    ("initialize", _INITIALIZE, {}),
)
_MARKS = {"ok": "✓", "fail": "✗", "warn": "!", "skip": "○"}
# Errors Okta can only give after it has authenticated the client: the signed assertion was accepted.
_AFTER_CLIENT_AUTH = frozenset({"invalid_grant", "invalid_target", "invalid_scope", "access_denied"})


@dataclass(frozen=True)
class Result:
    """One check's verdict, and the lines `doctor` prints for it (the fix only under a failure)."""

    check: str
    status: Literal["ok", "fail", "warn", "skip"]
    detail: str
    fix: str | None = None

    def lines(self) -> list[str]:
        head = f"{_MARKS[self.status]} {self.check}: {self.detail}"
        return [head, f"    fix: {self.fix}"] if self.fix and self.status == "fail" else [head]


def ok(check: str, detail: str) -> Result:
    return Result(check, "ok", detail)


def fail(check: str, detail: str, fix: str) -> Result:
    return Result(check, "fail", detail, fix)


def skip(check: str, detail: str) -> Result:
    return Result(check, "skip", detail)


def appended(url: str, suffix: str) -> str:
    return f"{url.rstrip('/')}/.well-known/{suffix}"


def _inserted(url: str, suffix: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/.well-known/{suffix}{parts.path.rstrip('/')}"


# ---- redis


async def check_redis(url: str, timeout: float) -> Result:
    client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        detail = f"REDIS_URL does not answer ({type(exc).__name__}): each process will cache credentials on its own"
        return Result("redis", "warn", detail)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
    return ok("redis", "REDIS_URL answers: replicas share the credential cache")


# ---- issuer


async def check_issuer(
    session: aiohttp.ClientSession, issuer: str | None, jwks_uri: str | None, timeout: float, *, front_door: bool
) -> list[Result]:
    if not issuer:
        why = "only the front door's own tokens are accepted" if front_door else "callers are not authenticated"
        return [skip("issuer metadata", f"not checked: OKTA_ISSUER is not set ({why})")]
    results: list[Result] = []
    metadata: dict[str, Any] | None = None
    failures: list[str] = []
    for url in (appended(issuer, "oauth-authorization-server"), appended(issuer, "openid-configuration")):
        try:
            document = await fetch_json(session, url, timeout)
        except JwksFetchError as exc:
            failures.append(str(exc))
            continue
        if document.get("issuer") != issuer:
            results.append(
                fail(
                    "issuer metadata",
                    f"{url} names issuer {document.get('issuer')!r}, not OKTA_ISSUER {issuer!r}",
                    "set OKTA_ISSUER to the issuer exactly as the authorization server names it (scheme, host, "
                    "/oauth2/<id>, no trailing slash)",
                )
            )
            break
        metadata = document
        results.append(ok("issuer metadata", f"{url} names issuer {issuer}"))
        break
    else:
        results.append(
            fail(
                "issuer metadata",
                "; ".join(failures),
                "set OKTA_ISSUER to your Okta custom authorization server's issuer (https://<org>/oauth2/<id>, "
                "Security → API → Authorization Servers) and check the gateway can reach it",
            )
        )
    discovered = metadata.get("jwks_uri") if metadata else None
    uri = jwks_uri or (discovered if isinstance(discovered, str) else None)
    if uri is None:
        results.append(
            fail("issuer jwks", "no JWKS URI: the metadata gave none", "set OKTA_JWKS_URI to {issuer}/v1/keys")
            if metadata
            else skip("issuer jwks", "not checked: no metadata and OKTA_JWKS_URI is not set")
        )
        return results
    fix = f"check that {uri} serves the issuer's JSON Web Key Set (OKTA_JWKS_URI, or the metadata's jwks_uri)"
    try:
        keys = parse_jwks(await fetch_json(session, uri, timeout))
    except JwksFetchError as exc:
        results.append(fail("issuer jwks", str(exc), fix))
        return results
    if not keys:
        results.append(fail("issuer jwks", f"{uri} holds no usable signing key (RSA/EC with kid, use sig)", fix))
    else:
        results.append(ok("issuer jwks", f"{uri}: {len(keys)} signing key(s), kid {', '.join(sorted(keys))}"))
    return results


# ---- backends: MCP


def _static_headers(backend: Backend) -> dict[str, str]:
    if isinstance(backend, PreSharedKeyBackend):
        return {backend.auth_config.header_name: backend.auth_config.key.get_secret_value()}
    if isinstance(backend, ServiceAccountBackend):
        pair = f"{backend.auth_config.username}:{backend.auth_config.password.get_secret_value()}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


async def _read_rpc(response: aiohttp.ClientResponse, request_id: int) -> dict[str, Any] | None:
    """The JSON-RPC message with this id from a JSON or SSE answer (None if there is none)."""
    if response.content_type == "application/json":
        message = _json(await read_at_most(response.content, _MAX_BODY))
        return message if isinstance(message, dict) and message.get("id") == request_id else None
    if response.content_type != "text/event-stream":
        return None
    data: list[str] = []
    seen = 0
    try:
        async for raw in response.content:
            seen += len(raw)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                message, data = _json("\n".join(data)), []
                if isinstance(message, dict) and message.get("id") == request_id:
                    return message
            if seen > _MAX_BODY:
                return None
    except ValueError:  # a line beyond aiohttp's limit
        return None
    return None


def _json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


async def check_backend_mcp(session: aiohttp.ClientSession, name: str, backend: Backend, timeout: float) -> Result:
    check = f"backend {name} mcp"
    wants_token = isinstance(backend, CrossAppBackend)
    credential = _static_headers(backend)
    limit = aiohttp.ClientTimeout(total=min(timeout, backend.timeout_seconds))
    statuses: list[str] = []
    for method, params, headers in _PROBES:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        try:
            async with session.post(
                backend.url,
                data=json.dumps(body),
                headers={**_ACCEPT, **headers, **credential},
                timeout=limit,
                allow_redirects=False,
            ) as response:
                status, session_id = response.status, response.headers.get("Mcp-Session-Id")
                message = await _read_rpc(response, 1) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return fail(
                check,
                f"{backend.url} is not reachable ({type(exc).__name__})",
                f"start the MCP server, or correct backends.{name}.url (timeout {limit.total:g} s)",
            )
        if status == 401 and wants_token:
            return ok(check, f"{backend.url} is reachable and wants a token (401): Cross App Access provides it")
        if status in (401, 403):
            what = "the configured credential" if credential else "the request"
            return fail(
                check,
                f"{backend.url} refused {what} ({status})",
                f"check backends.{name}.auth_config against what the MCP server expects",
            )
        if message is not None and isinstance(message.get("result"), dict):
            if session_id is not None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    # 200, 204 or 405 (a server that keeps no sessions clients may end): all fine
                    headers = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": LEGACY_VERSION, **credential}
                    async with session.delete(backend.url, headers=headers, timeout=limit, allow_redirects=False):
                        pass
            version = MODERN_VERSION if method == "server/discover" else message["result"].get("protocolVersion")
            return ok(check, f"{backend.url} speaks MCP {version} ({method})")
        statuses.append(f"{method} answered {status}")
        if status >= 500:
            break
    return fail(
        check,
        f"{backend.url} does not speak MCP over Streamable HTTP: {'; '.join(statuses)}",
        f"point backends.{name}.url at the MCP endpoint itself (often …/mcp)",
    )


# ---- backends: the target authorization server


async def check_backend_as(
    client: TokenEndpointClient, name: str, backend: CrossAppBackend
) -> tuple[Result, AuthorizationServerInfo | None]:
    check = f"backend {name} authorization server"
    config = backend.auth_config
    if config.id_jag_mode == "dynamic":
        resource = config.resource or backend.url
        try:
            info = await AuthServerDiscovery(client).for_resource(resource)
        except (TokenEndpointError, TokenEndpointUnavailable) as exc:
            detail = exc.description if isinstance(exc, TokenEndpointError) and exc.description else str(exc)
            return fail(
                check,
                f"discovery failed: {detail}",
                f"serve RFC 9728 metadata naming the AS for {resource}, or use id_jag_mode: static",
            ), None
        where = "discovered"
    else:
        assert config.target_authorization_server is not None
        issuer = config.target_authorization_server
        found: AuthorizationServerInfo | None = None
        failures: list[str] = []
        for url in (appended(issuer, "oauth-authorization-server"), _inserted(issuer, "oauth-authorization-server")):
            try:
                document = await client.fetch_metadata(url)
            except (TokenEndpointError, TokenEndpointUnavailable) as exc:
                failures.append(exc.description or str(exc) if isinstance(exc, TokenEndpointError) else str(exc))
                continue
            if document.get("issuer") != issuer:
                failures.append(f"{url} names issuer {document.get('issuer')!r}")
                continue
            grants = document.get("grant_types_supported")
            found = AuthorizationServerInfo(
                issuer,
                str(document.get("token_endpoint")),
                tuple(g for g in grants if isinstance(g, str)) if isinstance(grants, list) else (),
            )
            break
        if found is None:
            return fail(
                check,
                "no metadata: " + "; ".join(failures),
                f"set backends.{name}.auth_config.target_authorization_server to the AS issuer exactly",
            ), None
        info, where = found, "configured"
        if config.target_token_endpoint != info.token_endpoint:
            return fail(
                check,
                f"the metadata's token_endpoint is {info.token_endpoint}, not target_token_endpoint",
                f"set backends.{name}.auth_config.target_token_endpoint: {info.token_endpoint}",
            ), info
    if JWT_BEARER not in info.grant_types:
        return fail(
            check,
            f"{info.issuer} does not advertise the jwt-bearer grant ({JWT_BEARER})",
            "in Okta: Security → API → Authorization Servers → this server → Access Policies → the rule → "
            "allow the JWT Bearer grant type",
        ), info
    return ok(check, f"{where} {info.issuer} advertises the jwt-bearer grant"), info


# ---- agents


async def check_agent_at_okta(
    client: TokenEndpointClient, name: str, agent: Agent, backend: CrossAppBackend, target: str, okta_domain: str
) -> Result:
    check = f"agent {name} key at okta"
    assert agent.private_key is not None
    org = org_base_url(okta_domain)
    config = backend.auth_config
    auth = ClientAuth.private_key_jwt(
        agent.client_id, agent.private_key, org if config.client_assertion_audience == "issuer" else None
    )
    try:
        await exchange_for_id_jag(
            client,
            token_endpoint=f"{org}/oauth2/v1/token",
            auth=auth,
            subject_token=_PROBE_SUBJECT_TOKEN,
            subject_token_type=ID_TOKEN_TYPE if config.subject_token == "id_token" else ACCESS_TOKEN_TYPE,
            audience=target,
            resource=config.resource or backend.url,
            scopes=config.scopes,
        )
    except TokenEndpointUnavailable as exc:
        return fail(check, f"Okta's token endpoint is unavailable ({exc})", "check OKTA_DOMAIN and the network")
    except TokenEndpointError as exc:
        if exc.error == "invalid_client":
            return fail(
                check,
                f"Okta refused the agent's signed assertion (kid {agent.private_key.kid}): "
                f"{exc.description or exc.error}",
                f"in Okta, register this key's public JWK (kid {agent.private_key.kid}) on the AI agent "
                f"{agent.client_id}, or set agents.{name}.key_id to the kid Okta shows for it",
            )
        if exc.error in _AFTER_CLIENT_AUTH:
            return ok(check, f"Okta accepted the agent's signed assertion (kid {agent.private_key.kid})")
        return skip(check, f"cannot verify here: Okta answered {exc.error} before telling")
    return ok(check, f"Okta accepted the agent's signed assertion (kid {agent.private_key.kid})")
