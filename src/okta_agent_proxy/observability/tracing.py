"""Traces (DESIGN.md §9): OpenTelemetry, configured only by the standard `OTEL_*` variables, exported over OTLP/HTTP.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, unless
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK reads the rest itself: the sampler
(`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; default `parentbased_always_on`), the resource
(`OTEL_SERVICE_NAME`, default `okta-agent-proxy`; `OTEL_RESOURCE_ATTRIBUTES`), the exporter's headers, timeout and
compression, and the batch processor's queue (`OTEL_BSP_*`). Values in the `.env` file count as if exported (the
environment wins). Off, nothing of the SDK is imported or runs: no provider, no exporter thread, no span.

A request on a backend route is one SERVER span — continuing the caller's W3C `traceparent` when it sent exactly one
valid header — with a child per step of the pipeline: `authenticate` (the token and the agent; a JWKS fetch inside
it is a client span), `credential` (each round trip to Okta or an authorization server inside it is a client span of
its own, named after its grant) and `upstream` (a CLIENT span: the backend receives a `traceparent` naming it, in
place of the caller's). Attributes say which backend, agent, MCP method, tool, status and outcome — never a token, a
credential, a session id or an argument. The trace id is bound to the request's log lines (structlog context
variables) and written to its audit row. A request the sampler leaves out gets its (non-recording) server span only:
its trace id is logged and audited all the same, and the backend's `traceparent` names that span, unsampled — the
step spans would record nothing, and would cost most of what tracing costs such a request.

The SDK's own context (`opentelemetry.context`) carries the current step's span from the observer to the token
client without either knowing the other: attached when a step starts, detached when it ends, in the request's task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import structlog

from okta_agent_proxy.record import Headers, MutableHeaders, Observer, RequestRecord

if TYPE_CHECKING:  # the SDK is imported only when tracing is on
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = structlog.get_logger(__name__)
SERVICE_NAME = "okta-agent-proxy"
MAX_ATTRIBUTE_LENGTH = 1024  # unless OTEL_*ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise: the SDK has no default
_LENGTH_LIMITS = ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")
MAX_NAME_LENGTH = 256  # an MCP method or tool name as a span attribute (the body bounds them only by its size)
MAX_TRACESTATE_LENGTH = 512  # W3C: 32 members of up to 256 characters; vendors propagate 512 and drop the rest
HTTP_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})  # others: `_OTHER`
_tracer: Tracer | None = None  # the process's, while tracing is on (`start`); the token client reads it


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether these variables turn tracing on (see the module's docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def start(environ: Mapping[str, str], *, instance: str | None = None) -> TracerProvider | None:
    """Start tracing for this process if `environ` (the `.env` file's variables under the real environment) turns it
    on: a tracer provider with a batch OTLP/HTTP exporter. Returns it, for `stop`; None when tracing is off."""
    global _tracer
    for name, value in environ.items():  # the SDK reads os.environ: let it see the .env file's OTEL_* too
        if name.startswith("OTEL_"):
            os.environ.setdefault(name, value)
    if not enabled(os.environ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in (None, "", "http/protobuf"):
        log.warning("otel_protocol_unsupported", protocol=protocol[:40], using="http/protobuf")
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name != "otlp":
        log.warning("otel_exporter_unsupported", exporter=exporter_name[:40], using="otlp")
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    attributes: dict[str, str] = {} if named else {"service.name": SERVICE_NAME}
    if instance is not None:
        attributes["service.instance.id"] = instance
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)  # not a raw stderr line per odd caller header
    limited = any(name in os.environ for name in _LENGTH_LIMITS)
    provider = TracerProvider(
        resource=Resource.create(attributes),
        shutdown_on_exit=False,
        span_limits=SpanLimits(max_attribute_length=None if limited else MAX_ATTRIBUTE_LENGTH),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("okta_agent_proxy")
    log.info("tracing_on", sampler=os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"))
    return provider


def stop(provider: TracerProvider | None) -> None:
    """Export what is waiting (bounded by the exporter's timeout) and stop the exporter's thread."""
    global _tracer
    _tracer = None
    if provider is not None:
        provider.shutdown()


def tracer() -> Tracer | None:
    return _tracer


@contextmanager
def client_span(name: str, method: str, url: str, headers: MutableMapping[str, str]) -> Iterator[Span | None]:
    """A CLIENT span around one outbound HTTP round trip made by the gateway itself (a token request, a metadata or
    JWKS fetch), a child of the current step's span; `headers` gain its `traceparent` (not the caller's
    `tracestate`). None when tracing is off."""
    current = _tracer
    if current is None:
        yield None
        return
    from opentelemetry.propagate import inject
    from opentelemetry.trace import SpanKind

    parts = urlsplit(url)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.full": f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}",  # no query, no userinfo
        "server.address": parts.hostname or "",
    }
    if parts.port is not None:
        attributes["server.port"] = parts.port
    with current.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        inject(headers)
        headers.pop("tracestate", None)  # the caller's, for its own vendors: not for Okta or an authorization server
        yield span


def record_status(span: Span | None, status: int) -> None:
    """The answer's status on a client span: 4xx and 5xx mark it failed (OpenTelemetry's rule for client spans)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", str(status))


def span_method(method: str) -> str:
    """The HTTP method as spans name it: one of the known ones, else `_OTHER` (a client cannot pick span names)."""
    return method if method in HTTP_METHODS else "_OTHER"


@dataclass(slots=True)
class _RequestTrace:
    """One request's spans: the server span, and the step in progress."""

    span: Span
    context: Context  # the server span's, the parent of each step
    token: Token[Context] | None  # from attaching `context`, detached when the request is done
    log_tokens: Mapping[str, Any] = field(default_factory=dict)
    recording: bool = True  # False: not sampled — no step spans, and the server span is the backend's parent
    step: Span | None = None
    step_context: Context | None = None
    step_token: Token[Context] | None = None


class _SingleHeaderGetter:
    """The caller's trace headers: `traceparent` must come exactly once (W3C Trace Context §3.2: several are
    invalid, and a new trace is started); `tracestate` may be split over several headers."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        getall = getattr(carrier, "getall", None)
        values = list(getall(key, ())) if getall is not None else ([carrier[key]] if key in carrier else [])
        if not values or (key == "traceparent" and len(values) != 1):
            return None
        joined = ",".join(values)
        if key == "tracestate" and (len(joined) > MAX_TRACESTATE_LENGTH or joined.count(",") >= 32):
            return None  # dropped whole (W3C §3.3.1.1 allows it), the trace continued all the same
        return [joined]

    def keys(self, carrier: Headers) -> list[str]:
        return list(carrier.keys())


class TracingObserver(Observer):
    """The request's spans, from the record's steps (see the module's docstring). Registered only while tracing is
    on, and before the audit observer, whose `on_done` may wait."""

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._context = context
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._getter = cast("Getter[Headers]", _SingleHeaderGetter())
        self._servers: dict[str, dict[str, str | int]] = {}  # backend URL → its address attributes

    def on_start(self, record: RequestRecord, headers: Headers) -> None:
        trace, context = self._trace, self._context
        parent = self._propagator.extract(headers, getter=self._getter)
        method = span_method(record.http_method)
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "oap.request_id": record.request_id[:MAX_NAME_LENGTH]},
        )
        state = _RequestTrace(span, trace.set_span_in_context(span, parent), None, recording=span.is_recording())
        state.token = context.attach(state.context)
        ids = span.get_span_context()
        if ids.is_valid:  # sampled or not: the audit row and log lines name the trace the request belongs to
            record.trace_id = trace.format_trace_id(ids.trace_id)
            state.log_tokens = structlog.contextvars.bind_contextvars(
                trace_id=record.trace_id, span_id=trace.format_span_id(ids.span_id)
            )
        record.trace = state

    def on_step_start(self, record: RequestRecord, step: str) -> None:
        state = record.trace
        if not isinstance(state, _RequestTrace) or not state.recording:  # an unsampled step span records nothing
            return
        trace = self._trace
        kind = trace.SpanKind.CLIENT if step == "upstream" else trace.SpanKind.INTERNAL
        attributes: dict[str, str | int] = {}
        if step == "upstream" and record.route is not None:
            attributes = {
                "http.request.method": span_method(record.http_method),
                **self._server(record.route.backend.url),
            }
        elif step == "credential" and record.credential_method is not None:
            attributes = {"oap.credential.method": record.credential_method}
        span = self._tracer.start_span(step, context=state.context, kind=kind, attributes=attributes)
        state.step = span
        state.step_context = trace.set_span_in_context(span, state.context)
        state.step_token = self._context.attach(state.step_context)

    def on_upstream(self, record: RequestRecord, headers: MutableHeaders) -> None:
        state = record.trace
        if not isinstance(state, _RequestTrace):
            return
        for name in ("traceparent", "tracestate"):  # the caller's: the backend's parent is our upstream span
            while name in headers:
                del headers[name]
        self._propagator.inject(headers, context=state.step_context or state.context)  # (the server span, unsampled)

    def on_step_end(self, record: RequestRecord, step: str) -> None:
        state = record.trace
        if not isinstance(state, _RequestTrace) or state.step is None:
            return
        span = state.step
        if step == "upstream" and record.upstream_status is not None:
            record_status(span, record.upstream_status)
        if state.step_token is not None:
            self._context.detach(state.step_token)
        state.step = state.step_context = state.step_token = None
        span.end()

    def on_done(self, record: RequestRecord) -> None:
        state = record.trace
        if not isinstance(state, _RequestTrace):
            return
        record.trace = None
        span = state.span
        outcome, route, message = record.outcome, record.route, record.message
        if route is not None:
            span.update_name(f"{span_method(record.http_method)} {route.prefix}")
            span.set_attribute("http.route", route.prefix)
            span.set_attribute("oap.backend", route.name)
        if record.agent_id is not None:
            span.set_attribute("oap.agent", record.agent_id)
        if message is not None and message.method is not None:
            span.set_attribute("mcp.method.name", message.method[:MAX_NAME_LENGTH])
            if message.method == "tools/call" and message.name is not None:
                span.set_attribute("gen_ai.tool.name", message.name[:MAX_NAME_LENGTH])
        if outcome is not None:
            span.set_attribute("http.response.status_code", outcome.status)
            span.set_attribute("oap.outcome", outcome.code)
            if outcome.code != "ok":
                span.set_attribute("error.type", outcome.code)
            if outcome.status >= 500:  # a server span fails only on 5xx (a 4xx is the client's)
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome.code))
        span.end()
        if state.token is not None:
            self._context.detach(state.token)
        if state.log_tokens:
            structlog.contextvars.reset_contextvars(**state.log_tokens)

    def _server(self, url: str) -> dict[str, str | int]:
        known = self._servers.get(url)
        if known is None:
            parts = urlsplit(url)
            known = {"server.address": parts.hostname or ""}
            if parts.port is not None:
                known["server.port"] = parts.port
            if len(self._servers) < 1024:
                self._servers[url] = known
        return known
