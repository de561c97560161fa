"""Traces (DESIGN.md §9) exported over OTLP/HTTP to a real receiver, decoded with `opentelemetry-proto`.

One tools/call with Okta Cross App Access — the caller's token checked, an ID-JAG from the emulated Okta org, an
access token from the backend's authorization server, the backend validating what it gets — must give the span tree
an SRE reads: the SERVER span continuing the caller's `traceparent`, `authenticate`, `credential` with one CLIENT span
per token request, and the `upstream` CLIENT span whose id the backend received. No exported byte holds a token.
The `serve` process (subprocess) is covered too: its spans, its log line and audit row carrying the trace id, and
with tracing off, no exporter thread and nothing exported.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from okta_agent_proxy.devkit.okta_emulator import User
from okta_agent_proxy.observability import tracing
from tests.support.gateway import gateway_process, psk_backend
from tests.support.loopback import serving
from tests.support.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver
from tests.support.stacks import CURSOR_CLIENT_ID as CURSOR
from tests.support.stacks import EMPLOYEES_AS as BACKEND_AS
from tests.support.stacks import (
    GATEWAY_AS,
    AuditedGateway,
    RecordingOktaEmulator,
    ValidatingBackend,
    audited_gateway,
    employees_org,
    send,
    validating_backend,
    xaa_backend,
)

AUDIENCE = "api://okta-agent-proxy-tests"
ALICE = User("alice@example.com")
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "lookup", "arguments": {"q": "x"}}}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@dataclass
class TracedStack:
    idp: RecordingOktaEmulator
    backend: ValidatingBackend
    gateway: AuditedGateway
    receiver: OtlpReceiver
    http: aiohttp.ClientSession

    def token(self) -> str:
        return self.idp.mint_access_token(GATEWAY_AS, user=ALICE, client_id=CURSOR, scopes=["mcp:read"])


@asynccontextmanager
async def tracing_on(receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Tracing started in this process as `serve` starts it, with the standard variables (restored after). Stopped
    on a thread: the last export goes to the receiver, which is served by this event loop."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
    provider = tracing.start(dict(os.environ), instance="test-replica")
    assert provider is not None
    try:
        yield
    finally:
        await asyncio.to_thread(tracing.stop, provider)


@asynccontextmanager
async def traced_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TracedStack]:
    key, org = employees_org(AUDIENCE)
    async with (
        otlp_receiver() as receiver,
        tracing_on(receiver, monkeypatch),
        RecordingOktaEmulator(users=[ALICE], **org) as idp,
        validating_backend(idp, BACKEND_AS) as backend,
    ):
        config = {
            "backends": {
                "employees": xaa_backend(
                    idp, backend.resource, "/employees", auth_server=BACKEND_AS, scopes=["employees:read"]
                )
            },
            "agents": {
                "cursor": {
                    "client_id": CURSOR,
                    "private_key": key.config_value,
                    "backend_access": ["employees"],
                }
            },
        }
        settings = {
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
            "OKTA_AUDIENCE": AUDIENCE,
        }
        database = f"sqlite:///{tmp_path / 'audit.db'}"
        async with (
            audited_gateway(config, database, settings=settings) as gateway,
            aiohttp.ClientSession() as http,
        ):
            yield TracedStack(idp, backend, gateway, receiver, http)


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_ns)


async def test_a_cross_app_call_is_one_span_tree_continuing_the_callers_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with traced_stack(tmp_path, monkeypatch) as s:
        token = s.token()
        traceparent = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
        headers = {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE"}
        answer = await send(s.http, s.gateway.url("/employees"), token=token, body=CALL, headers=headers)
        assert answer.status == 200, answer.body

        def whole(spans: list[ReceivedSpan]) -> bool:
            return any(x.kind == "server" and x.trace_id == CLIENT_TRACE for x in spans)

        await s.receiver.wait_for(whole)
        spans = s.receiver.trace(CLIENT_TRACE)
        [server] = [x for x in spans if x.kind == "server"]
        assert server.parent_span_id == CLIENT_PARENT  # the caller's trace, continued
        assert server.name == "POST /employees"
        assert {k: server.attributes.get(k) for k in ("oap.backend", "oap.agent", "mcp.method.name")} == {
            "oap.backend": "employees",
            "oap.agent": "cursor",
            "mcp.method.name": "tools/call",
        }
        assert server.attributes["gen_ai.tool.name"] == "lookup"
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["oap.outcome"] == "ok"
        assert server.attributes["http.route"] == "/employees"
        assert server.resource["service.name"] == "gateway-under-test"
        assert server.resource["service.instance.id"] == "test-replica"

        steps = children(spans, server)
        assert [(x.name, x.kind) for x in steps] == [
            ("authenticate", "internal"),
            ("credential", "internal"),
            ("upstream", "client"),
        ]
        _, credential, upstream = steps
        assert credential.attributes["oap.credential.method"] == "okta-cross-app"
        round_trips = children(spans, credential)
        assert [(x.name, x.kind) for x in round_trips] == [
            ("token token-exchange", "client"),
            ("token jwt-bearer", "client"),
        ]
        assert round_trips[0].attributes["url.full"] == f"{s.idp.base_url}/oauth2/v1/token"
        assert all(x.attributes["http.response.status_code"] == 200 for x in round_trips)
        # Okta got each round trip's own span as parent, and not the caller's tracestate (its vendors' business).
        assert [(seen.traceparent, seen.tracestate) for seen in s.idp.received] == [
            (f"00-{CLIENT_TRACE}-{x.span_id}-01", None) for x in round_trips
        ]
        assert upstream.attributes["http.response.status_code"] == 200
        assert all(server.start_ns <= x.start_ns <= x.end_ns <= server.end_ns for x in steps)

        # The backend's traceparent names the upstream span, in the same trace (not the caller's parent).
        assert s.backend.traceparents_seen[-1] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"

        # The audit row leads to the trace.
        row = await s.gateway.row(answer.request_id)
        assert row["trace_id"] == CLIENT_TRACE

        # No token, assertion or credential in any exported byte.
        exported = b"".join(s.receiver.bodies)
        secrets = [token, *s.idp.issued, *s.idp.client_assertions(), *s.backend.tokens_seen]
        assert len(secrets) >= 4
        for secret in secrets:
            for piece in (secret, *secret.split(".")):
                if len(piece) >= 16:
                    assert piece.encode() not in exported, "a token (or a part of one) was exported"
        assert b'"q"' not in exported and b"arguments" not in exported  # nor the call's arguments


async def test_without_a_callers_traceparent_a_new_trace_starts_and_a_refusal_is_traced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with traced_stack(tmp_path, monkeypatch) as s:
        duplicated = [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01")] * 2
        headers = {"Authorization": "Bearer not-a-token", "Accept": "application/json, text/event-stream"}
        async with s.http.post(s.gateway.url("/employees"), json=CALL, headers=[*headers.items(), *duplicated]) as r:
            assert r.status == 401  # two traceparent headers: invalid (W3C), so a new trace
        answer = await send(s.http, s.gateway.url("/employees"), token="not-a-token", body=CALL)
        assert answer.status == 401

        def two(spans: list[ReceivedSpan]) -> bool:
            return sum(x.kind == "server" for x in spans) >= 2

        servers = [x for x in await s.receiver.wait_for(two) if x.kind == "server"]
        assert all(x.trace_id != CLIENT_TRACE and x.parent_span_id == "" for x in servers)
        outcomes = [(x.attributes["http.response.status_code"], x.attributes["oap.outcome"]) for x in servers]
        assert outcomes == [(401, "invalid_token")] * 2
        assert [x.name for x in children(s.receiver.spans, servers[0])] == ["authenticate"]
        assert all(x.status_code != 2 for x in servers)  # a client's mistake is not the server's error
        refused = await s.gateway.row(answer.request_id)
        assert refused["trace_id"] in {x.trace_id for x in servers}
        assert b"not-a-token" not in b"".join(s.receiver.bodies)


async def test_what_a_caller_controls_is_bounded_and_an_unsampled_caller_still_gets_its_trace_id_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with traced_stack(tmp_path, monkeypatch) as s:
        token = s.token()
        long_name = {**CALL, "params": {"name": "t" * 4000, "arguments": {}}}
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01", "tracestate": "a=1," * 400 + "b=2"}
        answer = await send(s.http, s.gateway.url("/employees"), token=token, body=long_name, headers=headers)
        assert answer.status == 200
        async with s.http.request("PROPFIND", s.gateway.url("/employees")) as odd:
            assert odd.status == 405
        unsampled = "5" * 32
        quiet = await send(
            s.http,
            s.gateway.url("/employees"),
            token=token,
            body=CALL,
            headers={"traceparent": f"00-{unsampled}-{CLIENT_PARENT}-00"},
        )
        assert quiet.status == 200

        def two(spans: list[ReceivedSpan]) -> bool:
            return sum(x.kind == "server" for x in spans) >= 2

        servers = [x for x in await s.receiver.wait_for(two) if x.kind == "server"]
        named = next(x for x in servers if x.trace_id == CLIENT_TRACE)
        assert named.attributes["gen_ai.tool.name"] == "t" * 256  # not 4 000 characters per span in the queue
        odd_span = next(x for x in servers if x.trace_id != CLIENT_TRACE)
        assert odd_span.name == "_OTHER /employees"  # a client cannot pick span names
        assert odd_span.attributes["http.request.method"] == "_OTHER"
        assert all(x.trace_id != unsampled for x in s.receiver.spans)  # the caller said: not sampled
        assert (await s.gateway.row(quiet.request_id))["trace_id"] == unsampled  # its row still names the trace
        _, trace_id, parent, flags = (s.backend.traceparents_seen[-1] or "---").split("-")
        assert (trace_id, flags) == (unsampled, "00")  # the backend continues it, unsampled,
        assert parent not in (CLIENT_PARENT, "0" * 16)  # as a child of the gateway's (unrecorded) server span


# ---------------------------------------------------------------- the serve process


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def _call(url: str, headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        sent = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **headers}
        async with http.post(url, data=json.dumps(CALL), headers=sent) as response:
            await response.read()
            return response.status, response.headers.get("X-Request-ID", "")


@asynccontextmanager
async def echo_backend() -> AsyncIterator[tuple[str, list[str | None]]]:
    """A backend that answers every call and keeps the `traceparent` it got."""
    seen: list[str | None] = []

    async def mcp(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(request.headers.get("traceparent"))
        body = await request.json()
        return aiohttp.web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": {}})

    app = aiohttp.web.Application()
    app.router.add_post("/mcp", mcp)
    async with serving(app) as url:
        yield f"{url}/mcp", seen


@pytest.mark.slow
async def test_serve_exports_spans_logs_and_audits_the_trace_id_and_without_otel_has_no_exporter(
    tmp_path: Path,
) -> None:
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    database = tmp_path / "audit.db"
    async with otlp_receiver() as receiver, echo_backend() as (backend_url, seen):
        config = {"backends": {"tools": psk_backend(backend_url, "/tools")}}
        off_settings = {"LOG_LEVEL": "INFO", "OTEL_SERVICE_NAME": "not-exported"}
        with gateway_process(config, settings=off_settings) as off:
            status, _ = await asyncio.to_thread(_sync_call, off.url("/tools"), {"traceparent": traceparent})
            assert status == 200
            threads_off = _threads(off.process.pid)
        assert seen[-1] == traceparent  # tracing off: the caller's header passes untouched (DESIGN.md §2)

        on_settings = {
            "LOG_LEVEL": "INFO",
            "DATABASE_URL": f"sqlite:///{database}",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        with gateway_process(config, settings=on_settings) as on:
            status, request_id = await asyncio.to_thread(_sync_call, on.url("/tools"), {"traceparent": traceparent})
            assert status == 200
            threads_on = _threads(on.process.pid)
            spans = await receiver.wait_for(lambda got: any(x.kind == "server" for x in got))
            assert on.stop() == 0  # SIGTERM: the audit queue is flushed before the process exits
            output = on.output()
        assert threads_on >= threads_off + 1  # the batch exporter's thread, only when tracing is on
        assert all(x.resource.get("service.name") != "not-exported" for x in spans)  # nothing from the first
        [server] = [x for x in spans if x.kind == "server"]
        assert server.trace_id == CLIENT_TRACE and server.resource["service.name"] == "okta-agent-proxy"
        [upstream] = [x for x in spans if x.name == "upstream"]
        assert seen[-1] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"
        request_lines = [json.loads(line) for line in output.splitlines() if '"event": "request"' in line]
        assert [line.get("trace_id") for line in request_lines if line["request_id"] == request_id] == [CLIENT_TRACE]
        with sqlite3.connect(database) as db:
            rows = db.execute("SELECT trace_id FROM audit_events WHERE request_id = ?", (request_id,)).fetchall()
        assert rows == [(CLIENT_TRACE,)]


def _sync_call(url: str, headers: dict[str, str]) -> tuple[int, str]:
    return asyncio.run(_call(url, headers))
