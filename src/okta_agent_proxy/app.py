"""Assemble the gateway: the one place that picks concrete implementations (DESIGN.md §6).

`build_app` wires settings and config into the pipeline and an aiohttp application; `serve` runs it on one port
(several worker processes share the port through SO_REUSEPORT) until SIGTERM or SIGINT, then drains it
(`http/drain.py`) and flushes the audit queue last. Routes: `/healthz`, `/readyz`, `/metrics` (or on a
listener of its own, `METRICS_PORT`), the RFC 9728 documents, and everything else through the pipeline, which
answers unknown paths itself with the gateway's JSON 404. Every endpoint passes the edge checks first
(`edge.py`), with the rules of its kind.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from okta_agent_proxy.config.loader import LoadedConfig
from okta_agent_proxy.errors import GatewayError, NotFound
from okta_agent_proxy.gateway import Gateway, replica_id
from okta_agent_proxy.http.aiohttp_binding import Route, application
from okta_agent_proxy.http.answers import error_answer
from okta_agent_proxy.http.drain import CLOSING_SECONDS, Drain, DrainReport
from okta_agent_proxy.http.edge import OPERATIONS, PUBLIC_METADATA, Edge, EdgeRules, request_id
from okta_agent_proxy.http.interface import Answer, Endpoint, HttpRequest
from okta_agent_proxy.http.server import ConnectionLimits, GatewayRunner, ServerEvents
from okta_agent_proxy.inbound.metadata import WELL_KNOWN, protected_resource_metadata
from okta_agent_proxy.observability import tracing
from okta_agent_proxy.observability.logging import get_logger, protect_server_logs
from okta_agent_proxy.observability.metrics import (
    AUDIT_DROPPED,
    AUDIT_QUEUE_DEPTH,
    CONNECTIONS_CLOSED,
    UNREADABLE_REQUESTS,
)
from okta_agent_proxy.observability.metrics import render as render_metrics
from okta_agent_proxy.reload import ConfigReloader
from okta_agent_proxy.store.audit import AuditWriter
from okta_agent_proxy.store.config_store import save_config
from okta_agent_proxy.store.db import Store, migrate, open_store
from okta_agent_proxy.store.frontdoor import FrontDoorStore

log = get_logger(__name__)
AUDIT_GAUGE_SECONDS = 1.0  # how often each process publishes its audit queue's gauges
GATEWAY = web.AppKey("gateway", Gateway)


_CORS_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "MCP-Protocol-Version, Authorization",
    "Access-Control-Max-Age": "86400",
}


def server_events() -> ServerEvents:
    """The server's events, counted in `/metrics`."""
    return ServerEvents(lambda reason: CONNECTIONS_CLOSED.labels(reason).inc(), UNREADABLE_REQUESTS.inc)


def json_answer(document: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(document).encode(), headers or {})


def edge_checked(edge: Edge, rules: EdgeRules, endpoint: Endpoint) -> Endpoint:
    """`endpoint`, behind the edge checks for its kind (the pipeline does the same for backend routes)."""

    async def checked(request: HttpRequest) -> Answer | None:
        try:
            edge.check(request, rules)
        except GatewayError as error:
            return error_answer(error, request_id(request))
        return await endpoint(request)

    return checked


def publish_audit_gauges(audit: AuditWriter) -> None:
    AUDIT_QUEUE_DEPTH.set(audit.queue_depth)
    AUDIT_DROPPED.set(audit.dropped)


async def keep_publishing_audit_gauges(audit: AuditWriter, every: float = AUDIT_GAUGE_SECONDS) -> None:
    """Under `--workers`, a scrape sums every worker's last published gauges: each worker publishes its own."""
    while True:
        publish_audit_gauges(audit)
        await asyncio.sleep(every)


def metrics_endpoint(audit: AuditWriter | None) -> Endpoint:
    async def metrics(request: HttpRequest) -> Answer:
        if audit is not None:
            publish_audit_gauges(audit)
        body, content_type = render_metrics()
        return Answer(200, body, {"Content-Type": content_type}, content_type=None)

    return metrics


def build_app(
    loaded: LoadedConfig,
    *,
    store: Store | None = None,
    audit: AuditWriter | None = None,
    drain: Drain | None = None,
) -> web.Application:
    """The gateway as an aiohttp application; call it with an event loop running (it opens client sessions).
    `store` and `audit` (opened by the caller, which also closes them) turn on readiness checks and the audit log;
    `drain`, the process's shutdown, turns `/readyz` to 503 once it begins.
    `app[GATEWAY].reload(...)` swaps in a new config. With `METRICS_PORT` set, `/metrics` is not served here but
    by `build_metrics_app` on its own listener."""
    protect_server_logs()
    settings = loaded.settings
    front_door_store = None
    if settings.front_door:
        if store is None:
            raise ValueError("FRONT_DOOR=on needs the store")
        front_door_store = FrontDoorStore(store.engine, replica=replica_id())
    gateway = Gateway(loaded, audit=audit, front_door_store=front_door_store)
    edge = gateway.edge
    # Clients find the front door (when on) from here; else the Okta issuer whose tokens are accepted.
    authorization_server = settings.base_url if settings.front_door else settings.OKTA_ISSUER

    async def healthz(request: HttpRequest) -> Answer:
        return json_answer({"status": "ok"})

    async def readyz(request: HttpRequest) -> Answer:
        if drain is not None and drain.draining:  # first: load balancers must see it at once (DESIGN.md §9)
            return json_answer({"status": "draining"}, 503)
        checks = {"config": "loaded"}
        if gateway.validator is not None:
            checks["jwks"] = "fetched" if gateway.validator.jwks_ready else "not fetched"
        if store is not None:
            try:
                await store.ping()
                checks["store"] = "reachable"
            except Exception:  # any database failure means "not ready", whatever the driver raises
                checks["store"] = "unreachable"
        if gateway.redis is not None:  # optional: without it each process caches on its own (DESIGN.md §4)
            checks["redis"] = "reachable" if await gateway.redis.ping() else "degraded"
        if not all(value in ("loaded", "fetched", "reachable", "degraded") for value in checks.values()):
            return json_answer({"status": "not ready", "checks": checks}, 503)
        status = "degraded" if "degraded" in checks.values() else "ready"
        return json_answer({"status": status, "checks": checks})

    async def protected_resource(request: HttpRequest) -> Answer:
        """RFC 9728 §3: the document for `path`, at `/.well-known/oauth-protected-resource{path}`."""
        generation = gateway.current
        path = request.path[len(WELL_KNOWN) :]
        cors = {"Access-Control-Allow-Origin": "*"}
        if path in ("", "/"):
            document = protected_resource_metadata(settings.base_url, "", authorization_server, generation.all_scopes)
        else:
            route = generation.pipeline.routes.router.match(path)
            if route is None:
                refusal = error_answer(NotFound("no protected resource at this path"), request_id(request))
                return Answer(refusal.status, refusal.body, {**refusal.headers, **cors})
            document = protected_resource_metadata(
                settings.base_url, path, authorization_server, generation.scopes[route.name], route.name
            )
        return json_answer(document, headers={"Cache-Control": "max-age=300", **cors})

    async def cors_preflight(request: HttpRequest) -> Answer:
        return Answer(204, headers=_CORS_PREFLIGHT, content_type=None)

    routes = [
        Route("GET", "/healthz", edge_checked(edge, OPERATIONS, healthz)),
        Route("GET", "/readyz", edge_checked(edge, OPERATIONS, readyz)),
    ]
    if settings.METRICS_PORT is None:
        routes.append(Route("GET", "/metrics", edge_checked(edge, OPERATIONS, metrics_endpoint(audit))))
    if gateway.front_door is not None:
        routes += gateway.front_door.routes(edge)
    routes += [
        Route("GET", WELL_KNOWN, edge_checked(edge, PUBLIC_METADATA, protected_resource), prefix=True),
        Route("OPTIONS", WELL_KNOWN, edge_checked(edge, PUBLIC_METADATA, cors_preflight), prefix=True),
        # Every other path, a decoded CR LF included: the pipeline checks the edge itself (and audits backend routes).
        Route("*", "/", gateway.handle, prefix=True),
    ]
    app = application(
        routes, client_max_size=settings.MAX_BODY_BYTES, on_startup=gateway.start, on_cleanup=gateway.close
    )
    app[GATEWAY] = gateway
    return app


def build_metrics_app(edge: Edge, audit: AuditWriter | None) -> web.Application:
    """`/metrics` alone, for `METRICS_HOST`/`METRICS_PORT`; any other path is a JSON 404."""

    async def not_found(request: HttpRequest) -> Answer:
        return error_answer(NotFound("only /metrics is served here"), request_id(request))

    routes = [
        Route("GET", "/metrics", edge_checked(edge, OPERATIONS, metrics_endpoint(audit))),
        Route("*", "/", edge_checked(edge, OPERATIONS, not_found), prefix=True),
    ]
    return application(routes, client_max_size=1024)


# The young generation's size (objects allocated and still alive) that triggers a collection. CPython's default,
# 700, is reached every few ms under load by what requests in flight and audit events waiting for their batch hold
# for a moment: collections that found little garbage, 3-8 µs of CPU per request. At 10 000, only lasting growth
# (or cyclic garbage, bounded to that many objects) starts one. Requests leave no cycles, failed ones included
# (tests/integration/test_memory.py): a cycle through a request would hold its body until a collection.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc_for_serving() -> None:
    """Take what is alive now — modules, settings, config, the first generation — out of the cyclic collector's
    view, once, when `serve` has started (the process's choice, not the gateway's: tests embed the gateway too). A
    serving process keeps these to the end, and the steady flow of per-request objects triggers full collections
    that would otherwise re-scan all of them each time: pauses of tens of ms (the p99) and several % of the CPU
    under load. Collected first, so no garbage is kept; objects made later (requests,
    later generations) are collected as usual, once `GC_YOUNG_THRESHOLD` of them are alive."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def run_until_stopped(
    loaded: LoadedConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    migrate_store: bool = True,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then drain (`http/drain.py`: `/readyz` 503 at once, stop listening after the
    drain window, a grace for requests in flight, remaining streams ended cleanly), and flush the audit queue last,
    before the process exits."""
    database_url = loaded.settings.DATABASE_URL
    if migrate_store:
        await migrate(database_url)  # serialised across replicas inside `migrate`
    traces = tracing.start(loaded.environ, instance=replica_id())  # None unless OTEL_* turn tracing on (DESIGN.md §9)
    store = await open_store(database_url)
    audit: AuditWriter | None = None
    report: DrainReport | None = None
    try:
        if loaded.settings.AUDIT_ENABLED:
            audit = store.writer(loaded.config.audit)
            await audit.start()
        if loaded.source_hash is not None:
            await save_config(store.engine, loaded.config, file_hash=loaded.source_hash, source=loaded.source)
        drain = Drain(loaded.settings.SHUTDOWN_DRAIN_SECONDS, loaded.settings.SHUTDOWN_GRACE_SECONDS)
        app = build_app(loaded, store=store, audit=audit, drain=drain)
        report = await _serve(app, loaded, store, audit, drain, host, port, reuse_port, on_ready)
    finally:
        await store.close()  # flushes the audit queue: after the server, so that every request's row is in it
        tracing.stop(traces)  # the spans still waiting are exported (bounded by OTEL_EXPORTER_OTLP_TIMEOUT)
    if report is not None:
        log.info(
            "gateway_stopped",
            in_flight=report.in_flight,
            finished=report.in_flight - report.cut,
            cut=report.cut,
            seconds=round(report.seconds, 3),
            audit_written=audit.written if audit is not None else 0,
            audit_lost=audit.failed + audit.dropped if audit is not None else 0,
        )


async def _serve(
    app: web.Application,
    loaded: LoadedConfig,
    store: Store,
    audit: AuditWriter | None,
    drain: Drain,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[int], None] | None,
) -> DrainReport | None:
    """Serve `app` until `drain` begins (a signal), then carry the drain out; what it did (None: stopped without a
    signal, by an error or a cancellation)."""
    settings = loaded.settings
    runner = GatewayRunner(
        app,
        limits=ConnectionLimits.from_settings(settings),
        events=server_events(),
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=CLOSING_SECONDS,  # for what the drain left running: the grace is the drain's
    )
    await runner.setup()
    tune_gc_for_serving()  # after setup: the first config generation is among what is frozen
    runners = [runner]
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    if settings.METRICS_PORT is not None:
        metrics_runner = GatewayRunner(
            build_metrics_app(app[GATEWAY].edge, audit),
            limits=ConnectionLimits.from_settings(settings),
            events=server_events(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=CLOSING_SECONDS,
        )
        await metrics_runner.setup()
        runners.append(metrics_runner)
        metrics_host = settings.METRICS_HOST or host
        await web.TCPSite(metrics_runner, metrics_host, settings.METRICS_PORT, reuse_port=reuse_port).start()
        log.info("metrics_listening", host=metrics_host, port=settings.METRICS_PORT)
    log.info("gateway_listening", host=host, port=bound_port, backends=sorted(loaded.config.backends))
    if on_ready is not None:
        on_ready(bound_port)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, drain.begin, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, lambda: drain.begin("SIGINT", window=False))  # by hand: no balancer
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
    gauges = asyncio.ensure_future(keep_publishing_audit_gauges(audit)) if audit is not None else None

    async def stop_reloading() -> None:
        """No reload from now on, and none still building a generation (its pools would outlive the clean-up)."""
        loop.remove_signal_handler(signal.SIGHUP)
        running: set[asyncio.Future[Any]] = {*tasks, *([watcher] if watcher is not None else [])}
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    try:
        await drain.requested()
        await stop_reloading()  # the config the drain began with is the one it ends with
        return await drain.run(runner)  # /metrics stays up meanwhile
    finally:
        await stop_reloading()
        if gauges is not None:
            gauges.cancel()
        if not drain.draining:  # no signal: an error or a cancellation, and no drain
            await runner.cleanup()
        for each in runners[1:]:
            await each.cleanup()
