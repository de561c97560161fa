"""The OAuth front door, assembled (DESIGN.md §8): its endpoints, and the check of its tokens on backend routes.

`FrontDoor` is built once per process when `FRONT_DOOR=on`. `routes()` gives the endpoints of §8's table; `verify`
is what the pipeline's authentication step calls for a token this gateway issued (`issued` tells which tokens those
are: signed with one of its keys). Endpoints are served behind the edge checks: the browser pages and the consent
POST with the default rules (an `Origin` must be the gateway's own), the endpoints clients call from anywhere
(metadata, registration, token, revocation, keys) with any `Origin`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

import aiohttp
import structlog

from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.config.settings import Settings, is_loopback_host
from okta_agent_proxy.errors import GatewayError, InternalError, InvalidToken
from okta_agent_proxy.frontdoor import authorize, consent, metadata, registration, token_endpoint
from okta_agent_proxy.frontdoor.cimd import ClientMetadataFetcher
from okta_agent_proxy.frontdoor.context import FrontDoorContext
from okta_agent_proxy.frontdoor.forms import html_error, json_answer
from okta_agent_proxy.frontdoor.grants import GrantLiveness, HeldIdTokens
from okta_agent_proxy.frontdoor.keyring import sealers, signing_keys, state_secret
from okta_agent_proxy.frontdoor.okta_login import OktaApp, OktaLogin
from okta_agent_proxy.frontdoor.redirects import RedirectPolicy
from okta_agent_proxy.frontdoor.resources import InvalidTarget, ResourceMap
from okta_agent_proxy.frontdoor.scopes import supported_scopes
from okta_agent_proxy.frontdoor.tokens import FrontDoorTokens, InvalidFrontDoorToken
from okta_agent_proxy.http.aiohttp_binding import Route
from okta_agent_proxy.http.answers import error_answer
from okta_agent_proxy.http.edge import MCP_ROUTES, PUBLIC_METADATA, Edge, EdgeRules, request_id
from okta_agent_proxy.http.interface import Answer, Endpoint, HttpRequest
from okta_agent_proxy.inbound.validator import Principal
from okta_agent_proxy.keys import load_signing_key
from okta_agent_proxy.outbound.cross_app import org_base_url
from okta_agent_proxy.outbound.oauth_client import ClientAuth
from okta_agent_proxy.policy.rate_limits import RateLimiter
from okta_agent_proxy.store.frontdoor import FrontDoorStore, Retention
from okta_agent_proxy.store.redis import RedisLink

log = structlog.get_logger(__name__)
_MAX_VERIFIED = 10_000
PRUNE_SECONDS = 3600.0
AUTHORIZATIONS_PER_MINUTE = 30  # per client address
_CORS = {"Access-Control-Allow-Origin": "*"}


def okta_app_auth(settings: Settings) -> ClientAuth:
    """How the gateway's own Okta app authenticates at Okta (and, for Cross App Access step 2, at a backend's
    authorization server unless the backend names its own client)."""
    assert settings.OKTA_CLIENT_ID is not None
    if settings.OKTA_CLIENT_PRIVATE_KEY is not None:
        key = load_signing_key(settings.OKTA_CLIENT_PRIVATE_KEY.get_secret_value())
        return ClientAuth.private_key_jwt(settings.OKTA_CLIENT_ID, key)
    assert settings.OKTA_CLIENT_SECRET is not None
    return ClientAuth.client_secret_basic(settings.OKTA_CLIENT_ID, settings.OKTA_CLIENT_SECRET)


def cross_app_auth(settings: Settings) -> ClientAuth:
    """Who signs Cross App Access for front-door callers: the linked AI agent when `FRONT_DOOR_AGENT_*` name one,
    else the gateway's own app (DESIGN.md §8)."""
    if settings.FRONT_DOOR_AGENT_CLIENT_ID and settings.FRONT_DOOR_AGENT_PRIVATE_KEY is not None:
        key = load_signing_key(settings.FRONT_DOOR_AGENT_PRIVATE_KEY.get_secret_value())
        return ClientAuth.private_key_jwt(settings.FRONT_DOOR_AGENT_CLIENT_ID, key)
    return okta_app_auth(settings)


class FrontDoor:
    def __init__(
        self,
        settings: Settings,
        store: FrontDoorStore,
        session: aiohttp.ClientSession,
        config: Callable[[], GatewayConfig],
        backend_of: Callable[[str], str | None],
        *,
        limiter: RateLimiter,
        redis: RedisLink | None = None,
        cimd: ClientMetadataFetcher | None = None,
    ) -> None:
        assert settings.OKTA_DOMAIN is not None and settings.OKTA_CLIENT_ID is not None
        app = OktaApp(
            org=org_base_url(settings.OKTA_DOMAIN),
            client_id=settings.OKTA_CLIENT_ID,
            auth=okta_app_auth(settings),
            redirect_uri=settings.base_url + metadata.CALLBACK,
        )
        self.settings = settings
        self.login = OktaLogin(app, session, leeway=settings.JWT_LEEWAY_SECONDS)
        liveness = GrantLiveness(store, redis=redis)
        keys = sealers(state_secret(settings))
        if cimd is None and settings.front_door_cimd:
            cimd = ClientMetadataFetcher(allow_loopback=_loopback(settings.base_url))
        self.held = HeldIdTokens(store, keys.okta_tokens, self.login, liveness)
        self.context = FrontDoorContext(
            settings=settings,
            store=store,
            sealers=keys,
            login=self.login,
            redirects=RedirectPolicy.from_setting(settings.FRONT_DOOR_REDIRECT_URIS),
            resources=ResourceMap(settings.base_url, backend_of),
            liveness=liveness,
            held=self.held,
            config=config,
            cimd=cimd,
        )
        self.liveness = liveness
        # Per client address, in the gateway's buckets (`limiter`: shared by the replicas with REDIS_URL).
        self._limit = registration.AddressLimit("register", registration.REGISTRATIONS_PER_MINUTE, limiter)
        # A person signs in a few times a minute at most; a script starting authorizations in a loop (each may make
        # the gateway fetch a client metadata document and write a security event) is slowed down here.
        self._authorize_limit = registration.AddressLimit("authorize", AUTHORIZATIONS_PER_MINUTE, limiter)
        self._verified: dict[str, tuple[Principal, str]] = {}  # token hash → its caller and audience
        self._backends: dict[str, str | None] = {}  # a token's audience → the backend it names

    async def start(self) -> None:
        """Load (or make) the signing key; the endpoints and `verify` need it."""
        keys = await signing_keys(self.settings, self.context.store, self.context.sealers.signing_key)
        self.context.tokens = FrontDoorTokens(
            self.settings.base_url,
            keys,
            ttl_seconds=self.settings.FRONT_DOOR_TOKEN_TTL_SECONDS,
            leeway=self.settings.JWT_LEEWAY_SECONDS,
        )

    async def keep_pruning(self, every: float = PRUNE_SECONDS) -> None:
        """Delete what can no longer be used (spent codes and states, dead grants, idle clients, old events), on
        every replica: the deletes are idempotent, so replicas pruning at once only repeat each other's work."""
        while True:
            await asyncio.sleep(every * random.uniform(0.5, 1.0))  # noqa: S311 - spreads replicas, not a secret
            config = self.context.config()
            retention = Retention(
                events=timedelta(days=config.audit.retention_days),
                refresh_grace=timedelta(seconds=self.settings.FRONT_DOOR_REFRESH_GRACE_SECONDS),
            )
            try:
                pruned = await self.context.store.prune(retention)
            except Exception as exc:  # the store is down: try again next time
                log.warning("front_door_prune_failed", reason=type(exc).__name__)
            else:
                log.info("front_door_pruned", **pruned)

    # ------------------------------------------------------------ inbound: the gateway's own tokens

    def issued(self, token: str) -> bool:
        return self.context.tokens is not None and self.context.tokens.issued(token)

    async def verify(self, token: str, backend: str) -> Principal:
        """The caller of a request routed to `backend` with a front-door token; InvalidToken if it is not good
        there (another backend's, expired, forged) or its grant was revoked. A verified token's caller and audience
        are remembered until it expires, as the Okta validator does: one signature check per token."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        verified = self._verified.get(digest)
        if verified is None or verified[0].expires_at + self.settings.JWT_LEEWAY_SECONDS < time.time():
            verified = self._verify(token, digest)
        principal, audience = verified
        if self._backend(audience) != backend:
            raise InvalidToken("the access token was issued for another server behind this gateway")
        assert principal.grant_id is not None
        if not await self.liveness.is_live(principal.grant_id):
            raise InvalidToken("this login was revoked; sign in again")
        return principal

    def _verify(self, token: str, digest: str) -> tuple[Principal, str]:
        try:
            claims = self.context.signer.verify_for(token, lambda audience: True)
        except InvalidFrontDoorToken as refused:
            raise InvalidToken(f"the access token is not valid: {refused}") from None
        principal = Principal(
            issuer=self.settings.base_url,
            subject=claims.subject,
            uid=claims.subject,  # the Okta user id, as an Okta access token's `uid`: one user, whichever token
            client_id=claims.client_id,
            scopes=frozenset(claims.scopes),
            expires_at=claims.expires_at,
            jti=claims.jti,
            token_hash=digest,
            grant_id=claims.grant_id,
            client_name=claims.client_name,
        )
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[digest] = (principal, claims.resource)
        return principal, claims.resource

    def _backend(self, resource: str) -> str | None:
        """The backend a token's audience names, remembered until the next config reload (`reloaded`)."""
        try:
            return self._backends[resource]
        except KeyError:
            pass
        try:
            backend: str | None = self.context.resources.resolve(resource).backend
        except InvalidTarget:
            backend = None
        if len(self._backends) >= _MAX_VERIFIED:
            self._backends.clear()
        self._backends[resource] = backend
        return backend

    def reloaded(self) -> None:
        """The routes may have changed: audiences name backends afresh."""
        self._backends.clear()

    # ------------------------------------------------------------ endpoints

    def routes(self, edge: Edge) -> list[Route]:
        context = self.context

        def bound(handler: Callable[[FrontDoorContext, HttpRequest], object], rules: EdgeRules) -> Endpoint:
            async def endpoint(request: HttpRequest) -> Answer:
                try:
                    edge.check(request, rules)
                    answer = await handler(context, request)  # type: ignore[misc]
                except GatewayError as error:
                    return error_answer(error, request_id(request))
                except Exception:  # a bug or a dead store: logged, answered in the gateway's shape
                    log.exception("front_door_error", path=request.path[:200])
                    return error_answer(InternalError("the front door failed"), request_id(request))
                assert isinstance(answer, Answer)
                return answer

            return endpoint

        async def server_metadata(context: FrontDoorContext, request: HttpRequest) -> Answer:
            config = context.config()
            backend_scopes = {scope for agent in config.agents.values() for scope in agent.scopes}
            document = metadata.authorization_server_metadata(
                context.issuer, supported_scopes(config.front_door, backend_scopes), cimd=context.cimd is not None
            )
            return json_answer(document, headers={**_CORS, "Cache-Control": "max-age=300"})

        async def jwks(context: FrontDoorContext, request: HttpRequest) -> Answer:
            return json_answer(context.signer.jwks(), headers={**_CORS, "Cache-Control": "max-age=300"})

        def address_of(request: HttpRequest) -> str:
            forwarded = request.headers.getall("X-Forwarded-For", ())
            return registration.client_address(request.remote, forwarded, self.settings.trusted_proxies)

        async def authorize_limited(context: FrontDoorContext, request: HttpRequest) -> Answer:
            retry_after = await self._authorize_limit.take(address_of(request))
            if retry_after:
                page = html_error("Too many sign-ins", "Too many sign-ins from this address; try again later.", 429)
                return Answer(page.status, page.body, {**page.headers, "Retry-After": str(retry_after)}, None)
            return await authorize.authorize(context, request)

        async def register(context: FrontDoorContext, request: HttpRequest) -> Answer:
            address = address_of(request)
            answer = await registration.register(context, request, self._limit, address)
            return Answer(answer.status, answer.body, {**answer.headers, **_CORS}, answer.content_type)

        async def with_cors(handler: Callable[..., object], context: FrontDoorContext, request: HttpRequest) -> Answer:
            answer = await handler(context, request)  # type: ignore[misc]
            assert isinstance(answer, Answer)
            return Answer(answer.status, answer.body, {**answer.headers, **_CORS}, answer.content_type)

        async def token(context: FrontDoorContext, request: HttpRequest) -> Answer:
            return await with_cors(token_endpoint.token, context, request)

        async def revoke(context: FrontDoorContext, request: HttpRequest) -> Answer:
            return await with_cors(token_endpoint.revoke, context, request)

        async def preflight(context: FrontDoorContext, request: HttpRequest) -> Answer:
            headers = {
                **_CORS,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, MCP-Protocol-Version",
                "Access-Control-Max-Age": "86400",
            }
            return Answer(204, b"", headers, content_type=None)

        routes = [Route("GET", path, bound(server_metadata, PUBLIC_METADATA)) for path in metadata.WELL_KNOWN_PATHS]
        routes += [
            Route("GET", metadata.JWKS, bound(jwks, PUBLIC_METADATA)),
            Route("POST", metadata.REGISTER, bound(register, PUBLIC_METADATA)),
            Route("POST", metadata.TOKEN, bound(token, PUBLIC_METADATA)),
            Route("POST", metadata.REVOKE, bound(revoke, PUBLIC_METADATA)),
            Route("GET", metadata.AUTHORIZE, bound(authorize_limited, MCP_ROUTES)),
            Route("GET", metadata.CALLBACK, bound(authorize.callback, MCP_ROUTES)),
            Route("POST", metadata.CONSENT, bound(consent.decide, MCP_ROUTES)),
        ]
        for path in (*metadata.WELL_KNOWN_PATHS, metadata.JWKS, metadata.REGISTER, metadata.TOKEN, metadata.REVOKE):
            routes.append(Route("OPTIONS", path, bound(preflight, PUBLIC_METADATA)))
        return routes


def _loopback(base_url: str) -> bool:
    return is_loopback_host(urlsplit(base_url).hostname)
