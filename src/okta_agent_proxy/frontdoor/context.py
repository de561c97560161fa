"""What the front door's endpoints share: settings, the store, keys, the Okta app, the rules for clients.

One `FrontDoorContext` per process. Nothing in it holds a flow's state: every step of a flow finds what it needs in
the store or in the sealed cookie the browser brings back, so any replica can serve any step (DESIGN.md §8).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.frontdoor.cimd import ClientMetadataFetcher
from okta_agent_proxy.frontdoor.grants import GrantLiveness, HeldIdTokens
from okta_agent_proxy.frontdoor.keyring import Sealers
from okta_agent_proxy.frontdoor.okta_login import OktaLogin
from okta_agent_proxy.frontdoor.redirects import RedirectPolicy
from okta_agent_proxy.frontdoor.resources import ResourceMap
from okta_agent_proxy.frontdoor.tokens import FrontDoorTokens
from okta_agent_proxy.store.frontdoor import FrontDoorStore

log = structlog.get_logger(__name__)
FLOW_SECONDS = 600  # a login and its consent must finish within this (the cookies' and pending values' lifetime)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        return None


def short_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass
class FrontDoorContext:
    settings: Settings
    store: FrontDoorStore
    sealers: Sealers
    login: OktaLogin
    redirects: RedirectPolicy
    resources: ResourceMap
    liveness: GrantLiveness
    held: HeldIdTokens  # the Okta ID token each grant holds: a refresh asks Okta whether the user may go on
    config: Callable[[], GatewayConfig]  # the current generation's
    cimd: ClientMetadataFetcher | None  # None: FRONT_DOOR_CIMD=off
    tokens: FrontDoorTokens | None = field(default=None)  # set by `FrontDoor.start` (the key may come from the store)

    @property
    def issuer(self) -> str:
        return self.settings.base_url

    @property
    def signer(self) -> FrontDoorTokens:
        if self.tokens is None:
            raise RuntimeError("the front door has not started")
        return self.tokens

    def cookie_name(self, kind: str, value: str) -> str:
        """Per flow (several may run in one browser at once: one per backend), `__Host-` over https."""
        name = f"oap-{kind}-{short_hash(value)}"
        return f"__Host-{name}" if self.settings.base_url.startswith("https://") else name

    def set_cookie(self, name: str, value: str, max_age: int = FLOW_SECONDS) -> str:
        secure = "; Secure" if name.startswith("__Host-") else ""
        return f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"

    async def event(
        self,
        kind: str,
        *,
        client_id: str | None = None,
        user_sub: str | None = None,
        grant_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a security event; a store failure is logged, never the request's failure."""
        try:
            await self.store.record_event(
                kind, client_id=client_id, user_sub=user_sub, grant_id=grant_id, detail=detail
            )
        except Exception as exc:  # the event is lost, the answer is not
            log.warning("security_event_not_recorded", kind=kind, reason=type(exc).__name__)
