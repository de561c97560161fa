"""Who is calling (DESIGN.md §2, steps 2–3): the verified token, then the agent it was issued to.

`Identity.authenticate` reads the token from `Authorization: Bearer` — the only place a token is read from (RFC 6750
§2.1) — and verifies it; `Identity.identify` finds the agent from the verified token (`X-Agent-ID` is only checked
against it). The result is a `Caller`, which the later steps receive explicitly; its token goes to the credential
step (the Cross App Access subject token) and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDictProxy

from okta_agent_proxy.errors import AuthorizationDenied, InvalidToken, MissingToken
from okta_agent_proxy.inbound.agents import AgentDirectory, IdentifiedAgent
from okta_agent_proxy.inbound.validator import OktaTokenValidator, Principal


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    agent: IdentifiedAgent
    token: str = field(repr=False)

    @property
    def agent_name(self) -> str:
        return self.agent.name

    @property
    def issuer(self) -> str:
        return self.principal.issuer

    @property
    def subject(self) -> str:
        return self.principal.subject

    @property
    def token_expires_at(self) -> float:
        return self.principal.expires_at

    @property
    def grant_id(self) -> str | None:
        """The front-door grant behind the token (its held Okta ID token is Cross App Access's subject)."""
        return self.principal.grant_id

    @property
    def user(self) -> str:
        """The user: the token's `uid` when it has one, else its `sub` (DESIGN.md §2)."""
        return self.principal.uid or self.principal.subject

    @property
    def key(self) -> tuple[str, str]:
        """(user, agent), for per-caller limits."""
        return (self.user, self.agent.name)


@dataclass(frozen=True, slots=True)
class Authenticated:
    principal: Principal
    token: str = field(repr=False)


def bearer_token(headers: CIMultiDictProxy[str]) -> str:
    header = headers.get("Authorization")
    if header is None:
        raise MissingToken("this resource needs an access token")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise InvalidToken("the Authorization header must be 'Bearer <token>'")
    return token


class OwnTokens(Protocol):
    """The gateway's own tokens (the OAuth front door, DESIGN.md §8), good only on the backend they name."""

    def issued(self, token: str) -> bool: ...

    async def verify(self, token: str, backend: str) -> Principal: ...


@dataclass(frozen=True, slots=True)
class Identity:
    validator: OktaTokenValidator | None  # None: only the gateway's own tokens are accepted
    agents: AgentDirectory
    own_tokens: OwnTokens | None = None

    async def authenticate(self, headers: CIMultiDictProxy[str], backend: str) -> Authenticated:
        """The token's verified principal — by the verifier of whoever issued it — for a request to `backend`."""
        token = bearer_token(headers)
        if self.own_tokens is not None and self.own_tokens.issued(token):
            return Authenticated(await self.own_tokens.verify(token, backend), token)
        if self.validator is None:
            raise InvalidToken("this gateway accepts only the tokens it issues: sign in through it")
        return Authenticated(await self.validator.validate(token), token)

    def identify(self, headers: CIMultiDictProxy[str], who: Authenticated) -> Caller:
        """The caller, or AuthorizationDenied."""
        return Caller(who.principal, self.agents.identify(who.principal, headers.get("X-Agent-ID")), who.token)

    def verified_agent(self, denied: AuthorizationDenied) -> str | None:
        """The agent a refusal names, if the token (not the header) says so — what the audit row may keep."""
        return denied.agent_id if self.agents.from_token else None
