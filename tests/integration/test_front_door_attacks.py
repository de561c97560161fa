"""The OAuth front door under attack (DESIGN.md §8, "Security"): what an attacker tries against the running stack —
the Okta emulator, the gateway with `FRONT_DOOR=on`, real loopback HTTP — and what must come of it: the right
refusal (status, OAuth error code, an HTML page where the redirect URI is not yet trusted), nothing issued (no code,
no token, no grant, checked from outside and in the store), and the right security event recorded.

Each test groups the attacks that share one stack (a stack costs about half a second), in the order an attacker
would try them; a positive control beside the refusals shows that the request was refused for what was wrong with
it, not for its shape.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import jwt
import pytest
import structlog
import yarl
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDictProxy
from sqlalchemy import Table, func, select

from okta_agent_proxy.devkit.okta_emulator import ORG, TokenRequest
from okta_agent_proxy.frontdoor.redirects import DEFAULT_REDIRECT_GLOBS
from okta_agent_proxy.frontdoor.registration import REGISTRATIONS_PER_MINUTE
from okta_agent_proxy.frontdoor.service import AUTHORIZATIONS_PER_MINUTE
from okta_agent_proxy.observability.logging import configure
from okta_agent_proxy.store.frontdoor import EventKind, FrontDoorStore, SecurityEvent
from okta_agent_proxy.store.models import (
    Model,
    oauth_clients,
    oauth_codes,
    oauth_grants,
    oauth_pending,
    oauth_refresh_tokens,
)
from tests.integration.conftest import SampleBackends
from tests.integration.test_front_door_flow import CLIENT_NAME, REDIRECT, claims, mcp_call
from tests.support.front_door import (
    ADA,
    GATEWAY_APP,
    Browser,
    FrontDoorStack,
    Hop,
    Page,
    Pkce,
    browser,
    front_door_stack,
)
from tests.support.processes import LOOPBACK

FORM = "application/x-www-form-urlencoded"

# ---------------------------------------------------------------- the stack and the attacker's tools


@asynccontextmanager
async def running(
    sample_backends: SampleBackends, tmp_path: Path, app: Mapping[str, Any] | None = None, **settings: Any
) -> AsyncIterator[FrontDoorStack]:
    """The front door's stack with its store (and every file it writes) in `tmp_path`; `app`: the gateway's Okta
    app's options at the emulator."""
    async with front_door_stack(
        f"sqlite:///{tmp_path}/gateway.db",
        sample_backends.employees.url("/mcp"),
        sample_backends.partners.url("/mcp"),
        settings={"DATA_DIR": str(tmp_path), **settings},
        app=app,
    ) as stack:
        yield stack


@pytest.fixture
async def stack(sample_backends: SampleBackends, tmp_path: Path) -> AsyncIterator[FrontDoorStack]:
    async with running(sample_backends, tmp_path) as started:
        yield started


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str

    @property
    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.text)
        return document

    @property
    def error(self) -> str | None:
        """The OAuth (or gateway) error code of a JSON answer."""
        try:
            return str(self.json.get("error"))
        except ValueError:
            return None


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    form: Mapping[str, str] | None = None,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    data: Any = dict(form) if form is not None else body
    async with http.request(method, url, data=data, headers=headers, allow_redirects=False) as response:
        return Reply(response.status, response.headers, await response.text(errors="replace"))


async def register(
    http: aiohttp.ClientSession, stack: FrontDoorStack, *redirect_uris: str, name: str = CLIENT_NAME
) -> str:
    body = {"client_name": name, "redirect_uris": list(redirect_uris or (REDIRECT,))}
    async with http.post(stack.url("/oauth/register"), json=body) as response:
        assert response.status == 201, await response.text()
        client_id: str = (await response.json())["client_id"]
        return client_id


def authorize_url(
    stack: FrontDoorStack,
    client_id: str,
    pkce: Pkce,
    redirect_uri: str = REDIRECT,
    path: str = "/employees",
    changes: Mapping[str, str | None] | None = None,
) -> str:
    """The client's authorization request for the backend at `path`; `changes` replace (None: remove) parameters."""
    query: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "state": pkce.state,
        "resource": stack.url(path),
        **(changes or {}),
    }
    kept = {name: value for name, value in query.items() if value is not None}
    return str(yarl.URL(stack.url("/oauth/authorize")).with_query(kept))


async def authorized(
    stack: FrontDoorStack, person: Browser, client_id: str, pkce: Pkce, redirect_uri: str = REDIRECT
) -> dict[str, str]:
    """Sign in, approve if asked: the query the client's redirect URI receives (its code, state and iss)."""
    params = await person.authorize(authorize_url(stack, client_id, pkce, redirect_uri), redirect_uri)
    assert params.get("state") == pkce.state and params.get("iss") == stack.base_url, params
    return params


async def redeem(
    stack: FrontDoorStack, client_id: str, code: str, verifier: str, redirect_uri: str = REDIRECT
) -> Reply:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    async with aiohttp.ClientSession() as http:
        return await send(http, "POST", stack.url("/oauth/token"), form=form)


async def refresh(stack: FrontDoorStack, client_id: str, refresh_token: str) -> Reply:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    async with aiohttp.ClientSession() as http:
        return await send(http, "POST", stack.url("/oauth/token"), form=form)


async def logged_in(stack: FrontDoorStack, person: Browser) -> tuple[str, dict[str, Any]]:
    """A registered client, signed in (Ada, /employees): its id and its token response."""
    client_id = await register(person.http, stack)
    pkce = Pkce()
    params = await authorized(stack, person, client_id, pkce)
    answer = await redeem(stack, client_id, params["code"], pkce.verifier)
    assert answer.status == 200, answer.text
    return client_id, answer.json


async def security_events(stack: FrontDoorStack) -> list[SecurityEvent]:
    return await FrontDoorStore(stack.gateway.store.engine).list_events()


async def refusals(stack: FrontDoorStack) -> list[str]:
    """The `reason` of every refusal event, oldest first."""
    return [str(e.detail.get("reason")) for e in await security_events(stack) if e.kind == EventKind.REFUSAL]


async def kinds(stack: FrontDoorStack) -> list[str]:
    return [str(event.kind) for event in await security_events(stack)]


async def rows(stack: FrontDoorStack, table: Table) -> int:
    async with stack.gateway.store.engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(table))).scalar_one())


def query_of(location: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query, keep_blank_values=True).items()}


def assert_refused_page(reply: Reply | Hop, status: int = 400) -> None:
    """An error page of the gateway's own: HTML, no redirect anywhere, nothing cached."""
    assert reply.status == status, (reply.status, reply.text[:300])
    assert reply.headers.get("Content-Type", "").startswith("text/html"), reply.headers
    assert "Location" not in reply.headers
    assert reply.headers.get("Cache-Control") == "no-store"


def assert_oauth_error(reply: Reply, error: str, status: int = 400) -> None:
    assert (reply.status, reply.error) == (status, error), reply.text[:300]
    assert reply.headers.get("Cache-Control") == "no-store"
    assert "access_token" not in reply.json and "refresh_token" not in reply.json


# ---------------------------------------------------------------- 1, 2: codes


async def test_a_wrong_pkce_verifier_spends_the_code_and_revokes_its_grant(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id = await register(person.http, stack)
        other_client = await register(person.http, stack)
        # Stolen codes, each tried once with one thing wrong — the verifier, the client, the redirect URI — then
        # with everything right: the first attempt spent it.
        for wrong_client, wrong_verifier, wrong_redirect in (
            (client_id, Pkce().verifier, REDIRECT),
            (client_id, "short", REDIRECT),
            (other_client, None, REDIRECT),
            (client_id, None, "http://127.0.0.1:40000/callback"),
        ):
            pkce = Pkce()
            code = (await authorized(stack, person, client_id, pkce))["code"]
            attempt = await redeem(stack, wrong_client, code, wrong_verifier or pkce.verifier, wrong_redirect)
            assert_oauth_error(attempt, "invalid_grant")
            assert_oauth_error(await redeem(stack, client_id, code, pkce.verifier), "invalid_grant")
    assert await rows(stack, oauth_refresh_tokens) == 0
    assert EventKind.TOKEN_ISSUED not in await kinds(stack)
    refused = [event for event in await security_events(stack) if event.kind == EventKind.REFUSAL]
    assert len(refused) == 4, refused  # one per wrong attempt; a spent code is invalid_grant, not an event
    store = FrontDoorStore(stack.gateway.store.engine)
    for event in refused:
        grant = await store.get_grant(str(event.grant_id))
        assert grant is not None and grant.revoked_reason == "pkce_failure", grant


async def test_a_replayed_code_revokes_what_its_first_use_issued(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id = await register(person.http, stack)
        pkce = Pkce()
        code = (await authorized(stack, person, client_id, pkce))["code"]
    first = await redeem(stack, client_id, code, pkce.verifier)
    assert first.status == 200, first.text
    tokens = first.json
    assert (await mcp_call(stack, "/employees", tokens["access_token"]))[0] == 200  # now cached as live
    assert_oauth_error(await redeem(stack, client_id, code, pkce.verifier), "invalid_grant")
    status, body = await mcp_call(stack, "/employees", tokens["access_token"])
    assert (status, body.get("error")) == (401, "invalid_token"), body
    assert_oauth_error(await refresh(stack, client_id, tokens["refresh_token"]), "invalid_grant")
    replays = [event for event in await security_events(stack) if event.kind == EventKind.CODE_REPLAY]
    assert len(replays) == 1 and replays[0].client_id == client_id
    grant = await FrontDoorStore(stack.gateway.store.engine).get_grant(str(replays[0].grant_id))
    assert grant is not None and grant.revoked_reason == "code_replay"
    assert grant.okta_id_token is None and grant.okta_refresh_token is None  # the Okta tokens went with it
    # The thief races the client: two redemptions at once. Whoever wins, nothing issued stays usable.
    async with browser() as person:
        pkce = Pkce()
        code = (await authorized(stack, person, client_id, pkce))["code"]
    raced = await asyncio.gather(*(redeem(stack, client_id, code, pkce.verifier) for _ in range(2)))
    assert sorted(reply.status for reply in raced) in ([200, 400], [400, 400]), [r.text for r in raced]
    for reply in raced:
        if reply.status == 200:
            assert (await mcp_call(stack, "/employees", reply.json["access_token"]))[0] == 401
            assert_oauth_error(await refresh(stack, client_id, reply.json["refresh_token"]), "invalid_grant")
        else:
            assert reply.error == "invalid_grant"
    assert (await kinds(stack)).count(EventKind.CODE_REPLAY) == 2


# ---------------------------------------------------------------- 3: redirect URIs


async def test_redirect_uris_match_exactly_except_a_loopback_port(stack: FrontDoorStack) -> None:
    registered = ("http://127.0.0.1:33418/callback", "https://app.example.com/cb")
    refused = [
        "https://evil.example.com/cb",
        "https://app.example.com/cb/",  # a trailing slash
        "https://app.example.com/cb?next=1",
        "https://app.example.com/cb#x",
        "https://APP.example.com/cb",
        "https://app.example.com:443/cb",
        "http://app.example.com/cb",
        "http://127.0.0.1:33418/callback/",
        "http://127.0.0.1:33418/Callback",
        "http://127.0.0.1:33418/callback?x=1",
        "http://localhost:33418/callback",  # localhost does not stand in for 127.0.0.1
        "http://[::1]:33418/callback",
        "https://127.0.0.1:33418/callback",
        "http://127.0.0.1.evil.example:33418/callback",
        "http://127.0.0.1:33418@evil.example/callback",
    ]
    async with browser() as person:
        client_id = await register(person.http, stack, *registered)
        okta_logins = len(stack.idp.login.authorization_requests)
        for uri in refused:
            reply = await send(person.http, "GET", authorize_url(stack, client_id, Pkce(), uri))
            assert_refused_page(reply)
            assert "Set-Cookie" not in reply.headers, uri
        unknown = await send(person.http, "GET", authorize_url(stack, "no-such-client", Pkce(), REDIRECT))
        assert_refused_page(unknown)
        assert len(stack.idp.login.authorization_requests) == okta_logins
        assert await rows(stack, oauth_pending) == 0  # no flow was started
        assert await refusals(stack) == ["redirect_uri_mismatch"] * len(refused) + ["unknown_client"]
        # RFC 8252 §7.3: the registered loopback URI on another port is the same redirect URI.
        pkce, elsewhere = Pkce(), "http://127.0.0.1:5555/callback"
        params = await authorized(stack, person, client_id, pkce, elsewhere)  # the code came back to port 5555
        assert person.hops[-1].headers["Location"].startswith(elsewhere + "?")
        assert_oauth_error(
            await redeem(stack, client_id, params["code"], pkce.verifier, registered[0]), "invalid_grant"
        )
        pkce = Pkce()
        params = await authorized(stack, person, client_id, pkce, elsewhere)
        assert (await redeem(stack, client_id, params["code"], pkce.verifier, elsewhere)).status == 200


# ---------------------------------------------------------------- 4: registration


# An operator's list that would admit anything: the fixed rules of redirects.py must refuse what is dangerous anyway.
WIDE_OPEN_GLOBS = f"{DEFAULT_REDIRECT_GLOBS},http://*,javascript:*,data:*"


async def test_registration_takes_cursors_uris_and_refuses_bad_metadata(
    sample_backends: SampleBackends, tmp_path: Path
) -> None:
    async with running(sample_backends, tmp_path, FRONT_DOOR_REDIRECT_URIS=WIDE_OPEN_GLOBS) as stack:
        await registrations_refused(stack)


async def registrations_refused(stack: FrontDoorStack) -> None:
    cursor = [
        "cursor://anysphere.cursor-mcp/oauth/callback",
        "https://www.cursor.com/agents/mcp/oauth/callback",
        "http://localhost:8787/callback",
        "http://127.0.0.1:8787/callback",
    ]
    url = stack.url("/oauth/register")
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        made = await send(
            http,
            "POST",
            url,
            body=json.dumps({"client_name": "Cursor", "redirect_uris": cursor}).encode(),
            headers=json_type,
        )
        assert made.status == 201, made.text
        assert made.json["redirect_uris"] == cursor and made.json["token_endpoint_auth_method"] == "none"
        assert "client_secret" not in made.json
        refused: dict[str, tuple[bytes, str]] = {
            "javascript": (json.dumps({"redirect_uris": ["javascript:alert(1)"]}).encode(), "invalid_redirect_uri"),
            "http_remote": (json.dumps({"redirect_uris": ["http://evil.example/cb"]}).encode(), "invalid_redirect_uri"),
            "one_bad_of_many": (
                json.dumps({"redirect_uris": [*cursor, "data:text/html,hi"]}).encode(),
                "invalid_redirect_uri",
            ),
            "no_redirect_uris": (json.dumps({"client_name": "x"}).encode(), "invalid_redirect_uri"),
            "secret_basic": (
                json.dumps({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_basic"}).encode(),
                "invalid_client_metadata",
            ),
            "not_json": (b"redirect_uris=http://127.0.0.1/cb", "invalid_client_metadata"),
            "json_array": (json.dumps([{"redirect_uris": [REDIRECT]}]).encode(), "invalid_client_metadata"),
            "control_in_name": (
                json.dumps({"redirect_uris": [REDIRECT], "client_name": "Claude Code\u202e\x00"}).encode(),
                "invalid_client_metadata",
            ),
        }
        for label, (body, error) in refused.items():
            reply = await send(http, "POST", url, body=body, headers=json_type)
            assert (reply.status, reply.error) == (400, error), (label, reply.text)
        huge = json.dumps({"redirect_uris": [REDIRECT], "client_name": "x" * 1_000_000}).encode()
        reply = await send(http, "POST", url, body=huge, headers=json_type)
        assert reply.status in (400, 413), reply.text[:300]
        assert reply.error in ("invalid_client_metadata", "payload_too_large"), reply.text[:300]
        assert (await send(http, "GET", stack.url("/.well-known/oauth-authorization-server"))).status == 200
    assert await rows(stack, oauth_clients) == 1  # Cursor's, and nothing of the refused ones
    assert (await refusals(stack)).count("registration_refused") == len(refused)
    assert (await kinds(stack)).count(EventKind.REGISTRATION) == 1


async def test_registration_is_rate_limited_per_address(stack: FrontDoorStack) -> None:
    body = json.dumps({"redirect_uris": [REDIRECT]}).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for _ in range(REGISTRATIONS_PER_MINUTE):
            assert (await send(http, "POST", stack.url("/oauth/register"), body=body, headers=headers)).status == 201
        limited = await send(http, "POST", stack.url("/oauth/register"), body=body, headers=headers)
        # X-Forwarded-For from a peer that is not a trusted proxy changes nothing
        spoofed = await send(
            http, "POST", stack.url("/oauth/register"), body=body, headers={**headers, "X-Forwarded-For": "203.0.113.9"}
        )
    for reply in (limited, spoofed):
        assert reply.status == 429, reply.text
        assert 0 < int(reply.headers["Retry-After"]) <= 60
        assert "client_id" not in reply.json
    assert await rows(stack, oauth_clients) == REGISTRATIONS_PER_MINUTE


# ---------------------------------------------------------------- 5: refresh-token reuse


async def test_refresh_token_reuse_after_the_grace_revokes_the_grant(
    sample_backends: SampleBackends, tmp_path: Path
) -> None:
    async with running(sample_backends, tmp_path, FRONT_DOOR_REFRESH_GRACE_SECONDS=1) as stack, browser() as person:
        client_id, first = await logged_in(stack, person)
        rotated = await refresh(stack, client_id, first["refresh_token"])
        assert rotated.status == 200, rotated.text
        second = rotated.json
        assert (await mcp_call(stack, "/employees", second["access_token"]))[0] == 200
        await asyncio.sleep(1.2)  # the grace must really pass (the gateway reads the wall clock)
        assert_oauth_error(await refresh(stack, client_id, first["refresh_token"]), "invalid_grant")
        assert_oauth_error(await refresh(stack, client_id, second["refresh_token"]), "invalid_grant")
        for token in (first["access_token"], second["access_token"]):
            status, body = await mcp_call(stack, "/employees", token)
            assert (status, body.get("error")) == (401, "invalid_token"), body
        reuse = [event for event in await security_events(stack) if event.kind == EventKind.REFRESH_REUSE]
        assert len(reuse) == 1 and reuse[0].client_id == client_id
        grant = await FrontDoorStore(stack.gateway.store.engine).get_grant(str(reuse[0].grant_id))
        assert grant is not None and grant.revoked_reason == "refresh_token_reuse"


# ---------------------------------------------------------------- 6: consent


async def consent_page(stack: FrontDoorStack, person: Browser, client_id: str, pkce: Pkce) -> tuple[Page, str]:
    """Sign in up to the consent page: its form and its CSRF token."""
    page = await person.sign_in(authorize_url(stack, client_id, pkce), REDIRECT)
    assert page.status == 200 and 'name="decision"' in page.text, (page.status, page.text[:300])
    form = Page(page.text)
    assert form.action == "/oauth/consent" and form.method == "post"
    return form, form.fields["csrf"]


async def test_consent_refuses_forged_cross_site_and_stolen_forms(stack: FrontDoorStack) -> None:
    consent = stack.url("/oauth/consent")
    name = '<script>alert(1)</script><form action="https://evil.example/"><input name="csrf">\u202egnp.exe'
    async with browser() as person, browser() as thief:
        client_id = await register(person.http, stack, name=name.replace("\u202e", ""))
        form, csrf = await consent_page(stack, person, client_id, Pkce())
        page = person.hops[-1]
        assert form.forms == 1 and form.scripts == 0 and list(form.fields) == ["csrf"]  # the name is text only
        assert "tag unverified" in page.text
        assert page.headers["X-Frame-Options"] == "DENY"  # no clickjacking of the buttons
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert isinstance(page.headers, CIMultiDictProxy)
        cookie = next(value for value in page.headers.getall("Set-Cookie") if "oap-consent-" in value)
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        post = person.post
        assert_refused_page(await post(consent, {"decision": "approve"}))
        assert_refused_page(await post(consent, {"csrf": csrf, "decision": "yes please"}))
        forged = await post(consent, {"csrf": secrets.token_urlsafe(32), "decision": "approve"})
        assert_refused_page(forged, 403)
        for site in ("cross-site", "same-site"):  # a form another site posts, with the user's cookies
            refused = await post(consent, {"csrf": csrf, "decision": "approve"}, {"Sec-Fetch-Site": site})
            assert_refused_page(refused, 403)
        for origin in ("https://evil.example", "null", stack.base_url.replace(LOOPBACK, "localhost")):
            foreign = await post(consent, {"csrf": csrf, "decision": "approve"}, {"Origin": origin})
            assert (foreign.status, json.loads(foreign.text)["error"]) == (403, "forbidden_origin"), origin  # the edge
            assert "Location" not in foreign.headers
        # The token copied into another browser: refused, and spent — the user's own form cannot complete either.
        stolen = await thief.post(consent, {"csrf": csrf, "decision": "approve"})
        assert_refused_page(stolen, 403)
        assert_refused_page(await post(consent, {"csrf": csrf, "decision": "approve"}), 403)
        assert await rows(stack, oauth_codes) == 0
        # Deny: back to the client with access_denied, its state and the issuer; no code; the login's grant revoked.
        pkce = Pkce()
        _, csrf = await consent_page(stack, person, client_id, pkce)
        denied = await post(consent, {"csrf": csrf, "decision": "deny"})
        assert denied.status == 303 and denied.headers["Location"].startswith(REDIRECT + "?")
        assert query_of(denied.headers["Location"]) == {
            "error": "access_denied",
            "error_description": "the user denied access",
            "state": pkce.state,
            "iss": stack.base_url,
        }
        assert await rows(stack, oauth_codes) == 0
        # The control: this browser's own page, sent from the gateway's origin, is approved.
        pkce = Pkce()
        _, csrf = await consent_page(stack, person, client_id, pkce)
        same_origin = {"Origin": stack.base_url, "Sec-Fetch-Site": "same-origin"}
        approved = await post(consent, {"csrf": csrf, "decision": "approve"}, same_origin)
        assert approved.status == 303, approved.text
        assert set(query_of(approved.headers["Location"])) == {"code", "state", "iss"}
    assert await rows(stack, oauth_codes) == 1
    store = FrontDoorStore(stack.gateway.store.engine)
    decisions = [e for e in await security_events(stack) if e.kind == EventKind.CONSENT]
    assert [event.detail["decision"] for event in decisions] == ["deny", "approve"]
    denied_grant = await store.get_grant(str(decisions[0].grant_id))
    assert denied_grant is not None and denied_grant.revoked_reason == "consent_denied"
    reasons = await refusals(stack)
    assert (
        reasons
        == ["consent_malformed", "consent_malformed", "consent_csrf"]
        + ["consent_cross_site"] * 2
        + ["consent_csrf"] * 2
    ), reasons


# ---------------------------------------------------------------- 7: state at the callback


async def to_callback(stack: FrontDoorStack, person: Browser, client_id: str) -> str:
    """Start a flow and sign in at Okta: the callback URL Okta sends the browser to (not yet opened)."""
    start = await person.get(authorize_url(stack, client_id, Pkce()))
    assert start.status == 303 and start.headers["Location"].startswith(stack.idp.base_url), start
    sign_in = await person.get(start.headers["Location"])
    form = Page(sign_in.text)
    assert form.action, sign_in.text[:300]
    fields = {**form.fields, "username": ADA.login, "password": str(ADA.password)}
    back = await person.post(urljoin(sign_in.url, form.action), fields)
    location = back.headers["Location"]
    assert location.startswith(stack.url("/oauth/callback?")), location
    return location


async def test_forged_and_replayed_states_are_refused_at_the_callback(stack: FrontDoorStack) -> None:
    async with browser() as person, browser() as thief:
        client_id = await register(person.http, stack)
        callback = await to_callback(stack, person, client_id)
        code = query_of(callback)["code"]
        for forged in ("forged", secrets.token_urlsafe(32)):  # while the real flow is pending in this browser
            hop = await person.get(stack.url(f"/oauth/callback?state={forged}&code={code}"))
            assert_refused_page(hop)
        assert_refused_page(await person.get(stack.url(f"/oauth/callback?code={code}")))
        assert await rows(stack, oauth_grants) == 0 and stack.idp.login.codes_redeemed == 0
        first = await person.get(callback)
        assert first.status == 200 and 'name="decision"' in first.text  # the consent page: the grant is made
        assert await rows(stack, oauth_grants) == 1
        for replayer in (person, thief):
            assert_refused_page(await replayer.get(callback))
        assert await rows(stack, oauth_grants) == 1 and stack.idp.login.codes_redeemed == 1
        # A callback URL opened first in another browser (it lacks the flow's cookie): refused, and the state is
        # spent, so the browser that started the flow cannot use it either.
        stolen = await to_callback(stack, person, client_id)
        assert_refused_page(await thief.get(stolen))
        assert_refused_page(await person.get(stolen))
    assert await rows(stack, oauth_grants) == 1 and stack.idp.login.codes_redeemed == 1
    reasons = await refusals(stack)  # the forged two, none, the replays by both browsers, the stolen URL and its owner
    assert reasons == [
        *("bad_state", "bad_state", "bad_state"),
        *("state_replayed", "state_replayed"),
        *("bad_state", "state_replayed"),
    ]


# ---------------------------------------------------------------- 8: ID tokens the gateway must refuse

ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # published nowhere
OTHER_APP = "0oaanotherapp0000001"
IdTokenChange = Callable[[FrontDoorStack, dict[str, Any]], str]


def _reminted(audience: str = GATEWAY_APP, **claims: str) -> IdTokenChange:
    """The ID token Okta issued, minted again with the org's own key, with `claims` changed (`{org}` in a value:
    the org's URL)."""

    def change(stack: FrontDoorStack, issued: dict[str, Any]) -> str:
        kept: dict[str, Any] = {name: issued[name] for name in ("name", "email", "groups") if name in issued}
        changed = {name: value.replace("{org}", stack.idp.base_url) for name, value in claims.items()}
        return stack.idp.mint_id_token(
            ORG, user=ADA, client_id=audience, nonce=issued.get("nonce"), extra_claims={**kept, **changed}
        )

    return change


def _attackers(issuer: str | None, kid: str | None) -> IdTokenChange:
    """The ID token's claims, signed with the attacker's key (`issuer`, `kid`: None keeps the org's)."""

    def change(stack: FrontDoorStack, issued: dict[str, Any]) -> str:
        headers = {"kid": kid or stack.idp.signing_kid(ORG)}
        return jwt.encode({**issued, "iss": issuer or issued["iss"]}, ATTACKER_KEY, "RS256", headers=headers)

    return change


ID_TOKENS: dict[str, IdTokenChange] = {
    "another_nonce": _reminted(nonce="not-the-nonce-of-this-sign-in"),
    "another_audience": _reminted(OTHER_APP),
    "another_issuer": _reminted(iss="https://evil.example.com"),
    "a_custom_servers_issuer": _reminted(iss="{org}/oauth2/default"),
    "another_issuer_and_key": _attackers("https://evil.example.com", "attacker-key"),
    "the_orgs_kid_another_key": _attackers(None, None),
}


def serve_id_tokens(stack: FrontDoorStack, change: IdTokenChange) -> Callable[[], None]:
    """From now on Okta's code redemption answers with `change` of the ID token it issued; returns the undo."""
    original = stack.idp.login.redeem_code

    async def redeem_code(request: TokenRequest) -> dict[str, Any]:
        body = await original(request)
        issued = jwt.decode(body["id_token"], options={"verify_signature": False})
        return {**body, "id_token": change(stack, issued)}

    stack.idp.register_grant("authorization_code", redeem_code, kind="org")
    return lambda: stack.idp.register_grant("authorization_code", original, kind="org")


async def test_id_tokens_with_a_wrong_nonce_audience_issuer_or_key_are_refused(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id = await register(person.http, stack)
        for label, change in ID_TOKENS.items():
            undo = serve_id_tokens(stack, change)
            pkce = Pkce()
            params = await person.authorize(authorize_url(stack, client_id, pkce), REDIRECT)
            undo()
            back = (params.get("error"), params.get("state"), params.get("iss"), params.get("code"))
            assert back == ("server_error", pkce.state, stack.base_url, None), (label, params)
        assert await rows(stack, oauth_grants) == 0 and await rows(stack, oauth_codes) == 0
        assert await refusals(stack) == ["id_token_refused"] * len(ID_TOKENS)
        assert stack.idp.login.codes_redeemed == len(ID_TOKENS)  # each was redeemed at Okta, then refused
        # The control: reminted with nothing changed, the same path is accepted.
        undo = serve_id_tokens(stack, _reminted())
        pkce = Pkce()
        params = await authorized(stack, person, client_id, pkce)
        undo()
    assert (await redeem(stack, client_id, params["code"], pkce.verifier)).status == 200
    assert await rows(stack, oauth_grants) == 1


# ---------------------------------------------------------------- 9: client metadata documents


class ClientDocuments:
    """Client metadata documents served on a loopback port (the gateway's base URL is loopback, so the front door
    may fetch them over http: addresses.py, `allow_loopback`); every path requested is recorded."""

    def __init__(self) -> None:
        self.base_url = ""
        self.answers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {}
        self.requested: list[str] = []

    def url(self, path: str) -> str:
        return self.base_url + path

    def document(self, path: str, **fields: Any) -> None:
        body = json.dumps({"client_id": self.url(path), "redirect_uris": [REDIRECT], **fields}).encode()
        self.raw(path, body)

    def raw(self, path: str, body: bytes, status: int = 200, **headers: str) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, body=body, content_type="application/json", headers=headers)

        self.answers[path] = answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requested.append(request.path)
        answer = self.answers.get(request.path)
        return await answer(request) if answer is not None else web.Response(status=404)


@asynccontextmanager
async def client_documents() -> AsyncIterator[ClientDocuments]:
    documents = ClientDocuments()
    app = web.Application()
    app.router.add_route("GET", "/{path:.*}", documents.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    try:
        documents.base_url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
        yield documents
    finally:
        await runner.cleanup()


async def stream_json(request: web.Request) -> web.StreamResponse:
    """6 KB of a JSON document, chunked: no Content-Length to refuse it by."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    url = f"http://{request.host}{request.path}"
    head = json.dumps({"client_id": url, "redirect_uris": [REDIRECT], "client_name": "x" * 6144})
    for start in range(0, len(head), 1024):
        await response.write(head[start : start + 1024].encode())
    await response.write_eof()
    return response


async def test_client_metadata_documents_are_fenced_and_checked(stack: FrontDoorStack) -> None:
    forbidden = [
        "https://169.254.169.254/client.json",  # the cloud metadata service
        "https://10.0.0.1/client.json",
        "https://[::ffff:169.254.169.254]/client.json",
        "https://192.168.1.1:8443/client.json",
        "http://169.254.169.254/latest/meta-data/",
    ]
    async with client_documents() as documents, browser() as person:
        documents.document("/good.json", client_name="Good Client")
        documents.raw("/redirect.json", b"", 302, Location=documents.url("/target.json"))
        documents.document("/target.json")
        documents.document("/big.json", client_name="x" * 6144)
        documents.answers["/chunked.json"] = stream_json
        documents.raw(
            "/mismatch.json",
            json.dumps({"client_id": documents.url("/good.json"), "redirect_uris": [REDIRECT]}).encode(),
        )
        documents.document("/evil-redirect.json", redirect_uris=["https://evil.example/cb", "javascript:alert(1)"])
        documents.document("/keyed.json", token_endpoint_auth_method="private_key_jwt")
        documents.document("/secret.json", client_secret="s3cret")
        refused = {
            **{url: "forbidden_address" for url in forbidden[:4]},
            forbidden[4]: "invalid_url",
            documents.url("/redirect.json"): "redirect",
            documents.url("/big.json"): "too_large",
            documents.url("/chunked.json"): "too_large",
            documents.url("/mismatch.json"): "client_id_mismatch",
            documents.url("/evil-redirect.json"): "Unknown application",  # refused by FRONT_DOOR_REDIRECT_URIS
            documents.url("/missing.json"): "bad_status",
            documents.url("/keyed.json"): "invalid_metadata",
            documents.url("/secret.json"): "invalid_metadata",
        }
        for client_id in refused:
            reply = await send(person.http, "GET", authorize_url(stack, client_id, Pkce()))
            assert_refused_page(reply)
            assert "10.0.0.1" not in reply.text and "resolves" not in reply.text  # no resolver detail for outsiders
        # CimdRefused's reason code is in the security event, for the operator
        documents_refused = [e.detail.get("document") for e in await security_events(stack) if e.kind == "refusal"]
        expected = [
            "redirect_uri_not_allowed" if reason == "Unknown application" else reason for reason in refused.values()
        ]
        assert documents_refused == expected
        assert "/target.json" not in documents.requested  # a redirect is never followed
        assert await rows(stack, oauth_pending) == 0 and await rows(stack, oauth_grants) == 0
        assert await refusals(stack) == ["unknown_client"] * len(refused)
        # A good document: a redirect URI it does not list is refused; the flow completes with one it lists.
        good = documents.url("/good.json")
        other = await send(person.http, "GET", authorize_url(stack, good, Pkce(), "http://127.0.0.1:1/elsewhere"))
        assert_refused_page(other)
        pkce = Pkce()
        params = await authorized(stack, person, good, pkce)
        page = next(hop for hop in person.hops if 'name="decision"' in hop.text)
        assert "Good Client" in page.text and f"<bdi>{LOOPBACK}</bdi>" in page.text
        assert 'class="tag verified"' in page.text and "tag unverified" not in page.text
    answer = await redeem(stack, good, params["code"], pkce.verifier)
    assert answer.status == 200, answer.text
    assert claims(answer.json["access_token"])["client_id"] == good
    assert (await mcp_call(stack, "/employees", answer.json["access_token"]))[0] == 200


# ---------------------------------------------------------------- 10: audience and revocation


def forgeries(stack: FrontDoorStack, access_token: str, refresh_token: str) -> dict[str, str]:
    """Bearer tokens an attacker could make from what it holds: Okta's own tokens for the gateway's app, the
    gateway's token re-signed (with its own key under the gateway's `kid`, or unsigned) or with more scopes."""
    header = jwt.get_unverified_header(access_token)
    claims_of = jwt.decode(access_token, options={"verify_signature": False})
    attacker = ec.generate_private_key(ec.SECP256R1())
    head, _, signature = access_token.split(".")
    wider = {**claims_of, "scope": "mcp:read mcp:write mcp:admin"}
    payload = jwt.encode(wider, attacker, "ES256").split(".")[1]
    return {
        "the refresh token": refresh_token,
        "an Okta ID token": stack.idp.mint_id_token(ORG, user=ADA, client_id=GATEWAY_APP),
        "an Okta access token": stack.idp.mint_access_token(ORG, user=ADA, client_id=GATEWAY_APP, scopes=["openid"]),
        "another key, the gateway's kid": jwt.encode(claims_of, attacker, "ES256", headers=header),
        "alg none": jwt.encode(claims_of, "", "none", headers={"kid": header["kid"], "typ": "at+jwt"}),
        "more scopes, the old signature": f"{head}.{payload}.{signature}",
    }


async def revoke(stack: FrontDoorStack, client_id: str, token: str) -> Reply:
    async with aiohttp.ClientSession() as http:
        return await send(http, "POST", stack.url("/oauth/revoke"), form={"token": token, "client_id": client_id})


async def test_tokens_stay_on_their_backend_and_die_with_their_grant(stack: FrontDoorStack) -> None:
    async with browser() as person, browser() as other_person:
        client_id, tokens = await logged_in(stack, person)
        other_client, other_tokens = await logged_in(stack, other_person)
    access = tokens["access_token"]
    assert (await mcp_call(stack, "/employees", access))[0] == 200
    for path in ("/partners", "/xaa"):  # another backend behind the same gateway
        status, body = await mcp_call(stack, path, access)
        assert (status, body.get("error")) == (401, "invalid_token"), (path, body)
    for label, token in forgeries(stack, access, tokens["refresh_token"]).items():
        status, body = await mcp_call(stack, "/employees", token)
        assert (status, body.get("error")) == (401, "invalid_token"), (label, body)
    # The refresh token in the wrong hands or for more than it was granted: refused, and nothing rotated.
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
    async with aiohttp.ClientSession() as http:
        for changes, error in (
            ({"client_id": other_client}, "invalid_grant"),
            ({"resource": stack.url("/partners")}, "invalid_target"),
            ({"scope": "mcp:read mcp:admin"}, "invalid_scope"),
        ):
            assert_oauth_error(await send(http, "POST", stack.url("/oauth/token"), form={**form, **changes}), error)
    assert (await kinds(stack)).count(EventKind.REFRESH) == 0
    # RFC 7009: unknown tokens, and tokens of another client, are "revoked" (200 {}) — and nothing happens.
    for client, token in (
        (client_id, "no-such-token"),
        (client_id, secrets.token_urlsafe(32)),
        (other_client, tokens["refresh_token"]),
        (other_client, access),
    ):
        reply = await revoke(stack, client, token)
        assert (reply.status, reply.json) == (200, {}), reply.text
    assert (await mcp_call(stack, "/employees", access))[0] == 200
    assert EventKind.REVOCATION not in await kinds(stack)
    # The client revokes its refresh token: its access tokens die at once, and the refresh token too.
    assert (await revoke(stack, client_id, tokens["refresh_token"])).json == {}
    status, body = await mcp_call(stack, "/employees", access)
    assert (status, body.get("error")) == (401, "invalid_token"), body
    assert_oauth_error(await refresh(stack, client_id, tokens["refresh_token"]), "invalid_grant")
    # Revoking by the access token (RFC 7009 §2.1 allows either) ends the other grant the same way.
    assert (await mcp_call(stack, "/employees", other_tokens["access_token"]))[0] == 200
    assert (await revoke(stack, other_client, other_tokens["access_token"])).json == {}
    assert (await mcp_call(stack, "/employees", other_tokens["access_token"]))[0] == 401
    assert_oauth_error(await refresh(stack, other_client, other_tokens["refresh_token"]), "invalid_grant")
    assert (await kinds(stack)).count(EventKind.REVOCATION) == 2


# ---------------------------------------------------------------- 11: Okta's tokens never in clear


@dataclass
class OktaIssued:
    """What the emulator's org server issued to the gateway, recorded from its own grant handlers."""

    id_tokens: list[str] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)
    access_tokens: list[str] = field(default_factory=list)

    def record(self, body: Mapping[str, Any]) -> None:
        for name, kept in (
            ("id_token", self.id_tokens),
            ("refresh_token", self.refresh_tokens),
            ("access_token", self.access_tokens),
        ):
            if body.get(name):
                kept.append(str(body[name]))


def record_okta_tokens(stack: FrontDoorStack, id_token_lifetime: int) -> OktaIssued:
    """Record every token Okta gives the gateway; the sign-in's ID token lives `id_token_lifetime` seconds, so that
    a Cross App Access call soon after refreshes it at Okta (grants.py, REFRESH_AHEAD_SECONDS)."""
    issued = OktaIssued()
    login = stack.idp.login
    redeem_code, refresh_grant = login.redeem_code, login.refresh

    async def code(request: TokenRequest) -> dict[str, Any]:
        body = await redeem_code(request)
        signed_in = jwt.decode(body["id_token"], options={"verify_signature": False})
        kept: dict[str, Any] = {name: signed_in[name] for name in ("name", "email", "groups") if name in signed_in}
        body["id_token"] = stack.idp.mint_id_token(
            ORG,
            user=ADA,
            client_id=GATEWAY_APP,
            lifetime=id_token_lifetime,
            nonce=signed_in["nonce"],
            extra_claims=kept,
        )
        issued.record(body)
        return body

    async def refreshed(request: TokenRequest) -> dict[str, Any]:
        body = await refresh_grant(request)
        issued.record(body)
        return body

    stack.idp.register_grant("authorization_code", code, kind="org")
    stack.idp.register_grant("refresh_token", refreshed, kind="org")
    return issued


@pytest.fixture
def debug_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """stdlib logging at DEBUG into `caplog` (SQLAlchemy's statements too); structlog as `serve` sets it up, at
    DEBUG in JSON, reset afterwards."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    try:
        yield caplog
    finally:
        structlog.reset_defaults()


async def dump_store(stack: FrontDoorStack) -> str:
    """Every row of every table, every column, as text."""
    await stack.gateway.audit.flush()
    lines = []
    async with stack.gateway.store.engine.connect() as connection:
        for table in Model.metadata.sorted_tables:
            for row in (await connection.execute(select(table))).mappings():
                lines.append(f"{table.name}: {json.dumps(dict(row), default=repr)}")
    return "\n".join(lines)


def secrets_found(haystack: str | bytes, secrets_by_label: Mapping[str, str]) -> list[str]:
    text = haystack if isinstance(haystack, bytes) else haystack.encode()
    return sorted(label for label, value in secrets_by_label.items() if value.encode() in text)


async def test_okta_tokens_and_refresh_tokens_are_never_in_clear(
    sample_backends: SampleBackends,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    debug_logging: pytest.LogCaptureFixture,
) -> None:
    configure("DEBUG", "json")
    structlog.configure(cache_logger_on_first_use=False)  # no logger may outlive this test's captured stderr
    rotating = {"refresh_token_rotation": "ROTATE"}
    async with running(sample_backends, tmp_path, app=rotating) as stack, browser() as person:
        issued = record_okta_tokens(stack, id_token_lifetime=120)
        client_id = await register(person.http, stack)
        pkce = Pkce()
        params = await person.authorize(authorize_url(stack, client_id, pkce, path="/xaa"), REDIRECT)
        first = await redeem(stack, client_id, params["code"], pkce.verifier)
        assert first.status == 200, first.text
        second = await refresh(stack, client_id, first.json["refresh_token"])
        assert second.status == 200, second.text
        status, body = await mcp_call(stack, "/xaa", second.json["access_token"])  # refreshes the ID token at Okta
        assert status == 200, body
        assert_oauth_error(await refresh(stack, client_id, "not-" + first.json["refresh_token"]), "invalid_grant")
        store_text = await dump_store(stack)
        audit_text = json.dumps(await stack.gateway.rows(), default=repr)
        assert EventKind.OKTA_REFRESH in await kinds(stack)
    # Positive controls: Okta issued two sign-ins' worth of tokens, and each channel captured something.
    assert len(issued.id_tokens) == 2 and len(issued.refresh_tokens) == 2, issued
    assert "oauth_grants:" in store_text and '"okta_id_token": "b' in store_text
    assert '"backend": "xaa"' in audit_text
    out, err = capfd.readouterr()
    log_text = out + err
    logged_events = {json.loads(line)["event"] for line in log_text.splitlines() if line.startswith("{")}
    assert {"request", "okta_emulator_token_issued"} <= logged_events, logged_events
    assert any(record.name.startswith("sqlalchemy") for record in debug_logging.records)
    files = {path.name: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert "gateway.db" in files
    secrets_by_label = {
        **{f"Okta ID token #{i}": token for i, token in enumerate(issued.id_tokens)},
        **{f"Okta ID token #{i} signature": token.rsplit(".", 1)[1] for i, token in enumerate(issued.id_tokens)},
        **{f"Okta refresh token #{i}": token for i, token in enumerate(issued.refresh_tokens)},
        **{f"Okta access token #{i}": token for i, token in enumerate(issued.access_tokens)},
        "gateway refresh token #1": first.json["refresh_token"],
        "gateway refresh token #2": second.json["refresh_token"],
        "gateway access token #1": first.json["access_token"],
        "gateway access token #2": second.json["access_token"],
        "gateway authorization code": params["code"],
    }
    channels: dict[str, str | bytes] = {
        "the store (every table, every column)": store_text,
        "the audit rows": audit_text,
        "structlog output": log_text,
        "stdlib logging": debug_logging.text,
        **{f"the file {name}": data for name, data in files.items()},
    }
    leaks = {channel: found for channel, text in channels.items() if (found := secrets_found(text, secrets_by_label))}
    assert not leaks, leaks


# ---------------------------------------------------------------- 12: hostile requests


async def test_hostile_authorization_requests(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id = await register(person.http, stack)
        pkce = Pkce()
        good = authorize_url(stack, client_id, pkce)
        # Before the client and its redirect URI are trusted: an HTML page, never a redirect.
        for url in (
            good + "&client_id=" + client_id,  # a repeated parameter
            good + "&redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
            good.replace("client_id=", "x=", 1),
            good + "".join(f"&p{i}=1" for i in range(70)),  # more parameters than any request needs
        ):
            assert_refused_page(await send(person.http, "GET", url))
        huge = await send(person.http, "GET", good + "&junk=" + "A" * 100_000)  # beyond the HTTP parser's line
        assert huge.status in (400, 414, 431) and "Location" not in huge.headers, huge.status
        # After the client is known, but before the user did anything: an HTML page naming the error, still no
        # redirect (registration is open: a redirect here would make the gateway an open redirector, RFC 9700
        # §4.11.2) — and no login at Okta.
        refused: list[tuple[str, dict[str, str | None]]] = [
            ("unsupported_response_type", {"response_type": "token"}),  # the implicit grant
            ("invalid_request", {"code_challenge_method": "plain"}),
            ("invalid_request", {"code_challenge": None}),
            ("invalid_request", {"code_challenge": "too-short"}),
            ("invalid_target", {"resource": "https://evil.example/employees"}),
            ("invalid_target", {"resource": None}),
            ("invalid_target", {"resource": stack.url("/nowhere")}),
            ("request_not_supported", {"request": "eyJhbGciOiJub25lIn0.e30."}),
        ]
        for error, changes in refused:
            reply = await send(person.http, "GET", authorize_url(stack, client_id, pkce, changes=changes))
            assert_refused_page(reply)
            assert error in reply.text and "Set-Cookie" not in reply.headers, (error, reply.text[:300])
    assert len(stack.idp.login.authorization_requests) == 0
    assert await rows(stack, oauth_pending) == 0
    # Scopes beyond what the user's groups allow are dropped; nothing left to grant → invalid_scope, no grant.
    async with browser() as person:
        pkce = Pkce()
        url = authorize_url(stack, client_id, pkce, changes={"scope": "mcp:admin"})
        back = await person.authorize(url, REDIRECT)
        assert (back["error"], back["state"], back.get("code")) == ("invalid_scope", pkce.state, None), back
        assert await rows(stack, oauth_grants) == 0 and await refusals(stack) == ["no_scope"]
        params = await person.authorize(
            authorize_url(stack, client_id, pkce, changes={"scope": "mcp:write mcp:admin"}), REDIRECT
        )
    answer = await redeem(stack, client_id, params["code"], pkce.verifier)
    assert answer.status == 200 and answer.json["scope"] == "mcp:write", answer.text
    assert claims(answer.json["access_token"])["scope"] == "mcp:write"


async def test_a_challenge_that_is_not_base64url_is_refused_before_the_login(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id = await register(person.http, stack)
        for challenge in ("!" * 43, "A" * 41 + "+/", "A" * 42 + "="):  # 43 characters, none of them an S256 value
            pkce = Pkce()
            reply = await send(
                person.http, "GET", authorize_url(stack, client_id, pkce, changes={"code_challenge": challenge})
            )
            assert_refused_page(reply)
            assert "invalid_request" in reply.text, (challenge, reply.text[:300])
    assert len(stack.idp.login.authorization_requests) == 0


async def test_hostile_token_requests(stack: FrontDoorStack) -> None:
    async with browser() as person:
        client_id = await register(person.http, stack)
        pkce = Pkce()
        code = (await authorized(stack, person, client_id, pkce))["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": pkce.verifier,
    }
    token_url = stack.url("/oauth/token")
    encoded = str(yarl.URL.build(query=form).query_string)
    async with aiohttp.ClientSession() as http:

        async def post(body: bytes, content_type: str = FORM, **headers: str) -> Reply:
            return await send(http, "POST", token_url, body=body, headers={"Content-Type": content_type, **headers})

        cases: list[tuple[Reply, str, int]] = [
            (await post(f"{encoded}&client_id={client_id}".encode()), "invalid_request", 400),
            (await post(f"{encoded}&code=other".encode()), "invalid_request", 400),
            (await post(json.dumps(form).encode(), "application/json"), "invalid_request", 400),
            (await post(encoded.encode(), "text/plain"), "invalid_request", 400),
            (await post(encoded.replace("authorization_code", "password").encode()), "unsupported_grant_type", 400),
            (await post(encoded.replace("grant_type=authorization_code&", "").encode()), "invalid_request", 400),
            (await post(f"{encoded}&client_secret=s3cret".encode()), "invalid_client", 401),
            (await post(f"{encoded}&client_assertion=eyJ.eyJ.sig".encode()), "invalid_client", 401),
            (await post(encoded.encode(), Authorization="Basic Y2xpZW50OnNlY3JldA=="), "invalid_client", 401),
            (await post(encoded.encode() + b"&x=\xff\xfe"), "invalid_request", 400),
        ]
        for index, (reply, error, status) in enumerate(cases):
            assert (reply.status, reply.error) == (status, error), (index, reply.text)
            assert reply.headers.get("Cache-Control") == "no-store"
            if status == 401:
                assert reply.headers["WWW-Authenticate"].startswith("Basic ")
        too_big = await post(encoded.encode() + b"&pad=" + b"A" * 100_000)
        assert too_big.status in (400, 413), too_big.text[:200]
        # None of that spent the code: the well-formed request is the first to redeem it.
        answer = await post(encoded.encode())
    assert answer.status == 200, answer.text
    assert (await kinds(stack)).count(EventKind.TOKEN_ISSUED) == 1


async def test_authorizations_from_one_address_are_rate_limited(stack: FrontDoorStack) -> None:
    """Each start of a flow may fetch a client metadata document and writes a security event: a loop of them from
    one address is slowed down (a person signs in a few times a minute)."""
    async with aiohttp.ClientSession() as http:
        url = stack.url("/oauth/authorize?client_id=unknown&redirect_uri=http://127.0.0.1/cb")
        statuses = [(await send(http, "GET", url)).status for _ in range(AUTHORIZATIONS_PER_MINUTE)]
        assert set(statuses) == {400}  # an unknown client: the HTML page
        limited = await send(http, "GET", url)
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "text/html" in limited.headers["Content-Type"]


# More addresses than the front door's own table held before it was emptied at once (10 000), each taking a bucket.
FLOOD = 10_500


async def test_a_flood_of_addresses_gives_no_limited_address_its_budget_back(
    sample_backends: SampleBackends, tmp_path: Path
) -> None:
    """Without Redis the per-address limits live in the process's bounded buckets, which make room by dropping the
    buckets nearest to full — a flooding address's, one token down — never by emptying them all: an address whose
    budget is spent stays limited however many other addresses come (here through a trusted proxy)."""
    registering, authorizing = "198.51.100.7", "198.51.100.8"

    def forwarded(address: str) -> dict[str, str]:
        return {"X-Forwarded-For": address}

    async with (
        running(sample_backends, tmp_path, TRUSTED_PROXIES=LOOPBACK) as stack,
        aiohttp.ClientSession() as http,
    ):
        register_url, authorize_url = stack.url("/oauth/register"), stack.url("/oauth/authorize")
        body = json.dumps({"redirect_uris": [REDIRECT]}).encode()
        json_from = {"Content-Type": "application/json", **forwarded(registering)}

        async def registrations(count: int) -> list[int]:
            return [(await send(http, "POST", register_url, body=body, headers=json_from)).status for _ in range(count)]

        async def authorizations(address: str, count: int = 1) -> list[int]:
            # no parameters: an HTML 400 once past the limit, nothing stored
            return [(await send(http, "GET", authorize_url, headers=forwarded(address))).status for _ in range(count)]

        assert await registrations(REGISTRATIONS_PER_MINUTE + 1) == [201] * REGISTRATIONS_PER_MINUTE + [429]
        spent = {"register": time.monotonic()}
        authorized = await authorizations(authorizing, AUTHORIZATIONS_PER_MINUTE + 1)
        assert authorized == [400] * AUTHORIZATIONS_PER_MINUTE + [429]
        spent["authorize"] = time.monotonic()
        first = int(ipaddress.IPv4Address("10.0.0.0"))
        flood: list[int] = []
        for start in range(0, FLOOD, 250):
            batch = (authorizations(str(ipaddress.IPv4Address(first + n))) for n in range(start, start + 250))
            flood += [status for statuses in await asyncio.gather(*batch) for status in statuses]
        assert flood == [400] * FLOOD  # each a new address, with a budget of its own
        again = {"register": await registrations(REGISTRATIONS_PER_MINUTE)}
        took = {"register": time.monotonic() - spent["register"]}
        again["authorize"] = await authorizations(authorizing, AUTHORIZATIONS_PER_MINUTE)
        took["authorize"] = time.monotonic() - spent["authorize"]
    for kind, per_minute in (("register", REGISTRATIONS_PER_MINUTE), ("authorize", AUTHORIZATIONS_PER_MINUTE)):
        # At most what the bucket regained since it was spent, and the fraction of a token it held then.
        regained = took[kind] * per_minute / 60
        assert regained < per_minute - 1, f"{kind}: {took[kind]:.1f} s, too slow to tell a refill from a reset"
        allowed = len([status for status in again[kind] if status != 429])
        assert allowed <= regained + 1 and again[kind][-1] == 429, (kind, took[kind], again[kind])


async def test_a_remembered_consent_is_not_reused_for_a_loopback_redirect(stack: FrontDoorStack) -> None:
    """RFC 8252 §8.6: a loopback port (or a custom scheme) proves nothing of who gets the code — a local process can
    name a client the user approved and listen on any port. Remembered consent skips the page for https only."""
    https_uri = "https://client.example/callback"
    async with browser() as person:
        client_id = await register(person.http, stack, REDIRECT, https_uri)
        for uri in (REDIRECT, https_uri):  # approved once for each
            await person.authorize(authorize_url(stack, client_id, Pkce(), uri), uri)
        again = await person.sign_in(authorize_url(stack, client_id, Pkce(), https_uri), https_uri)
        assert again.status == 303 and again.headers["Location"].startswith(https_uri)  # straight back with a code
        elsewhere = REDIRECT.replace("33418", "45999")
        page = await person.sign_in(authorize_url(stack, client_id, Pkce(), elsewhere), elsewhere)
        assert page.status == 200 and 'name="decision"' in page.text  # asked again
