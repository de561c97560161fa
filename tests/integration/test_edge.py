"""The edge (DESIGN.md §2, "Edge order"), attacked from outside on a bare socket: security headers sent twice, a
token in the query string, control characters in the path, a foreign `Host` or `Origin` — on every endpoint, in
order, each refusal with its JSON body, nothing forwarded, and one audit row when the path is a backend route.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, OktaEmulator, User
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import gateway_config, gateway_process, psk_backend, running_gateway
from tests.support.processes import LOOPBACK, free_port
from tests.support.raw_http import raw_request
from tests.support.stacks import AuditedGateway, audited_gateway

CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}'
EVIL_HOST = "evil.example"
EVIL_ORIGIN = "http://evil.example"


@contextlib.asynccontextmanager
async def edge_stack(tmp_path: Path) -> AsyncIterator[tuple[RecordingBackend, AuditedGateway]]:
    async with (
        running_backend() as backend,
        audited_gateway(
            gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo")), f"sqlite:///{tmp_path / 'audit.db'}"
        ) as gateway,
    ):
        yield backend, gateway


def post(path: str, port: int, *extra: str, request_id: str = "edge-1") -> str:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {LOOPBACK}:{port}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"X-Request-ID: {request_id}",
        *extra,
    ]
    return "\n".join(lines)


def duplicated(name: str, port: int) -> tuple[str, ...]:
    """Two copies of `name`, both values the gateway would otherwise accept."""
    values = {
        "Host": (f"{LOOPBACK}:{port}", f"localhost:{port}"),
        "Origin": (f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{port}"),
        "Authorization": ("Bearer first-token", "Bearer second-token"),
    }.get(name, ("one", "two"))
    return tuple(f"{name}: {value}" for value in values)


SECURITY_HEADERS = (
    "Authorization",
    "Mcp-Session-Id",
    "X-Agent-ID",
    "Origin",
    "Host",
    "Mcp-Method",
    "Mcp-Name",
    "MCP-Protocol-Version",
    "Last-Event-ID",
)


@pytest.mark.parametrize("name", SECURITY_HEADERS)
async def test_a_security_header_sent_twice_is_refused_first_and_audited(tmp_path: Path, name: str) -> None:
    async with edge_stack(tmp_path) as (backend, gateway):
        head = post("/echo", gateway.port, *duplicated(name, gateway.port))
        if name != "Host":  # …before the Origin check: a forbidden Origin would otherwise be a 403
            head += f"\nOrigin: {EVIL_ORIGIN}" if name != "Origin" else ""
        answer = await raw_request(gateway.port, head, CALL)
        assert (answer.status, answer.error) == (400, "bad_request"), answer.body
        # The other copy of a lower-case spelling counts too: header names are case-insensitive.
        lower = post("/echo", gateway.port, *(line.lower() for line in duplicated(name, gateway.port)))
        assert (await raw_request(gateway.port, lower.replace("edge-1", "edge-2"), CALL)).status == 400
        if name == "Host":
            # aiohttp's HTTP parser refuses a second Host itself: the gateway's JSON 400, before any handler (no row).
            assert await gateway.rows_for("edge-1", timeout=0.3) == []
        else:
            assert answer.headers["X-Request-ID"] == "edge-1"
            row = await gateway.row("edge-1")
            assert (row["status"], row["outcome"], row["backend"]) == (400, "bad_request", "echo")
        assert backend.requests == []
        assert (await raw_request(gateway.port, post("/echo", gateway.port), CALL)).status == 200  # still serving


@pytest.mark.parametrize(
    "query",
    [
        "access_token=abc",
        "x=1&access_token=abc",
        "access%5Ftoken=abc",
        "access_token",
        "access_token=",
        "Access_Token=abc",
    ],
)
@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
async def test_a_token_in_the_query_string_is_refused_never_forwarded(tmp_path: Path, query: str, method: str) -> None:
    async with edge_stack(tmp_path) as (backend, gateway):
        head = post(f"/echo?{query}", gateway.port).replace("POST", method, 1)
        answer = await raw_request(gateway.port, head, CALL if method == "POST" else b"")
        assert (answer.status, answer.error) == (400, "bad_request")
        assert b"abc" not in answer.body
        assert backend.requests == []
        row = await gateway.row("edge-1")
        assert (row["status"], row["outcome"]) == (400, "bad_request")
        # A parameter that merely contains the name is another parameter: it is forwarded as sent.
        assert (await raw_request(gateway.port, post("/echo?my_access_token=1", gateway.port), CALL)).status == 200
        assert (await backend.last_request()).path_qs == "/mcp?my_access_token=1"


@pytest.mark.parametrize(
    ("path", "backend_route"),
    [
        ("/echo/%00", True),
        ("/echo/a%0D%0AX-Injected:%20yes", True),
        ("/echo/a%09b", True),
        ("/echo/%7F", True),
        ("/nowhere/%00", False),
    ],
)
async def test_control_characters_in_the_path_get_400_and_the_gateway_keeps_serving(
    tmp_path: Path, path: str, backend_route: bool
) -> None:
    async with edge_stack(tmp_path) as (backend, gateway):
        answer = await raw_request(gateway.port, post(path, gateway.port), CALL)
        assert (answer.status, answer.error) == (400, "bad_request"), answer
        assert "X-Injected" not in answer.headers
        assert backend.requests == []
        rows = await gateway.rows_for("edge-1", timeout=2.0 if backend_route else 0.3)
        if backend_route:
            # Kept percent-encoded: a NUL cannot be stored in PostgreSQL text, and a CR LF must not reach a log.
            assert [row["path"] for row in rows] == [path]
        else:
            assert rows == []
        assert (await raw_request(gateway.port, post("/echo", gateway.port, request_id="ok"), CALL)).status == 200


async def test_the_challenge_quotes_a_percent_encoded_path() -> None:
    issuer = AuthorizationServer("aus-gateway", "api://edge-tests")
    async with (
        OktaEmulator(auth_servers=(issuer,), users=(User("alice@example.com"),)) as idp,
        running_backend() as backend,
        running_gateway(
            gateway_config(echo=psk_backend(backend.url("/mcp"), "/echo")),
            settings={"OKTA_ISSUER": idp.issuer("aus-gateway"), "OKTA_AUDIENCE": "api://edge-tests"},
        ) as gateway,
    ):
        answer = await raw_request(gateway.port, post('/echo/a%22b%5Cc%C3%A9"d', gateway.port), CALL)
        assert answer.status == 401
        challenge = answer.headers["WWW-Authenticate"]
        expected = f"{gateway.base_url}/.well-known/oauth-protected-resource/echo/a%22b%5Cc%C3%A9%22d"
        assert f'resource_metadata="{expected}"' in challenge
        assert challenge.isascii() and challenge.isprintable()


OPERATIONAL = ("/healthz", "/readyz", "/metrics")
WELL_KNOWN = "/.well-known/oauth-protected-resource/echo"


def get(path: str, host: str, *extra: str) -> str:
    return "\n".join([f"GET {path} HTTP/1.1", f"Host: {host}", *extra])


async def test_every_endpoint_checks_host_and_origin(tmp_path: Path) -> None:
    async with edge_stack(tmp_path) as (_, gateway):
        port = gateway.port
        own = f"{LOOPBACK}:{port}"
        for path in (*OPERATIONAL, WELL_KNOWN, "/echo", "/nowhere"):
            answer = await raw_request(port, get(path, f"{EVIL_HOST}:{port}"))
            assert (answer.status, answer.error) == (421, "misdirected_request"), path  # DNS rebinding
            answer = await raw_request(port, get(path, own, "Host: localhost"))
            assert (answer.status, answer.error) == (400, "bad_request"), path
        for path in (*OPERATIONAL, "/echo"):
            answer = await raw_request(port, get(path, own, f"Origin: {EVIL_ORIGIN}"))
            assert (answer.status, answer.error) == (403, "forbidden_origin"), path
        # /metrics names backends and agents: a rebinding page must not read it.
        metrics = await raw_request(port, get("/metrics", own))
        assert metrics.status == 200 and b"oap_" in metrics.body


async def test_probes_may_address_the_gateway_by_ip_but_mcp_routes_may_not(tmp_path: Path) -> None:
    async with edge_stack(tmp_path) as (_, gateway):
        port = gateway.port
        for host in (f"10.1.2.3:{port}", "10.1.2.3", f"[fd00::1]:{port}"):
            for path in OPERATIONAL:
                assert (await raw_request(port, get(path, host))).status == 200, (path, host)
            assert (await raw_request(port, get("/echo", host))).status == 421, host
        assert (await raw_request(port, get("/healthz", "10.1.2.3.evil.example"))).status == 421
        # No Host at all (HTTP/1.0, as HAProxy's default health check sends): a probe, never a browser.
        for path in OPERATIONAL:
            assert (await raw_request(port, f"GET {path} HTTP/1.0")).status == 200, path
        assert (await raw_request(port, "GET /echo HTTP/1.0")).status == 421
        assert (await raw_request(port, "POST /echo HTTP/1.0", b"{}")).status == 421
        # An empty Host is no Host: fine for a probe, refused on an MCP route.
        assert (await raw_request(port, "GET /healthz HTTP/1.1\nHost: ")).status == 200
        assert (await raw_request(port, "POST /echo HTTP/1.1\nHost: ", b"{}")).status == 421


async def test_public_metadata_takes_any_origin_and_answers_cors_preflights(tmp_path: Path) -> None:
    async with edge_stack(tmp_path) as (_, gateway):
        port = gateway.port
        own = f"{LOOPBACK}:{port}"
        answer = await raw_request(port, get(WELL_KNOWN, own, "Origin: https://app.example"))
        assert answer.status == 200 and answer.json["resource"] == gateway.url("/echo")
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        preflight = "\n".join(
            [
                f"OPTIONS {WELL_KNOWN} HTTP/1.1",
                f"Host: {own}",
                "Origin: https://app.example",
                "Access-Control-Request-Method: GET",
                "Access-Control-Request-Headers: mcp-protocol-version",
            ]
        )
        answer = await raw_request(port, preflight)
        assert answer.status == 204
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert "GET" in answer.headers["Access-Control-Allow-Methods"]
        assert "mcp-protocol-version" in answer.headers["Access-Control-Allow-Headers"].lower()
        # The Host check still applies there.
        assert (await raw_request(port, get(WELL_KNOWN, f"{EVIL_HOST}:{port}"))).status == 421


async def test_refusals_before_routing_leave_one_audit_row_each(tmp_path: Path) -> None:
    async with edge_stack(tmp_path) as (backend, gateway):
        port = gateway.port
        own = f"{LOOPBACK}:{port}"
        cases: list[tuple[str, str, int, str]] = [
            ("host", post("/echo", port).replace(f"Host: {own}", f"Host: {EVIL_HOST}"), 421, "misdirected_request"),
            ("origin", post("/echo", port, f"Origin: {EVIL_ORIGIN}"), 403, "forbidden_origin"),
            ("method", post("/echo", port).replace("POST", "PUT", 1), 405, "method_not_allowed"),
            ("twice", post("/echo", port, "Mcp-Session-Id: a", "Mcp-Session-Id: b"), 400, "bad_request"),
            ("query", post("/echo?access_token=x", port), 400, "bad_request"),
        ]
        for name, head, status, code in cases:
            answer = await raw_request(port, head.replace("edge-1", name), CALL)
            assert (answer.status, answer.error) == (status, code), name
            row = await gateway.row(name)
            assert (row["status"], row["outcome"], row["backend"]) == (status, code, "echo"), name
        # Not on a backend route: no row.
        await raw_request(port, get("/healthz", f"{EVIL_HOST}:{port}", "X-Request-ID: health"))
        await raw_request(port, get("/nowhere", f"{EVIL_HOST}:{port}", "X-Request-ID: nowhere"))
        assert await gateway.rows_for("health", timeout=0.3) == []
        assert await gateway.rows_for("nowhere", timeout=0) == []
        assert len(await gateway.rows()) == len(cases)
        assert backend.requests == []


async def test_metrics_on_a_listener_of_their_own() -> None:
    metrics_port = free_port()
    config = gateway_config(echo=psk_backend("http://127.0.0.1:9/mcp", "/echo"))
    with gateway_process(config, settings={"METRICS_PORT": metrics_port}) as gateway:
        main, metrics = f"{LOOPBACK}:{gateway.port}", f"{LOOPBACK}:{metrics_port}"
        answer = await raw_request(gateway.port, get("/metrics", main))
        assert (answer.status, answer.error) == (404, "not_found")
        answer = await raw_request(metrics_port, get("/metrics", metrics))
        assert answer.status == 200 and b"oap_requests_total" in answer.body
        assert (await raw_request(metrics_port, get("/metrics", f"10.0.0.7:{metrics_port}"))).status == 200
        assert (await raw_request(metrics_port, get("/metrics", f"{EVIL_HOST}:{metrics_port}"))).status == 421
        assert (await raw_request(metrics_port, get("/healthz", metrics))).status == 404
        assert (await raw_request(gateway.port, get("/healthz", main))).status == 200


async def test_aiohttp_client_duplicate_header_helper_agrees(tmp_path: Path) -> None:
    """The same refusal through an ordinary client library (a multidict with two values), not only a raw socket."""
    async with edge_stack(tmp_path) as (backend, gateway), aiohttp.ClientSession() as http:
        headers = [("Content-Type", "application/json"), ("Mcp-Name", "a"), ("Mcp-Name", "b")]
        async with http.post(gateway.url("/echo"), data=CALL, headers=CIMultiDict(headers)) as r:
            assert (r.status, (await r.json())["error"]) == (400, "bad_request")
        assert backend.requests == []
