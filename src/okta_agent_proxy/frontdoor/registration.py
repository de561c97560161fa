"""`POST /oauth/register` (DESIGN.md §8; RFC 7591) — dynamic registration of public clients, such as Cursor.

Accepted: `redirect_uris` (required; every one allowed by `FRONT_DOOR_REDIRECT_URIS` and the fixed rules of
`redirects.py` — Cursor registers three at once), `client_name` (≤ 200 characters, printable: it is shown on the
consent page and matched by `agents.<name>.client_names`, declared, never verified), `token_endpoint_auth_method`
`none` (anything else is refused: clients here are public), `grant_types` within authorization_code and
refresh_token, `response_types` `code`. Other metadata is ignored (RFC 7591 §2: "The authorization server MAY
ignore any client metadata"). The answer is 201 with a new `client_id` and no secret.

Registration is open to anyone who can reach the gateway, so it is limited per client address (the peer, or the
address a `TRUSTED_PROXIES` proxy forwarded for): `REGISTRATIONS_PER_MINUTE`, an `AddressLimit` over the gateway's
`RateLimiter` — one budget across replicas and workers with `REDIS_URL`, else this process's.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from okta_agent_proxy.frontdoor.context import FrontDoorContext
from okta_agent_proxy.frontdoor.forms import OAuthError, json_answer, oauth_error_answer
from okta_agent_proxy.frontdoor.redirects import RedirectUriRefused
from okta_agent_proxy.http.interface import Answer, HttpRequest
from okta_agent_proxy.policy.rate_limits import Rate, RateLimiter
from okta_agent_proxy.store.frontdoor import EventKind

MAX_REGISTRATION_BYTES = 16 * 1024
MAX_REDIRECT_URIS = 10
MAX_CLIENT_NAME = 200
REGISTRATIONS_PER_MINUTE = 10
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client's address: the peer's, or — while the peer is a trusted proxy — the nearest address in
    `X-Forwarded-For` that is not itself a trusted proxy (the rightmost untrusted one: a client can write anything
    to the left of what its own proxy appended)."""
    address = peer or "unknown"
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    while hops and _trusted(address, trusted):
        address = hops.pop()
    return address


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class AddressLimit:
    """One of the front door's budgets per client address: a token bucket of `per_minute` a minute, bursts of as
    many, kept by the gateway's `RateLimiter` beside the request budgets — in Redis with `REDIS_URL` (one budget
    across replicas and workers; keys hashed, so no address is stored in clear; Redis down: this process's buckets),
    else in this process's bounded buckets, which drop the buckets nearest to full first and are never cleared
    wholesale. A bucket's key is `("front_door.<name>", address)`: a request budget's starts with "u", "a" or "b",
    so the two never share a bucket."""

    def __init__(self, name: str, per_minute: int, limiter: RateLimiter) -> None:
        self._kind = f"front_door.{name}"
        self._rate = Rate(self._kind, per_minute, per_minute)
        self._limiter = limiter

    async def take(self, address: str) -> int:
        """0 when allowed; else the `Retry-After`: the seconds until the next one is, rounded up, at least 1."""
        refusal = await self._limiter.take((((self._kind, limited_as(address)), self._rate),))
        return 0 if refusal is None else refusal.retry_after


def limited_as(address: str) -> str:
    """The budget an address spends: one per IPv4 address, one per IPv6 /64 (what one host or site is usually
    given: a /128 each would hand it 2^64 budgets), an IPv4-mapped IPv6 address as its IPv4 one, each written one
    way (`2001:DB8::1` and `2001:db8::1` are one address). Anything else (a peer aiohttp could not name) as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _metadata(document: Any, context: FrontDoorContext) -> tuple[list[str], str | None]:
    if not isinstance(document, dict):
        raise OAuthError("invalid_client_metadata", "the body must be a JSON object")
    uris = document.get("redirect_uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(uri, str) for uri in uris):
        raise OAuthError("invalid_redirect_uri", "redirect_uris must be a non-empty list of URIs")
    if len(uris) > MAX_REDIRECT_URIS:
        raise OAuthError("invalid_redirect_uri", f"at most {MAX_REDIRECT_URIS} redirect URIs")
    for uri in uris:
        try:
            context.redirects.check(uri)
        except RedirectUriRefused as refused:
            raise OAuthError("invalid_redirect_uri", f"{uri[:200]} is not allowed ({refused.problem})") from None
    name = document.get("client_name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_CLIENT_NAME or not name.isprintable()):
        raise OAuthError(
            "invalid_client_metadata", f"client_name: printable text, at most {MAX_CLIENT_NAME} characters"
        )
    method = document.get("token_endpoint_auth_method", "none")
    if method != "none":
        raise OAuthError("invalid_client_metadata", "token_endpoint_auth_method must be none: clients here are public")
    grant_types = document.get("grant_types", ["authorization_code"])
    if not isinstance(grant_types, list) or not set(grant_types) <= {"authorization_code", "refresh_token"}:
        raise OAuthError("invalid_client_metadata", "grant_types may hold authorization_code and refresh_token only")
    if document.get("response_types", ["code"]) != ["code"]:
        raise OAuthError("invalid_client_metadata", 'response_types must be ["code"]')
    return list(dict.fromkeys(uris)), name or None


async def register(context: FrontDoorContext, request: HttpRequest, limit: AddressLimit, address: str) -> Answer:
    retry_after = await limit.take(address)
    if retry_after:
        error = OAuthError("slow_down", "too many registrations from this address; try again later", 429)
        refusal = oauth_error_answer(error)
        return Answer(refusal.status, refusal.body, {**refusal.headers, "Retry-After": str(retry_after)})
    try:
        if request.headers.get("Content-Type", "").partition(";")[0].strip().lower() != "application/json":
            raise OAuthError("invalid_client_metadata", "the body must be application/json")
        body = await request.read_body(MAX_REGISTRATION_BYTES, context.settings.HEADER_READ_TIMEOUT_SECONDS)
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_client_metadata", "the body is not JSON") from None
        uris, name = _metadata(document, context)
    except OAuthError as error:
        await context.event(EventKind.REFUSAL, detail={"reason": "registration_refused", "error": error.error})
        return oauth_error_answer(error)
    client = await context.store.register_client(client_name=name, redirect_uris=uris)
    await context.event(EventKind.REGISTRATION, client_id=client.client_id, detail={"client_name": name or ""})
    registered: dict[str, Any] = {
        "client_id": client.client_id,
        "client_id_issued_at": int(client.created_at.timestamp()),
        "redirect_uris": uris,
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    if name is not None:
        registered["client_name"] = name
    return json_answer(registered, 201)
