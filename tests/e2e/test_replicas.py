"""Issue 13: three gateway replicas behind a round-robin load balancer — nginx, then HAProxy, each run from the
example config in `deploy/` — with no sticky sessions, sharing PostgreSQL (audit), Redis and SESSION_SECRET.

The official `mcp` SDK client runs one legacy-era session through the balancer, authenticated (a user token the
embedded Okta emulator signed; the replicas fetch its keys): initialize, tools/list, tool calls, a slow tool whose
progress must arrive while it runs (SSE passed through unbuffered), the GET stream the client opens after
initialize, and DELETE at the end. The backend is the devkit's employees server (the SDK's own server) with
sessions and a GET stream, behind a pre-shared key. Round-robin sends consecutive requests of the session to
different replicas, so the session only survives if every replica opens the sealed `oap1.` id another one issued.

Checked: the client never got a 404 (nor anything but 200/202), the session id it saw is sealed, progress events
came on time, every replica reports the shared database and Redis reachable, and the audit rows (one PostgreSQL
database for all three) show the session served by all three replica processes, a GET stream among them, and no two
consecutive POSTs on the same replica — round-robin guarantees that, since at most the GET stream is dispatched
between two of them. The replicas accept only the public host name in `Host`, so a balancer that did not pass the
client's on would fail every request with 421.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, OktaEmulator, User
from tests.support.gateway import DEFAULT_KEY, psk_backend
from tests.support.processes import ServerProcess, start_server
from tests.support.replicas import (
    BALANCERS,
    PUBLIC_HOST,
    REPLICAS,
    ReplicatedGateway,
    replicated_gateway,
    require_balancer,
    require_redis,
)

pytestmark = pytest.mark.slow

AS_ID, AUDIENCE = "aus-replicas", "api://okta-agent-proxy-replicas"
AGENT, AGENT_CLIENT_ID = "cursor", "wlp_replicas_agent"
SCOPES = ("mcp:read", "mcp:write")
USER = User("replicas@example.com")
ROUTE = "/employees"
LEGACY_VERSIONS = {"2025-06-18", "2025-11-25"}
EMPLOYEE_IDS = ("E001", "E002", "E003", "E001", "E002", "E003")
PROGRESS_STEPS, PROGRESS_INTERVAL_MS = 4, 250
MAX_LATE_SECONDS = 0.1  # how late the earliest progress event may be (a held-back write is ~0.2 s late)
WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Exchange:
    """One HTTP request the SDK client made, as it saw the answer's headers."""

    method: str
    status: int
    sent_session: str | None  # the Mcp-Session-Id the request carried
    got_session: str | None  # the Mcp-Session-Id the answer carried
    content_type: str


@contextmanager
def stateful_employees() -> Iterator[ServerProcess]:
    """The devkit's employees server (official SDK) with sessions and a GET stream, requiring `DEFAULT_KEY`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLE_BACKEND_")}
    env["SAMPLE_BACKEND_API_KEY"] = DEFAULT_KEY

    def command(port: int) -> list[str]:
        serve = ["employees", "--port", str(port), "--stateful"]
        return [sys.executable, "-m", "okta_agent_proxy.devkit.sample_backends", *serve]

    with start_server(command, http_path="/mcp", env=env, name="sample-employees") as server:
        yield server


async def until(condition: Any, what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll `condition()` (bounded) until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class SessionRun:
    exchanges: list[Exchange]  # every HTTP answer the client got, in order
    progress_late: list[float]  # how late each progress event but the last was, in seconds


async def run_session(stack: ReplicatedGateway, token: str) -> SessionRun:
    """The SDK client's session through the balancer."""
    exchanges: list[Exchange] = []

    async def record(response: httpx2.Response) -> None:
        request = response.request
        exchanges.append(
            Exchange(
                request.method,
                response.status_code,
                request.headers.get("Mcp-Session-Id"),
                response.headers.get("Mcp-Session-Id"),
                response.headers.get("Content-Type", ""),
            )
        )

    headers = {"Authorization": f"Bearer {token}", **stack.headers}
    http = httpx2.AsyncClient(
        headers=headers, timeout=httpx2.Timeout(10.0, read=30.0), event_hooks={"response": [record]}
    )
    async with http, Client(streamable_http_client(stack.url(ROUTE), http_client=http), mode="legacy") as client:
        assert client.protocol_version in LEGACY_VERSIONS
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} >= {"get_employee", "slow_report"}
        for employee_id in EMPLOYEE_IDS:
            result = await client.call_tool("get_employee", {"employee_id": employee_id})
            assert not result.is_error and result.structured_content is not None, result
            assert result.structured_content["id"] == employee_id

        progress_at: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            progress_at.append(time.monotonic())

        arguments = {"steps": PROGRESS_STEPS, "interval_ms": PROGRESS_INTERVAL_MS}
        started = time.monotonic()
        result = await client.call_tool("slow_report", arguments, progress_callback=on_progress)
        assert not result.is_error, result
        assert len(progress_at) == PROGRESS_STEPS
        interval = PROGRESS_INTERVAL_MS / 1000  # step n's progress is due n intervals after the call
        late = [at - started - (step + 1) * interval for step, at in enumerate(progress_at[:-1])]

        # The client opens its GET stream after initialize, in the background: be sure it was answered as a stream.
        await until(lambda: any(e.method == "GET" for e in exchanges), "the SDK client's GET stream")
    return SessionRun(exchanges, late)


async def session_rows(stack: ReplicatedGateway) -> list[dict[str, Any]]:
    """The session's audit rows, once the DELETE's and the GET stream's (written when it ends) are there."""
    rows: list[dict[str, Any]] = []

    async def complete() -> bool:
        nonlocal rows
        rows = [row for row in await stack.audit_rows() if row["path"] == ROUTE]
        return {"GET", "DELETE"} <= {row["http_method"] for row in rows}

    deadline = time.monotonic() + WAIT_SECONDS
    while not await complete():
        assert time.monotonic() < deadline, f"audit rows incomplete: {rows}\n{stack.describe()}"
        await asyncio.sleep(0.1)
    return rows


async def replica_readiness(stack: ReplicatedGateway) -> list[Any]:
    """Each replica's own `/readyz` document."""
    async with httpx2.AsyncClient(timeout=5.0) as http:
        return [(await http.get(replica.url("/readyz"))).json() for replica in stack.replicas]


def summary(exchanges: list[Exchange], rows: list[dict[str, Any]]) -> str:
    """One line per request, as the client saw it and as the audit recorded it (for assertion messages)."""
    seen = [f"{e.method} {e.status} {e.content_type}" for e in exchanges]
    recorded = [
        f"{row['http_method']} {row['mcp_method']} {row['status']} {row['outcome']} on {row['replica']}" for row in rows
    ]
    return "client:\n  " + "\n  ".join(seen) + "\naudit:\n  " + "\n  ".join(recorded)


@pytest.mark.parametrize("kind", BALANCERS)
async def test_a_session_round_robins_over_three_replicas_without_stickiness(kind: str) -> None:
    require_balancer(kind)  # before starting anything (replicated_gateway checks again, with PostgreSQL)
    require_redis()
    with stateful_employees() as backend:
        async with OktaEmulator(auth_servers=[AuthorizationServer(AS_ID, AUDIENCE)], users=[USER]) as idp:
            token = idp.mint_access_token(AS_ID, user=USER, client_id=AGENT_CLIENT_ID, scopes=SCOPES)
            config = {
                "backends": {"employees": psk_backend(backend.url("/mcp"), ROUTE)},
                "agents": {AGENT: {"client_id": AGENT_CLIENT_ID, "backend_access": ["employees"]}},
            }
            # Only the public host: a balancer that did not pass the client's Host on would get 421 everywhere.
            settings = {"OKTA_ISSUER": idp.issuer(AS_ID), "OKTA_AUDIENCE": AUDIENCE, "ALLOWED_HOSTS": PUBLIC_HOST}
            async with replicated_gateway(kind, config, settings=settings) as stack:
                run = await run_session(stack, token)
                rows = await session_rows(stack)
                readiness = await replica_readiness(stack)
                exchanges = run.exchanges
                pids = {replica.process.pid for replica in stack.replicas}
                context = f"{summary(exchanges, rows)}\n{stack.describe()}"

    # The client: nothing but 200/202 (no 404 session_not_found), one sealed session id, carried to the end.
    assert {e.status for e in exchanges} <= {200, 202}, context
    initialize = exchanges[0]
    assert initialize.method == "POST" and initialize.sent_session is None, context
    session = initialize.got_session
    assert session is not None and session.startswith("oap1."), context
    assert all(e.sent_session == session for e in exchanges[1:]), context
    assert [e.method for e in exchanges].count("DELETE") == 1 and exchanges[-1].method == "DELETE", context
    (stream,) = [e for e in exchanges if e.method == "GET"]
    assert stream.status == 200 and stream.content_type.startswith("text/event-stream"), context

    # SSE through the balancer: buffered, every progress event would come at the end, with the answer; held back as
    # small writes (HAProxy without `option http-no-delay`), each would be ~0.2 s late. The last one comes with the
    # answer either way, so look at the others, at the least late.
    assert min(run.progress_late) < MAX_LATE_SECONDS, f"progress events late by {run.progress_late} s"

    # Every replica uses the shared database and the shared Redis.
    for document in readiness:
        assert document["checks"]["store"] == "reachable" and document["checks"]["redis"] == "reachable", readiness

    # The replicas: every request recorded once, for this user; all three served the one session.
    assert sorted(row["http_method"] for row in rows) == sorted(e.method for e in exchanges), context
    assert {row["user_sub"] for row in rows} == {USER.login}, context
    (get_row,) = [row for row in rows if row["http_method"] == "GET"]
    others = [row for row in rows if row is not get_row]
    assert all(row["status"] in (200, 202) and row["outcome"] == "ok" for row in others), context
    # The GET stream was open until the client closed it, after its DELETE: 499 client_closed is how the gateway
    # records a stream the client ended (200 if the backend had ended it first).
    assert get_row["upstream_status"] == 200 and (get_row["status"], get_row["outcome"]) in {
        (200, "ok"),
        (499, "client_closed"),
    }, context
    served_by = [row["replica"] for row in rows if row["http_method"] == "POST"]
    assert len(set(served_by)) == REPLICAS, context
    assert {int(replica.rpartition(":")[2]) for replica in served_by} == pids, context  # `replica`: host:pid
    assert {row["replica"] for row in rows} == set(served_by), context
    # Round-robin: between two consecutive POSTs at most the GET stream was dispatched, so with three replicas
    # the two never land on the same one.
    assert all(a != b for a, b in itertools.pairwise(served_by)), served_by
