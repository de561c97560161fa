"""The emulated Okta org's directory: its users, its apps (OAuth clients and AI agents) and its custom authorization
servers, as the tests and the demo declare them. Plain data: the rules that use it live with the endpoints
(`okta_emulator.py`, `okta_emulator_clients.py`, `okta_emulator_xaa.py`).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["OIDC_SCOPES", "ORG", "App", "AuthorizationServer", "User", "by_key", "okta_id"]

_T = TypeVar("_T")

ORG = "org"  # the id under which the org authorization server is addressed in the emulator's API
OIDC_SCOPES = ("openid", "profile", "email", "address", "phone", "offline_access", "groups")
_ID_ALPHABET = string.ascii_letters + string.digits
_SERVER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def okta_id(prefix: str) -> str:
    """An Okta-style object id: a type prefix (`00u` user, `0oa` app, `00o` org) and 17 random characters."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))


@dataclass(frozen=True)
class User:
    """An Okta user: `login` becomes the access token's `sub`, `uid` its `uid` (and the ID token's `sub`)."""

    login: str
    uid: str = field(default_factory=lambda: okta_id("00u"))


@dataclass(frozen=True)
class App:
    """An OAuth client registered with the org (an OIDC app, a service app, or an AI agent's `wlp…` principal).

    `client_secret` enables `client_secret_basic`/`client_secret_post`; `public_jwk` enables `private_key_jwt`.
    An app with neither is a public client: tokens can be minted for it, but it cannot authenticate at /v1/token.
    `linked_client_id`: an AI agent's linked OIDC sign-on app, whose ID tokens the agent may exchange for ID-JAGs.
    """

    client_id: str
    name: str
    client_secret: str | None = field(default=None, repr=False)
    public_jwk: Mapping[str, Any] | None = None
    linked_client_id: str | None = None

    def __post_init__(self) -> None:
        if self.public_jwk is not None and any(k in self.public_jwk for k in ("d", "p", "q", "k")):
            raise ValueError(f"app {self.client_id}: public_jwk holds private key material")


@dataclass(frozen=True)
class AuthorizationServer:
    """A custom authorization server `/oauth2/{id}`: its default `aud` and its scopes (empty: any custom scope).

    `default_scopes`: what a client_credentials grant gets when its request names none.
    `resources`: the resources (MCP servers) it protects; when declared, an ID-JAG's `resource` must be one of them.
    `jwt_bearer`: it redeems ID-JAGs (RFC 7523 jwt-bearer grant, advertised with the id-jag grant profile)."""

    id: str
    audience: str
    scopes: tuple[str, ...] = ()
    default_scopes: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    jwt_bearer: bool = True

    def __post_init__(self) -> None:
        if self.id in (ORG, "v1") or not _SERVER_ID.fullmatch(self.id):
            raise ValueError(f"invalid custom authorization server id {self.id!r}")


def by_key(items: Sequence[_T], key: Callable[[_T], str], what: str) -> dict[str, _T]:
    """`items` by their key; two items with one key are a configuration error."""
    indexed = {key(item): item for item in items}
    if len(indexed) != len(items):
        raise ValueError(f"duplicate {what}")
    return indexed
