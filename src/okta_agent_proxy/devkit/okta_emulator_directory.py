"""The emulated Okta org's directory: its users, its apps (OAuth clients and AI agents) and its custom authorization
servers, as the tests and the demo declare them. Plain data: the rules that use it live with the endpoints
(`okta_emulator.py`, `okta_emulator_clients.py`, `okta_emulator_login.py`, `okta_emulator_xaa.py`).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = [
    "AI_AGENT_PREFIX",
    "OIDC_SCOPES",
    "ORG",
    "App",
    "AuthorizationServer",
    "RefreshTokenRotation",
    "User",
    "by_key",
    "okta_id",
]

_T = TypeVar("_T")

ORG = "org"  # the id under which the org authorization server is addressed in the emulator's API
OIDC_SCOPES = ("openid", "profile", "email", "address", "phone", "offline_access", "groups")
AI_AGENT_PREFIX = "wlp"  # Okta's AI agents are workload principals: `wlp…` client ids
RefreshTokenRotation = Literal["STATIC", "ROTATE"]  # Okta's `settings.oauthClient.refresh_token.rotation_type`
_ID_ALPHABET = string.ascii_letters + string.digits
_SERVER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def okta_id(prefix: str) -> str:
    """An Okta-style object id: a type prefix (`00u` user, `0oa` app, `00o` org) and 17 random characters."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))


@dataclass(frozen=True)
class User:
    """An Okta user: `login` becomes the access token's `sub`, `uid` its `uid` (and the ID token's `sub`).

    `password`: what the sign-in page accepts (None: the user cannot sign in). `name`: the display name, the ID
    token's `name` (default: the login). `groups`: the Okta groups the user belongs to besides `Everyone`, which on
    Okta holds every user. The login doubles as the `email`, as on most Okta orgs."""

    login: str
    uid: str = field(default_factory=lambda: okta_id("00u"))
    password: str | None = field(default=None, repr=False)
    name: str = ""
    groups: tuple[str, ...] = ()

    @property
    def display_name(self) -> str:
        return self.name or self.login


@dataclass(frozen=True)
class App:
    """An OAuth client registered with the org (an OIDC app, a service app, or an AI agent's `wlp…` principal).

    `client_secret` enables `client_secret_basic`/`client_secret_post`; `public_jwk` enables `private_key_jwt`.
    An app with neither is a public client (SPA or native app): it authenticates at /v1/token by its `client_id` alone,
    and only for the user grants (authorization_code, refresh_token), where PKCE is then required.
    `linked_client_id`: an AI agent's linked OIDC sign-on app, whose ID tokens the agent may exchange for ID-JAGs.

    Sign-in (`okta_emulator_login.py`), as an OIDC app's settings in Okta's Admin Console:
    `redirect_uris`: its "Sign-in redirect URIs", matched exactly. `require_pkce`: "Require PKCE as additional
    verification" (always on for public clients). `groups_claim_filter`: the ID token's "Groups claim filter"
    (`groups`, "Matches regex"; None: no groups claim); Okta adds the claim only when the `groups` scope is requested.
    `refresh_token_rotation`: "Use persistent token" (STATIC, Okta's default for web apps) or "Rotate token after
    every use" (ROTATE, Okta's default for SPAs), with `refresh_token_leeway_seconds` of grace (Okta's default 30).
    """

    client_id: str
    name: str
    client_secret: str | None = field(default=None, repr=False)
    public_jwk: Mapping[str, Any] | None = None
    linked_client_id: str | None = None
    redirect_uris: tuple[str, ...] = ()
    require_pkce: bool = False
    groups_claim_filter: str | None = ".*"
    refresh_token_rotation: RefreshTokenRotation = "STATIC"
    refresh_token_leeway_seconds: int = 30

    def __post_init__(self) -> None:
        if self.public_jwk is not None and any(k in self.public_jwk for k in ("d", "p", "q", "k")):
            raise ValueError(f"app {self.client_id}: public_jwk holds private key material")
        if self.groups_claim_filter is not None:
            re.compile(self.groups_claim_filter)  # re.error: not a regular expression
        if self.refresh_token_rotation not in ("STATIC", "ROTATE") or self.refresh_token_leeway_seconds < 0:
            raise ValueError(f"app {self.client_id}: invalid refresh token settings")

    @property
    def public(self) -> bool:
        """No credential of its own (a SPA or native app): PKCE stands in for client authentication."""
        return self.client_secret is None and self.public_jwk is None

    @property
    def ai_agent(self) -> bool:
        """An AI agent's principal (`wlp…`), which Okta lets request ID-JAGs only with private_key_jwt."""
        return self.client_id.startswith(AI_AGENT_PREFIX)


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
