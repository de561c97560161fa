"""The request pipeline, in order, in one place (DESIGN.md §2). `Pipeline.handle` reads top to bottom:

    route → edge → method → authenticate and identify the agent → request budgets → inspect → authorize → what
          it may see (tools, resources, prompts) → open the session → stream cap → credential and upstream call (its
          auth flow) → seal the session id → relay (list answers filtered when the agent has rules on the backend)

Each step is a plain function or method in the folder of its layer; `handle` passes what one returns to the next.
The `RequestRecord` is for observers (audit, metrics, the request line): `handle` writes it and no step reads it.
Without `OKTA_ISSUER` there is no inbound identity (`identity` is None): nobody is authenticated, nothing is
authorized per agent, no request budget applies (they count users and agents, and there are none), session ids are
sealed to their backend alone, and `serve` then listens on loopback only.
Every refusal is a `GatewayError`, rendered by `error_answer` — the one renderer — before the response starts. Once a
response has started, the forwarder ends it (an SSE error event, or an aborted connection for a cut JSON body).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
import structlog
import yarl

from okta_agent_proxy.config.limits import StreamLimits
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import (
    AuthorizationDenied,
    BackendRejectedCredential,
    BadBackendResponse,
    GatewayError,
    GatewayShuttingDown,
    HeaderMismatch,
    HiddenTarget,
    InsufficientScope,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Unauthenticated,
)
from okta_agent_proxy.http.answers import error_answer
from okta_agent_proxy.http.drain import ended_by_shutdown
from okta_agent_proxy.http.edge import Edge, request_id
from okta_agent_proxy.http.interface import Answer, HttpRequest
from okta_agent_proxy.inbound.caller import Caller, Identity
from okta_agent_proxy.inbound.metadata import bearer_challenge, metadata_url
from okta_agent_proxy.mcp.forward import Forwarder, RelayStats, ResponseTransformer
from okta_agent_proxy.mcp.headers import SSE, upstream_headers
from okta_agent_proxy.mcp.list_filter import MAX_LIST_BYTES, SseListFilter, filtered_json
from okta_agent_proxy.mcp.messages import McpMessage, is_stateless, parse_message, routing_header_mismatch
from okta_agent_proxy.mcp.sessions import NOBODY, Session, SessionOwner, SessionSeal
from okta_agent_proxy.mcp.stream_slots import StreamSlot, StreamSlots
from okta_agent_proxy.outbound.base import CredentialProvider
from okta_agent_proxy.policy.authz import Decisions
from okta_agent_proxy.policy.rate_limits import RequestLimits
from okta_agent_proxy.policy.tools import LIST_METHODS, Kind, Policies, Visibility, call_kind, unknown_message
from okta_agent_proxy.record import CLIENT_CLOSED, Observers, Outcome, RequestRecord, upstream_outcome
from okta_agent_proxy.routing import Route, RouteTable

log = structlog.get_logger(__name__)
FORWARDED_METHODS = frozenset({"POST", "GET", "DELETE"})
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": what a path keeps unescaped

Transformers = Callable[[Route, Caller | None], ResponseTransformer | None]


def no_transform(route: Route, caller: Caller | None) -> ResponseTransformer | None:
    return None


@dataclass(frozen=True, slots=True)
class Upstream:
    """What the credential and forward steps need for one backend."""

    provider: CredentialProvider
    extra_headers: frozenset[str]  # lower-cased `forward_headers`


@dataclass(frozen=True)
class Pipeline:
    """One config generation's request path; everything here is fixed for the generation's life."""

    settings: Settings
    routes: RouteTable
    edge: Edge
    identity: Identity | None  # None: no OKTA_ISSUER, nobody is authenticated
    sessions: SessionSeal
    decisions: Decisions
    upstreams: Mapping[str, Upstream]
    forwarder: Forwarder
    stream_slots: StreamSlots  # the process's, shared by every generation
    stream_limits: StreamLimits
    observers: Observers
    transformers: Transformers = no_transform  # the response seam, for answers the tool policy leaves alone
    policies: Policies = field(default_factory=Policies)  # the tool, resource and prompt rules (DESIGN.md §7)
    framing: dict[str, bool] = field(default_factory=dict)  # backend → whether it answered its last request as SSE
    request_limits: RequestLimits | None = None  # the request budgets (DESIGN.md §9); None: rate_limits sets none

    async def handle(self, request: HttpRequest) -> Answer | None:
        """The request's answer (None: streamed through the request)."""
        record = RequestRecord(
            request_id(request), time.perf_counter(), request.method, recorded_path(request), self.observers
        )
        slot: StreamSlot | None = None
        try:
            route, url = self.routes.find(request.raw_path, request.path)
            record.route = route  # known before the edge refuses, so that a refusal on a backend route is audited
            if route is not None and self.observers.watch_headers:  # observed only on a backend route
                self.observers.start(record, request.headers)
            self.edge.check(request)
            route = check_route(route, request)
            caller = await self.identify(request, record, route)
            if self.request_limits is not None and caller is not None:  # before the body: a runaway agent is cheap
                shared = self.request_limits.take(caller.user, caller.agent_name, route.name)
                if shared is not None:  # the buckets are in Redis
                    await shared
            body, message = await self.inspect(request, record)
            self.authorize(caller, route, message)
            session = self.open_session(request, route, caller, message)
            rules = self.visible(request, route, caller, message, session)
            self.authorize_tool(caller, route, message)
            slot = self.admit_stream(request, route, caller)
            response = await self.send(request, route, url, caller, body, session, record)
            session_id = self.client_session_id(response, route, session)
            return await self.relay(request, response, route, caller, message, session_id, record, rules)
        except GatewayError as error:
            return self.refuse(request, record, error)
        except Exception as exc:
            return self.fail(request, record, exc)
        except asyncio.CancelledError as exc:  # the forwarder ends what it relays; this is before any answer
            if record.response_started_at is not None or not ended_by_shutdown(exc):
                raise
            return self.refuse(request, record, GatewayShuttingDown("the gateway shut down before this was answered"))
        finally:
            if slot is not None:
                slot.release()
            if record.route is not None:  # DESIGN.md §4: every request on a backend route, whatever its method
                await self.observers.done(record.finish())
            # The error's traceback holds this frame, which holds the record (and the body): without this, each
            # failed request would wait for the cyclic collector.
            record.error = None

    async def identify(self, request: HttpRequest, record: RequestRecord, route: Route) -> Caller | None:
        """Authenticate (the Bearer token) and identify the agent; None without an inbound identity."""
        if self.identity is None:
            return None
        record.step("authenticate")
        authenticated = await self.identity.authenticate(request.headers, route.name)
        record.principal = authenticated.principal
        try:
            caller = self.identity.identify(request.headers, authenticated)
        except AuthorizationDenied as denied:
            record.agent_id = self.identity.verified_agent(denied)
            raise
        record.agent_id = caller.agent_name
        record.agent_evidence = caller.agent.evidence
        record.step(None)  # the "authenticate" step is the token and the agent, nothing after them
        return caller

    async def inspect(self, request: HttpRequest, record: RequestRecord) -> tuple[bytes | None, McpMessage | None]:
        """A POST's body, read whole (bounded), and the JSON-RPC message in it."""
        if request.method != "POST":
            return None, None
        body = await request.read_body(self.settings.MAX_BODY_BYTES, self.settings.HEADER_READ_TIMEOUT_SECONDS)
        record.bytes_in = len(body)  # recorded even when it turns out not to be JSON
        message = record.message = parse_message(body)
        headers = request.headers
        if message.kind == "request" and ("Mcp-Method" in headers or "Mcp-Name" in headers):  # sent: must agree
            mismatch = routing_header_mismatch(headers.get("Mcp-Method"), headers.get("Mcp-Name"), message)
            if mismatch is not None:
                raise HeaderMismatch(mismatch, request_id=message.id, status=400)
        return body, message

    def authorize(self, caller: Caller | None, route: Route, message: McpMessage | None) -> None:
        if caller is not None:
            agent, method = caller.agent, message.method if message is not None else None
            self.decisions.check(agent.name, agent.agent, route.name, route.backend, caller.principal.scopes, method)

    def authorize_tool(self, caller: Caller | None, route: Route, message: McpMessage | None) -> None:
        """A visible tool's step-up scopes (`tool_scopes`), once the call is known not to be hidden: a hidden tool
        is unknown, whatever scopes it would need."""
        if caller is None or message is None or message.method != "tools/call" or not route.backend.tool_scopes:
            return
        agent, scopes, backend = caller.agent, caller.principal.scopes, route.backend
        self.decisions.check(agent.name, agent.agent, route.name, backend, scopes, message.method, message.name)

    def visible(
        self, request: HttpRequest, route: Route, caller: Caller | None, message: McpMessage | None, session: Session
    ) -> Visibility | None:
        """The agent's tool, resource and prompt rules on this backend (None: none, its answers pass untouched); a
        call of a hidden one gets the answer for one that does not exist, and never reaches the backend."""
        if caller is None:
            return None
        rules = self.policies.of(caller.agent_name, caller.agent.agent, route.name)
        if rules is None or message is None or message.name is None:
            return rules
        kind = call_kind(message.method, message.ref_type)
        if kind is not None and not rules.permits(kind, message.name):
            stateless = is_stateless(request.headers.get("MCP-Protocol-Version"), message)
            raise HiddenTarget(
                unknown_message(kind, message.name),
                request_id=message.id,
                status=400 if stateless else 200,  # as the SDK servers answer a name they do not have
                sse=not stateless and self.framing.get(route.name, False),  # a 2026-07-28 error is always JSON
                data={"uri": message.name} if kind is Kind.RESOURCE else None,
                session_id=session.presented,
                agent_id=caller.agent_name,
            )
        return rules

    def open_session(
        self, request: HttpRequest, route: Route, caller: Caller | None, message: McpMessage | None
    ) -> Session:
        """The session the request continues: its sealed id opened for this backend and caller (else 404
        `session_not_found`). A stateless-era request has none: its `Mcp-Session-Id` is dropped."""
        owner = SessionOwner(caller.issuer, caller.user, caller.agent_name) if caller is not None else NOBODY
        presented = request.headers.get("Mcp-Session-Id")
        if presented is None or is_stateless(request.headers.get("MCP-Protocol-Version"), message):
            return Session(owner)
        return Session(owner, presented, self.sessions.open(presented, route.name, owner))

    def admit_stream(self, request: HttpRequest, route: Route, caller: Caller | None) -> StreamSlot | None:
        """A GET is a stream from the start: admitted only under the stream caps (DESIGN.md §9)."""
        if request.method != "GET":
            return None
        return self.stream_slots.admit(route.name, caller.key if caller else None, self.stream_limits)

    async def send(
        self,
        request: HttpRequest,
        route: Route,
        url: yarl.URL | None,
        caller: Caller | None,
        body: bytes | None,
        session: Session,
        record: RequestRecord,
    ) -> aiohttp.ClientResponse:
        """The backend's own credential, as its provider's auth flow, around the upstream call: after a 401 the
        flow may give a fresh credential for one more try (DESIGN.md §3); a 401 it cannot help is a 502."""
        upstream = self.upstreams[route.name]
        record.credential_method = upstream.provider.method
        record.step("credential")
        flow = upstream.provider.auth_flow(caller, request.headers)
        credential = record.credential = await flow.credential()
        headers = upstream_headers(request.headers, upstream.extra_headers, credential.headers, record.request_id)
        headers.popall("Mcp-Session-Id", None)  # the client's is sealed: the backend gets its own id, or none
        if session.backend_id is not None:
            headers["Mcp-Session-Id"] = session.backend_id
        target = url if url is not None else route.target(request.query_string)
        while True:
            record.step("upstream")
            if self.observers.watch_headers:
                self.observers.upstream(record, headers)
            sent = time.perf_counter()
            response = await self.forwarder.open(route.name, route.backend, request.method, target, headers, body)
            record.upstream_headers_seconds = time.perf_counter() - sent
            record.upstream_status = response.status
            if response.status != 401:
                return response
            record.step("credential")
            record.credential = None  # a re-exchange that fails must not show the rejected credential
            fresh = await flow.retry(response.status)
            if fresh is None:
                record.credential = credential  # the one the backend refused: no other was fetched
                break
            response.close()
            credential = record.credential = fresh
            headers.update(credential.headers)
        response.close()
        agent = caller.agent_name if caller else None
        raise BackendRejectedCredential(f"backend {route.name} rejected the gateway's credential", agent_id=agent)

    def client_session_id(self, response: aiohttp.ClientResponse, route: Route, session: Session) -> str | None:
        """What the client gets for the backend's `Mcp-Session-Id`: the id it presented when the backend repeats
        the one inside it, else the backend's id sealed (never the raw id)."""
        issued = response.headers.get("Mcp-Session-Id")
        if issued is None:
            return None
        if issued == session.backend_id:
            return session.presented
        return self.sessions.seal(route.name, issued, session.owner)

    async def relay(
        self,
        request: HttpRequest,
        response: aiohttp.ClientResponse,
        route: Route,
        caller: Caller | None,
        message: McpMessage | None,
        session_id: str | None,
        record: RequestRecord,
        rules: Visibility | None = None,
    ) -> Answer | None:
        """Stream the answer to the client (`session_id` in place of the backend's session id). A POST answered as
        a stream is counted under the stream caps while it lasts, never cut (the backend is already working on it).
        With `rules`, list answers are filtered: the answer to a list request — read whole first when it is JSON (the
        Answer returned), event by event when it is a stream — and every event of a GET stream (a resumed stream
        may carry a list answer)."""
        is_sse = record.is_stream = response.headers.get("Content-Type", "").startswith(SSE)
        if request.method == "POST" and message is not None and message.kind == "request" and response.status < 300:
            self.framing[route.name] = is_sse  # how this backend answers: a refused call is framed alike
        if rules is not None and request.method == "POST" and (message is None or message.method not in LIST_METHODS):
            rules = None  # only a list request's answer holds a list: any other streams untouched, however large
        if rules is not None and response.headers.get("Content-Encoding", "identity").lower() != "identity":
            response.close()  # asked for identity (`upstream_headers`): a compressed list cannot be judged
            raise BadBackendResponse(f"backend {route.name} sent a compressed answer where a list must be read")
        if rules is not None and not is_sse and request.method == "POST":
            return await self.whole(response, route, rules, message, session_id, record)
        counted = None
        if is_sse and request.method != "GET":
            counted = self.stream_slots.count(route.name, caller.key if caller else None)
        stats = record.relay = RelayStats()
        answer_id = message.id if message is not None and message.kind == "request" else None
        try:
            status = await self.forwarder.relay(
                request,
                response,
                route.name,
                route.backend,
                self.settings.base_url + route.prefix,
                record.request_id,
                stats,
                is_sse,
                answer_id,
                session_id,
                record.response_started,
                SseListFilter(rules, answer_id) if rules is not None and is_sse else self.transformers(route, caller),
            )
        finally:
            if counted is not None:
                counted.release()
        record.outcome = Outcome(status, stats.failure) if stats.failure else upstream_outcome(status)
        return None

    async def whole(
        self,
        response: aiohttp.ClientResponse,
        route: Route,
        rules: Visibility,
        message: McpMessage | None,
        session_id: str | None,
        record: RequestRecord,
    ) -> Answer:
        """A JSON answer for an agent with rules: read whole and filtered before anything is sent."""
        stats = record.relay = RelayStats()
        status, headers, body = await self.forwarder.whole(
            response,
            route.backend,
            self.settings.base_url + route.prefix,
            record.request_id,
            session_id,
            MAX_LIST_BYTES,
            lambda answer: filtered_json(answer, rules, message.id if message is not None else None),
            stats,
        )
        record.response_started()
        record.outcome = upstream_outcome(status)
        return Answer(status, body, headers, content_type=None)

    def refuse(self, request: HttpRequest, record: RequestRecord, error: GatewayError) -> Answer:
        record.error = error
        record.outcome = Outcome(error.status, error.code)
        if self.identity is not None:
            add_challenge(error, self.settings.base_url, quote(request.path, safe=_PATH_SAFE))
        return error_answer(error, record.request_id)

    def fail(self, request: HttpRequest, record: RequestRecord, exc: Exception) -> Answer:
        if isinstance(exc, ConnectionResetError) and request.client_gone():
            # The client went away while its answer was being written (aiohttp's ClientConnectionResetError):
            # 499, and nothing left to send. The answer only lets the server finish quietly.
            return Answer(CLIENT_CLOSED, content_type=None)
        # A bug, not a client's fault: log it (without the request's content) and answer 500 in our shape.
        log.exception("unhandled_error", request_id=record.request_id, path=request.path[:200])
        return self.refuse(request, record, InternalError("the gateway failed to handle this request"))


def check_route(route: Route | None, request: HttpRequest) -> Route:
    """The route, or 404 (no backend serves the path) or 405 (a method MCP does not use)."""
    if route is None:
        raise NotFound(f"no backend serves {recorded_path(request)[:200]}")
    if request.method not in FORWARDED_METHODS:
        raise MethodNotAllowed(
            f"{request.method} is not supported on MCP routes", headers={"Allow": "GET, POST, DELETE"}
        )
    return route


def add_challenge(error: GatewayError, base_url: str, path: str) -> None:
    """RFC 6750 §3 / RFC 9728 §5.1: a 401 or insufficient-scope 403 names the resource's metadata document."""
    if isinstance(error, Unauthenticated):
        error.headers["WWW-Authenticate"] = bearer_challenge(metadata_url(base_url, path), error=error.oauth_error)
    elif isinstance(error, InsufficientScope):
        error.headers["WWW-Authenticate"] = bearer_challenge(
            metadata_url(base_url, path), error="insufficient_scope", scopes=error.scopes
        )


def recorded_path(request: HttpRequest) -> str:
    """The path as the audit row and the log line keep it: as decoded, unless it has control characters (the edge
    refuses those), which are kept percent-encoded — a NUL cannot be stored in PostgreSQL text."""
    path = request.path
    return path[:2048] if path.isprintable() else quote(path, safe=_PATH_SAFE)[:2048]
