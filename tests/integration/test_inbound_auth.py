"""Inbound identity end to end: Okta-shaped tokens from the emulator, the gateway on loopback, a recording backend.

Covers issue 3's required cases: hostile tokens (each rejected with the right status and challenge), key rotation
without a restart, RFC 9728 discovery from the 401, agent identification and authorization, session binding, and
a dead, slow or garbled JWKS (503, never 401, and never a request through on an unverified token).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDictProxy

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, User
from tests.support.backends import BACKEND_SESSION_ID, RecordingBackend, running_backend
from tests.support.gateway import DEFAULT_KEY, RunningGateway, psk_backend, running_gateway
from tests.support.okta_faults import FaultyOktaEmulator

AS_ID = "aus-gateway"
AUDIENCE = "api://okta-agent-proxy-tests"
ALICE = User("alice@example.com")
BOB = User("bob@example.com")
CURSOR = "0oa_cursor_app"
CLAUDE_APP, CLAUDE_CLI = "0oa_claude_app", "0oa_claude_cli"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Stack:
    idp: FaultyOktaEmulator
    backend: RecordingBackend
    gateway: RunningGateway
    http: aiohttp.ClientSession

    def token(self, user: User | None = ALICE, client_id: str = CURSOR, **kwargs: Any) -> str:
        scopes = kwargs.pop("scopes", ["mcp:read"])
        return self.idp.mint_access_token(AS_ID, user=user, client_id=client_id, scopes=scopes, **kwargs)

    async def post(
        self, path: str, token: str | None, body: Any = LIST, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | None, CIMultiDictProxy[str]]:
        sent = dict(ACCEPT)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        async with self.http.post(self.gateway.url(path), data=json.dumps(body), headers=sent) as response:
            text = await response.read()
            document = json.loads(text) if text else None
            return response.status, document, response.headers


def agents_config() -> dict[str, Any]:
    return {
        "cursor": {"client_id": CURSOR, "scopes": ["mcp:read"], "backend_access": ["employees"]},
        "claude-code": {
            "client_id": "wlp_claude_agent",
            "inbound_client_ids": [CLAUDE_APP, CLAUDE_CLI],
            "backend_access": ["employees", "partners"],
        },
        "retired": {"client_id": "0oa_retired", "enabled": False, "backend_access": ["employees"]},
    }


@asynccontextmanager
async def stack(**settings: Any) -> AsyncIterator[Stack]:
    async with (
        FaultyOktaEmulator(auth_servers=(AuthorizationServer(AS_ID, AUDIENCE),), users=(ALICE, BOB)) as idp,
        running_backend() as backend,
    ):
        config = {
            "backends": {
                "employees": psk_backend(
                    backend.url("/mcp"), "/employees", method_scopes={"tools/call": ["mcp:write"]}
                ),
                "partners": psk_backend(backend.url("/partners"), "/partners"),
            },
            "agents": agents_config(),
        }
        values = {"OKTA_ISSUER": idp.issuer(AS_ID), "OKTA_AUDIENCE": AUDIENCE, **settings}
        async with running_gateway(config, settings=values) as gateway, aiohttp.ClientSession() as http:
            yield Stack(idp, backend, gateway, http)


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer ")
    params = {}
    for part in header[len("Bearer ") :].split(", "):
        name, _, value = part.partition("=")
        params[name] = value.strip('"')
    return params


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ---- discovery and challenges ---------------------------------------------------------------------------------


async def test_no_token_401_names_the_routes_metadata_and_a_client_can_discover_the_issuer() -> None:
    async with stack() as s:
        status, body, headers = await s.post("/employees", None)
        assert status == 401
        assert body is not None and body["error"] == "invalid_token"
        params = challenge_params(headers["WWW-Authenticate"])
        assert "error" not in params
        assert params["resource_metadata"] == s.gateway.url("/.well-known/oauth-protected-resource/employees")
        async with s.http.get(params["resource_metadata"]) as response:
            assert response.status == 200
            document = await response.json()
        assert document["resource"] == s.gateway.url("/employees")
        assert document["authorization_servers"] == [s.idp.issuer(AS_ID)]
        assert document["bearer_methods_supported"] == ["header"]
        assert {"mcp:read", "mcp:write"} <= set(document["scopes_supported"])
        # What a client does next: the AS metadata, where Okta serves it (path-appended).
        issuer = document["authorization_servers"][0]
        async with s.http.get(issuer + "/.well-known/oauth-authorization-server") as response:
            assert (await response.json())["issuer"] == issuer
        assert s.backend.requests == []


async def test_metadata_for_sub_paths_root_and_unknown() -> None:
    async with stack() as s:
        async with s.http.get(s.gateway.url("/.well-known/oauth-protected-resource/employees/mcp")) as response:
            assert (await response.json())["resource"] == s.gateway.url("/employees/mcp")
        async with s.http.get(s.gateway.url("/.well-known/oauth-protected-resource")) as response:
            assert (await response.json())["resource"] == s.gateway.base_url
        async with s.http.get(s.gateway.url("/.well-known/oauth-protected-resource/nowhere")) as response:
            assert response.status == 404
        status, _, headers = await s.post("/employees/mcp", None)
        assert status == 401
        assert challenge_params(headers["WWW-Authenticate"])["resource_metadata"].endswith(
            "/.well-known/oauth-protected-resource/employees/mcp"
        )


async def test_unknown_path_is_404_with_or_without_token() -> None:
    async with stack() as s:
        assert (await s.post("/nowhere", None))[0] == 404
        assert (await s.post("/nowhere", s.token()))[0] == 404


async def test_valid_token_reaches_backend_without_the_callers_token() -> None:
    async with stack() as s:
        token = s.token()
        status, body, _ = await s.post("/employees", token)
        assert status == 200
        assert body is not None and body["result"]["tools"][0]["name"] == "echo"
        seen = await s.backend.last_request()
        assert "authorization" not in {name.lower() for name in seen.headers}
        assert seen.headers["X-API-Key"] == DEFAULT_KEY
        assert token not in repr(seen.raw_headers)


# ---- hostile tokens -------------------------------------------------------------------------------------------


async def assert_invalid(s: Stack, token: str) -> None:
    before = len(s.backend.requests)
    status, body, headers = await s.post("/employees", token)
    assert status == 401, body
    assert body is not None and body["error"] == "invalid_token"
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"
    assert token not in json.dumps(body)
    assert len(s.backend.requests) == before


async def test_hostile_tokens_are_rejected() -> None:
    async with stack() as s:
        good = s.token()
        header, payload, signature = good.split(".")
        claims = jwt.decode(good, options={"verify_signature": False})
        kid = jwt.get_unverified_header(good)["kid"]
        now = int(time.time())
        public_pem = (
            jwt.PyJWK(s.idp.jwks(AS_ID)["keys"][0])
            .key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
        hostile = {
            "alg none": b64(json.dumps({"alg": "none", "kid": kid}).encode()) + "." + payload + ".",
            "HS256 with the public key as secret": b64(json.dumps({"alg": "HS256", "kid": kid}).encode())
            + "."
            + payload
            + "."
            + b64(hmac.new(public_pem.encode(), f"x.{payload}".encode(), "sha256").digest()),
            "expired": s.token(lifetime=-600),
            "not yet valid": s.token(extra_claims={"nbf": now + 3600}),
            "issued in the future": s.token(extra_claims={"iat": now + 3600}),
            "wrong iss": s.token(extra_claims={"iss": "https://evil.example.com/oauth2/default"}),
            "wrong aud": s.token(audience="api://someone-else"),
            "unknown kid": s.token(headers={"kid": "not-a-published-kid"}),
            "tampered payload": header
            + "."
            + b64(json.dumps({**claims, "scp": ["mcp:admin"]}).encode())
            + "."
            + signature,
            "truncated": good[: len(good) // 2],
            "non-base64 segments": "!!!." + payload + ".@@@",
            "two segments": header + "." + payload,
            "ID-JAG typ": s.token(headers={"typ": "oauth-id-jag+jwt"}),
            "ID token": s.idp.mint_id_token(AS_ID, user=ALICE, client_id=CURSOR),
            "attacker key announced in jwk/jku/x5u": jwt.encode(
                claims,
                attacker,
                algorithm="RS256",
                headers={
                    "kid": kid,
                    "jwk": attacker_jwk,
                    "jku": "http://127.0.0.1:1/jwks",
                    "x5u": "http://127.0.0.1:1/c",
                },
            ),
            "missing exp": s.token(extra_claims={"exp": None}),
        }
        for name, token in hostile.items():
            try:
                await assert_invalid(s, token)
            except AssertionError as exc:
                raise AssertionError(f"hostile token accepted or mis-answered: {name}: {exc}") from None
        # And the real one still works.
        assert (await s.post("/employees", good))[0] == 200


async def test_unknown_kid_costs_at_most_one_refetch() -> None:
    async with stack() as s:
        assert (await s.post("/employees", s.token()))[0] == 200
        fetches = s.idp.jwks_fetches[AS_ID]
        for i in range(5):
            await assert_invalid(s, s.token(headers={"kid": f"made-up-{i}"}))
        assert s.idp.jwks_fetches[AS_ID] - fetches <= 1


async def test_oversized_header_is_rejected_by_the_parser() -> None:
    async with stack() as s:
        headers = {**ACCEPT, "Authorization": "Bearer " + "a" * (1024 * 1024)}
        async with s.http.post(s.gateway.url("/employees"), data=json.dumps(LIST), headers=headers) as response:
            assert response.status in (400, 413, 431)
        assert s.backend.requests == []
        assert (await s.post("/employees", s.token()))[0] == 200


async def test_only_the_authorization_header_carries_a_token() -> None:
    async with stack() as s:
        token = s.token()
        async with s.http.post(
            s.gateway.url("/employees"), data=json.dumps(LIST), headers={**ACCEPT, "Cookie": f"token={token}"}
        ) as response:
            assert response.status == 401
        # A token in the query string is refused outright (RFC 6750 §2.3; see test_edge.py), never used or forwarded.
        async with s.http.post(
            s.gateway.url(f"/employees?access_token={token}"), data=json.dumps(LIST), headers=ACCEPT
        ) as response:
            assert (response.status, (await response.json())["error"]) == (400, "bad_request")
        async with s.http.post(
            s.gateway.url("/employees"), data=json.dumps(LIST), headers={**ACCEPT, "Authorization": f"Basic {token}"}
        ) as response:
            assert response.status == 401


async def test_key_rotation_without_restart_and_retired_key_fails() -> None:
    async with stack() as s:
        old = s.token()
        assert (await s.post("/employees", old))[0] == 200
        s.idp.rotate_keys(AS_ID, keep_old=False)
        new = s.token()
        assert jwt.get_unverified_header(new)["kid"] != jwt.get_unverified_header(old)["kid"]
        assert (await s.post("/employees", new))[0] == 200  # unknown kid → one refetch → accepted
        await assert_invalid(s, old)  # its key is no longer published, even though it was verified before
        await assert_invalid(s, s.token(headers={"kid": jwt.get_unverified_header(old)["kid"]}))


# ---- agents and authorization ---------------------------------------------------------------------------------


async def test_agent_cases() -> None:
    async with stack() as s:
        assert (await s.post("/employees", s.token()))[0] == 200
        status, body, _ = await s.post("/partners", s.token())
        assert (status, body and body["error"], body and body["agent_id"]) == (403, "authorization_denied", "cursor")
        status, body, headers = await s.post("/employees", s.token(scopes=["profile"]))
        assert status == 403 and body is not None and body["error"] == "insufficient_scope"
        params = challenge_params(headers["WWW-Authenticate"])
        assert params["error"] == "insufficient_scope" and params["scope"] == "mcp:read"
        status, body, _ = await s.post("/employees", s.token(), headers={"X-Agent-ID": "claude-code"})
        assert (status, body and body["error"]) == (403, "authorization_denied")
        assert (await s.post("/employees", s.token(), headers={"X-Agent-ID": "cursor"}))[0] == 200
        assert (await s.post("/employees", s.token(client_id="0oa_stranger")))[0] == 403
        status, body, _ = await s.post("/employees", s.token(client_id="0oa_retired"))
        assert (status, body and body["agent_id"]) == (403, "retired")
        for cid in (CLAUDE_APP, CLAUDE_CLI):
            assert (await s.post("/partners", s.token(client_id=cid)))[0] == 200
        assert (await s.post("/partners", s.token(client_id="wlp_claude_agent")))[0] == 403


async def test_method_scopes_checked_from_the_body() -> None:
    async with stack() as s:
        # A mirrored header that disagrees with the body is refused whatever the era (PROTOCOL §4: -32020), never
        # believed; the method's scopes come from the body.
        status, body, headers = await s.post("/employees", s.token(), body=CALL, headers={"Mcp-Method": "tools/list"})
        assert status == 400 and body is not None and body["error"]["code"] == -32020, body
        status, body, headers = await s.post("/employees", s.token(), body=CALL)
        assert status == 403 and body is not None and body["error"] == "insufficient_scope"
        assert challenge_params(headers["WWW-Authenticate"])["scope"] == "mcp:read mcp:write"
        assert (await s.post("/employees", s.token(scopes=["mcp:read", "mcp:write"]), body=CALL))[0] == 200


# ---- sessions -------------------------------------------------------------------------------------------------


async def test_another_user_replaying_a_session_id_gets_404_and_the_backend_never_sees_it() -> None:
    async with stack() as s:
        alice, bob = s.token(ALICE), s.token(BOB)
        status, _, headers = await s.post("/employees", alice, body=INIT)
        assert status == 200
        session = headers["Mcp-Session-Id"]
        count = len(s.backend.requests)
        status, body, _ = await s.post("/employees", bob, headers={"Mcp-Session-Id": session})
        assert status == 404 and body is not None and body["error"] == "session_not_found"
        assert len(s.backend.requests) == count
        assert (await s.post("/employees", alice, headers={"Mcp-Session-Id": session}))[0] == 200
        assert s.backend.requests[-1].headers["Mcp-Session-Id"] == BACKEND_SESSION_ID
        assert (await s.post("/employees", alice, headers={"Mcp-Session-Id": "never-issued"}))[0] == 404
        async with s.http.delete(
            s.gateway.url("/employees"), headers={"Authorization": f"Bearer {alice}", "Mcp-Session-Id": session}
        ) as response:
            assert response.status == 200
        # Ending the session is the backend's: the DELETE reached it with its own id.
        assert (s.backend.requests[-1].method, s.backend.requests[-1].headers["Mcp-Session-Id"]) == (
            "DELETE",
            BACKEND_SESSION_ID,
        )


# ---- the IdP's keys unreachable -------------------------------------------------------------------------------


async def test_during_a_jwks_outage_a_token_with_a_new_key_gets_503_never_401_and_passes_once_keys_are_back() -> None:
    """Issue 11: after one failed refetch, the old code spent its 10 s refetch window on it and answered 401
    ("unknown key") to correctly signed tokens — pushing clients into a re-login. A failed fetch is not a refetch."""
    async with stack() as s:
        assert (await s.post("/employees", s.token()))[0] == 200  # the keys are fetched
        s.idp.rotate_keys(AS_ID)
        s.idp.set_jwks_mode("down")
        token = s.token()  # signed with the new key, which the gateway cannot fetch now
        answers = []
        deadline = time.monotonic() + 3.0  # several times the 1 s backoff between fetch attempts
        while time.monotonic() < deadline:
            status, body, headers = await s.post("/employees", token)
            answers.append((status, body and body["error"], headers.get("Retry-After")))
            await asyncio.sleep(0.15)
        assert {(status, error) for status, error, _ in answers} == {(503, "idp_unavailable")}, answers
        assert all(retry_after is not None and int(retry_after) > 0 for _, _, retry_after in answers)
        s.idp.set_jwks_mode("ok")
        deadline = time.monotonic() + 2.5  # the next attempt after the backoff, not after a refetch window
        while (status := (await s.post("/employees", token))[0]) != 200:
            assert status == 503 and time.monotonic() < deadline, status
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["down", "slow", "garbage"])
async def test_jwks_trouble_is_503_never_401_and_recovers(mode: str) -> None:
    async with FaultyOktaEmulator(auth_servers=(AuthorizationServer(AS_ID, AUDIENCE),), users=(ALICE,)) as idp:
        idp.set_jwks_mode(mode, delay_seconds=10)  # type: ignore[arg-type]
        async with running_backend() as backend:
            config = {
                "backends": {"employees": psk_backend(backend.url("/mcp"), "/employees")},
                "agents": agents_config(),
            }
            settings = {"OKTA_ISSUER": idp.issuer(AS_ID), "OKTA_AUDIENCE": AUDIENCE}
            async with running_gateway(config, settings=settings) as gateway, aiohttp.ClientSession() as http:
                s = Stack(idp, backend, gateway, http)
                token = s.token()
                status, body, headers = await s.post("/employees", token)
                assert status == 503, body
                assert body is not None and body["error"] == "idp_unavailable"
                assert int(headers["Retry-After"]) > 0
                assert backend.requests == []
                idp.set_jwks_mode("ok")
                deadline = time.monotonic() + 15
                statuses = []
                while time.monotonic() < deadline:
                    statuses.append((await s.post("/employees", token))[0])
                    if statuses[-1] != 503:
                        break
                    await asyncio.sleep(0.2)
                assert statuses[-1] == 200, statuses
