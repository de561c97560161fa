"""The gateway's one error tree (DESIGN.md §1, the error table).

Every failure the gateway itself decides is a `GatewayError`: an HTTP status, a machine-readable `error` code, a
message that is safe to show a client (never a token, key or upstream body), and any headers OAuth requires. The
body is the seed's shape generalised: `{"error", "message", "agent_id"}`. Malformed JSON is the one exception: a
JSON-RPC parse error (-32700), because the client is a JSON-RPC peer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, agent_id: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.agent_id = agent_id
        self.headers: dict[str, str] = dict(headers or {})
        self.detail: str | None = None  # for the audit log and operators only; never sent to the client

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "agent_id": self.agent_id}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    @property
    def content_type(self) -> str:
        return "application/json"


class InternalError(GatewayError):
    status = 500
    code = "internal_error"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class SessionNotFound(NotFound):
    """A session id that does not open, was sealed for another backend or principal, or was never issued: answered
    exactly like an unknown session, so the client starts a new one."""

    code = "session_not_found"


class MisdirectedRequest(GatewayError):
    status = 421
    code = "misdirected_request"


class ForbiddenOrigin(GatewayError):
    status = 403
    code = "forbidden_origin"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(GatewayError):
    """408: the request's body stopped arriving (a client that trickles it would hold a handler forever)."""

    status = 408
    code = "request_timeout"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class MalformedJson(GatewayError):
    """400 with a JSON-RPC parse-error body (JSON-RPC 2.0 §5.1, code -32700)."""

    status = 400
    code = "parse_error"

    def body(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": self.message}}


class BadRequest(GatewayError):
    """400: a request the gateway refuses to interpret — a security header sent twice, a token in the query
    string, a control character in the path, a JSON-RPC batch (DESIGN.md §2 "Edge order", §7)."""

    status = 400
    code = "bad_request"


class UnreadableRequest(BadRequest):
    """400 (or the 4xx the HTTP parser chose): the request is not HTTP this server can read."""


class Unauthenticated(GatewayError):
    """401: no usable token. The challenge is added by the pipeline, which knows the route's metadata URL."""

    status = 401
    code = "invalid_token"
    # RFC 6750 §3.1: no error code when the request carried no credentials.
    oauth_error: str | None = "invalid_token"


class MissingToken(Unauthenticated):
    oauth_error = None


class InvalidToken(Unauthenticated):
    pass


class IdpUnavailable(GatewayError):
    """The IdP (JWKS, token endpoint) could not be reached: not the caller's fault, never a 401."""

    status = 503
    code = "idp_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, agent_id: str | None = None) -> None:
        super().__init__(message, agent_id=agent_id, headers={"Retry-After": str(retry_after)})


class RateLimited(GatewayError):
    """429: over a limit (open streams, DESIGN.md §9); `Retry-After` says when to try again."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, agent_id: str | None = None) -> None:
        super().__init__(message, agent_id=agent_id, headers={"Retry-After": str(retry_after)})


class AuthorizationDenied(GatewayError):
    status = 403
    code = "authorization_denied"


class InsufficientScope(GatewayError):
    """403 with an RFC 6750 insufficient_scope challenge listing every scope the operation needs."""

    status = 403
    code = "insufficient_scope"

    def __init__(self, message: str, *, scopes: tuple[str, ...], agent_id: str | None = None) -> None:
        super().__init__(message, agent_id=agent_id)
        self.scopes = scopes


class BackendUnavailable(GatewayError):
    status = 502
    code = "backend_unavailable"


class BackendTimeout(GatewayError):
    status = 504
    code = "backend_timeout"


class GatewayShuttingDown(GatewayError):
    """503: the gateway shut down (the end of SHUTDOWN_GRACE_SECONDS) before the request was answered (DESIGN.md
    §9); a client may retry on another replica."""

    status = 503
    code = "gateway_shutdown"


class BadBackendResponse(GatewayError):
    """502: the backend answered something the gateway will not pass on (a redirect off the backend's own URL)."""

    status = 502
    code = "bad_backend_response"


class BackendRejectedCredential(GatewayError):
    """The backend refused the credential the gateway sent. The caller's token is fine, so no 401 (it would loop
    the client through a needless re-login) and the backend's own challenge is not relayed."""

    status = 502
    code = "backend_rejected_credential"


class TokenExchangeFailed(GatewayError):
    status = 403
    code = "token_exchange_failed"


class CredentialUnavailable(GatewayError):
    """The gateway cannot obtain a credential for this backend (misconfiguration or unimplemented method)."""

    status = 502
    code = "token_exchange_failed"


class JsonRpcRefusal(GatewayError):
    """Answered as a JSON-RPC error — the MCP specification's shape, which the client's SDK understands — rather than
    the gateway's error body; as an SSE event when the backend answers with streams (`sse`)."""

    rpc_code: ClassVar[int] = -32600

    def __init__(
        self,
        message: str,
        *,
        request_id: str | int | None,
        status: int,
        sse: bool = False,
        data: Any = None,
        session_id: str | None = None,
        agent_id: str | None = None,
    ) -> None:
        super().__init__(message, agent_id=agent_id)
        self.request_id = request_id
        self.status = status  # type: ignore[misc]  # per instance: the era decides it
        self.sse = sse
        self.data = data
        if session_id is not None:  # the client's session goes on, as with any answer of the backend's
            self.headers["Mcp-Session-Id"] = session_id
        if sse:  # as a relayed stream's
            self.headers["Cache-Control"] = "no-cache"
            self.headers["X-Accel-Buffering"] = "no"

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.rpc_code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": "2.0", "id": self.request_id, "error": error}

    def body_bytes(self) -> bytes:
        text = json.dumps(self.body(), ensure_ascii=False, separators=(",", ":")).encode()
        return b"event: message\ndata: " + text + b"\n\n" if self.sse else text

    @property
    def content_type(self) -> str:
        return "text/event-stream" if self.sse else "application/json"


class HiddenTarget(JsonRpcRefusal):
    """A tool, resource or prompt the agent may not see was called: the answer for one that does not exist
    (DESIGN.md §7) — 200 in the 2025 eras, 400 in 2026-07-28, as the SDK servers answer — audited `tool_denied`."""

    code = "tool_denied"
    rpc_code = -32602


class HeaderMismatch(JsonRpcRefusal):
    """2026-07-28: `Mcp-Method` or `Mcp-Name` disagrees with the body (PROTOCOL §4: 400 with -32020)."""

    code = "bad_request"
    rpc_code = -32020
