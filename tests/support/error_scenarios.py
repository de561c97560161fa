"""The error scenarios of docs/SEQUENCE.md, each played against the real gateway and the embedded Okta emulator.

The setup follows tests/integration/test_inbound_auth.py and test_cross_app_access.py: an emulated Okta org with a
custom authorization server for the gateway's callers (`aus-gateway`) and one for the `employees` backend
(`aus-employees`); an AI agent `cursor` (`wlp…`, an EC key registered with the org, a Cross App Access policy for
`aus-employees`); a backend that accepts only tokens `aus-employees` minted for its own URL (and can be told to
answer 401); and the gateway, from `running_gateway`, routing `/employees` (okta-cross-app, static) and `/partners`
(pre-shared key, which `cursor` may not reach).

`SCENARIOS` maps each scenario name — the first column of the SEQUENCE.md error table — to a coroutine that builds
that situation and returns what the gateway answered (`Answer`). Each scenario gets a fresh stack, so caches and
remembered refusals never leak from one row into the next.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from okta_agent_proxy.devkit.okta_emulator import ORG, User

from .gateway import DEFAULT_KEY, RunningGateway, psk_backend, running_gateway
from .okta_faults import FaultyOktaEmulator, JwksMode
from .stacks import CURSOR_CLIENT_ID as CURSOR
from .stacks import EMPLOYEES_AS as BACKEND_AS
from .stacks import GATEWAY_AS, ValidatingBackend, ec_agent_key, employees_org, validating_backend, xaa_backend

__all__ = ["SCENARIOS", "Answer", "ErrorStack", "error_stack"]

AUDIENCE = "api://okta-agent-proxy-docs"
ALICE, GHOST = User("alice@example.com"), User("ghost@example.com")
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})


@dataclass(frozen=True)
class Answer:
    """What the gateway answered: status, headers (lower-cased names) and the raw body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    base_url: str  # the gateway's GATEWAY_BASE_URL, which the docs write as {base}


@dataclass
class ErrorStack:
    idp: FaultyOktaEmulator
    backend: ValidatingBackend
    gateway: RunningGateway
    http: aiohttp.ClientSession

    def token(self, user: User = ALICE, client_id: str = CURSOR, **kwargs: Any) -> str:
        scopes = kwargs.pop("scopes", ["mcp:read"])
        return self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=client_id, scopes=scopes, **kwargs)

    async def post(self, path: str, token: str | None, headers: Mapping[str, str] | None = None) -> Answer:
        sent = dict(ACCEPT)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        async with self.http.post(self.gateway.url(path), data=LIST, headers=sent) as response:
            body = await response.read()
            received = {name.lower(): value for name, value in response.headers.items()}
            return Answer(response.status, received, body, self.gateway.base_url)


@asynccontextmanager
async def error_stack(
    *, jwks_mode: JwksMode = "ok", register_public_jwk: Mapping[str, Any] | None = None
) -> AsyncIterator[ErrorStack]:
    """The emulator, the validating backend and the gateway; `jwks_mode` is set before the gateway starts, so a
    "down" JWKS is down from the gateway's first fetch."""
    key, org = employees_org(AUDIENCE, register_public_jwk=register_public_jwk)
    async with FaultyOktaEmulator(users=[ALICE], **org) as idp:
        idp.set_jwks_mode(jwks_mode)
        async with validating_backend(idp, BACKEND_AS) as backend:
            partners = backend.resource.removesuffix("/mcp") + "/partners"
            config = {
                "backends": {
                    "employees": xaa_backend(
                        idp, backend.resource, "/employees", auth_server=BACKEND_AS, scopes=["employees:read"]
                    ),
                    "partners": psk_backend(partners, "/partners", key=DEFAULT_KEY),
                },
                "agents": {
                    "cursor": {
                        "client_id": CURSOR,
                        "private_key": key.config_value,
                        "scopes": ["mcp:read"],
                        "backend_access": ["employees"],
                    }
                },
            }
            settings = {"OKTA_DOMAIN": idp.base_url, "OKTA_ISSUER": idp.issuer(GATEWAY_AS), "OKTA_AUDIENCE": AUDIENCE}
            async with running_gateway(config, settings=settings) as gateway, aiohttp.ClientSession() as http:
                yield ErrorStack(idp, backend, gateway, http)


# ---- the scenarios, by their name in the SEQUENCE.md error table ----------------------------------------------


async def no_token() -> Answer:
    async with error_stack() as s:
        return await s.post("/employees", None)


async def bad_signature() -> Answer:
    async with error_stack() as s:
        good = s.token()
        claims = jwt.decode(good, options={"verify_signature": False})
        forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # A published kid, but signed by another key.
        forged = jwt.encode(claims, forger, algorithm="RS256", headers={"kid": jwt.get_unverified_header(good)["kid"]})
        return await s.post("/employees", forged)


async def expired_token() -> Answer:
    async with error_stack() as s:
        return await s.post("/employees", s.token(lifetime=-600))


async def wrong_audience() -> Answer:
    async with error_stack() as s:
        return await s.post("/employees", s.token(audience="api://someone-else"))


async def jwks_down() -> Answer:
    async with error_stack(jwks_mode="down") as s:
        return await s.post("/employees", s.token())


async def unknown_agent() -> Answer:
    async with error_stack() as s:
        return await s.post("/employees", s.token(client_id="0oa_not_an_agent"))


async def backend_not_allowed() -> Answer:
    async with error_stack() as s:
        return await s.post("/partners", s.token())


async def missing_scope() -> Answer:
    async with error_stack() as s:
        return await s.post("/employees", s.token(scopes=["profile"]))


async def exchange_refused() -> Answer:
    async with error_stack() as s:
        s.idp.xaa.policies.clear()  # no resource connection allows cursor → aus-employees: access_denied
        return await s.post("/employees", s.token())


async def subject_rejected() -> Answer:
    async with error_stack() as s:
        # Signed by the gateway's AS, so the gateway accepts it; Okta does not know the user: invalid_grant.
        return await s.post("/employees", s.token(user=GHOST))


async def agent_key_rejected() -> Answer:
    other_public = ec_agent_key("cursor-key-1").public_jwk
    async with error_stack(register_public_jwk=other_public) as s:  # Okta holds another public key: invalid_client
        return await s.post("/employees", s.token())


async def token_endpoint_down() -> Answer:
    async with error_stack() as s:
        s.idp.set_token_endpoint_mode("down", auth_server_id=ORG)
        return await s.post("/employees", s.token())


async def backend_401_twice() -> Answer:
    async with error_stack() as s:
        s.backend.reject_next = 2
        answer = await s.post("/employees", s.token())
        assert s.idp.xaa.id_jag_exchanges == 2, "expected one fresh exchange before giving up"
        return answer


SCENARIOS: dict[str, Callable[[], Awaitable[Answer]]] = {
    "no token": no_token,
    "bad signature": bad_signature,
    "expired token": expired_token,
    "wrong audience": wrong_audience,
    "IdP down: signing keys unreachable": jwks_down,
    "unknown agent": unknown_agent,
    "backend not allowed": backend_not_allowed,
    "missing scope": missing_scope,
    "exchange refused": exchange_refused,
    "subject token refused by Okta": subject_rejected,
    "agent key refused by Okta": agent_key_rejected,
    "IdP down: token endpoint unreachable": token_endpoint_down,
    "backend 401 twice": backend_401_twice,
}
