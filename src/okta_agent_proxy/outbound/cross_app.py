"""The `okta-cross-app` credential: a token minted for one backend, for one user, through one agent (DESIGN.md §3).

For each (user, agent, backend) the provider runs the two ID-JAG steps (`id_jag.py`): at Okta's org authorization
server with the agent's own key, then at the backend's authorization server — found in config (`static`) or by
discovery (`dynamic`). The caller's token is only ever a `subject_token` sent to Okta; it never reaches a backend.

Errors map as DESIGN.md §1's table says, so a client sees what it can act on:
- Okta rejects the subject token (`invalid_grant` at step 1) → 401 with the gateway's challenge (log in again);
- a policy refusal (`access_denied`, `unauthorized_client`, `invalid_scope`, `invalid_target`, `invalid_grant` at
  step 2, …) → 403 `token_exchange_failed`;
- `invalid_client` anywhere → 502: the gateway itself is misconfigured (logged loudly);
- the IdP or AS unreachable, timing out or failing (5xx) → 503 `idp_unavailable` with Retry-After — never a
  revocation.
The IdP's own description is logged for the operator and never sent to the client. Caching is `CachingProvider`'s.

A caller who logged in through the OAuth front door (DESIGN.md §8) brings the gateway's own token, which Okta does
not know: step 1 then presents the Okta ID token the gateway holds for that login (`subject_token_type` id_token),
authenticated as the gateway's Okta app — the ID token's audience — or as the AI agent linked to it; step 2
authenticates as that same client unless the backend names its own (`target_client_id`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn, Protocol

import jwt
import structlog

from okta_agent_proxy.config.models import Agent, CrossAppBackend
from okta_agent_proxy.errors import (
    CredentialUnavailable,
    GatewayError,
    IdpUnavailable,
    InvalidToken,
    TokenExchangeFailed,
)
from okta_agent_proxy.outbound.base import Credential, CredentialRequest, Subject, credential_request
from okta_agent_proxy.outbound.discovery import AuthorizationServerInfo, AuthServerDiscovery
from okta_agent_proxy.outbound.id_jag import (
    ACCESS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    exchange_for_id_jag,
    redeem_id_jag,
)
from okta_agent_proxy.outbound.oauth_client import (
    ClientAuth,
    TokenEndpointClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
)

log = structlog.get_logger(__name__)
DEFAULT_LIFETIME_SECONDS = 300  # when a token response omits expires_in


def org_base_url(okta_domain: str) -> str:
    """`dev-1.okta.com` → `https://dev-1.okta.com` (no scheme means https); the org AS issuer."""
    domain = okta_domain.rstrip("/")
    return domain if "://" in domain else f"https://{domain}"


class HeldIdTokens(Protocol):
    async def id_token(self, grant_id: str) -> str: ...


@dataclass(frozen=True)
class FrontDoorLogins:
    """What Cross App Access needs for front-door callers: their held ID tokens, and who presents them."""

    id_tokens: HeldIdTokens
    auth: ClientAuth


class CrossAppProvider:
    method = "okta-cross-app"

    def __init__(
        self,
        backend_name: str,
        backend: CrossAppBackend,
        agents: Mapping[str, Agent],
        *,
        okta_domain: str,
        client: TokenEndpointClient,
        discovery: AuthServerDiscovery,
        front_door: FrontDoorLogins | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._front_door = front_door
        self._name = backend_name
        self._config = backend.auth_config
        self._resource = backend.auth_config.resource or backend.url
        self._agents = agents
        self._org_issuer = org_base_url(okta_domain)
        self._org_token_endpoint = f"{self._org_issuer}/oauth2/v1/token"
        self._client = client
        self._discovery = discovery
        self._clock = clock

    async def invalidate(self, request: CredentialRequest) -> None:
        return None  # nothing is kept here; the cache in front of this provider drops its entry

    def request_for(self, caller: Subject | None, headers: Mapping[str, str]) -> CredentialRequest:
        id_token_header = self._config.id_token_header
        return credential_request(self._name, caller, headers.get(id_token_header) if id_token_header else None)

    async def get(self, request: CredentialRequest) -> Credential:
        if request.grant_id is not None:
            if self._front_door is None:
                raise CredentialUnavailable("the front door is off", agent_id=request.agent)
            subject_token = await self._front_door.id_tokens.id_token(request.grant_id)
            subject_type = ID_TOKEN_TYPE
            target = await self._target(request.agent)
            step1_auth = self._front_door.auth
            step2_auth = self._step2_front_door_auth(target)
        else:
            agent = self._agents.get(request.agent or "")
            if agent is None or agent.private_key is None:
                raise CredentialUnavailable(
                    f"agent {request.agent} has no key for Cross App Access to {self._name}", agent_id=request.agent
                )
            subject_token, subject_type = self._subject(request)
            target = await self._target(request.agent)
            step1_auth = ClientAuth.private_key_jwt(
                agent.client_id,
                agent.private_key,
                self._org_issuer if self._config.client_assertion_audience == "issuer" else None,
            )
            step2_auth = self._step2_auth(agent, target)
        try:
            grant = await exchange_for_id_jag(
                self._client,
                token_endpoint=self._org_token_endpoint,
                auth=step1_auth,
                subject_token=subject_token,
                subject_token_type=subject_type,
                audience=target.issuer,
                resource=self._resource,
                scopes=self._config.scopes,
            )
        except (TokenEndpointError, TokenEndpointUnavailable) as exc:
            self._fail(exc, step=1, agent=request.agent)
        try:
            token = await redeem_id_jag(
                self._client,
                token_endpoint=target.token_endpoint,
                auth=step2_auth,
                id_jag=grant.access_token,
                scopes=self._config.scopes,
            )
        except (TokenEndpointError, TokenEndpointUnavailable) as exc:
            self._fail(exc, step=2, agent=request.agent)
        if token.token_type is not None and token.token_type.lower() != "bearer":
            log.error("token_exchange_unsupported_token_type", backend=self._name, token_type=token.token_type)
            raise CredentialUnavailable(f"the authorization server of {self._name} issued a non-Bearer token")
        lifetime = token.expires_in if token.expires_in is not None else DEFAULT_LIFETIME_SECONDS
        id_jag_jti = _jti(grant.access_token)
        log.info(
            "token_exchange_completed",
            backend=self._name,
            agent=request.agent,
            subject=request.subject,
            audience=target.issuer,
            resource=self._resource,
            id_jag_jti=id_jag_jti,
            granted_scope=token.scope,
            expires_in=lifetime,
        )
        return Credential(
            headers={"Authorization": f"Bearer {token.access_token}"},
            expires_at=token.received_at + lifetime,
            refreshable=True,
            id_jag_jti=id_jag_jti,
        )

    def _subject(self, request: CredentialRequest) -> tuple[str, str]:
        if self._config.subject_token == "id_token":
            if not request.id_token:
                raise InvalidToken(f"an ID token is required in {self._config.id_token_header}", agent_id=request.agent)
            return request.id_token, ID_TOKEN_TYPE
        if not request.subject_token:
            raise InvalidToken("an access token is required", agent_id=request.agent)
        return request.subject_token, ACCESS_TOKEN_TYPE

    async def _target(self, agent: str | None) -> AuthorizationServerInfo:
        config = self._config
        if config.id_jag_mode == "static":
            assert config.target_authorization_server is not None and config.target_token_endpoint is not None
            return AuthorizationServerInfo(config.target_authorization_server, config.target_token_endpoint, ())
        try:
            return await self._discovery.for_resource(self._resource)
        except TokenEndpointUnavailable:
            raise IdpUnavailable(
                f"the authorization server of {self._name} cannot be reached", agent_id=agent
            ) from None
        except TokenEndpointError as exc:
            log.error("authorization_server_discovery_failed", backend=self._name, reason=exc.description)
            raise CredentialUnavailable(
                f"the authorization server of {self._name} could not be discovered", agent_id=agent
            ) from None

    def _step2_auth(self, agent: Agent, target: AuthorizationServerInfo) -> ClientAuth:
        config = self._config
        if config.target_client_secret is not None and config.target_client_id is not None:
            return ClientAuth.client_secret_basic(config.target_client_id, config.target_client_secret)
        assert agent.private_key is not None
        audience = target.issuer if config.client_assertion_audience == "issuer" else None
        return ClientAuth.private_key_jwt(config.target_client_id or agent.client_id, agent.private_key, audience)

    def _step2_front_door_auth(self, target: AuthorizationServerInfo) -> ClientAuth:
        config = self._config
        if config.target_client_secret is not None and config.target_client_id is not None:
            return ClientAuth.client_secret_basic(config.target_client_id, config.target_client_secret)
        assert self._front_door is not None
        auth = self._front_door.auth
        if auth.method == "private_key_jwt" and auth.key is not None:
            audience = target.issuer if config.client_assertion_audience == "issuer" else None
            return ClientAuth.private_key_jwt(config.target_client_id or auth.client_id, auth.key, audience)
        return auth

    def _fail(self, exc: TokenEndpointError | TokenEndpointUnavailable, *, step: int, agent: str | None) -> NoReturn:
        where = "Okta" if step == 1 else f"the authorization server of {self._name}"
        if isinstance(exc, TokenEndpointUnavailable):
            log.warning("token_exchange_unavailable", backend=self._name, step=step, reason=str(exc))
            raise IdpUnavailable(f"{where} is unavailable", agent_id=agent) from None
        fields = {"backend": self._name, "agent": agent, "step": step, "error": exc.error, "detail": exc.description}
        error: GatewayError
        if exc.error == "invalid_client":
            log.error("token_exchange_misconfigured", **fields)
            error = CredentialUnavailable(f"{where} does not accept the gateway's client credentials", agent_id=agent)
        elif step == 1 and exc.error == "invalid_grant":
            log.info("token_exchange_subject_rejected", **fields)
            error = InvalidToken("the identity provider no longer accepts this access token", agent_id=agent)
        elif exc.error in ("invalid_request", "invalid_response", "unsupported_grant_type", "invalid_metadata"):
            log.error("token_exchange_protocol_error", **fields)
            error = CredentialUnavailable(f"{where} could not complete the token exchange", agent_id=agent)
        else:
            log.info("token_exchange_refused", **fields)
            error = TokenExchangeFailed(f"{where} refused a credential for backend {self._name}", agent_id=agent)
        error.detail = exc.description or exc.error
        raise error from None


def _jti(assertion: str) -> str | None:
    """The ID-JAG's `jti`, read without verification — only for the audit record; the AS verifies it."""
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    jti = claims.get("jti")
    return jti if isinstance(jti, str) else None
