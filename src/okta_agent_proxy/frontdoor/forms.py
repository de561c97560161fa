"""What the front door's endpoints read and answer: OAuth parameters, JSON errors, redirects, HTML pages.

Parameters (RFC 6749 §3.1, §3.2): "Request and response parameters MUST NOT be included more than once" — a
repeated one is `invalid_request`, so that no two readers of a request can see different values; empty ones count
as absent. Token-endpoint bodies must be `application/x-www-form-urlencoded` (RFC 6749 §4.1.3).

Answers: token-endpoint errors are JSON `{"error", "error_description"}` with `Cache-Control: no-store` (RFC 6749
§5.2); authorization errors go back to the client's redirect URI once it is trusted, with `state` and `iss` (RFC 9207),
and before that are an HTML page — never a redirect to an unverified URI (RFC 6749 §4.1.2.1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from okta_agent_proxy.frontdoor.pages import CONTENT_TYPE, HTML_HEADERS, error_page
from okta_agent_proxy.http.interface import Answer, HttpRequest

MAX_FORM_BYTES = 64 * 1024
MAX_PARAMETERS = 64
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
FORM_TYPE = "application/x-www-form-urlencoded"


class OAuthError(Exception):
    """An OAuth error for the client: `error` is the RFC code; the description is shown to it (no secrets)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def parameters(text: str) -> dict[str, str]:
    """The parameters of a query string or form body; `invalid_request` for a repeated or malformed one."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_PARAMETERS)
    except ValueError:
        raise OAuthError("invalid_request", "too many parameters") from None
    found: dict[str, str] = {}
    seen: set[str] = set()  # an empty repeat counts too: `state=&state=x` is two states
    for name, value in pairs:
        if name in seen:
            raise OAuthError("invalid_request", f"the parameter {name} was sent more than once")
        seen.add(name)
        if value:
            found[name] = value
    return found


async def form(request: HttpRequest, gap: float) -> dict[str, str]:
    """A POST's form parameters (RFC 6749 §3.2: form-encoded, UTF-8)."""
    content_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        raise OAuthError("invalid_request", f"the body must be {FORM_TYPE}")
    body = await request.read_body(MAX_FORM_BYTES, gap)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OAuthError("invalid_request", "the body is not UTF-8") from None
    return parameters(text)


def required(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None:
        raise OAuthError("invalid_request", f"{name} is required")
    return value


def json_answer(document: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(document).encode(), {**NO_STORE, **(headers or {})})


def oauth_error_answer(error: OAuthError) -> Answer:
    headers = {}
    if error.status == 401:  # RFC 6749 §5.2: invalid_client with 401 names the scheme the client could use
        headers["WWW-Authenticate"] = 'Basic realm="okta-agent-proxy"'
    return json_answer({"error": error.error, "error_description": error.description}, error.status, headers)


def html_answer(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
    # aiohttp takes a charset only apart from `content_type`: the whole header is given instead
    return Answer(status, body, {**HTML_HEADERS, "Content-Type": CONTENT_TYPE, **(headers or {})}, content_type=None)


def html_error(title: str, message: str, status: int = 400) -> Answer:
    return html_answer(error_page(title, message), status)


def redirect(uri: str, values: Mapping[str, str | None], headers: Mapping[str, str] | None = None) -> Answer:
    """303 to `uri` with `values` added to its query (a registered URI may carry a query of its own)."""
    parts = urlsplit(uri)
    extra = urlencode({name: value for name, value in values.items() if value is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    location = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    return Answer(303, b"", {**NO_STORE, "Location": location, **(headers or {})}, content_type=None)


def cookies(request: HttpRequest) -> dict[str, str]:
    """The request's cookies (name → value); a name sent twice keeps neither."""
    found: dict[str, str] = {}
    repeated: set[str] = set()
    for header in request.headers.getall("Cookie", ()):
        for item in header.split(";"):
            name, sep, value = item.strip().partition("=")
            if not sep:
                continue
            if name in found:
                repeated.add(name)
            found[name] = value.strip()
    return {name: value for name, value in found.items() if name not in repeated}
