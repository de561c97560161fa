"""Assemble the gateway: the one place that picks concrete implementations (DESIGN.md §6).

`build_app` wires settings and config into the pipeline and an aiohttp application; `serve` runs it on one port
(several worker processes share the port through SO_REUSEPORT). Routes: `/healthz`, `/readyz`, `/metrics` (or on a
listener of its own, `METRICS_PORT`), the RFC 9728 documents, and everything else through the pipeline, which
answers unknown paths itself with the gateway's JSON 404. Every endpoint passes the edge checks first
(`edge.py`), with the rules of its kind.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from okta_agent_proxy.config.loader import LoadedConfig
from okta_agent_proxy.errors import GatewayError, NotFound
from okta_agent_proxy.gateway import Gateway
from okta_agent_proxy.http.edge import OPERATIONS, PUBLIC_METADATA, Edge, EdgeRules, request_id
from okta_agent_proxy.http.server import ConnectionLimits, GatewayRunner
from okta_agent_proxy.inbound.metadata import WELL_KNOWN, protected_resource_metadata
from okta_agent_proxy.observability.logging import get_logger, protect_server_logs
from okta_agent_proxy.observability.metrics import AUDIT_DROPPED, AUDIT_QUEUE_DEPTH
from okta_agent_proxy.observability.metrics import render as render_metrics
from okta_agent_proxy.pipeline import error_response
from okta_agent_proxy.reload import ConfigReloader
from okta_agent_proxy.store.audit import AuditWriter
from okta_agent_proxy.store.config_store import save_config
from okta_agent_proxy.store.db import Store, migrate, open_store

log = get_logger(__name__)
SHUTDOWN_GRACE_SECONDS = 10.0
GATEWAY = web.AppKey("gateway", Gateway)


Endpoint = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CORS_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "MCP-Protocol-Version, Authorization",
    "Access-Control-Max-Age": "86400",
}


def edge_checked(edge: Edge, rules: EdgeRules, endpoint: Endpoint) -> Endpoint:
    """`endpoint`, behind the edge checks for its kind (the pipeline does the same for backend routes)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        try:
            edge.check(request, rules)
        except GatewayError as error:
            return error_response(error, request_id(request))
        return await endpoint(request)

    return checked


def metrics_endpoint(audit: AuditWriter | None) -> Endpoint:
    async def metrics(request: web.Request) -> web.Response:
        if audit is not None:
            AUDIT_QUEUE_DEPTH.set(audit.queue_depth)
            AUDIT_DROPPED.set(audit.dropped)
        body, content_type = render_metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


def build_app(loaded: LoadedConfig, *, store: Store | None = None, audit: AuditWriter | None = None) -> web.Application:
    """The gateway as an aiohttp application; call it with an event loop running (it opens client sessions).
    `store` and `audit` (opened by the caller, which also closes them) turn on readiness checks and the audit log.
    `app[GATEWAY].reload(...)` swaps in a new config. With `METRICS_PORT` set, `/metrics` is not served here but
    by `build_metrics_app` on its own listener."""
    protect_server_logs()
    settings = loaded.settings
    gateway = Gateway(loaded, audit=audit)
    edge = gateway.edge
    app = web.Application(client_max_size=settings.MAX_BODY_BYTES)
    app[GATEWAY] = gateway

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks = {"config": "loaded"}
        if gateway.validator is not None:
            checks["jwks"] = "fetched" if gateway.validator.jwks_ready else "not fetched"
        if store is not None:
            try:
                await store.ping()
                checks["store"] = "reachable"
            except Exception:  # any database failure means "not ready", whatever the driver raises
                checks["store"] = "unreachable"
        ready = all(value in ("loaded", "fetched", "reachable") for value in checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
        )

    async def protected_resource(request: web.Request) -> web.Response:
        """RFC 9728 §3: the document for `path`, at `/.well-known/oauth-protected-resource{path}`."""
        generation = gateway.current
        path = request.match_info["path"]
        cors = {"Access-Control-Allow-Origin": "*"}
        if path in ("", "/"):
            document = protected_resource_metadata(settings.base_url, "", settings.OKTA_ISSUER, generation.all_scopes)
        else:
            route = generation.pipeline.router.match(path)
            if route is None:
                response = error_response(NotFound("no protected resource at this path"), request_id(request))
                response.headers.update(cors)
                return response
            document = protected_resource_metadata(
                settings.base_url, path, settings.OKTA_ISSUER, generation.scopes[route.name], route.name
            )
        return web.json_response(document, headers={"Cache-Control": "max-age=300", **cors})

    async def cors_preflight(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=_CORS_PREFLIGHT)

    async def on_startup(app: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(app: web.Application) -> None:
        await gateway.close()

    app.router.add_get("/healthz", edge_checked(edge, OPERATIONS, healthz), allow_head=False)
    app.router.add_get("/readyz", edge_checked(edge, OPERATIONS, readyz), allow_head=False)
    if settings.METRICS_PORT is None:
        app.router.add_get("/metrics", edge_checked(edge, OPERATIONS, metrics_endpoint(audit)), allow_head=False)
    well_known = WELL_KNOWN + "{path:[\\s\\S]*}"
    app.router.add_get(well_known, edge_checked(edge, PUBLIC_METADATA, protected_resource), allow_head=False)
    app.router.add_route("OPTIONS", well_known, edge_checked(edge, PUBLIC_METADATA, cors_preflight))
    # Every other path, a decoded CR LF included: the pipeline checks the edge itself (and audits backend routes).
    app.router.add_route("*", "/{tail:[\\s\\S]*}", gateway.handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def build_metrics_app(edge: Edge, audit: AuditWriter | None) -> web.Application:
    """`/metrics` alone, for `METRICS_HOST`/`METRICS_PORT`; any other path is a JSON 404."""
    app = web.Application()

    async def not_found(request: web.Request) -> web.Response:
        return error_response(NotFound("only /metrics is served here"), request_id(request))

    app.router.add_get("/metrics", edge_checked(edge, OPERATIONS, metrics_endpoint(audit)), allow_head=False)
    app.router.add_route("*", "/{tail:[\\s\\S]*}", edge_checked(edge, OPERATIONS, not_found))
    return app


async def run_until_stopped(
    loaded: LoadedConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    migrate_store: bool = True,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, give in-flight requests a grace period, and flush the
    audit queue before the process exits."""
    database_url = loaded.settings.DATABASE_URL
    if migrate_store:
        await migrate(database_url)  # serialised across replicas inside `migrate`
    store = await open_store(database_url)
    try:
        audit: AuditWriter | None = None
        if loaded.settings.AUDIT_ENABLED:
            audit = store.writer(loaded.config.audit)
            await audit.start()
        if loaded.source_hash is not None:
            await save_config(store.engine, loaded.config, file_hash=loaded.source_hash, source=loaded.source)
        app = build_app(loaded, store=store, audit=audit)
        await _serve(app, loaded, store, audit, host, port, reuse_port, on_ready)
    finally:
        await store.close()


async def _serve(
    app: web.Application,
    loaded: LoadedConfig,
    store: Store,
    audit: AuditWriter | None,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[int], None] | None,
) -> None:
    settings = loaded.settings
    runner = GatewayRunner(
        app,
        limits=ConnectionLimits.from_settings(settings),
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    runners = [runner]
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    if settings.METRICS_PORT is not None:
        metrics_runner = GatewayRunner(
            build_metrics_app(app[GATEWAY].edge, audit),
            limits=ConnectionLimits.from_settings(settings),
            handle_signals=False,
            access_log=None,
        )
        await metrics_runner.setup()
        runners.append(metrics_runner)
        metrics_host = settings.METRICS_HOST or host
        await web.TCPSite(metrics_runner, metrics_host, settings.METRICS_PORT, reuse_port=reuse_port).start()
        log.info("metrics_listening", host=metrics_host, port=settings.METRICS_PORT)
    log.info("gateway_listening", host=host, port=bound_port, backends=sorted(loaded.config.backends))
    if on_ready is not None:
        on_ready(bound_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Future[bool]] = set()
    watcher = None
    if loaded.source is not None:
        reloader = ConfigReloader(app[GATEWAY], loaded, store)

        def on_sighup() -> None:
            task = asyncio.ensure_future(reloader.reload("SIGHUP"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        watcher = asyncio.ensure_future(reloader.watch())
    try:
        await stop.wait()
    finally:
        log.info("gateway_stopping")
        if watcher is not None:
            watcher.cancel()
        for each in reversed(runners):
            await each.cleanup()
