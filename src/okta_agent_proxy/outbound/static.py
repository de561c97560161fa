"""The two static backend credentials: a pre-shared key in one header, and HTTP Basic (RFC 7617).

Both are computed once at start: the same headers go with every request, whoever the caller is. A backend that
rejects them cannot be helped by a retry, so `refreshable` is False.
"""

from __future__ import annotations

import base64

from okta_agent_proxy.config.models import PreSharedKeyAuth, ServiceAccountAuth
from okta_agent_proxy.errors import CredentialUnavailable
from okta_agent_proxy.outbound.base import Credential, CredentialRequest


class StaticProvider:
    def __init__(self, method: str, headers: dict[str, str]) -> None:
        self.method = method
        self._credential = Credential(headers=headers)

    async def get(self, request: CredentialRequest) -> Credential:
        return self._credential

    async def invalidate(self, request: CredentialRequest) -> None:
        return None


def pre_shared_key(auth: PreSharedKeyAuth) -> StaticProvider:
    return StaticProvider("pre-shared-key", {auth.header_name: auth.key.get_secret_value()})


def service_account(auth: ServiceAccountAuth) -> StaticProvider:
    pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
    return StaticProvider("service-account", {"Authorization": "Basic " + base64.b64encode(pair).decode()})


class UnavailableProvider:
    """Stands in for a method this build cannot perform yet, with an explicit error rather than a silent pass."""

    def __init__(self, method: str, reason: str) -> None:
        self.method = method
        self._reason = reason

    async def get(self, request: CredentialRequest) -> Credential:
        raise CredentialUnavailable(self._reason, agent_id=request.agent)

    async def invalidate(self, request: CredentialRequest) -> None:
        return None
