"""Assemble the gateway: the one place that picks concrete implementations (DESIGN.md §6).

`build_app` wires settings and config into the pipeline and an aiohttp application; `serve` runs it on one port
(several worker processes share the port through SO_REUSEPORT). Routes: `/healthz`, `/readyz`, and everything
else through the pipeline, which answers unknown paths itself with the gateway's JSON 404.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from okta_agent_proxy.config_loader import LoadedConfig
from okta_agent_proxy.errors import GatewayError, NotFound, UnreadableRequest
from okta_agent_proxy.gateway import Gateway
from okta_agent_proxy.inbound.metadata import WELL_KNOWN, protected_resource_metadata
from okta_agent_proxy.observability.logging import get_logger, protect_server_logs
from okta_agent_proxy.observability.metrics import AUDIT_DROPPED, AUDIT_QUEUE_DEPTH
from okta_agent_proxy.observability.metrics import render as render_metrics
from okta_agent_proxy.pipeline import check_edge, error_response
from okta_agent_proxy.reload import ConfigReloader
from okta_agent_proxy.store.audit import AuditWriter
from okta_agent_proxy.store.config_store import save_config
from okta_agent_proxy.store.db import Store, migrate, open_store

log = get_logger(__name__)
SHUTDOWN_GRACE_SECONDS = 10.0
GATEWAY = web.AppKey("gateway", Gateway)


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, except for the answer to a request its HTTP parser refuses (an oversized or
    malformed header, a bad request line): aiohttp's text quotes the offending bytes — the start of an oversized
    `Authorization` header, say — where the gateway's JSON error body says what happened and quotes nothing."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)  # logs (without content) and closes
        if not 400 <= status < 500:
            return response
        error = UnreadableRequest("the request could not be read as HTTP")
        replacement = web.Response(status=status, body=error.body_bytes(), content_type="application/json")
        replacement.force_close()
        return replacement


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections are `_GatewayRequestHandler`s (aiohttp offers no setting for the body of
    its parse-error answers; the server it builds is given the subclass that makes them)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GatewayServer
        return server


def build_app(loaded: LoadedConfig, *, store: Store | None = None, audit: AuditWriter | None = None) -> web.Application:
    """The gateway as an aiohttp application; call it with an event loop running (it opens client sessions).
    `store` and `audit` (opened by the caller, which also closes them) turn on readiness checks and the audit log.
    `app[GATEWAY].reload(...)` swaps in a new config."""
    protect_server_logs()
    settings = loaded.settings
    gateway = Gateway(loaded, audit=audit)
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

    async def metrics(request: web.Request) -> web.Response:
        if audit is not None:
            AUDIT_QUEUE_DEPTH.set(audit.queue_depth)
            AUDIT_DROPPED.set(audit.dropped)
        body, content_type = render_metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def protected_resource(request: web.Request) -> web.Response:
        """RFC 9728 §3: the document for `path`, at `/.well-known/oauth-protected-resource{path}`."""
        try:
            check_edge(request, settings)
        except GatewayError as error:
            return error_response(error, "-")
        generation = gateway.current
        path = request.match_info["path"]
        if path in ("", "/"):
            document = protected_resource_metadata(settings.base_url, "", settings.OKTA_ISSUER, generation.all_scopes)
        else:
            route = generation.pipeline.router.match(path)
            if route is None:
                return error_response(NotFound("no protected resource at this path"), "-")
            document = protected_resource_metadata(
                settings.base_url, path, settings.OKTA_ISSUER, generation.scopes[route.name], route.name
            )
        return web.json_response(document, headers={"Cache-Control": "max-age=300"})

    async def on_startup(app: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(app: web.Application) -> None:
        await gateway.close()

    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get(WELL_KNOWN + "{path:.*}", protected_resource, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", gateway.handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
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
        await _serve(app, loaded, store, host, port, reuse_port, on_ready)
    finally:
        await store.close()


async def _serve(
    app: web.Application,
    loaded: LoadedConfig,
    store: Store,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[int], None] | None,
) -> None:
    runner = GatewayRunner(
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
        await runner.cleanup()
