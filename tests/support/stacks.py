"""Building blocks for the audit, secret-leak and durability tests: a gateway with a real audit store, an Okta
emulator that records what it received and issued, a backend that validates Cross App Access tokens, agent keys,
and the databases (a SQLite file, or a database of its own on the PostgreSQL server).

- `database_url("sqlite" | "postgresql", directory)`: an async context manager yielding a `DATABASE_URL`. The
  PostgreSQL one is a fresh database on `OAP_TEST_POSTGRES_URL` (default postgresql://root@127.0.0.1:5432/test),
  dropped afterwards; unreachable → skip, or fail under `OAP_REQUIRE_SERVICES=1`.
- `audited_gateway(config, database_url, settings=…)`: the real app (`build_app`) with a migrated `Store` and a
  started `AuditWriter`, on 127.0.0.1:<ephemeral> in the test's loop. `AuditedGateway.row(request_id)` waits for
  the one row of a request; `rows()` flushes the writer and returns every row (all columns); `reload(config)`
  swaps in a new config as SIGHUP does.
- `RecordingOktaEmulator`: the devkit emulator with its outages (`FaultyOktaEmulator`), plus `received` (every
  `/v1/token` request: form and `Authorization` header, read before the emulator or an outage judged it, so refused
  client assertions are kept too) and `issued` (every `access_token` it answered: ID-JAGs and backend tokens).
- `ValidatingBackend` / `validating_backend(idp, as_id)`: an MCP endpoint accepting only tokens that `as_id`
  minted for its own URL; `reject_next` makes it answer 401 to the next N valid calls.
- `ec_agent_key(kid)`, `rsa_agent_key(kid)`: an agent's private key as the YAML takes it (JWK / PEM), the public
  JWK to register at the emulator, and the secret strings that must never leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from okta_agent_proxy.app import GATEWAY, build_app, server_events
from okta_agent_proxy.config.loader import LoadedConfig
from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, XaaPolicy
from okta_agent_proxy.http.server import ConnectionLimits, GatewayRunner
from okta_agent_proxy.store.audit import AuditWriter, WriterOptions
from okta_agent_proxy.store.db import Store, async_database_url, display_url, migrate, open_store
from okta_agent_proxy.store.models import audit_events

from .gateway import ConfigInput, bound_socket, load_config
from .loopback import serving
from .node_tools import services_required
from .okta_faults import FaultyOktaEmulator, okta_endpoint
from .processes import LOOPBACK

__all__ = [
    "ACCEPT",
    "AUDIENCE",
    "BACKEND_AS",
    "DATABASES",
    "GATEWAY_AS",
    "POSTGRES_URL",
    "AgentKey",
    "Answer",
    "AuditedGateway",
    "ReceivedTokenRequest",
    "RecordingOktaEmulator",
    "ValidatingBackend",
    "audited_gateway",
    "database_url",
    "ec_agent_key",
    "jwt_claims",
    "postgres_database",
    "requests_total_by_labels",
    "rsa_agent_key",
    "sample_values",
    "send",
    "validating_backend",
    "xaa_backend",
]

POSTGRES_URL = os.environ.get("OAP_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
DATABASES = ("sqlite", "postgresql")
GATEWAY_AS, BACKEND_AS = "aus-gateway", "aus-backend"
EMPLOYEES_AS = "aus-employees"  # the employees backend's AS, in `employees_org`
CURSOR_CLIENT_ID = "wlp_cursor_agent"
AUDIENCE = "api://okta-agent-proxy-tests"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
WAIT_SECONDS = 10.0
_POLL_SECONDS = 0.02


# ---------------------------------------------------------------- databases


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL server (dropped afterwards); its URL as an operator writes it."""
    admin_url = async_database_url(POSTGRES_URL)
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"timeout": 5})
    name = f"oap_test_{uuid.uuid4().hex[:12]}"
    try:
        try:
            async with admin.connect() as connection:
                await connection.execute(text(f'CREATE DATABASE "{name}"'))
        except (OSError, TimeoutError, OperationalError) as exc:
            reason = f"PostgreSQL at {display_url(admin_url)} is unreachable ({type(exc).__name__})"
            if services_required():
                pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
            pytest.skip(reason)
        try:
            url = admin_url.set(database=name).render_as_string(hide_password=False)
            yield url.replace("postgresql+asyncpg://", "postgresql://", 1)
        finally:
            async with admin.connect() as connection:
                await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@asynccontextmanager
async def database_url(kind: str, directory: Path) -> AsyncIterator[str]:
    """`sqlite`: a file in `directory`; `postgresql`: a database of its own (see `postgres_database`)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'audit.db'}"
    elif kind == "postgresql":
        async with postgres_database() as url:
            yield url
    else:
        raise ValueError(f"unknown database kind {kind!r}")


# ---------------------------------------------------------------- the gateway with its audit store


@dataclass
class AuditedGateway:
    """The gateway on 127.0.0.1:`port`, writing its audit rows through `audit` into `store`."""

    port: int
    loaded: LoadedConfig
    store: Store
    audit: AuditWriter
    app: web.Application
    _settings: dict[str, Any] = field(default_factory=dict, repr=False)
    _environ: Mapping[str, str] | None = field(default=None, repr=False)

    async def reload(self, config: ConfigInput) -> LoadedConfig:
        """Swap in `config` (loaded with the same settings) as a SIGHUP does, without the file watcher."""
        with tempfile.TemporaryDirectory(prefix="oap-reload-") as tmp:
            loaded = load_config(config, Path(tmp), settings=self._settings, environ=self._environ)
        await self.app[GATEWAY].reload(loaded)
        return loaded

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path

    async def rows(self) -> list[dict[str, Any]]:
        """Every audit row (all columns), in insertion order, after writing what is queued."""
        await self.audit.flush()
        async with self.store.engine.connect() as connection:
            result = await connection.execute(select(audit_events).order_by(audit_events.c.id))
            return [dict(row) for row in result.mappings()]

    async def wait_rows(self, count: int, timeout: float = WAIT_SECONDS) -> list[dict[str, Any]]:
        """The rows once there are at least `count` of them. A request's event is queued in the handler's
        `finally`, which may run just after the client has read the response: hence a poll."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.rows()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(_POLL_SECONDS)

    async def rows_for(self, request_id: str, timeout: float = WAIT_SECONDS) -> list[dict[str, Any]]:
        """The rows of one request, waiting (bounded) for the first to appear."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [row for row in await self.rows() if row["request_id"] == request_id]
            if rows or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(_POLL_SECONDS)

    async def row(self, request_id: str, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """The one row of a request (AssertionError if none appears in time, or more than one)."""
        rows = await self.rows_for(request_id, timeout)
        assert len(rows) == 1, f"expected exactly one audit row for {request_id}, got {len(rows)}: {rows}"
        return rows[0]


@asynccontextmanager
async def audited_gateway(
    config: ConfigInput,
    database: str,
    *,
    settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    writer_options: WriterOptions | None = None,
    handler_cancellation: bool = True,
    sock: socket.socket | None = None,
) -> AsyncIterator[AuditedGateway]:
    """The gateway as `serve` assembles it (migrated store, started writer, `build_app(store=, audit=)`), in the
    running loop. On exit the server stops first, then the store closes (flushing the writer). Without
    `handler_cancellation` (aiohttp's default) a client that hangs up is only noticed when its answer is written.
    `sock`: a socket already bound (`bound_socket()`), when the test must know the gateway's URL beforehand."""
    with sock or bound_socket() as sock, tempfile.TemporaryDirectory(prefix="oap-audited-") as tmp:
        port: int = sock.getsockname()[1]
        values = {"GATEWAY_BASE_URL": f"http://{LOOPBACK}:{port}", "GATEWAY_PORT": port, **(settings or {})}
        values.setdefault("DATABASE_URL", database)
        loaded = load_config(config, Path(tmp), settings=values, environ=environ)
        await migrate(database)
        store = await open_store(database)
        try:
            writer = store.writer(loaded.config.audit, **(writer_options or {}))
            await writer.start()
            app = build_app(loaded, store=store, audit=writer)
            runner = GatewayRunner(
                app,
                limits=ConnectionLimits.from_settings(loaded.settings),
                events=server_events(),
                handler_cancellation=handler_cancellation,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=1.0,
            )
            await runner.setup()
            try:
                await web.SockSite(runner, sock).start()
                yield AuditedGateway(port, loaded, store, writer, app, values, environ)
            finally:
                await runner.cleanup()
        finally:
            await store.close()


# ---------------------------------------------------------------- HTTP client side


@dataclass(frozen=True)
class Answer:
    """What the client got from the gateway."""

    request_id: str
    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        try:
            document = json.loads(self.body)
        except ValueError:
            return None
        return document.get("error") if isinstance(document, dict) else None


async def send(
    http: aiohttp.ClientSession,
    url: str,
    *,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> Answer:
    """One request with a fresh `X-Request-ID` (or the given one); `body` is JSON-encoded unless `raw` is given."""
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    sent = {**ACCEPT, "X-Request-ID": request_id}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with http.request(method, url, data=data, headers=sent) as response:
        content = await response.read()
        return Answer(request_id, response.status, content, dict(response.headers))


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (to know a token's `jti` or an ID-JAG's)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def sample_values(exposition: str, sample: str, *labels: str) -> Counter[tuple[str, ...]]:
    """The values of every `sample` (e.g. `oap_requests_total`) by the given labels, parsed with prometheus-client's
    own text parser."""
    totals: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == sample:
                totals[tuple(found.labels[label] for label in labels)] += int(found.value)
    return totals


def requests_total_by_labels(exposition: str) -> Counter[tuple[str, ...]]:
    """`oap_requests_total` by (backend, agent, status)."""
    return sample_values(exposition, "oap_requests_total", "backend", "agent", "status")


# ---------------------------------------------------------------- the Okta emulator, recording


@dataclass(frozen=True)
class ReceivedTokenRequest:
    auth_server: str | None  # the custom server id, None for the org server
    form: dict[str, list[str]]
    authorization: str | None
    traceparent: str | None = None
    tracestate: str | None = None


class RecordingOktaEmulator(FaultyOktaEmulator):
    """The devkit emulator, recording every token request it received and every token it issued."""

    def __init__(self, **kwargs: Any) -> None:
        self.received: list[ReceivedTokenRequest] = []
        self.issued: list[str] = []
        super().__init__(middlewares=[self._record], **kwargs)

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if okta_endpoint(request) != "token":
            return await handler(request)
        form: dict[str, list[str]] = {}
        with contextlib.suppress(Exception):  # whatever the body is, the emulator itself answers it
            for name, value in (await request.post()).items():
                if isinstance(value, str):
                    form.setdefault(name, []).append(value)
        self.received.append(
            ReceivedTokenRequest(
                request.match_info.get("id"),
                form,
                request.headers.get("Authorization"),
                request.headers.get("traceparent"),
                request.headers.get("tracestate"),
            )
        )
        response = await handler(request)
        if isinstance(response, web.Response) and response.status == 200 and isinstance(response.body, bytes):
            token = json.loads(response.body).get("access_token")
            if isinstance(token, str):
                self.issued.append(token)
        return response

    def client_assertions(self) -> list[str]:
        return [value for seen in self.received for value in seen.form.get("client_assertion", [])]

    def id_jags(self) -> list[str]:
        """The ID-JAGs issued (step 1 answers), oldest first."""
        return [token for token in self.issued if jwt.get_unverified_header(token).get("typ") == "oauth-id-jag+jwt"]


# ---------------------------------------------------------------- a Cross App Access backend


@dataclass
class ValidatingBackend:
    """An MCP endpoint that accepts only tokens `auth_server` minted for its own URL (`resource`)."""

    idp: OktaEmulator
    auth_server: str
    resource: str = ""
    tokens_seen: list[str] = field(default_factory=list)
    request_ids_seen: list[str] = field(default_factory=list)
    traceparents_seen: list[str | None] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    reject_next: int = 0
    serve_prm: bool = False  # answer its RFC 9728 metadata (what dynamic `id_jag_mode` discovers); else 404

    async def mcp(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.tokens_seen.append(token)
        self.request_ids_seen.append(request.headers.get("X-Request-ID", ""))
        self.traceparents_seen.append(request.headers.get("traceparent"))
        try:
            kid = jwt.get_unverified_header(token)["kid"]
            key = next(k for k in self.idp.jwks(self.auth_server)["keys"] if k["kid"] == kid)
            claims = jwt.decode(
                token,
                jwt.PyJWK(key).key,
                algorithms=["RS256"],
                audience=self.resource,
                issuer=self.idp.issuer(self.auth_server),
            )
        except (jwt.PyJWTError, KeyError, StopIteration):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if self.reject_next > 0:
            self.reject_next -= 1
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        self.accepted.append(claims)
        body = await request.json()
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": {"sub": claims["sub"]}})

    async def prm(self, request: web.Request) -> web.Response:
        if not self.serve_prm:
            return web.Response(status=404)
        issuer = self.idp.issuer(self.auth_server)
        return web.json_response({"resource": self.resource, "authorization_servers": [issuer]})


@asynccontextmanager
async def validating_backend(idp: OktaEmulator, auth_server: str = BACKEND_AS) -> AsyncIterator[ValidatingBackend]:
    """A `ValidatingBackend` at `http://127.0.0.1:PORT/mcp` (its `resource`), with its metadata document at
    `/.well-known/oauth-protected-resource/mcp`."""
    backend = ValidatingBackend(idp, auth_server)
    app = web.Application()
    app.router.add_post("/mcp", backend.mcp)
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", backend.prm)
    async with serving(app) as url:
        backend.resource = f"{url}/mcp"
        yield backend


def xaa_backend(idp: OktaEmulator, url: str, *paths: str, auth_server: str = BACKEND_AS, **auth: Any) -> dict[str, Any]:
    """An `okta-cross-app` backend entry in static mode, targeting `auth_server` of the emulator."""
    auth_config: dict[str, Any] = {
        "id_jag_mode": "static",
        "target_authorization_server": idp.issuer(auth_server),
        "target_token_endpoint": idp.token_endpoint(auth_server),
        "scopes": ["backend:read"],
        **auth,
    }
    return {"url": url, "paths": list(paths), "auth_method": "okta-cross-app", "auth_config": auth_config}


# ---------------------------------------------------------------- agent keys


@dataclass(frozen=True)
class AgentKey:
    config_value: str | dict[str, Any]  # what the YAML's `private_key` holds (PEM text or a private JWK)
    public_jwk: dict[str, Any]  # what the emulator's App registers
    secrets: tuple[str, ...]  # strings that must never appear anywhere (private JWK members, PEM body lines)


def ec_agent_key(kid: str) -> AgentKey:
    key = ec.generate_private_key(ec.SECP256R1())
    private = {**json.loads(ECAlgorithm.to_jwk(key)), "kid": kid}
    public = {k: v for k, v in private.items() if k != "d"} | {"alg": "ES256", "use": "sig"}
    return AgentKey(private, public, (private["d"],))


def rsa_agent_key(kid: str) -> AgentKey:
    """An RSA key as PKCS#8 PEM; its JWK form gives the private members to look for too."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    private = json.loads(RSAAlgorithm.to_jwk(key))
    public = {"kty": "RSA", "n": private["n"], "e": private["e"], "kid": kid, "alg": "RS256", "use": "sig"}
    body_lines = tuple(line for line in pem.splitlines() if line and not line.startswith("-----"))
    members = tuple(private[name] for name in ("d", "p", "q", "dp", "dq", "qi"))
    return AgentKey(pem, public, body_lines + members)


def employees_org(
    audience: str, *, register_public_jwk: Mapping[str, Any] | None = None
) -> tuple[AgentKey, dict[str, Any]]:
    """The Okta org of the Cross App Access tests and of the docs' error scenarios, as `OktaEmulator` keyword
    arguments (users aside): the callers' AS (`GATEWAY_AS`, for `audience`), the employees backend's AS
    (`EMPLOYEES_AS`), agent `cursor`'s app with a new EC key — or `register_public_jwk`, a key the agent does not
    hold — and its Cross App Access policy. Returns the agent's key too."""
    key = ec_agent_key("cursor-key-1")
    servers = [
        AuthorizationServer(GATEWAY_AS, audience),
        AuthorizationServer(EMPLOYEES_AS, "api://employees", scopes=("employees:read",)),
    ]
    apps = [App(CURSOR_CLIENT_ID, "Cursor agent", public_jwk=dict(register_public_jwk or key.public_jwk))]
    policies = [XaaPolicy(agent_client_id=CURSOR_CLIENT_ID, audience=EMPLOYEES_AS)]
    return key, {"auth_servers": servers, "apps": apps, "xaa_policies": policies}
