"""Assemble the gateway: the one place that picks concrete implementations (DESIGN.md §6).

`build_app` wires settings and config into the pipeline and an aiohttp application; `serve` runs it on one port
(several worker processes share the port through SO_REUSEPORT). Routes: `/healthz`, `/readyz`, and everything
else through the pipeline, which answers unknown paths itself with the gateway's JSON 404.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable

import aiohttp
from aiohttp import web

from okta_agent_proxy.config import (
    Backend,
    CrossAppBackend,
    GatewayConfig,
    PreSharedKeyBackend,
    ServiceAccountBackend,
)
from okta_agent_proxy.config_loader import LoadedConfig
from okta_agent_proxy.errors import GatewayError, NotFound
from okta_agent_proxy.inbound.agents import AgentDirectory
from okta_agent_proxy.inbound.jwks import JwksCache
from okta_agent_proxy.inbound.metadata import WELL_KNOWN, protected_resource_metadata
from okta_agent_proxy.inbound.validator import OktaTokenValidator
from okta_agent_proxy.mcp.forward import Forwarder, UpstreamPool
from okta_agent_proxy.mcp.sessions import SessionBindings
from okta_agent_proxy.observability.logging import get_logger, protect_server_logs
from okta_agent_proxy.observability.metrics import render as render_metrics
from okta_agent_proxy.observability.recorder import AuditSink, RequestRecorder
from okta_agent_proxy.outbound import static
from okta_agent_proxy.outbound.base import CredentialProvider
from okta_agent_proxy.outbound.cache import CachingProvider
from okta_agent_proxy.outbound.cross_app import CrossAppProvider
from okta_agent_proxy.outbound.discovery import AuthServerDiscovery
from okta_agent_proxy.outbound.oauth_client import TokenEndpointClient
from okta_agent_proxy.pipeline import InboundIdentity, Pipeline, check_edge, error_response
from okta_agent_proxy.routing import BackendRouter

log = get_logger(__name__)
SHUTDOWN_GRACE_SECONDS = 10.0
_STARTUP_TASKS = web.AppKey("startup_tasks", list[asyncio.Future[None]])


async def _warm_jwks(inbound: InboundIdentity) -> None:
    try:
        await inbound.validator.warm()
    except Exception as exc:  # logged, not fatal: the gateway answers 503 until the IdP is back
        log.warning("jwks_warmup_failed", reason=type(exc).__name__)


def credential_provider(
    name: str, backend: Backend, loaded: LoadedConfig, client: TokenEndpointClient, discovery: AuthServerDiscovery
) -> CredentialProvider:
    if isinstance(backend, PreSharedKeyBackend):
        return static.pre_shared_key(backend.auth_config)
    if isinstance(backend, ServiceAccountBackend):
        return static.service_account(backend.auth_config)
    assert isinstance(backend, CrossAppBackend)
    settings = loaded.settings
    if not settings.OKTA_DOMAIN or not settings.OKTA_ISSUER:
        return static.UnavailableProvider(
            "okta-cross-app", "Cross App Access needs OKTA_DOMAIN and OKTA_ISSUER, which are not set"
        )
    return CachingProvider(
        CrossAppProvider(
            name, backend, loaded.config.agents, okta_domain=settings.OKTA_DOMAIN, client=client, discovery=discovery
        )
    )


def build_inbound(loaded: LoadedConfig, idp_session: aiohttp.ClientSession) -> InboundIdentity | None:
    settings = loaded.settings
    if not settings.OKTA_ISSUER:
        return None
    jwks = JwksCache(idp_session, settings.OKTA_ISSUER, settings.OKTA_JWKS_URI)
    return InboundIdentity(
        validator=OktaTokenValidator(
            jwks, settings.OKTA_ISSUER, settings.audiences, leeway=settings.JWT_LEEWAY_SECONDS
        ),
        agents=AgentDirectory(loaded.config.agents, mode=settings.AGENT_IDENTIFICATION),
        sessions=SessionBindings(),
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
    """The scopes a caller may need for each backend: its agents' scopes, its own and its methods'."""
    result = {}
    for name, backend in config.backends.items():
        scopes = set(backend.required_scopes)
        for method_scopes in backend.method_scopes.values():
            scopes.update(method_scopes)
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
    inbound: InboundIdentity | None,
    idp_session: aiohttp.ClientSession,
    audit: AuditSink | None = None,
) -> Pipeline:
    config: GatewayConfig = loaded.config
    client = TokenEndpointClient(idp_session)
    discovery = AuthServerDiscovery(client)
    return Pipeline(
        inbound=inbound,
        settings=loaded.settings,
        router=BackendRouter(config),
        providers={
            name: credential_provider(name, backend, loaded, client, discovery)
            for name, backend in config.backends.items()
        },
        forwarder=Forwarder(pool),
        recorder=RequestRecorder(audit, replica=replica_id(), record_arguments=config.audit.record_arguments),
        extra_headers={
            name: frozenset(h.lower() for h in backend.forward_headers) for name, backend in config.backends.items()
        },
    )


def build_app(loaded: LoadedConfig) -> web.Application:
    """The gateway as an aiohttp application; call it with an event loop running (it opens client sessions)."""
    protect_server_logs()
    settings = loaded.settings
    pool = UpstreamPool(loaded.config.backends)
    idp_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    inbound = build_inbound(loaded, idp_session)
    pipeline = build_pipeline(loaded, pool, inbound, idp_session)
    scopes = scopes_by_backend(loaded.config)
    all_scopes = frozenset().union(*scopes.values())
    app = web.Application(client_max_size=settings.MAX_BODY_BYTES)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks = {"config": "loaded"}
        if inbound is not None:
            checks["jwks"] = "fetched" if inbound.validator.jwks_ready else "not fetched"
        ready = all(value in ("loaded", "fetched") for value in checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
        )

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render_metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def protected_resource(request: web.Request) -> web.Response:
        """RFC 9728 §3: the document for `path`, at `/.well-known/oauth-protected-resource{path}`."""
        try:
            check_edge(request, settings)
        except GatewayError as error:
            return error_response(error, "-")
        path = request.match_info["path"]
        if path in ("", "/"):
            document = protected_resource_metadata(settings.base_url, "", settings.OKTA_ISSUER, all_scopes)
        else:
            route = pipeline.router.match(path)
            if route is None:
                return error_response(NotFound("no protected resource at this path"), "-")
            document = protected_resource_metadata(
                settings.base_url, path, settings.OKTA_ISSUER, scopes[route.name], route.name
            )
        return web.json_response(document, headers={"Cache-Control": "max-age=300"})

    async def on_startup(app: web.Application) -> None:
        await pool.start()
        if inbound is not None:
            # Fetch the keys now so the first request does not wait and /readyz turns ready; failures are retried
            # on demand by the first request that needs a key.
            app[_STARTUP_TASKS].append(asyncio.ensure_future(_warm_jwks(inbound)))

    async def on_cleanup(app: web.Application) -> None:
        for task in app[_STARTUP_TASKS]:
            task.cancel()
        await pool.close()
        await idp_session.close()

    app[_STARTUP_TASKS] = []
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get(WELL_KNOWN + "{path:.*}", protected_resource, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", pipeline.handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def run_until_stopped(
    loaded: LoadedConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting and give in-flight requests a grace period."""
    app = build_app(loaded)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    log.info("gateway_listening", host=host, port=bound_port, backends=sorted(loaded.config.backends))
    if on_ready is not None:
        on_ready(bound_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gateway_stopping")
        await runner.cleanup()
