"""Tokens minted by a certified third-party authorization server validate through the gateway's own code path.

The issuer is npm `oidc-provider` 9.13.3 (panva, OpenID-certified; `tests/support/oidc_provider.py`), not our Okta
emulator, so nothing here can pass because the validator and the token minter share assumptions. Its tokens are
RFC 9068 JWT access tokens (`typ: at+jwt`, RS256, `scope` as a string, the client in `client_id`; one client also
gets Okta's `cid`), issued through the client_credentials grant for an RFC 8707 resource indicator.

- Validator level: `JwksCache` discovers the JWKS from the issuer's metadata (RFC 8414 location, or the OIDC
  document when the RFC 8414 one is missing), and `OktaTokenValidator` accepts the token and reads subject,
  client id and scopes; a token for another resource, a tampered token and another issuer's token are refused.
- Through the gateway (`build_app`, a pre-shared-key JSON backend): the token gets 200 from the backend; no
  token → 401 with the RFC 9728 challenge; a garbage token → 401 `invalid_token`; and a client that follows the
  challenge the way an MCP client does (PRM → authorization server metadata → token for the PRM's `resource`)
  ends with 200.

The audience is the backend's RFC 9728 `resource` on the gateway (`{GATEWAY_BASE_URL}/tools`, what an RFC 8707
client asks for), so `OKTA_AUDIENCE` names it: the default audience, the bare base URL, would refuse these tokens.
That URL must be known before oidc-provider starts, so the gateway's port is reserved first (a bound socket) and the
gateway then serves on that very socket, in a background event loop shared by the module's tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
import pytest
from aiohttp import web

from okta_agent_proxy.app import build_app
from okta_agent_proxy.errors import InvalidToken
from okta_agent_proxy.inbound.jwks import JwksCache
from okta_agent_proxy.inbound.validator import OktaTokenValidator
from tests.support.gateway import load_config, psk_backend
from tests.support.oidc_provider import (
    SUPPORTED_SCOPES,
    OidcClient,
    OidcProvider,
    TokenRequestError,
    client_credentials_token,
    running_oidc_provider,
)
from tests.support.processes import LOOPBACK

pytestmark = pytest.mark.node

T = TypeVar("T")

OKTA_SHAPED = OidcClient("agent-okta-shaped", "secret-okta-shaped-0123456789", okta_cid=True)
PLAIN = OidcClient("agent-plain", "secret-plain-0123456789")
STRANGER = OidcClient("agent-stranger", "secret-stranger-0123456789", okta_cid=True)  # no agent in the gateway
CLIENTS = (OKTA_SHAPED, PLAIN, STRANGER)
BACKEND_PATH = "/tools"
BACKEND_KEY = "third-party-backend-key-0123456789"
OTHER_RESOURCE = "https://other-api.oap.test"
OIDC_ONLY_RESOURCE = "https://gateway.oap.test/tools"
START_TIMEOUT = 30.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _rfc7638_thumbprint(jwk: dict[str, Any]) -> str:
    members = {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}
    return _b64url_encode(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def _challenge_params(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer", header
    return dict(re.findall(r'([a-z_]+)="([^"]*)"', params))


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200, url
        document: dict[str, Any] = await response.json()
        return document


# --- the module's servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_socket() -> Iterator[socket.socket]:
    """The gateway's port, reserved before oidc-provider starts so it can be the token audience."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    with sock:
        yield sock


@pytest.fixture(scope="module")
def gateway_base(gateway_socket: socket.socket) -> str:
    port: int = gateway_socket.getsockname()[1]
    return f"http://{LOOPBACK}:{port}"


@pytest.fixture(scope="module")
def gateway_resource(gateway_base: str) -> str:
    """The backend's RFC 9728 `resource` — what an MCP client asks the authorization server for."""
    return gateway_base + BACKEND_PATH


@pytest.fixture(scope="module")
def provider(gateway_resource: str) -> Iterator[OidcProvider]:
    with running_oidc_provider([gateway_resource, OTHER_RESOURCE], CLIENTS, timeout=START_TIMEOUT) as server:
        yield server


@pytest.fixture(scope="module")
def oidc_only_provider() -> Iterator[OidcProvider]:
    """A second instance (own key, own issuer) that publishes only `/.well-known/openid-configuration`."""
    with running_oidc_provider(
        [OIDC_ONLY_RESOURCE, OTHER_RESOURCE], CLIENTS, hide_rfc8414=True, timeout=START_TIMEOUT
    ) as server:
        yield server


@dataclass
class BackendLog:
    """What the JSON backend received (written from the server thread, read after the response arrived)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)

    def last(self) -> dict[str, Any]:
        with self.lock:
            return self.requests[-1]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def json_backend(log: BackendLog) -> web.Application:
    """A minimal JSON-RPC backend that demands the pre-shared key, like a real protected MCP server."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        log.add({"path": request.path, "headers": dict(request.headers), "body": body})
        if request.headers.get("X-API-Key") != BACKEND_KEY:
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": {"tools": [], "from": "backend"}})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


class EventLoopThread:
    """An event loop on a daemon thread, for servers shared by tests that each run in their own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="third-party-servers", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = START_TIMEOUT) -> T:
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(START_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


async def _serve(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


@dataclass(frozen=True)
class Gateway:
    base: str
    resource: str
    backend: BackendLog

    @property
    def url(self) -> str:
        return self.base + BACKEND_PATH


@pytest.fixture(scope="module")
def gateway(
    gateway_socket: socket.socket, gateway_base: str, gateway_resource: str, provider: OidcProvider
) -> Iterator[Gateway]:
    """The real gateway app trusting oidc-provider, with one pre-shared-key backend and agents for two clients."""
    log = BackendLog()
    backend_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    backend_socket.bind((LOOPBACK, 0))
    backend_url = f"http://{LOOPBACK}:{backend_socket.getsockname()[1]}/mcp"
    config = {
        "backends": {"tools": psk_backend(backend_url, BACKEND_PATH, key=BACKEND_KEY)},
        "agents": {
            "okta-shaped-agent": {"client_id": OKTA_SHAPED.client_id, "backend_access": ["tools"]},
            "plain-agent": {"client_id": PLAIN.client_id, "backend_access": ["tools"], "scopes": ["mcp:read"]},
        },
    }
    settings = {
        "OKTA_ISSUER": provider.issuer,
        "OKTA_AUDIENCE": gateway_resource,
        "GATEWAY_BASE_URL": gateway_base,
        "GATEWAY_PORT": gateway_socket.getsockname()[1],
    }
    with tempfile.TemporaryDirectory(prefix="oap-third-party-") as tmp:
        loaded = load_config(config, Path(tmp), settings=settings)
    servers = EventLoopThread()
    runners: list[web.AppRunner] = []

    async def start() -> None:
        runners.append(await _serve(json_backend(log), backend_socket))
        runners.append(await _serve(build_app(loaded), gateway_socket))

    try:
        servers.run(start())
        yield Gateway(gateway_base, gateway_resource, log)
    finally:
        # The servers close the sockets they were given; the explicit close covers a failed start.
        for runner in reversed(runners):
            servers.run(runner.cleanup())
        servers.close()
        backend_socket.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        yield session


# --- validator level -----------------------------------------------------------------------------------------------


@asynccontextmanager
async def validator_for(issuer: str, audience: str) -> AsyncIterator[tuple[OktaTokenValidator, JwksCache]]:
    """The gateway's validator with JWKS discovery from the issuer's metadata (no OKTA_JWKS_URI)."""
    async with aiohttp.ClientSession() as session:
        jwks = JwksCache(session, issuer)
        yield OktaTokenValidator(jwks, issuer, [audience]), jwks


@dataclass(frozen=True)
class Issuer:
    server: OidcProvider
    resource: str  # the audience the validator is configured with
    rfc8414_published: bool


@pytest.fixture(params=["rfc8414-metadata", "openid-configuration-only"])
def issuer(request: pytest.FixtureRequest) -> Issuer:
    """Each discovery route: oidc-provider's RFC 8414 document, or (hidden) the OIDC document as the fallback."""
    if request.param == "rfc8414-metadata":
        server: OidcProvider = request.getfixturevalue("provider")
        return Issuer(server, server.resources[0], rfc8414_published=True)
    server = request.getfixturevalue("oidc_only_provider")
    return Issuer(server, OIDC_ONLY_RESOURCE, rfc8414_published=False)


async def test_validator_accepts_oidc_provider_token(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    async with http.get(issuer.server.issuer + "/.well-known/oauth-authorization-server") as rfc8414:
        assert rfc8414.status == (200 if issuer.rfc8414_published else 404)
    token = await issuer.server.token(OKTA_SHAPED.client_id, issuer.resource)

    async with validator_for(issuer.server.issuer, issuer.resource) as (validator, jwks):
        principal = await validator.validate(token)
        assert jwks.fetch_count == 1

    claims = _unverified_claims(token)
    assert principal.issuer == issuer.server.issuer
    assert principal.subject == OKTA_SHAPED.client_id  # client_credentials: oidc-provider's `sub` is the client
    assert principal.client_id == OKTA_SHAPED.client_id
    assert principal.scopes == SUPPORTED_SCOPES
    assert principal.uid is None
    assert principal.jti == claims["jti"]
    assert principal.expires_at == claims["exp"]


async def test_token_shape_is_oidc_providers_own(provider: OidcProvider, http: aiohttp.ClientSession) -> None:
    """What the validator is up against: RFC 9068 `at+jwt`, `scope` string, client in `client_id` (+ `cid`)."""
    token = await provider.token(OKTA_SHAPED.client_id, provider.resources[0], scope="mcp:read")
    header = jwt.get_unverified_header(token)
    claims = _unverified_claims(token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    assert claims["aud"] == provider.resources[0]
    assert claims["scope"] == "mcp:read"
    assert "scp" not in claims
    assert claims["client_id"] == claims["cid"] == OKTA_SHAPED.client_id

    metadata = await _get_json(http, provider.issuer + "/.well-known/openid-configuration")
    keys = (await _get_json(http, metadata["jwks_uri"]))["keys"]
    assert [key["kid"] for key in keys] == [header["kid"]]
    assert "alg" not in keys[0]  # RFC 7517 §4.4: optional, and oidc-provider's keys usually go without
    assert header["kid"] == _rfc7638_thumbprint(keys[0])  # a fresh key can never reuse a cached kid


async def test_validator_reads_client_id_claim_without_cid(provider: OidcProvider) -> None:
    token = await provider.token(PLAIN.client_id, provider.resources[0], scope="mcp:read")
    assert "cid" not in _unverified_claims(token)

    async with validator_for(provider.issuer, provider.resources[0]) as (validator, _):
        principal = await validator.validate(token)

    assert principal.client_id == PLAIN.client_id
    assert principal.subject == PLAIN.client_id
    assert principal.scopes == {"mcp:read"}


async def test_validator_rejects_token_for_another_resource(provider: OidcProvider) -> None:
    token = await provider.token(OKTA_SHAPED.client_id, OTHER_RESOURCE)
    assert _unverified_claims(token)["aud"] == OTHER_RESOURCE

    async with validator_for(provider.issuer, provider.resources[0]) as (validator, _):
        with pytest.raises(InvalidToken):
            await validator.validate(token)


async def test_validator_rejects_tampered_tokens(provider: OidcProvider) -> None:
    token = await provider.token(PLAIN.client_id, provider.resources[0], scope="mcp:read")
    header, payload, signature = token.split(".")
    claims = json.loads(_b64url_decode(payload))
    widened = _b64url_encode(json.dumps({**claims, "scope": "mcp:read mcp:write admin"}).encode())
    first = _b64url_decode(signature)
    flipped = _b64url_encode(bytes([first[0] ^ 0x01]) + first[1:])
    forged = [f"{header}.{widened}.{signature}", f"{header}.{payload}.{flipped}", f"{header}.{payload}."]

    async with validator_for(provider.issuer, provider.resources[0]) as (validator, _):
        for candidate in forged:
            with pytest.raises(InvalidToken):
                await validator.validate(candidate)
        assert (await validator.validate(token)).scopes == {"mcp:read"}  # the untouched token still passes


async def test_validator_rejects_another_issuers_token(
    provider: OidcProvider, oidc_only_provider: OidcProvider
) -> None:
    """Same software, same claims, same kid scheme, but another key and issuer: unknown kid, refused."""
    token = await oidc_only_provider.token(OKTA_SHAPED.client_id, OTHER_RESOURCE)

    async with validator_for(provider.issuer, OTHER_RESOURCE) as (validator, _):
        with pytest.raises(InvalidToken):
            await validator.validate(token)


async def test_validator_accepts_rs512_token_from_alg_less_key() -> None:
    """RS512 is on the allow-list; a JWK without `alg` may be used with it (RFC 7517 §4.4)."""
    with running_oidc_provider([OIDC_ONLY_RESOURCE], [PLAIN], access_token_alg="RS512") as server:
        token = await server.token(PLAIN.client_id, OIDC_ONLY_RESOURCE, scope="mcp:read")
        assert jwt.get_unverified_header(token)["alg"] == "RS512"

        async with validator_for(server.issuer, OIDC_ONLY_RESOURCE) as (validator, _):
            principal = await validator.validate(token)

    assert principal.client_id == PLAIN.client_id


async def test_oidc_provider_refuses_unknown_resource(provider: OidcProvider) -> None:
    """The audience really is restricted by the server: it issues nothing for a resource it does not know."""
    with pytest.raises(TokenRequestError) as refused:
        await client_credentials_token(
            provider.issuer, PLAIN.client_id, PLAIN.client_secret, "https://unknown.oap.test", "mcp:read"
        )
    assert refused.value.error == "invalid_target"


# --- through the gateway -------------------------------------------------------------------------------------------


async def _call(http: aiohttp.ClientSession, url: str, token: str | None) -> tuple[int, Any, dict[str, str]]:
    headers = dict(MCP_HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(url, json=LIST_TOOLS, headers=headers) as response:
        body = await response.json(content_type=None)
        return response.status, body, dict(response.headers)


def _metadata_url(gateway: Gateway) -> str:
    return f"{gateway.base}/.well-known/oauth-protected-resource{BACKEND_PATH}"


async def test_gateway_forwards_with_oidc_provider_token(
    gateway: Gateway, provider: OidcProvider, http: aiohttp.ClientSession
) -> None:
    token = await provider.token(OKTA_SHAPED.client_id, gateway.resource)

    status, body, _ = await _call(http, gateway.url, token)

    assert status == 200, body
    assert body == {"jsonrpc": "2.0", "id": 1, "result": {"tools": [], "from": "backend"}}
    seen = gateway.backend.last()
    assert seen["headers"]["X-API-Key"] == BACKEND_KEY
    assert token not in json.dumps(seen)  # the caller's token never reaches the backend


async def test_gateway_identifies_agent_by_client_id_claim(
    gateway: Gateway, provider: OidcProvider, http: aiohttp.ClientSession
) -> None:
    """oidc-provider's own `client_id` claim (no Okta `cid`) identifies the agent; an unknown client is refused."""
    plain = await provider.token(PLAIN.client_id, gateway.resource, scope="mcp:read")
    stranger = await provider.token(STRANGER.client_id, gateway.resource)
    before = gateway.backend.count()

    assert (await _call(http, gateway.url, plain))[0] == 200
    status, body, _ = await _call(http, gateway.url, stranger)

    assert status == 403
    assert body["error"] == "authorization_denied", body
    assert gateway.backend.count() == before + 1


async def test_gateway_without_token_challenges_with_metadata(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    before = gateway.backend.count()

    status, _, headers = await _call(http, gateway.url, None)

    assert status == 401
    params = _challenge_params(headers["WWW-Authenticate"])
    assert params == {"resource_metadata": _metadata_url(gateway)}  # no error= when no token was sent
    assert gateway.backend.count() == before


async def test_gateway_rejects_garbage_token(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    status, body, headers = await _call(http, gateway.url, "not-a-jwt.at-all.really")

    assert status == 401
    assert body["error"] == "invalid_token"
    params = _challenge_params(headers["WWW-Authenticate"])
    assert params["error"] == "invalid_token"
    assert params["resource_metadata"] == _metadata_url(gateway)


async def test_gateway_rejects_oidc_provider_token_for_another_resource(
    gateway: Gateway, provider: OidcProvider, http: aiohttp.ClientSession
) -> None:
    token = await provider.token(OKTA_SHAPED.client_id, OTHER_RESOURCE)

    status, _, headers = await _call(http, gateway.url, token)

    assert status == 401
    assert _challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"


async def test_client_following_the_challenge_gets_through(
    gateway: Gateway, provider: OidcProvider, http: aiohttp.ClientSession
) -> None:
    """What an MCP client does with only the gateway URL: 401 → PRM → AS metadata → token for `resource` → 200."""
    status, _, headers = await _call(http, gateway.url, None)
    assert status == 401
    prm = await _get_json(http, _challenge_params(headers["WWW-Authenticate"])["resource_metadata"])
    assert prm["resource"] == gateway.resource
    [authorization_server] = prm["authorization_servers"]
    assert authorization_server == provider.issuer
    assert set(prm["scopes_supported"]) <= SUPPORTED_SCOPES

    as_metadata = await _get_json(http, authorization_server + "/.well-known/oauth-authorization-server")
    assert as_metadata["issuer"] == authorization_server
    assert "client_credentials" in as_metadata["grant_types_supported"]
    token = await client_credentials_token(
        authorization_server,
        OKTA_SHAPED.client_id,
        OKTA_SHAPED.client_secret,
        prm["resource"],
        " ".join(prm["scopes_supported"]),
        token_endpoint=as_metadata["token_endpoint"],
    )

    status, body, _ = await _call(http, gateway.url, token)
    assert status == 200, body
