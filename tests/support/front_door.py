"""The OAuth front door's test stack (DESIGN.md §8): the Okta emulator with the gateway's own OIDC app and users who
sign in with a password, a Cross App Access backend that validates what its authorization server minted, the
devkit's SDK backends, and the gateway (`build_app` with a migrated store) with `FRONT_DOOR=on`.

`Browser` walks the login as a person's browser does, one hop at a time (no redirect followed by itself): the
gateway's `/oauth/authorize`, the emulator's sign-in form, the gateway's callback, the consent page and its form,
and stops at the redirect to the client, whose query it returns.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp

from okta_agent_proxy.devkit.okta_emulator import App, AuthorizationServer, OktaEmulator, User, XaaPolicy

from .gateway import bound_socket, psk_backend
from .processes import LOOPBACK
from .stacks import AgentKey, AuditedGateway, ValidatingBackend, audited_gateway, validating_backend, xaa_backend

GATEWAY_APP = "0oafrontdoor00000001"
LINKED_AGENT = "wlpfrontdooragent001"  # an Okta AI agent linked to the gateway's app
APP_SECRET = "front-door-app-secret-0123456789"
BACKEND_AS = "aus-backend"
ADA = User(
    "ada@example.com", "00uada0000000000001x", password="correct horse", name="Ada Lovelace", groups=("Engineering",)
)
BOB = User("bob@example.com", "00ubob00000000000001", password="bob's password", name="Bob Smith")
STATE_KEY = "state-encryption-key-for-tests-0123456789"


@dataclass
class FrontDoorStack:
    gateway: AuditedGateway
    idp: OktaEmulator
    xaa: ValidatingBackend

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway.port}"

    def url(self, path: str) -> str:
        return self.base_url + path


def front_door_yaml(employees_url: str, partners_url: str, xaa: dict[str, Any], **front_door: Any) -> dict[str, Any]:
    """/employees and /partners (pre-shared key to the devkit's SDK backends) and /xaa (Cross App Access)."""
    return {
        "backends": {
            "employees": psk_backend(employees_url, "/employees"),
            "partners": psk_backend(partners_url, "/partners"),
            "xaa": xaa,
        },
        "agents": {
            "claude-code": {
                "client_id": "0oaclaudecode0000001",
                "client_names": ["Claude Code*", "MCP SDK test client*"],
                "scopes": ["mcp:read"],
                "backend_access": ["employees", "xaa"],
            },
            "fallback": {
                "client_id": "0oafallback000000001",
                "scopes": ["mcp:read"],
                "backend_access": ["employees", "partners", "xaa"],
            },
        },
        "front_door": {
            "default_agent": "fallback",
            "default_scopes": ["mcp:read"],
            "scopes_by_group": {"Engineering": ["mcp:write"]},
            **front_door,
        },
    }


@asynccontextmanager
async def front_door_stack(
    database: str,
    employees_url: str,
    partners_url: str,
    *,
    settings: Mapping[str, Any] | None = None,
    front_door: Mapping[str, Any] | None = None,
    app: Mapping[str, Any] | None = None,
    xaa_mode: str = "static",
    linked_agent: AgentKey | None = None,
) -> AsyncIterator[FrontDoorStack]:
    """`xaa_mode`: how /xaa finds its authorization server — from the config (static), or from the backend's RFC
    9728 metadata (dynamic). `linked_agent`: an Okta AI agent (`LINKED_AGENT`) linked to the gateway's app, with
    this key, signs Cross App Access instead of the app (`FRONT_DOOR_AGENT_*`)."""
    sock = bound_socket()
    base = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    gateway_app = App(
        GATEWAY_APP,
        "Okta Agent Proxy",
        client_secret=APP_SECRET,
        redirect_uris=(base + "/oauth/callback",),
        **(app or {}),
    )
    async with AsyncExitStack() as stack:
        apps, policies = [gateway_app], [XaaPolicy(GATEWAY_APP, BACKEND_AS)]
        agent_settings: dict[str, Any] = {}
        if linked_agent is not None:
            apps.append(
                App(LINKED_AGENT, "Gateway agent", public_jwk=linked_agent.public_jwk, linked_client_id=GATEWAY_APP)
            )
            policies = [XaaPolicy(LINKED_AGENT, BACKEND_AS)]  # only the agent may get ID-JAGs: the app may not
            agent_settings = {
                "FRONT_DOOR_AGENT_CLIENT_ID": LINKED_AGENT,
                "FRONT_DOOR_AGENT_PRIVATE_KEY": json.dumps(linked_agent.config_value),
            }
        idp = OktaEmulator(
            auth_servers=[AuthorizationServer(BACKEND_AS, "api://backend", scopes=("backend:read",))],
            users=[ADA, BOB],
            apps=apps,
            xaa_policies=policies,
            sign_in_notice="Test user: ada@example.com / correct horse",
        )
        await stack.enter_async_context(idp)
        backend = await stack.enter_async_context(validating_backend(idp, BACKEND_AS))
        discovered = {"target_authorization_server": None, "target_token_endpoint": None}
        backend.serve_prm = xaa_mode == "dynamic"
        auth = {"id_jag_mode": "dynamic", **discovered} if xaa_mode == "dynamic" else {}
        xaa = xaa_backend(idp, backend.resource, "/xaa", auth_server=BACKEND_AS, **auth)
        config = front_door_yaml(employees_url, partners_url, xaa, **(front_door or {}))
        values = {
            "FRONT_DOOR": "on",
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_CLIENT_ID": GATEWAY_APP,
            "OKTA_CLIENT_SECRET": APP_SECRET,
            "STATE_ENCRYPTION_KEY": STATE_KEY,
            **agent_settings,
            **(settings or {}),
        }
        gateway = await stack.enter_async_context(audited_gateway(config, database, settings=values, sock=sock))
        yield FrontDoorStack(gateway, idp, backend)


class Page(HTMLParser):
    """A page's one form: its action, method, fields and submit buttons."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms = 0
        self.action: str | None = None
        self.method: str | None = None
        self.fields: dict[str, str] = {}
        self.buttons: list[tuple[str, str]] = []
        self.scripts = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.forms += 1
            self.action, self.method = attributes.get("action"), (attributes.get("method") or "get").lower()
        elif tag == "input" and attributes.get("name") and attributes.get("type") != "submit":
            self.fields[str(attributes["name"])] = attributes.get("value") or ""
        elif tag in ("button", "input") and attributes.get("type", "submit") == "submit" and attributes.get("name"):
            self.buttons.append((str(attributes["name"]), attributes.get("value") or ""))
        elif tag == "script":
            self.scripts += 1


@dataclass
class Hop:
    status: int
    headers: Mapping[str, str]
    text: str
    url: str


@dataclass
class Browser:
    """One person's browser: a cookie jar, and each hop seen (redirects followed by `walk`, not by aiohttp)."""

    http: aiohttp.ClientSession
    hops: list[Hop] = field(default_factory=list)

    async def get(self, url: str) -> Hop:
        async with self.http.get(url, allow_redirects=False) as response:
            hop = Hop(response.status, response.headers, await response.text(), url)
        self.hops.append(hop)
        return hop

    async def post(self, url: str, form: Mapping[str, str], headers: Mapping[str, str] | None = None) -> Hop:
        """A form posted from a page of the same origin, with the `Origin` a browser sends."""
        parts = urlsplit(url)
        sent = {"Origin": f"{parts.scheme}://{parts.netloc}", **(headers or {})}
        async with self.http.post(url, data=dict(form), headers=sent, allow_redirects=False) as response:
            hop = Hop(response.status, response.headers, await response.text(), url)
        self.hops.append(hop)
        return hop

    async def follow(self, hop: Hop, stop_at: str) -> Hop:
        """Follow redirects from `hop` until a page, or a redirect to a URL starting with `stop_at`."""
        while hop.status in (301, 302, 303, 307) and not hop.headers["Location"].startswith(stop_at):
            hop = await self.get(urljoin(hop.url, hop.headers["Location"]))
        return hop

    async def sign_in(self, authorize_url: str, redirect_uri: str, user: User = ADA) -> Hop:
        """From the client's authorization URL to the page after Okta (the consent page), or to the redirect to
        the client when there is nothing to approve."""
        hop = await self.follow(await self.get(authorize_url), redirect_uri)
        if hop.status != 200 or "password" not in hop.text:
            return hop  # an error page of the gateway, or back at the client already
        login = Page(hop.text)
        assert login.method == "post" and login.action, hop.text
        form = {**login.fields, "username": user.login, "password": str(user.password)}
        return await self.follow(await self.post(urljoin(hop.url, login.action), form), redirect_uri)

    async def consent(self, page: Hop, decision: str = "approve", redirect_uri: str = "") -> Hop:
        form = Page(page.text)
        assert form.forms == 1 and form.method == "post", page.text
        assert ("decision", decision) in form.buttons, form.buttons
        return await self.post(urljoin(page.url, form.action), {**form.fields, "decision": decision})

    async def authorize(
        self, authorize_url: str, redirect_uri: str, user: User = ADA, decision: str = "approve"
    ) -> dict[str, str]:
        """The whole walk; the query the client's redirect URI receives."""
        hop = await self.sign_in(authorize_url, redirect_uri, user)
        if hop.status == 200:
            hop = await self.consent(hop, decision)
        assert hop.status in (302, 303), (hop.status, hop.text)
        return redirect_params(hop.headers["Location"], redirect_uri)


def redirect_params(location: str, redirect_uri: str) -> dict[str, str]:
    assert location.startswith(redirect_uri), (location, redirect_uri)
    params = parse_qs(urlsplit(location).query, keep_blank_values=True)
    assert all(len(values) == 1 for values in params.values()), params
    return {name: values[0] for name, values in params.items()}


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1, as a browser keeps them
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=15)) as http:
        yield Browser(http)


@dataclass
class Pkce:
    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    state: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def challenge(self) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(self.verifier.encode()).digest()).rstrip(b"=").decode()
