"""One OAuth 2 token-endpoint client for every outbound grant (DESIGN.md §3).

A token request is a form-encoded POST (RFC 6749 §3.2) authenticated one of three ways: `private_key_jwt`
(RFC 7523 §2.2, a fresh client assertion per request), `client_secret_basic` (RFC 6749 §2.3.1: client id and secret
form-urlencoded, then Base64 — not the raw values), or none (a public client sending `client_id`). Answers are
parsed strictly: a 200 must carry `access_token`; an error body is RFC 6749 §5.2 JSON (`error`,
`error_description`). Transport failures, timeouts and 5xx answers are `TokenEndpointUnavailable` — never mistaken
for a refusal. No secret, assertion or token is ever put into a log line or an exception message.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from pydantic import SecretStr

from okta_agent_proxy.http.bodies import read_at_most
from okta_agent_proxy.keys import SigningKey
from okta_agent_proxy.observability.tracing import client_span, record_status
from okta_agent_proxy.outbound.client_assertion import ASSERTION_TYPE, client_assertion

_MAX_RESPONSE_BYTES = 256 * 1024
_GRANT_PREFIX = "urn:ietf:params:oauth:grant-type:"  # token-exchange (RFC 8693), jwt-bearer (RFC 7523)


@dataclass(frozen=True)
class ClientAuth:
    """How the gateway authenticates to one token endpoint."""

    method: Literal["private_key_jwt", "client_secret_basic", "none"]
    client_id: str
    key: SigningKey | None = field(default=None, repr=False)
    secret: SecretStr | None = field(default=None, repr=False)
    assertion_audience: str | None = None  # None: the token endpoint URL (Okta's rule)

    @staticmethod
    def private_key_jwt(client_id: str, key: SigningKey, assertion_audience: str | None = None) -> ClientAuth:
        return ClientAuth("private_key_jwt", client_id, key=key, assertion_audience=assertion_audience)

    @staticmethod
    def public(client_id: str) -> ClientAuth:
        return ClientAuth("none", client_id)

    @staticmethod
    def client_secret_basic(client_id: str, secret: SecretStr) -> ClientAuth:
        return ClientAuth("client_secret_basic", client_id, secret=secret)


@dataclass(frozen=True)
class TokenResponse:
    access_token: str = field(repr=False)
    token_type: str | None
    expires_in: int | None
    issued_token_type: str | None
    scope: str | None
    received_at: float


class TokenEndpointError(Exception):
    """The server answered with an RFC 6749 §5.2 error. `description` is the server's text: keep it for the audit
    log, not for the client."""

    def __init__(self, status: int, error: str, description: str | None = None) -> None:
        super().__init__(f"token endpoint answered {status} {error}")
        self.status = status
        self.error = error
        self.description = description


class UnreadableTokenResponse(TokenEndpointError):
    """The answer was not a JSON object (an HTML page, an array, garbage), whatever its status."""

    def __init__(self, status: int) -> None:
        super().__init__(status, "invalid_response", f"the token endpoint answered {status} with no JSON object")


class TokenEndpointUnavailable(Exception):
    """The token endpoint could not be reached, timed out, or failed on its side (5xx)."""


def _basic(client_id: str, secret: str) -> str:
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


class TokenEndpointClient:
    def __init__(
        self, session: aiohttp.ClientSession, *, timeout: float = 10.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._clock = clock

    def authenticate(self, token_endpoint: str, auth: ClientAuth) -> tuple[dict[str, str], dict[str, str]]:
        """(extra form fields, extra headers) that authenticate `auth` at `token_endpoint`."""
        if auth.method == "private_key_jwt":
            assert auth.key is not None
            assertion = client_assertion(
                auth.key, auth.client_id, auth.assertion_audience or token_endpoint, clock=self._clock
            )
            return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}, {}
        if auth.method == "client_secret_basic":
            assert auth.secret is not None
            return {}, {"Authorization": _basic(auth.client_id, auth.secret.get_secret_value())}
        return {"client_id": auth.client_id}, {}

    async def request_token(self, token_endpoint: str, params: Mapping[str, str], auth: ClientAuth) -> TokenResponse:
        return _token_response(await self.request_document(token_endpoint, params, auth), self._clock())

    async def request_document(
        self, token_endpoint: str, params: Mapping[str, str], auth: ClientAuth
    ) -> dict[str, Any]:
        """The 200 answer's JSON object, whatever it holds (an OpenID Connect answer has an `id_token` and a
        `refresh_token` that `TokenResponse` does not keep); TokenEndpointError for a refusal
        (UnreadableTokenResponse when the answer is no JSON object), TokenEndpointUnavailable as `_exchange`."""
        fields, headers = self.authenticate(token_endpoint, auth)
        grant = params.get("grant_type", "")
        span_name = f"token {grant.removeprefix(_GRANT_PREFIX)}" if grant else "token"
        status, document = await self._exchange("POST", token_endpoint, headers, {**params, **fields}, span_name)
        if document is None:
            raise UnreadableTokenResponse(status)
        if status != 200:
            error, description = document.get("error"), document.get("error_description")
            return_error = error if isinstance(error, str) and error else "invalid_response"
            raise TokenEndpointError(status, return_error, description if isinstance(description, str) else None)
        return document

    async def fetch_metadata(self, url: str) -> dict[str, Any]:
        status, document = await self._exchange("GET", url, {}, None, "metadata")
        if status != 200 or document is None:
            raise TokenEndpointError(status, "invalid_metadata", f"GET {url} answered {status}")
        return document

    async def _exchange(
        self, method: str, url: str, headers: Mapping[str, str], form: Mapping[str, str] | None, span_name: str
    ) -> tuple[int, dict[str, Any] | None]:
        """(status, JSON object or None); TokenEndpointUnavailable on transport failure, timeout or 5xx. One client
        span per round trip when tracing is on (`span_name`: "token <grant>" or "metadata")."""
        sent = {"Accept": "application/json", **headers}
        try:
            with client_span(span_name, method, url, sent) as span:
                async with self._session.request(
                    method,
                    url,
                    data=form,
                    headers=sent,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                    allow_redirects=False,
                ) as response:
                    body = await read_at_most(response.content, _MAX_RESPONSE_BYTES)
                    status = response.status
                record_status(span, status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenEndpointUnavailable(f"{method} {url} failed: {type(exc).__name__}") from None
        if status >= 500:
            raise TokenEndpointUnavailable(f"{method} {url} answered {status}")
        return status, _json_object(body)


def _json_object(body: bytes) -> dict[str, Any] | None:
    if len(body) > _MAX_RESPONSE_BYTES:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _token_response(document: dict[str, Any], now: float) -> TokenResponse:
    if not isinstance(document.get("access_token"), str) or not document["access_token"]:
        raise TokenEndpointError(200, "invalid_response", "the token response has no access_token")
    expires_in = document.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)

    def text(name: str) -> str | None:
        value = document.get(name)
        return value if isinstance(value, str) else None

    return TokenResponse(
        access_token=document["access_token"],
        token_type=text("token_type"),
        expires_in=expires_in if isinstance(expires_in, int) and not isinstance(expires_in, bool) else None,
        issued_token_type=text("issued_token_type"),
        scope=text("scope"),
        received_at=now,
    )
