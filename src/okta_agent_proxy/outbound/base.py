"""The credential seam (DESIGN.md §3): what a backend receives instead of the caller's token.

A `CredentialProvider` turns "this caller, through this agent, wants this backend" into the headers the backend
expects, as an *auth flow* — the shape of httpx's `Auth.auth_flow` and the MCP SDK's OAuth providers: the flow gives
a credential, is shown the status the backend answered it with, and after a 401 may give one more — a caching
provider drops the rejected credential and fetches a fresh one. The static methods (pre-shared key, service account)
ignore the caller and never retry; Okta Cross App Access mints a token per user and agent. The pipeline drives every
flow the same way and never asks which kind it holds.

The flow is an object with two steps rather than an async generator: asyncio registers every async generator in a
WeakSet on its first step, and that, with the generator's own steps, cost 1.5 µs per request (cProfile and
callgrind against the bench's backend), more than all of the static credential's work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Subject(Protocol):
    """What a provider may know of the caller (`inbound.caller.Caller` is one)."""

    @property
    def agent_name(self) -> str: ...

    @property
    def issuer(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def token(self) -> str: ...

    @property
    def token_expires_at(self) -> float: ...

    @property
    def grant_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    backend: str
    agent: str | None = None
    issuer: str | None = None
    subject: str | None = None
    subject_token: str | None = field(default=None, repr=False)  # the caller's access token
    subject_token_expires_at: float | None = None
    id_token: str | None = field(default=None, repr=False)  # from the backend's `id_token_header`, if configured
    grant_id: str | None = None  # a front-door caller's grant: its held Okta ID token is the subject (DESIGN.md §8)


def credential_request(backend: str, caller: Subject | None, id_token: str | None = None) -> CredentialRequest:
    if caller is None:
        return CredentialRequest(backend=backend, id_token=id_token)
    return CredentialRequest(
        backend,
        caller.agent_name,
        caller.issuer,
        caller.subject,
        caller.token,
        caller.token_expires_at,
        id_token,
        caller.grant_id,
    )


@dataclass(frozen=True, slots=True)
class Credential:
    headers: Mapping[str, str] = field(repr=False)
    expires_at: float | None = None  # epoch seconds; None: does not expire
    cache_hit: bool | None = None  # None: the method has no cache
    refreshable: bool = False  # True when invalidating may yield a different credential
    id_jag_jti: str | None = None  # the ID-JAG minted for this credential, for the audit log


class AuthFlow(Protocol):
    """One request's credentials: the first, then — only after a rejection — perhaps one more."""

    async def credential(self) -> Credential: ...

    async def retry(self, status: int) -> Credential | None:
        """The backend answered the last credential with `status` (a 401): a fresh credential to send the same
        request again with, or None for no retry."""
        ...


class CredentialProvider(Protocol):
    method: str

    def auth_flow(self, caller: Subject | None, headers: Mapping[str, str]) -> AuthFlow:
        """`caller` is None without inbound authentication; `headers` are the client's request headers."""
        ...


class Exchanger(Protocol):
    """A provider that mints credentials per caller (wrapped by `CachingProvider`, which gives it its flow)."""

    method: str

    def request_for(self, caller: Subject | None, headers: Mapping[str, str]) -> CredentialRequest: ...

    async def get(self, request: CredentialRequest) -> Credential: ...

    async def invalidate(self, request: CredentialRequest) -> None: ...
