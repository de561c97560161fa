"""The running gateway: its long-lived parts, and the config-dependent parts rebuilt on every reload.

Long-lived (one per process): the IdP HTTP session, the token validator with its JWKS and verified-token caches,
MCP session bindings, the audit writer, the open-stream counts and the rate-limit buckets (a reload changes the
budgets' sizes, never how much of them is spent). Per config *generation*: the routing table, the agents, the
credential providers (and their caches) and the upstream connection pools. A reload builds a new generation and
swaps it in; requests already running finish on the generation they started with, whose pools close when its last
request ends — so a reload drops nothing in flight. A config that does not load is refused and the old one keeps
serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from okta_agent_proxy.config.loader import LoadedConfig
from okta_agent_proxy.config.models import (
    Backend,
    CrossAppBackend,
    GatewayConfig,
    PreSharedKeyBackend,
    ServiceAccountBackend,
)
from okta_agent_proxy.frontdoor.service import FrontDoor, cross_app_auth
from okta_agent_proxy.http.edge import Edge
from okta_agent_proxy.http.interface import Answer, HttpRequest
from okta_agent_proxy.inbound.agents import AgentDirectory
from okta_agent_proxy.inbound.caller import Identity
from okta_agent_proxy.inbound.jwks import JwksCache
from okta_agent_proxy.inbound.validator import OktaTokenValidator
from okta_agent_proxy.mcp.forward import Forwarder, UpstreamPool
from okta_agent_proxy.mcp.sessions import SessionSeal, session_keys
from okta_agent_proxy.mcp.stream_slots import StreamSlots
from okta_agent_proxy.observability import tracing
from okta_agent_proxy.observability.audit_log import AuditObserver, AuditSink
from okta_agent_proxy.observability.logging import get_logger
from okta_agent_proxy.observability.metrics import JWKS_REFRESHES, RATE_LIMITED, REDIS_ERRORS
from okta_agent_proxy.observability.request_log import RequestLogObserver
from okta_agent_proxy.observability.request_metrics import MetricsObserver
from okta_agent_proxy.observability.tracing import TracingObserver
from okta_agent_proxy.outbound import static
from okta_agent_proxy.outbound.base import CredentialProvider
from okta_agent_proxy.outbound.cache import CachingProvider
from okta_agent_proxy.outbound.cross_app import CrossAppProvider, FrontDoorLogins
from okta_agent_proxy.outbound.discovery import AuthServerDiscovery
from okta_agent_proxy.outbound.oauth_client import TokenEndpointClient
from okta_agent_proxy.outbound.shared_cache import SharedCredentials, cache_keys
from okta_agent_proxy.pipeline import Pipeline, Upstream
from okta_agent_proxy.policy.authz import Decisions
from okta_agent_proxy.policy.rate_limits import RateLimiter, RequestLimits
from okta_agent_proxy.record import Observer, Observers
from okta_agent_proxy.routing import BackendRouter, RouteTable
from okta_agent_proxy.store.frontdoor import FrontDoorStore
from okta_agent_proxy.store.redis import RedisLink

log = get_logger(__name__)


async def _warm_jwks(validator: OktaTokenValidator) -> None:
    try:
        await validator.warm()
    except Exception as exc:  # logged, not fatal: the gateway answers 503 until the IdP is back
        log.warning("jwks_warmup_failed", reason=type(exc).__name__)


def credential_provider(
    name: str,
    backend: Backend,
    loaded: LoadedConfig,
    client: TokenEndpointClient,
    discovery: AuthServerDiscovery,
    shared: SharedCredentials | None = None,
    front_door: FrontDoorLogins | None = None,
) -> CredentialProvider:
    if isinstance(backend, PreSharedKeyBackend):
        return static.pre_shared_key(backend.auth_config)
    if isinstance(backend, ServiceAccountBackend):
        return static.service_account(backend.auth_config)
    assert isinstance(backend, CrossAppBackend)
    settings = loaded.settings
    if not settings.OKTA_DOMAIN or not settings.authenticates:
        return static.UnavailableProvider(
            "okta-cross-app", "Cross App Access needs OKTA_DOMAIN, and OKTA_ISSUER or the front door"
        )
    return CachingProvider(
        CrossAppProvider(
            name,
            backend,
            loaded.config.agents,
            okta_domain=settings.OKTA_DOMAIN,
            client=client,
            discovery=discovery,
            front_door=front_door,
        ),
        shared=shared,
        namespace=credential_namespace(name, backend, loaded.config),
    )


def credential_namespace(name: str, backend: Backend, config: GatewayConfig) -> str:
    """What a backend's cached credentials depend on besides their key: its YAML and that of the agents that may
    reach it, private keys aside (a digest; pydantic masks the secrets it holds anyway)."""
    agents = {
        agent_name: agent.model_dump(mode="json", exclude={"private_key"})
        for agent_name, agent in config.agents.items()
        if name in agent.backend_access
    }
    text = json.dumps([backend.model_dump(mode="json"), agents], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def build_validator(loaded: LoadedConfig, idp_session: aiohttp.ClientSession) -> OktaTokenValidator | None:
    settings = loaded.settings
    if not settings.OKTA_ISSUER:
        return None
    jwks = JwksCache(
        idp_session,
        settings.OKTA_ISSUER,
        settings.OKTA_JWKS_URI,
        on_fetch=lambda result: JWKS_REFRESHES.labels(result).inc(),
    )
    return OktaTokenValidator(
        jwks, settings.OKTA_ISSUER, accepted_audiences(loaded), leeway=settings.JWT_LEEWAY_SECONDS
    )


def accepted_audiences(loaded: LoadedConfig) -> tuple[str, ...]:
    """`OKTA_AUDIENCE` when set; else the gateway's URL and every backend route's resource URL — what the metadata
    advertises, so a client that asks its AS for the advertised `resource` (RFC 8707) gets an accepted token."""
    settings = loaded.settings
    if settings.OKTA_AUDIENCE:
        return settings.audiences
    base = settings.base_url
    routes = (base + path for backend in loaded.config.backends.values() for path in backend.paths if path != "/")
    return (base, *dict.fromkeys(routes))


def scopes_by_backend(config: GatewayConfig) -> dict[str, frozenset[str]]:
    """The scopes a caller may need for each backend: its agents' scopes, its own, its methods' and its tools'."""
    result = {}
    for name, backend in config.backends.items():
        scopes = set(backend.required_scopes)
        for method_scopes in backend.method_scopes.values():
            scopes.update(method_scopes)
        for tool_scopes in backend.tool_scopes.values():  # step-up scopes (DESIGN.md §7): a client may ask for them
            scopes.update(tool_scopes)
        for agent in config.agents.values():
            if name in agent.backend_access:
                scopes.update(agent.scopes)
        result[name] = frozenset(scopes)
    return result


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def build_pipeline(
    loaded: LoadedConfig,
    pool: UpstreamPool,
    identity: Identity | None,
    sessions: SessionSeal,
    idp_session: aiohttp.ClientSession,
    edge: Edge,
    stream_slots: StreamSlots,
    audit: AuditSink | None = None,
    shared: SharedCredentials | None = None,
    front_door: FrontDoorLogins | None = None,
    rate_limiter: RateLimiter | None = None,
) -> Pipeline:
    config: GatewayConfig = loaded.config
    client = TokenEndpointClient(idp_session)
    discovery = AuthServerDiscovery(client)
    observers: list[Observer] = [MetricsObserver(), RequestLogObserver()]
    tracer = tracing.tracer()
    if tracer is not None:  # after the request line (which logs the trace id), before the audit (which may wait)
        observers.append(TracingObserver(tracer))
    if audit is not None:
        observers.append(AuditObserver(audit, replica=replica_id(), record_arguments=config.audit.record_arguments))
    return Pipeline(
        settings=loaded.settings,
        routes=RouteTable(BackendRouter(config)),
        edge=edge,
        identity=identity,
        sessions=sessions,
        decisions=Decisions(),
        upstreams={
            name: Upstream(
                credential_provider(name, backend, loaded, client, discovery, shared, front_door),
                frozenset(h.lower() for h in backend.forward_headers),
            )
            for name, backend in config.backends.items()
        },
        forwarder=Forwarder(pool),
        stream_slots=stream_slots,
        stream_limits=config.rate_limits.streams,
        observers=Observers(observers),
        request_limits=request_limits(config, rate_limiter or RateLimiter()),
    )


def request_limits(config: GatewayConfig, limiter: RateLimiter) -> RequestLimits | None:
    """This generation's request budgets over the process's buckets; None when it sets none (the request path then
    does no rate-limit work)."""
    if not config.rate_limits.limits_requests:
        return None
    return RequestLimits(config.rate_limits, limiter, lambda backend, agent: RATE_LIMITED.labels(backend, agent).inc())


@dataclass
class Generation:
    loaded: LoadedConfig
    pool: UpstreamPool
    pipeline: Pipeline
    scopes: dict[str, frozenset[str]]
    all_scopes: frozenset[str]
    active: int = 0
    retired: bool = False


class Gateway:
    """Serves requests with the current generation; `reload` replaces it."""

    def __init__(
        self, loaded: LoadedConfig, *, audit: AuditSink | None = None, front_door_store: FrontDoorStore | None = None
    ) -> None:
        self.settings = loaded.settings
        self._audit = audit
        self._idp_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self.validator = build_validator(loaded, self._idp_session)
        self.edge = Edge(loaded.settings)
        self.stream_slots = StreamSlots()  # open streams outlive a reload: counted across generations
        keys = session_keys(loaded.settings)
        self._sessions = SessionSeal(keys)
        self.redis: RedisLink | None = None
        self._shared: SharedCredentials | None = None
        if loaded.settings.REDIS_URL:
            self.redis = RedisLink(loaded.settings.REDIS_URL, on_error=lambda op: REDIS_ERRORS.labels(op).inc())
            self._shared = SharedCredentials(self.redis, cache_keys(keys))
        # Like the stream counts, the buckets outlive a reload: each generation brings only the budgets' sizes.
        self.rate_limiter = RateLimiter(self.redis)
        self._background: set[asyncio.Future[None]] = set()
        self.front_door: FrontDoor | None = None
        self._front_door_logins: FrontDoorLogins | None = None
        if loaded.settings.front_door:
            if front_door_store is None:
                raise ValueError("the front door needs the store")
            self.front_door = FrontDoor(
                loaded.settings,
                front_door_store,
                self._idp_session,
                lambda: self.current.loaded.config,
                self._backend_of,
                limiter=self.rate_limiter,
                redis=self.redis,
            )
            self._front_door_logins = FrontDoorLogins(self.front_door.held, cross_app_auth(loaded.settings))
        self.current = self._generation(loaded)

    def _backend_of(self, path: str) -> str | None:
        route = self.current.pipeline.routes.router.match(path)
        return route.name if route is not None else None

    def _generation(self, loaded: LoadedConfig) -> Generation:
        identity = None
        if self.validator is not None or self.front_door is not None:
            agents = AgentDirectory(
                loaded.config.agents, mode=self.settings.AGENT_IDENTIFICATION, front_door=loaded.config.front_door
            )
            identity = Identity(self.validator, agents, self.front_door)
        pool = UpstreamPool(loaded.config.backends, call_connections=self.settings.max_connections)
        scopes = scopes_by_backend(loaded.config)
        pipeline = build_pipeline(
            loaded,
            pool,
            identity,
            self._sessions,
            self._idp_session,
            self.edge,
            self.stream_slots,
            self._audit,
            self._shared,
            self._front_door_logins,
            self.rate_limiter,
        )
        return Generation(loaded, pool, pipeline, scopes, frozenset().union(*scopes.values()))

    async def start(self) -> None:
        await self.current.pool.start()
        if self.validator is not None:
            # Fetch the keys now so the first request does not wait and /readyz turns ready; a failure is retried on
            # demand by the first request that needs a key.
            self._spawn(_warm_jwks(self.validator))
        if self._shared is not None:
            self._spawn(self._shared.listen())
        if self.front_door is not None:
            await self.front_door.start()
            self._spawn(self.front_door.keep_pruning())
            if self.redis is not None:
                self._spawn(self.front_door.liveness.listen())

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await self.current.pool.close()
        await self._idp_session.close()
        if self.redis is not None:
            await self.redis.close()

    async def handle(self, request: HttpRequest) -> Answer | None:
        generation = self.current
        generation.active += 1
        try:
            return await generation.pipeline.handle(request)
        finally:
            generation.active -= 1
            if generation.retired and generation.active == 0:
                self._spawn(generation.pool.close())

    async def reload(self, loaded: LoadedConfig) -> None:
        """Swap in a new generation built from `loaded` (already validated)."""
        generation = self._generation(loaded)
        await generation.pool.start()
        old, self.current = self.current, generation
        if self.front_door is not None:
            self.front_door.reloaded()
        if self.validator is not None:
            self.validator.set_audiences(accepted_audiences(loaded))
        if self._audit is not None:
            self._audit.reconfigure(loaded.config.audit)
        old.retired = True
        if old.active == 0:
            await old.pool.close()
        log.info("config_reloaded", backends=sorted(loaded.config.backends), agents=sorted(loaded.config.agents))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
