"""The two static backend credentials: a pre-shared key in one header, and HTTP Basic (RFC 7617).

Both are computed once at start: the same headers go with every request, whoever the caller is. A backend that
rejects them cannot be helped by a retry, so `refreshable` is False.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from okta_agent_proxy.config.models import PreSharedKeyAuth, ServiceAccountAuth
from okta_agent_proxy.errors import CredentialUnavailable
from okta_agent_proxy.outbound.base import AuthFlow, Credential, Subject


class _StaticFlow:
    """The same credential for every request; a rejection is not helped by sending the same headers again."""

    def __init__(self, credential: Credential) -> None:
        self._credential = credential

    async def credential(self) -> Credential:
        return self._credential

    async def retry(self, status: int) -> Credential | None:
        return None


class StaticProvider:
    def __init__(self, method: str, headers: dict[str, str]) -> None:
        self.method = method
        self._flow = _StaticFlow(Credential(headers=headers))  # one for every request: it holds no state

    def auth_flow(self, caller: Subject | None, headers: Mapping[str, str]) -> AuthFlow:
        return self._flow


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

    def auth_flow(self, caller: Subject | None, headers: Mapping[str, str]) -> AuthFlow:
        return _Refusing(CredentialUnavailable(self._reason, agent_id=caller.agent_name if caller else None))


class _Refusing:
    def __init__(self, error: CredentialUnavailable) -> None:
        self._error = error

    async def credential(self) -> Credential:
        raise self._error

    async def retry(self, status: int) -> Credential | None:
        return None
