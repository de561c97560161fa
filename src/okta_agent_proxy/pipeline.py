"""The request pipeline, in order, in one place (DESIGN.md §2).

    edge → route → authenticate → identify agent → inspect → authorize → bind session → credential → forward

Without `OKTA_ISSUER` there is no inbound identity (`inbound` is None): the authenticate, identify, authorize and
session steps are skipped, and `serve` then listens on loopback only. Each step is a small function that reads
what earlier steps wrote on the per-request `Exchange` and writes its own fields; every failure is a
`GatewayError`, rendered by `error_response` — the one renderer — before the response starts. Once a response has
started, the forwarder ends it (an SSE error event, or an aborted connection for a cut JSON body).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import quote

import yarl
from aiohttp import web

from okta_agent_proxy.config.models import CrossAppBackend, StreamLimits
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import (
    AuthorizationDenied,
    BackendRejectedCredential,
    GatewayError,
    InsufficientScope,
    InternalError,
    InvalidToken,
    MethodNotAllowed,
    MissingToken,
    NotFound,
    Unauthenticated,
)
from okta_agent_proxy.exchange import Exchange
from okta_agent_proxy.http.edge import Edge, request_id
from okta_agent_proxy.http.request_body import read_body
from okta_agent_proxy.inbound.agents import AgentDirectory
from okta_agent_proxy.inbound.metadata import bearer_challenge, metadata_url
from okta_agent_proxy.inbound.validator import OktaTokenValidator
from okta_agent_proxy.mcp.forward import Forwarder
from okta_agent_proxy.mcp.headers import SSE, upstream_headers
from okta_agent_proxy.mcp.messages import parse_message
from okta_agent_proxy.mcp.sessions import SessionBindings, SessionOwner
from okta_agent_proxy.mcp.stream_slots import Caller, StreamSlot, StreamSlots
from okta_agent_proxy.observability.logging import get_logger
from okta_agent_proxy.observability.recorder import CLIENT_CLOSED, Outcome, RequestRecorder
from okta_agent_proxy.outbound.base import CredentialProvider, CredentialRequest
from okta_agent_proxy.outbound.static import StaticProvider
from okta_agent_proxy.policy.authz import authorize
from okta_agent_proxy.routing import BackendRouter, Route

log = get_logger(__name__)
FORWARDED_METHODS = frozenset({"POST", "GET", "DELETE"})
_MEMO_MAX = 1024  # entries in each per-generation memo keyed by what a client sends (a path): bounded
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": what a path keeps unescaped
_NOT_ANSWERED = Outcome(CLIENT_CLOSED, "client_closed")


@dataclass(frozen=True, slots=True)
class _Upstream:
    """What the forward step needs for one backend, worked out once per config generation."""

    provider: CredentialProvider
    extra_headers: frozenset[str]  # lower-cased `forward_headers`
    # A static credential ignores who is calling: one request object serves every call (None: build one per call).
    static_request: CredentialRequest | None


@dataclass(frozen=True, slots=True)
class _RouteEntry:
    route: Route | None  # None: no backend serves this path (or it has dot segments)
    url: yarl.URL | None  # the upstream URL when the request has no query string


@dataclass(frozen=True)
class Pipeline:
    settings: Settings
    router: BackendRouter
    providers: dict[str, CredentialProvider]
    forwarder: Forwarder
    extra_headers: dict[str, frozenset[str]]  # per backend: lower-cased `forward_headers`
    recorder: RequestRecorder
    edge: Edge
    stream_slots: StreamSlots  # the process's, shared by every generation
    stream_limits: StreamLimits
    inbound: InboundIdentity | None = None
    # Derived once per generation (see __post_init__); the memos fill up with what clients send, up to _MEMO_MAX.
    _upstreams: dict[str, _Upstream] = field(init=False, repr=False, compare=False)
    _routes: dict[str, _RouteEntry] = field(init=False, repr=False, compare=False)
    _allowed: set[tuple[str, str, frozenset[str], str | None]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        upstreams = {
            name: _Upstream(
                provider,
                self.extra_headers[name],
                CredentialRequest(backend=name) if isinstance(provider, StaticProvider) else None,
            )
            for name, provider in self.providers.items()
        }
        object.__setattr__(self, "_upstreams", upstreams)
        object.__setattr__(self, "_routes", {})
        object.__setattr__(self, "_allowed", set())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = Exchange(request_id(request), time.perf_counter(), request.method, _recorded_path(request))
        outcome = _NOT_ANSWERED  # unless we get to answer
        try:
            url = self.route(request, exchange)  # finds the backend (for the audit row); refuses nothing yet
            self.edge.check(request)
            if exchange.route is None:
                raise NotFound(f"no backend serves {exchange.path[:200]}")
            check_method(request)
            if self.inbound is not None:
                await authenticate(request, exchange, self.inbound)
                identify_agent(request, exchange, self.inbound)
            if request.method == "POST":
                await read_and_inspect(request, exchange, self.settings)
            if self.inbound is not None:
                self.authorize(exchange)
                check_session(request, exchange, self.inbound.sessions)
            response = await self.forward(request, exchange, url)
            failure = exchange.relay.failure
            outcome = Outcome(response.status, failure) if failure else _upstream_outcome(response.status)
            return response
        except GatewayError as error:
            exchange.error = error
            if self.inbound is not None:
                add_challenge(error, self.settings.base_url, quote(request.path, safe=_PATH_SAFE))
            outcome = Outcome(error.status, error.code)
            return error_response(error, exchange.request_id)
        except Exception as exc:
            if isinstance(exc, ConnectionResetError) and _client_gone(request):
                # The client went away while its answer was being written (aiohttp's ClientConnectionResetError):
                # 499, and nothing left to send. The response returned only lets aiohttp finish quietly.
                return web.Response(status=CLIENT_CLOSED)
            # A bug, not a client's fault: log it (without the request's content) and answer 500 in our shape.
            log.exception("unhandled_error", request_id=exchange.request_id, path=request.path[:200])
            internal = InternalError("the gateway failed to handle this request")
            exchange.error = internal
            outcome = Outcome(internal.status, internal.code)
            return error_response(internal, exchange.request_id)
        finally:
            if outcome is _NOT_ANSWERED and exchange.relay.delivered:
                # The client hung up once it had the whole answer (the SDK closes a POST's stream at its response).
                outcome = _upstream_outcome(exchange.upstream_status or 200)
            if exchange.route is not None:  # DESIGN.md §4: every request on a backend route, whatever its method
                await self.recorder.finish(exchange, outcome)
            # The error's traceback holds this frame, which holds the exchange (and the body): without this, each
            # failed request would wait for the cyclic collector.
            exchange.error = None

    def authorize(self, exchange: Exchange) -> None:
        """`authorize_request`, with the allowed combinations of agent, backend, scopes and MCP method remembered
        (within a generation the agent and backend behind a name do not change); a denial is worked out each time."""
        assert exchange.agent is not None and exchange.route is not None and exchange.principal is not None
        method = exchange.message.method if exchange.message is not None else None
        key = (exchange.agent.name, exchange.route.name, exchange.principal.scopes, method)
        if key not in self._allowed:
            authorize_request(exchange)
            if len(self._allowed) < _MEMO_MAX:
                self._allowed.add(key)

    def route(self, request: web.Request, exchange: Exchange) -> yarl.URL | None:
        """The backend route of the request's path (remembered per path) into `exchange.route`, None if there is
        none; returns the upstream URL if the request has no query string (None: build it from the query)."""
        raw_path = request.raw_path
        path, has_query, _ = raw_path.partition("?")
        entry = self._routes.get(path)
        if entry is None:
            route = find_route(request, self.router)
            url = yarl.URL(route.upstream_url(""), encoded=True) if route is not None else None
            entry = _RouteEntry(route, url)
            if len(self._routes) < _MEMO_MAX:
                self._routes[path] = entry
        exchange.route = entry.route
        return None if has_query else entry.url

    async def forward(
        self, request: web.Request, exchange: Exchange, url: yarl.URL | None = None
    ) -> web.StreamResponse:
        route = exchange.route
        assert route is not None
        upstream = self._upstreams[route.name]
        provider = upstream.provider
        credential_request = upstream.static_request or credential_request_for(request, exchange)
        exchange.credential_method = provider.method
        method = request.method
        caller = _caller(exchange)
        # A GET is a stream from the start: admitted only under the stream caps (DESIGN.md §9).
        slot: StreamSlot | None = (
            self.stream_slots.admit(route.name, caller, self.stream_limits) if method == "GET" else None
        )
        try:
            credential = exchange.credential = await provider.get(credential_request)
            target = url if url is not None else route.upstream_url(request.rel_url.raw_query_string)
            headers = upstream_headers(request.headers, upstream.extra_headers, credential.headers, exchange.request_id)
            sent = time.perf_counter()
            response = await self.forwarder.open(route.name, route.backend, method, target, headers, exchange.body)
            exchange.upstream_status = response.status
            if response.status == 401 and credential.refreshable:
                # The one retry (DESIGN.md §3): drop the cached credential, fetch a fresh one, resend the same body.
                response.close()
                await provider.invalidate(credential_request)
                exchange.credential = None  # until the fresh one arrives: a failed re-exchange must not show the old
                credential = exchange.credential = await provider.get(credential_request)
                headers.update(credential.headers)
                sent = time.perf_counter()
                response = await self.forwarder.open(route.name, route.backend, method, target, headers, exchange.body)
            exchange.relay.upstream_headers_seconds = time.perf_counter() - sent
            exchange.upstream_status = response.status
            if self.inbound is not None:
                track_session(
                    request, response.status, response.headers.get("Mcp-Session-Id"), exchange, self.inbound.sessions
                )
            is_sse = response.headers.get("Content-Type", "").startswith(SSE)
            if is_sse and slot is None:
                slot = self.stream_slots.count(route.name, caller)  # a POST answered as a stream: counted, not cut
            message = exchange.message
            answer_id = message.id if message is not None and message.kind == "request" else None
            return await self.forwarder.relay(
                request,
                response,
                route.name,
                route.backend,
                self.settings.base_url + route.prefix,
                exchange.request_id,
                exchange.relay,
                is_sse,
                answer_id,
            )
        except BackendRejectedCredential as error:
            error.agent_id = exchange.agent_id
            raise
        finally:
            if slot is not None:
                slot.release()


def credential_request_for(request: web.Request, exchange: Exchange) -> CredentialRequest:
    assert exchange.route is not None
    backend = exchange.route.backend
    principal = exchange.principal
    id_token_header = backend.auth_config.id_token_header if isinstance(backend, CrossAppBackend) else None
    return CredentialRequest(
        backend=exchange.route.name,
        agent=exchange.agent_id,
        issuer=principal.issuer if principal else None,
        subject=principal.subject if principal else None,
        subject_token=exchange.token,
        subject_token_expires_at=principal.expires_at if principal else None,
        id_token=request.headers.get(id_token_header) if id_token_header else None,
    )


@dataclass(frozen=True)
class InboundIdentity:
    validator: OktaTokenValidator
    agents: AgentDirectory
    sessions: SessionBindings


def bearer_token(request: web.Request) -> str | None:
    """The token from `Authorization: Bearer` — the only place a token is read from (RFC 6750 §2.1)."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise InvalidToken("the Authorization header must be 'Bearer <token>'")
    return token


async def authenticate(request: web.Request, exchange: Exchange, inbound: InboundIdentity) -> None:
    token = bearer_token(request)
    if token is None:
        raise MissingToken("this resource needs an access token")
    exchange.principal = await inbound.validator.validate(token)
    exchange.token = token


def identify_agent(request: web.Request, exchange: Exchange, inbound: InboundIdentity) -> None:
    assert exchange.principal is not None
    try:
        identified = inbound.agents.identify(exchange.principal, request.headers.get("X-Agent-ID"))
    except AuthorizationDenied as denied:
        # A header that disagrees with the token: the token still says who the agent is (never the header's word).
        if inbound.agents.from_token:
            exchange.agent_id = denied.agent_id
        raise
    exchange.agent = identified
    exchange.agent_id = identified.name


def authorize_request(exchange: Exchange) -> None:
    assert exchange.agent is not None and exchange.route is not None and exchange.principal is not None
    method = exchange.message.method if exchange.message is not None else None
    authorize(
        exchange.agent.name,
        exchange.agent.agent,
        exchange.route.name,
        exchange.route.backend,
        exchange.principal.scopes,
        method,
    )


def check_session(request: web.Request, exchange: Exchange, sessions: SessionBindings) -> None:
    assert exchange.principal is not None and exchange.agent is not None
    owner = SessionOwner(exchange.principal.issuer, exchange.principal.subject, exchange.agent.name)
    exchange.session_owner = owner
    session_id = request.headers.get("Mcp-Session-Id")
    if session_id is not None:
        sessions.check(session_id, owner)


def track_session(
    request: web.Request, status: int, issued: str | None, exchange: Exchange, sessions: SessionBindings
) -> None:
    """Bind a session id the backend issued; forget one that was deleted or that the backend no longer knows."""
    presented = request.headers.get("Mcp-Session-Id")
    if presented is not None and (status == 404 or (request.method == "DELETE" and 200 <= status < 300)):
        sessions.drop(presented)
    elif issued is not None and presented is None and exchange.session_owner is not None and status < 400:
        sessions.bind(issued, exchange.session_owner)


def add_challenge(error: GatewayError, base_url: str, path: str) -> None:
    """RFC 6750 §3 / RFC 9728 §5.1: a 401 or insufficient-scope 403 names the resource's metadata document."""
    if isinstance(error, Unauthenticated):
        error.headers["WWW-Authenticate"] = bearer_challenge(metadata_url(base_url, path), error=error.oauth_error)
    elif isinstance(error, InsufficientScope):
        error.headers["WWW-Authenticate"] = bearer_challenge(
            metadata_url(base_url, path), error="insufficient_scope", scopes=error.scopes
        )


_OUTCOMES: dict[int, Outcome] = {}  # one per status a backend answered (three digits: bounded)


def _upstream_outcome(status: int) -> Outcome:
    outcome = _OUTCOMES.get(status)
    if outcome is None:
        outcome = _OUTCOMES[status] = Outcome(status, "ok" if status < 400 else f"upstream_{status}")
    return outcome


def _caller(exchange: Exchange) -> Caller | None:
    """(user, agent) for per-caller limits: the user is the token's `uid` when it has one, else its `sub`."""
    principal = exchange.principal
    if principal is None or exchange.agent_id is None:
        return None
    return (principal.uid or principal.subject, exchange.agent_id)


def _recorded_path(request: web.Request) -> str:
    """The path as the audit row and the log line keep it: as decoded, unless it has control characters (the edge
    refuses those), which are kept percent-encoded — a NUL cannot be stored in PostgreSQL text."""
    path = request.path
    return path[:2048] if path.isprintable() else quote(path, safe=_PATH_SAFE)[:2048]


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def find_route(request: web.Request, router: BackendRouter) -> Route | None:
    """The backend route for the request's path; None for none, or for a path with `.` or `..` segments."""
    path = request.raw_path.split("?", 1)[0]
    segments = request.path.split("/")
    return None if ".." in segments or "." in segments else router.match(path)


def check_method(request: web.Request) -> None:
    if request.method not in FORWARDED_METHODS:
        raise MethodNotAllowed(
            f"{request.method} is not supported on MCP routes", headers={"Allow": "GET, POST, DELETE"}
        )


async def read_and_inspect(request: web.Request, exchange: Exchange, settings: Settings) -> None:
    if request.method != "POST":
        return
    body = await read_body(request, settings.MAX_BODY_BYTES, settings.HEADER_READ_TIMEOUT_SECONDS)
    exchange.body = body  # recorded (bytes in) even when it turns out not to be JSON
    exchange.message = parse_message(body)


def error_response(error: GatewayError, request_id: str) -> web.Response:
    response = web.Response(
        status=error.status, body=error.body_bytes(), content_type="application/json", headers=error.headers
    )
    response.headers["X-Request-ID"] = request_id
    return response
