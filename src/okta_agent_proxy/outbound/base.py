"""The credential seam (DESIGN.md §3): what a backend receives instead of the caller's token.

A `CredentialProvider` turns "this caller, through this agent, wants this backend" into the headers the backend
expects. The static methods (pre-shared key, service account) ignore the caller; Okta Cross App Access mints a
token per user and agent. `invalidate` is called after the backend rejects a credential, so a caching provider can
drop it and the request can be retried once with a fresh one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    backend: str
    agent: str | None = None
    issuer: str | None = None
    subject: str | None = None
    subject_token: str | None = field(default=None, repr=False)  # the caller's access token
    subject_token_expires_at: float | None = None
    id_token: str | None = field(default=None, repr=False)  # from the backend's `id_token_header`, if configured


@dataclass(frozen=True, slots=True)
class Credential:
    headers: Mapping[str, str] = field(repr=False)
    expires_at: float | None = None  # epoch seconds; None: does not expire
    cache_hit: bool | None = None  # None: the method has no cache
    refreshable: bool = False  # True when invalidating may yield a different credential
    id_jag_jti: str | None = None  # the ID-JAG minted for this credential, for the audit log


class CredentialProvider(Protocol):
    method: str

    async def get(self, request: CredentialRequest) -> Credential: ...

    async def invalidate(self, request: CredentialRequest) -> None: ...
