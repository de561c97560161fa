"""The audit log as the pipeline writes it (issue 5; DESIGN.md §4), on a real SQLite file and on real PostgreSQL.

Every outcome a client can get on a backend route leaves exactly one row, found by the request's `X-Request-ID`,
with the fields that answer "which user, through which agent, did what on which backend, with which credential,
and what happened": success, 401 (no token, bad token), 403 (each reason), 404 (another user's session), 413, 502
(unreachable, credential rejected), 503 (JWKS down, IdP token endpoint down), 504, a token exchange miss then a hit,
a retry after a backend 401 (one row), a denied tool call, a 202 and a DELETE. Unknown paths and the gateway's own
endpoints leave no row. A stream's row is written when it ends (a client leaving mid-stream: 499). Tool-call
arguments are stored only when configured (a reload turning it on or off applies at once). `/metrics` counters match
the rows. Gaps found in the gateway are pinned at the end as strict xfails.

The stack: the devkit Okta emulator (recording what it issued, so ID-JAG `jti`s can be compared), a Cross App
Access backend that validates its tokens like a real resource server, a recording backend with misbehaving paths,
and the gateway assembled as `serve` does it (migrated store, started AuditWriter).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from okta_agent_proxy.devkit.okta_emulator import ORG, App, AuthorizationServer, User, XaaPolicy
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import gateway_config, psk_backend
from tests.support.processes import LOOPBACK, free_port
from tests.support.stacks import (
    AUDIENCE,
    BACKEND_AS,
    DATABASES,
    GATEWAY_AS,
    Answer,
    AuditedGateway,
    RecordingOktaEmulator,
    ValidatingBackend,
    audited_gateway,
    database_url,
    ec_agent_key,
    jwt_claims,
    requests_total_by_labels,
    sample_values,
    send,
    validating_backend,
    xaa_backend,
)

ALICE = User("alice@example.com")
BOB = User("bob@example.com")
CAROL = User("carol@example.com")  # refused by policy
DAVE = User("dave@example.com")  # meets an IdP outage
ERIN = User("erin@example.com")  # her backend rejects the first credential
FRANK = User("frank@example.com")  # his backend rejects every credential
CURSOR = "wlp_cursor_agent"
CLAUDE = "0oa_claude_app"
RETIRED = "0oa_retired_app"
STRANGER = "0oa_stranger_app"
LIST = {"jsonrpc": "2.0", "id": 11, "method": "tools/list", "params": {}}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MAX_BODY = 4096
LATE_EVENT_SECONDS = 0.4

NOBODY = {"user_sub": None, "user_uid": None, "token_jti": None, "client_id": None, "agent": None}
NO_CREDENTIAL = {"credential_method": None, "credential_cache_hit": None, "id_jag_jti": None, "upstream_status": None}
NO_MCP = {"mcp_method": None, "mcp_name": None, "jsonrpc_id": None}


def call(tool: str, request_id: int | str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


@pytest.fixture(params=DATABASES)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with database_url(request.param, tmp_path) as url:
        yield url


@dataclass
class Stack:
    idp: RecordingOktaEmulator
    backend: RecordingBackend
    xaa: ValidatingBackend
    gateway: AuditedGateway
    http: aiohttp.ClientSession

    def token(self, user: User = ALICE, client_id: str = CURSOR, scopes: tuple[str, ...] = ("mcp:read",)) -> str:
        return self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=client_id, scopes=list(scopes))

    async def post(self, path: str, token: str | None, body: Any = LIST, **kwargs: Any) -> Answer:
        return await send(self.http, self.gateway.url(path), token=token, body=body, **kwargs)


@asynccontextmanager
async def stack(database: str, *, audit: dict[str, Any] | None = None) -> AsyncIterator[Stack]:
    key = ec_agent_key("cursor-key-1")
    servers = [
        AuthorizationServer(GATEWAY_AS, AUDIENCE),
        AuthorizationServer(BACKEND_AS, "api://backend", scopes=("backend:read",)),
    ]
    async with (
        RecordingOktaEmulator(
            auth_servers=servers,
            users=[ALICE, BOB, CAROL, DAVE, ERIN, FRANK],
            apps=[App(CURSOR, "Cursor agent", public_jwk=key.public_jwk)],
            xaa_policies=[XaaPolicy(agent_client_id=CURSOR, audience=BACKEND_AS)],
        ) as idp,
        running_backend(late_event_after=LATE_EVENT_SECONDS) as backend,
        validating_backend(idp) as xaa,
    ):
        reachable = ["employees", "partners", "late", "silent", "unauthorized", "down"]
        config: dict[str, Any] = {
            "backends": {
                "employees": xaa_backend(idp, xaa.resource, "/employees"),
                "partners": psk_backend(backend.url("/mcp"), "/partners", method_scopes={"tools/call": ["mcp:write"]}),
                "late": psk_backend(backend.url("/late-get"), "/late"),
                "silent": psk_backend(backend.url("/silent"), "/silent", timeout_seconds=0.3),
                "unauthorized": psk_backend(backend.url("/unauthorized"), "/unauthorized"),
                "down": psk_backend(f"http://127.0.0.1:{free_port()}/mcp", "/down", timeout_seconds=2),
                "finance": psk_backend(backend.url("/mcp"), "/finance"),
            },
            "agents": {
                "cursor": {"client_id": CURSOR, "private_key": key.config_value, "backend_access": reachable},
                "claude": {"client_id": CLAUDE, "backend_access": ["partners"]},
                "retired": {"client_id": RETIRED, "enabled": False, "backend_access": ["partners"]},
            },
        }
        if audit is not None:
            config["audit"] = audit
        settings = {
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
            "OKTA_AUDIENCE": AUDIENCE,
            "MAX_BODY_BYTES": MAX_BODY,
        }
        async with audited_gateway(config, database, settings=settings) as gateway, aiohttp.ClientSession() as http:
            yield Stack(idp, backend, xaa, gateway, http)


def caller(token: str, agent: str | None) -> dict[str, Any]:
    """The identity fields a row must carry for a request made with `token` (as the agent `agent`)."""
    claims = jwt_claims(token)
    return {
        "user_sub": claims["sub"],
        "user_uid": claims["uid"],
        "token_jti": claims["jti"],
        "client_id": claims["cid"],
        "agent": agent,
    }


def check(row: dict[str, Any], answer: Answer, outcome: str, **expected: Any) -> None:
    """The row agrees with what the client got, and has every `expected` field."""
    assert answer.status == row["status"], (answer.status, row)
    if outcome not in ("ok", "parse_error") and not outcome.startswith("upstream_"):
        assert answer.error == outcome, (answer.body, outcome)
    expected = {"outcome": outcome, "request_id": answer.request_id, **expected}
    wrong = {name: {"row": row[name], "expected": value} for name, value in expected.items() if row[name] != value}
    assert not wrong, f"{answer.request_id} ({outcome}): {wrong}"
    assert row["replica"], row
    assert row["latency_ms"] >= 0 and row["time"] is not None


async def test_every_outcome_leaves_exactly_one_row_with_its_fields(database: str) -> None:
    async with stack(database) as s:
        sent: list[str] = []  # request ids of every request on a backend route

        async def request(path: str, token: str | None, body: Any = LIST, **kwargs: Any) -> tuple[Answer, Any]:
            answer = await s.post(path, token, body, **kwargs)
            sent.append(answer.request_id)
            return answer, await s.gateway.row(answer.request_id)

        alice = s.token()
        list_bytes = len(json.dumps(LIST))

        # ---- success (pre-shared key)
        answer, row = await request("/partners", alice)
        assert answer.status == 200
        check(
            row,
            answer,
            "ok",
            http_method="POST",
            path="/partners",
            backend="partners",
            **caller(alice, "cursor"),
            mcp_method="tools/list",
            mcp_name=None,
            jsonrpc_id="11",
            credential_method="pre-shared-key",
            credential_cache_hit=None,
            id_jag_jti=None,
            upstream_status=200,
            bytes_in=list_bytes,
            bytes_out=len(answer.body),
            detail=None,
            arguments=None,
        )
        assert 0 < row["headers_ms"] <= row["latency_ms"]

        # ---- token exchange: a miss (an ID-JAG minted), then a hit with another token of the same user
        body = call("lookup", "call-1", employee="ada")
        answer, row = await request("/employees", alice, body)
        assert answer.status == 200, answer.body
        assert len(s.idp.id_jags()) == 1
        minted = jwt_claims(s.idp.id_jags()[0])["jti"]
        check(
            row,
            answer,
            "ok",
            path="/employees",
            backend="employees",
            **caller(alice, "cursor"),
            mcp_method="tools/call",
            mcp_name="lookup",
            jsonrpc_id="call-1",
            credential_method="okta-cross-app",
            credential_cache_hit=False,
            id_jag_jti=minted,
            upstream_status=200,
            bytes_in=len(json.dumps(body)),
            bytes_out=len(answer.body),
            arguments=None,  # record_arguments is off by default
        )
        alice_again = s.token()
        answer, row = await request("/employees", alice_again)
        assert answer.status == 200 and len(s.idp.id_jags()) == 1  # no new exchange
        # A hit carries the jti of the ID-JAG behind the cached credential: the grant this request relied on.
        check(
            row,
            answer,
            "ok",
            **caller(alice_again, "cursor"),
            credential_method="okta-cross-app",
            credential_cache_hit=True,
            id_jag_jti=minted,
            upstream_status=200,
        )

        # ---- a retry after a backend 401 is part of its request's one row
        erin = s.token(ERIN)
        assert (await request("/employees", erin))[0].status == 200  # erin's credential is now cached
        s.xaa.reject_next = 1
        answer, row = await request("/employees", erin)
        assert answer.status == 200
        assert s.xaa.request_ids_seen.count(answer.request_id) == 2  # sent twice upstream, recorded once
        check(
            row,
            answer,
            "ok",
            **caller(erin, "cursor"),
            credential_cache_hit=False,  # the fresh credential the retry used
            id_jag_jti=jwt_claims(s.idp.id_jags()[-1])["jti"],
            upstream_status=200,
        )

        # ---- 502: the backend rejects the fresh credential too
        frank = s.token(FRANK)
        s.xaa.reject_next = 2
        answer, row = await request("/employees", frank)
        check(
            row,
            answer,
            "backend_rejected_credential",
            status=502,
            **caller(frank, "cursor"),
            credential_method="okta-cross-app",
            credential_cache_hit=False,
            id_jag_jti=jwt_claims(s.idp.id_jags()[-1])["jti"],
            upstream_status=401,
            bytes_out=0,
        )
        assert s.xaa.request_ids_seen.count(answer.request_id) == 2

        # ---- 401
        answer, row = await request("/partners", None)
        check(row, answer, "invalid_token", status=401, backend="partners", **NOBODY, **NO_CREDENTIAL, **NO_MCP)
        assert row["bytes_in"] == 0 and row["bytes_out"] == 0 and row["headers_ms"] is None
        header, payload, signature = alice.split(".")
        tampered = f"{header}.{payload}.{signature[::-1]}"
        answer, row = await request("/partners", tampered)
        check(row, answer, "invalid_token", status=401, backend="partners", **NOBODY, **NO_CREDENTIAL)

        # ---- 403, each reason
        stranger = s.token(client_id=STRANGER)
        answer, row = await request("/partners", stranger)
        check(row, answer, "authorization_denied", status=403, **caller(stranger, None), **NO_CREDENTIAL)
        retired = s.token(client_id=RETIRED)
        answer, row = await request("/partners", retired)
        check(
            row,
            answer,
            "authorization_denied",
            status=403,
            **caller(retired, "retired"),
            mcp_method="tools/list",
            jsonrpc_id="11",
            **NO_CREDENTIAL,
        )
        answer, row = await request("/partners", alice, headers={"X-Agent-ID": "claude"})
        assert answer.json["agent_id"] == "cursor"
        identity = {k: v for k, v in caller(alice, "cursor").items() if k != "agent"}  # agent: see the xfail below
        check(row, answer, "authorization_denied", status=403, **identity, **NO_CREDENTIAL)
        answer, row = await request("/finance", alice)
        check(
            row,
            answer,
            "authorization_denied",
            status=403,
            backend="finance",
            **caller(alice, "cursor"),
            **NO_CREDENTIAL,
        )
        unscoped = s.token(scopes=("profile",))
        answer, row = await request("/partners", unscoped)
        check(row, answer, "insufficient_scope", status=403, **caller(unscoped, "cursor"), **NO_CREDENTIAL)
        carol = s.token(CAROL)
        policies = list(s.idp.xaa.policies)
        s.idp.xaa.policies.clear()
        answer, row = await request("/employees", carol)
        s.idp.xaa.policies.extend(policies)
        check(
            row,
            answer,
            "token_exchange_failed",
            status=403,
            backend="employees",
            **caller(carol, "cursor"),
            credential_method="okta-cross-app",
            credential_cache_hit=None,
            id_jag_jti=None,
            upstream_status=None,
        )
        assert row["detail"]  # the IdP's reason, for operators (never in the client's body)
        assert row["detail"] not in answer.body.decode()

        # ---- a denied tool call (method_scopes: tools/call needs mcp:write)
        answer, row = await request("/partners", alice, call("delete_everything", 7, confirm=True))
        check(
            row,
            answer,
            "insufficient_scope",
            status=403,
            **caller(alice, "cursor"),
            mcp_method="tools/call",
            mcp_name="delete_everything",
            jsonrpc_id="7",
            **NO_CREDENTIAL,
        )
        writer = s.token(scopes=("mcp:read", "mcp:write"))
        answer, row = await request("/partners", writer, call("echo", 8, message="hi"))
        check(row, answer, "ok", status=200, mcp_method="tools/call", mcp_name="echo", upstream_status=200)

        # ---- 404: a session another user started; an unknown path (no row at all)
        answer, row = await request("/partners", alice, INIT)
        session = answer.headers["Mcp-Session-Id"]
        check(row, answer, "ok", mcp_method="initialize", jsonrpc_id="0", upstream_status=200)
        bob = s.token(BOB)
        answer, row = await request("/partners", bob, headers={"Mcp-Session-Id": session})
        denied = caller(bob, "cursor")
        check(row, answer, "session_not_found", status=404, backend="partners", **denied, **NO_CREDENTIAL)
        for path in ("/nowhere", "/healthz", "/readyz", "/metrics", "/.well-known/oauth-protected-resource/partners"):
            method = "POST" if path == "/nowhere" else "GET"
            answer = await send(s.http, s.gateway.url(path), token=alice, body=LIST, method=method)
            assert answer.status in (200, 404), (path, answer.status)
            assert await s.gateway.rows_for(answer.request_id, timeout=0) == []

        # ---- a 202 (notification) and a DELETE are rows too
        answer, row = await request("/partners", alice, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        check(row, answer, "ok", status=202, mcp_method="notifications/initialized", jsonrpc_id=None, bytes_out=0)
        answer, row = await request("/partners", alice, None, method="DELETE", headers={"Mcp-Session-Id": session})
        check(row, answer, "ok", status=200, http_method="DELETE", **NO_MCP, bytes_in=0, upstream_status=200)

        # ---- 413
        big = call("echo", 9, message="x" * (MAX_BODY + 1))
        answer, row = await request("/partners", alice, big)
        check(row, answer, "payload_too_large", status=413, **caller(alice, "cursor"), **NO_MCP, **NO_CREDENTIAL)

        # ---- 400: not JSON (a JSON-RPC parse error)
        answer, row = await request("/partners", alice, raw=b'{"jsonrpc": "2.0", "id": 1, "method": ')
        assert answer.json["error"]["code"] == -32700
        check(row, answer, "parse_error", status=400, **caller(alice, "cursor"), **NO_MCP, **NO_CREDENTIAL)

        # ---- 502: unreachable backend, backend rejecting a static credential
        answer, row = await request("/down", alice)
        check(
            row,
            answer,
            "backend_unavailable",
            status=502,
            backend="down",
            **caller(alice, "cursor"),
            credential_method="pre-shared-key",
            upstream_status=None,
            bytes_out=0,
        )
        answer, row = await request("/unauthorized", alice)
        check(
            row,
            answer,
            "backend_rejected_credential",
            status=502,
            backend="unauthorized",
            credential_method="pre-shared-key",
            upstream_status=401,
            bytes_out=0,
        )
        assert "WWW-Authenticate" not in answer.headers

        # ---- 504
        answer, row = await request("/silent", alice)
        check(row, answer, "backend_timeout", status=504, backend="silent", upstream_status=None, bytes_out=0)

        # ---- 503: the IdP's token endpoint is down (a cache miss needs it)
        dave = s.token(DAVE)
        s.idp.set_token_endpoint_mode("down", auth_server_id=ORG)
        answer, row = await request("/employees", dave)
        s.idp.set_token_endpoint_mode("ok")
        check(
            row,
            answer,
            "idp_unavailable",
            status=503,
            **caller(dave, "cursor"),
            credential_method="okta-cross-app",
            credential_cache_hit=None,
            upstream_status=None,
        )
        assert int(answer.headers["Retry-After"]) > 0

        # ---- 503: JWKS down when a token names a key the gateway has not fetched yet (last: it breaks the keys)
        s.idp.rotate_keys(GATEWAY_AS)
        s.idp.set_jwks_mode("down")
        answer, row = await request("/partners", s.token())
        check(row, answer, "idp_unavailable", status=503, backend="partners", **NOBODY, **NO_CREDENTIAL)

        # ---- exactly one row per request on a backend route, and none for anything else
        rows = await s.gateway.wait_rows(len(sent))
        assert len(rows) == len(sent)
        assert Counter(row["request_id"] for row in rows) == Counter(sent)


async def test_a_streams_row_is_written_when_it_ends(database: str) -> None:
    async with stack(database) as s:
        token = s.token()
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream", "X-Request-ID": "stream-1"}
        started = datetime.now(UTC)
        async with s.http.get(s.gateway.url("/late"), headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            # Headers are in, the event is not: the stream is still open, so its row is not written yet.
            assert await s.gateway.rows_for("stream-1", timeout=0) == []
            body = await response.read()
        assert b"notifications/late" in body
        row = await s.gateway.row("stream-1")
        assert row["status"] == 200 and row["outcome"] == "ok" and row["http_method"] == "GET"
        assert row["backend"] == "late" and row["agent"] == "cursor" and row["user_sub"] == ALICE.login
        assert row["bytes_in"] == 0 and row["bytes_out"] == len(body) and row["upstream_status"] == 200
        assert row["headers_ms"] is not None
        assert row["headers_ms"] < LATE_EVENT_SECONDS * 1000 / 2  # the headers came at once…
        assert row["latency_ms"] >= LATE_EVENT_SECONDS * 1000 * 0.9  # …the row waited for the end
        assert row["headers_ms"] < row["latency_ms"]
        # `time` is when the request arrived (UTC), not when the row was written.
        assert abs(row["time"] - started) < timedelta(seconds=LATE_EVENT_SECONDS / 2), (row["time"], started)

        # A client that leaves mid-stream: the row is written when the gateway notices, as 499 client_closed.
        headers["X-Request-ID"] = "stream-2"
        async with s.http.get(s.gateway.url("/late"), headers=headers) as response:
            assert response.status == 200
            response.close()
        row = await s.gateway.row("stream-2")
        assert (row["status"], row["outcome"], row["upstream_status"]) == (499, "client_closed", 200)
        assert row["headers_ms"] is not None and row["bytes_out"] == 0
        assert len(await s.gateway.rows()) == 2


@pytest.mark.parametrize("record_arguments", [False, True])
async def test_arguments_are_recorded_only_when_configured(database: str, record_arguments: bool) -> None:
    arguments = {"message": "héllo", "count": 3, "nested": {"list": [1, None, True]}}
    async with (
        running_backend() as backend,
        audited_gateway(
            {
                "backends": {"echo": psk_backend(backend.url("/mcp"), "/echo")},
                "audit": {"record_arguments": record_arguments},
            },
            database,
        ) as gateway,
        aiohttp.ClientSession() as http,
    ):
        answer = await send(http, gateway.url("/echo"), body=call("echo", 1, **arguments))
        assert answer.status == 200
        row = await gateway.row(answer.request_id)
        assert (row["mcp_method"], row["mcp_name"]) == ("tools/call", "echo")
        if record_arguments:
            assert json.loads(row["arguments"]) == arguments
        else:
            assert row["arguments"] is None
        answer = await send(http, gateway.url("/echo"), body=LIST)  # a method without arguments: null either way
        assert (await gateway.row(answer.request_id))["arguments"] is None


async def test_metrics_parse_and_request_counters_match_the_rows(database: str) -> None:
    async with stack(database) as s:

        async def scrape() -> tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]:
            async with s.http.get(s.gateway.url("/metrics")) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
                credentials = sample_values(text, "oap_backend_credentials_total", "backend", "result")
                return requests_total_by_labels(text), credentials

        before, credentials_before = await scrape()  # counters are per process: compare what this workload added
        alice, bob = s.token(), s.token(BOB)
        workload: list[tuple[str, str | None, Any]] = [
            *[("/partners", alice, LIST)] * 3,
            ("/partners", bob, LIST),
            *[("/partners", None, LIST)] * 2,
            ("/partners", "not-a-jwt", LIST),
            *[("/finance", alice, LIST)] * 2,
            ("/partners", alice, call("echo", 1)),
            ("/partners", s.token(client_id=STRANGER), LIST),
            ("/partners", s.token(client_id=RETIRED), LIST),
            ("/down", alice, LIST),
            ("/unauthorized", alice, LIST),
            *[("/employees", alice, LIST)] * 2,
            ("/nowhere", alice, LIST),
        ]
        statuses: Counter[int] = Counter()
        for path, token, body in workload:
            statuses[(await s.post(path, token, body)).status] += 1
        assert statuses == Counter({200: 6, 401: 3, 403: 5, 404: 1, 502: 2})
        rows = await s.gateway.wait_rows(len(workload) - 1)  # /nowhere is not a backend route
        from_rows = Counter((row["backend"] or "-", row["agent"] or "-", str(row["status"])) for row in rows)
        after, credentials_after = await scrape()
        assert increase(before, after) == from_rows
        assert sum(from_rows.values()) == len(workload) - 1
        cache = {True: "cache_hit", False: "cache_miss"}
        credentials_from_rows = Counter(
            (row["backend"], cache[row["credential_cache_hit"]])
            for row in rows
            if row["credential_cache_hit"] is not None
        )
        assert credentials_from_rows == Counter({("employees", "cache_miss"): 1, ("employees", "cache_hit"): 1})
        assert increase(credentials_before, credentials_after) == credentials_from_rows


def increase(before: Counter[tuple[str, ...]], after: Counter[tuple[str, ...]]) -> Counter[tuple[str, ...]]:
    return Counter({labels: after[labels] - before[labels] for labels in after if after[labels] > before[labels]})


async def scrape_metrics(s: Stack) -> str:
    async with s.http.get(s.gateway.url("/metrics")) as response:
        return await response.text()


@pytest.mark.parametrize("before", [True, False])
async def test_record_arguments_changed_by_a_reload_applies_at_once(tmp_path: Path, before: bool) -> None:
    arguments = {"message": "across the reload"}
    async with running_backend() as backend, database_url("sqlite", tmp_path) as url:
        backends = {"echo": psk_backend(backend.url("/mcp"), "/echo")}
        async with (
            audited_gateway({"backends": backends, "audit": {"record_arguments": before}}, url) as gateway,
            aiohttp.ClientSession() as http,
        ):

            async def stored_arguments(request_id: int) -> Any:
                answer = await send(http, gateway.url("/echo"), body=call("echo", request_id, **arguments))
                assert answer.status == 200
                stored = (await gateway.row(answer.request_id))["arguments"]
                return None if stored is None else json.loads(stored)

            assert await stored_arguments(1) == (arguments if before else None)
            await gateway.reload({"backends": backends, "audit": {"record_arguments": not before}})
            assert await stored_arguments(2) == (None if before else arguments)


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_a_client_that_hangs_up_leaves_a_499_row(tmp_path: Path, handler_cancellation: bool) -> None:
    """A client that closes its connection before its answer comes: a 499 `client_closed` row, never a 500 —
    whether the server cancels the handler when the connection drops (as `serve` does) or the gateway only finds
    out when it writes the answer to the closed connection (aiohttp's default, and what a race with the
    cancellation looks like under load)."""
    async with (
        running_backend(delay=0.3) as backend,
        audited_gateway(
            gateway_config(slow=psk_backend(backend.url("/slow"), "/slow")),
            f"sqlite:///{tmp_path}/a.db",
            handler_cancellation=handler_cancellation,
        ) as gw,
    ):
        body = json.dumps(LIST).encode()
        request = (
            f"POST /slow HTTP/1.1\r\nHost: {LOOPBACK}:{gw.port}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json, text/event-stream\r\nX-Request-ID: gone\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        _, writer = await asyncio.open_connection(LOOPBACK, gw.port)
        writer.write(request)
        await writer.drain()
        await backend.last_request()  # the gateway is waiting for the backend…
        writer.close()  # …when the client goes away
        await writer.wait_closed()
        (row,) = await gw.wait_rows(1)
        assert (row["request_id"], row["status"], row["outcome"]) == ("gone", 499, "client_closed")
        async with aiohttp.ClientSession() as http:  # and the gateway goes on serving
            assert (await send(http, gw.url("/slow"), token=None, body=LIST)).status == 200


# ---- known gaps, pinned: each xfail is strict, so a fix turns it into a failure that asks to drop the marker


async def test_an_agent_header_mismatch_row_names_the_tokens_agent(tmp_path: Path) -> None:
    async with database_url("sqlite", tmp_path) as url, stack(url) as s:
        answer = await s.post("/partners", s.token(), headers={"X-Agent-ID": "claude"})
        assert (answer.status, answer.json["agent_id"]) == (403, "cursor")
        assert (await s.gateway.row(answer.request_id))["agent"] == "cursor"


async def test_a_parse_error_row_counts_the_bytes_read(tmp_path: Path) -> None:
    raw = b'{"jsonrpc": "2.0", "id": 1, "method": '
    async with (
        running_backend() as backend,
        database_url("sqlite", tmp_path) as url,
        audited_gateway({"backends": {"echo": psk_backend(backend.url("/mcp"), "/echo")}}, url) as gateway,
        aiohttp.ClientSession() as http,
    ):
        answer = await send(http, gateway.url("/echo"), raw=raw)
        assert answer.status == 400
        row = await gateway.row(answer.request_id)
        assert (row["outcome"], row["bytes_in"]) == ("parse_error", len(raw))


async def test_a_megabyte_tool_name_and_id_are_cut_in_the_row(tmp_path: Path) -> None:
    name, request_id = "t" * 1_000_000, "i" * 5000  # the caller's to choose; the backend answers what it answers
    async with (
        running_backend() as backend,
        database_url("sqlite", tmp_path) as url,
        audited_gateway({"backends": {"echo": psk_backend(backend.url("/mcp"), "/echo")}}, url) as gateway,
        aiohttp.ClientSession() as http,
    ):
        answer = await send(http, gateway.url("/echo"), body=call(name, request_id))
        row = await gateway.row(answer.request_id)
        assert row["mcp_name"] == "t" * 1023 + "…" and row["jsonrpc_id"] == "i" * 1023 + "…"
        assert row["mcp_method"] == "tools/call"
        answer = await send(http, gateway.url("/echo"), body=call("x" * 1024, 7))  # at the bound: whole
        assert (await gateway.row(answer.request_id))["mcp_name"] == "x" * 1024


async def test_metrics_count_jwks_fetches(tmp_path: Path) -> None:
    async with database_url("sqlite", tmp_path) as url, stack(url) as s:
        assert (await s.post("/partners", s.token())).status == 200  # the keys were fetched
        assert s.idp.jwks_fetches[GATEWAY_AS] >= 1
        fetches = sample_values(await scrape_metrics(s), "oap_jwks_fetches_total", "result")
        assert sum(fetches.values()) >= 1, fetches


async def test_metrics_count_failed_token_exchanges(tmp_path: Path) -> None:
    async with database_url("sqlite", tmp_path) as url, stack(url) as s:
        s.idp.xaa.policies.clear()
        answer = await s.post("/employees", s.token(CAROL))
        assert answer.error == "token_exchange_failed"
        results = sample_values(await scrape_metrics(s), "oap_backend_credentials_total", "backend", "result")
        assert results[("employees", "token_exchange_failed")] >= 1, results


async def test_a_failed_retry_row_keeps_the_backends_401(tmp_path: Path) -> None:
    async with database_url("sqlite", tmp_path) as url, stack(url) as s:
        erin = s.token(ERIN)
        assert (await s.post("/employees", erin)).status == 200
        s.xaa.reject_next = 1
        s.idp.set_token_endpoint_mode("down", auth_server_id=ORG)
        answer = await s.post("/employees", erin)
        assert answer.error == "idp_unavailable"
        row = await s.gateway.row(answer.request_id)
        assert (row["outcome"], row["upstream_status"]) == ("idp_unavailable", 401)
