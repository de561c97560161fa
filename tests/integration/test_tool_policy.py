"""Per-tool policy through the real gateway (issue 15, DESIGN.md §7): what an agent sees and calls.

The stack: the devkit Okta emulator signing real caller tokens, the gateway as `serve` assembles it (SQLite audit
store, started writer), and real MCP SDK backends (`tests/support/policy_backend.py`: a dozen tools, resources, a
template and prompts, three pages of tools, `-32602` for a name it lacks, a log of every request it received), one
answering POSTs as SSE streams and one as JSON, plus a scripted backend for answers no SDK server sends. Agent
`claude` has rules on every backend; agent `cursor` reaches the same backends without rules.

Clients are the official SDK's (`mcp.Client`) in both protocol eras — legacy (initialize, sessions) and 2026-07-28
(self-contained POSTs with `Mcp-Method`/`Mcp-Name`) — and raw HTTP where the status, framing or bytes are the point.
Gaps found in the gateway are pinned as strict xfails, each naming what happens and what should.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
import pytest_asyncio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import RequestParamsMeta, TextContent, TextResourceContents

from okta_agent_proxy.devkit.okta_emulator import AuthorizationServer, OktaEmulator, User
from okta_agent_proxy.mcp.list_filter import MAX_LIST_BYTES
from tests.integration.sse import SseEvent, iter_sse
from tests.support.gateway import psk_backend
from tests.support.policy_backend import (
    PROMPTS,
    RESOURCES,
    TEMPLATES,
    TOOLS,
    PolicyBackend,
    ScriptedAnswer,
    ScriptedBackend,
    scripted_backend,
    sdk_backend,
)
from tests.support.stacks import ACCEPT, AUDIENCE, GATEWAY_AS, Answer, AuditedGateway, audited_gateway, send

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the module's tests share its stacks (see `shared_stack`)

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
ERAS = ("legacy", MODERN)
CLAUDE = "0oa_claude_code"
CURSOR = "0oa_cursor_agent"
ALICE = User("alice@example.com")
PAGE = 5  # the SDK backends' page size: 12 tools are 3 pages
BOUND = 10.0

TOOL_RULE = {"allow": ["get_*", "search_*", "list_*", "count_*", "update_employee"], "deny": ["*salar*"]}
RESOURCE_RULE = {"allow": ["employees://public/*"]}
PROMPT_RULE = {"deny": ["salary_*"]}
STEP_UP = ("employees:write", "employees:admin")
VISIBLE_TOOLS = [
    "get_employee",
    "search_employees",
    "update_employee",
    "list_departments",
    "get_department",
    "count_employees",
]
HIDDEN_TOOLS = [name for name in TOOLS if name not in VISIBLE_TOOLS]
VISIBLE_RESOURCES = [uri for uri in RESOURCES if uri.startswith("employees://public/")]
HIDDEN_RESOURCES = [uri for uri in RESOURCES if uri not in VISIBLE_RESOURCES]
VISIBLE_TEMPLATES = ["employees://public/{employee_id}"]
VISIBLE_PROMPTS = ["introduce", "onboarding"]
HIDDEN_PROMPTS = ["salary_review"]
# The SDK server's own 2026-07-28 envelope (`_meta`) for raw requests.
MODERN_META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


def claude(extra_tool_rules: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Agent `claude`: the rules above on the three standard backends (and `extra_tool_rules` on others)."""
    names = ["employees", "employees-json", "scripted"]
    extra = dict(extra_tool_rules or {})
    return {
        "client_id": CLAUDE,
        "backend_access": [*names, *extra],
        "tool_access": {name: TOOL_RULE for name in names} | extra,
        "resource_access": {name: RESOURCE_RULE for name in names},
        "prompt_access": {name: PROMPT_RULE for name in names},
    }


@dataclass
class Stack:
    idp: OktaEmulator
    sse: PolicyBackend  # answers POSTs as SSE streams; keeps its events for resumption
    json: PolicyBackend  # answers POSTs as JSON
    scripted: ScriptedBackend
    extra: dict[str, PolicyBackend]
    gateway: AuditedGateway
    http: aiohttp.ClientSession
    config: dict[str, Any]

    def token(self, agent: str = CLAUDE, scopes: Iterable[str] = ("mcp:read",)) -> str:
        return self.idp.mint_access_token(GATEWAY_AS, user=ALICE, client_id=agent, scopes=list(scopes))

    def url(self, backend: str) -> str:
        return self.gateway.url("/" + backend)

    def backend(self, name: str) -> PolicyBackend:
        return {"employees": self.sse, "employees-json": self.json, **self.extra}[name]


@asynccontextmanager
async def stack(
    tmp_path: Path,
    extra: Mapping[str, tuple[PolicyBackend, bool]] | None = None,
    extra_tool_rules: Mapping[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """The stack; `extra`: more SDK backends (name → (backend, answers JSON)), with `extra_tool_rules` for claude."""
    async with contextlib.AsyncExitStack() as running:
        idp = await running.enter_async_context(
            OktaEmulator(auth_servers=[AuthorizationServer(GATEWAY_AS, AUDIENCE)], users=[ALICE])
        )
        sse = await running.enter_async_context(sdk_backend(PolicyBackend(page_size=PAGE), event_store=True))
        json_backend = await running.enter_async_context(sdk_backend(PolicyBackend(page_size=PAGE), json_response=True))
        scripted = await running.enter_async_context(scripted_backend())
        extras = {
            name: await running.enter_async_context(sdk_backend(backend, json_response=as_json))
            for name, (backend, as_json) in (extra or {}).items()
        }
        step_up = {"update_*": list(STEP_UP)}
        backends = {
            "employees": psk_backend(sse.url, "/employees", tool_scopes=step_up),
            "employees-json": psk_backend(json_backend.url, "/employees-json", tool_scopes=step_up),
            "scripted": psk_backend(scripted.url("/s"), "/scripted"),
        } | {name: psk_backend(backend.url, "/" + name) for name, backend in extras.items()}
        reachable = list(backends)
        config = {
            "backends": backends,
            "agents": {
                "claude": claude(extra_tool_rules),
                "cursor": {"client_id": CURSOR, "backend_access": reachable},
            },
        }
        settings = {"OKTA_DOMAIN": idp.base_url, "OKTA_ISSUER": idp.issuer(GATEWAY_AS), "OKTA_AUDIENCE": AUDIENCE}
        database = f"sqlite:///{tmp_path / 'audit.db'}"
        gateway = await running.enter_async_context(audited_gateway(config, database, settings=settings))
        # A connection per request: a pooled one left idle while the SDK clients of other tests run may be closed
        # by the gateway just as it is reused (a reset seen once in CI), which is the client's race, not the policy's.
        connector = aiohttp.TCPConnector(force_close=True)
        http = await running.enter_async_context(aiohttp.ClientSession(connector=connector))
        yield Stack(idp, sse, json_backend, scripted, extras, gateway, http, config)


# One stack for the module (starting one takes a few hundred milliseconds); tests that change it make their own.
@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with stack(tmp_path_factory.mktemp("policy")) as made:
        yield made


@pytest.fixture
def stk(shared_stack: Stack) -> Stack:
    """The module's stack with empty request logs and the backends' behaviour reset."""
    for backend in (shared_stack.sse, shared_stack.json):
        backend.received.clear()
        backend.list_done_at.clear()
        backend.list_progress, backend.list_progress_gap = 0, 0.0
    shared_stack.scripted.received.clear()
    shared_stack.scripted.answers.clear()
    return shared_stack


# ---------------------------------------------------------------- clients


@asynccontextmanager
async def sdk_client(url: str, token: str, mode: str) -> AsyncIterator[Client]:
    """The official SDK client for `url` sending `token`, in `mode` (`legacy` or a 2026 version), without a cache.
    Its 1 MiB limit on one SSE event is lifted: a list of 10,000 tools is one larger event."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(BOUND)) as http,
        Client(streamable_http_client(url, http_client=http, max_sse_event_size=None), mode=mode, cache=None) as client,
    ):
        yield client


def entry_name(entry: Any) -> str:
    """What the policy matches a list entry by: a template's `uriTemplate`, a resource's `uri`, else its `name`."""
    for attribute in ("uri_template", "uri"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry.name)


async def every_page(fetch: Callable[[str | None], Awaitable[Any]]) -> tuple[list[str], list[str | None]]:
    """Every entry of a paginated list (by `entry_name`), following `nextCursor`, and the cursors the pages gave
    (the last is None)."""
    names: list[str] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    for _ in range(20):
        page = await fetch(cursor)
        for key in ("tools", "prompts", "resources", "resource_templates"):
            names += [entry_name(entry) for entry in getattr(page, key, ())]
        cursor = page.next_cursor
        cursors.append(cursor)
        if cursor is None:
            return names, cursors
    raise AssertionError("the pagination did not end")


NAMED_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


def request(era: str, method: str, request_id: int | str, **params: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A JSON-RPC request and its era's headers (2026-07-28: `_meta`, `Mcp-Method`, `Mcp-Name`)."""
    if era == "legacy":
        return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}, {}
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if method in NAMED_PARAM:
        headers["Mcp-Name"] = params[NAMED_PARAM[method]]
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": MODERN_META}}
    return body, headers


async def session_headers(stk: Stack, backend: str, token: str, era: str) -> dict[str, str]:
    """What a raw client of `era` sends with each request: after an initialize handshake (legacy), the session."""
    if era != "legacy":
        return {}
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    }
    answer = await send(stk.http, stk.url(backend), token=token, body=init)
    assert answer.status == 200, answer.body
    headers = {"Mcp-Session-Id": answer.headers["Mcp-Session-Id"], "MCP-Protocol-Version": LEGACY}
    done = await send(
        stk.http,
        stk.url(backend),
        token=token,
        body={"jsonrpc": "2.0", "method": "notifications/initialized"},
        headers=headers,
    )
    assert done.status == 202, done.body
    return headers


async def call(
    stk: Stack,
    backend: str,
    token: str,
    era: str,
    method: str,
    request_id: int | str = 1,
    headers: Mapping[str, str] | None = None,
    **params: Any,
) -> Answer:
    body, era_headers = request(era, method, request_id, **params)
    return await send(stk.http, stk.url(backend), token=token, body=body, headers={**era_headers, **(headers or {})})


def media_type(answer: Answer) -> str:
    return answer.headers.get("Content-Type", "").partition(";")[0].strip()


def parse_sse(body: bytes) -> list[tuple[str, str, str | None]]:
    """(event type, data, id) of each complete event of an SSE body, by the WHATWG rules MCP uses."""
    events: list[tuple[str, str, str | None]] = []
    data: list[str] = []
    event, event_id, seen = "message", None, False
    for line in body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if seen:
                events.append((event, "\n".join(data), event_id))
            event, data, event_id, seen = "message", [], None, False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        seen = True
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
    return events


def messages(answer: Answer) -> list[Any]:
    """The JSON-RPC messages of an answer: its JSON body, or the data of its SSE events (priming events skipped)."""
    if media_type(answer) == "text/event-stream":
        return [json.loads(data) for _, data, _ in parse_sse(answer.body) if data]
    return [json.loads(answer.body)]


def names_in(result: Mapping[str, Any]) -> list[str]:
    for key, name in (
        ("tools", "name"),
        ("prompts", "name"),
        ("resources", "uri"),
        ("resourceTemplates", "uriTemplate"),
    ):
        if key in result:
            return [entry[name] for entry in result[key]]
    raise AssertionError(f"not a list result: {sorted(result)}")


# ---------------------------------------------------------------- what the SDK client sees and may call


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("backend", ["employees", "employees-json"])
async def test_the_sdk_client_sees_exactly_the_allowed_set_page_by_page(stk: Stack, backend: str, mode: str) -> None:
    token = stk.token(scopes=("mcp:read", *STEP_UP))
    # Asking for progress makes the SSE backend stream its list answers in both eras (a 2026-07-28 SDK server
    # answers in JSON what it has not begun to stream).
    stk.sse.list_progress = 1
    meta: RequestParamsMeta | None = {"progress_token": "listing"} if backend == "employees" else None
    async with sdk_client(stk.url(backend), token, mode) as client:
        tools, cursors = await every_page(lambda cursor: client.list_tools(cursor=cursor, meta=meta))
        resources, _ = await every_page(lambda cursor: client.list_resources(cursor=cursor))
        templates, _ = await every_page(lambda cursor: client.list_resource_templates(cursor=cursor))
        prompts, _ = await every_page(lambda cursor: client.list_prompts(cursor=cursor))
        for name in tools:  # everything listed can be called
            result = await client.call_tool(name, {"employee_id": "E1"})
            assert not result.is_error
            assert isinstance(result.content[0], TextContent)
            assert json.loads(result.content[0].text)["tool"] == name
        for uri in [*resources, "employees://public/E7"]:  # the last through the visible template
            read = await client.read_resource(uri)
            assert isinstance(read.contents[0], TextResourceContents)
            assert read.contents[0].text == f"contents of {uri}"
        for name in prompts:
            assert (await client.get_prompt(name)).messages
    assert tools == VISIBLE_TOOLS  # in the backend's order, pages joined
    assert cursors == [f"page-at-{PAGE}", f"page-at-{2 * PAGE}", None]  # the backend's cursors, untouched
    assert resources == VISIBLE_RESOURCES
    assert templates == VISIBLE_TEMPLATES
    assert prompts == VISIBLE_PROMPTS
    reached = stk.backend(backend).reached()
    assert reached == [*VISIBLE_TOOLS, *VISIBLE_RESOURCES, "employees://public/E7", *VISIBLE_PROMPTS]
    assert len(stk.backend(backend).list_done_at) == 3  # three pages asked for


@pytest.mark.parametrize("mode", ERAS)
async def test_an_agent_without_rules_sees_everything(stk: Stack, mode: str) -> None:
    async with sdk_client(stk.url("employees"), stk.token(CURSOR), mode) as client:
        tools, cursors = await every_page(lambda cursor: client.list_tools(cursor=cursor))
        resources, _ = await every_page(lambda cursor: client.list_resources(cursor=cursor))
        templates, _ = await every_page(lambda cursor: client.list_resource_templates(cursor=cursor))
        prompts, _ = await every_page(lambda cursor: client.list_prompts(cursor=cursor))
        result = await client.call_tool("get_salary", {})
    assert (tools, resources, templates, prompts) == (list(TOOLS), list(RESOURCES), list(TEMPLATES), list(PROMPTS))
    assert cursors == [f"page-at-{PAGE}", f"page-at-{2 * PAGE}", None]
    assert not result.is_error


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("backend", ["employees", "employees-json"])
async def test_every_hidden_name_is_unknown_and_never_reaches_the_backend(stk: Stack, backend: str, mode: str) -> None:
    hidden_uris = [*HIDDEN_RESOURCES, "employees://private/E1/salary"]  # the last: a hidden template's URI
    async with sdk_client(stk.url(backend), stk.token(scopes=("mcp:read", *STEP_UP)), mode) as client:
        # A client lists before it calls. (Without it, a 2026-07-28 call may be framed after another client's
        # answer: see test_a_2026_refusal_is_not_framed_after_another_eras_stream.)
        await client.list_tools()
        for name in HIDDEN_TOOLS:
            with pytest.raises(MCPError) as raised:
                await client.call_tool(name, {"employee_id": "E1"})
            assert (raised.value.code, raised.value.error.message) == (-32602, f"Unknown tool: {name}")
        for uri in hidden_uris:
            with pytest.raises(MCPError) as raised:
                await client.read_resource(uri)
            assert (raised.value.code, raised.value.error.message) == (-32602, f"Unknown resource: {uri}")
        for name in HIDDEN_PROMPTS:
            with pytest.raises(MCPError) as raised:
                await client.get_prompt(name)
            assert (raised.value.code, raised.value.error.message) == (-32602, f"Unknown prompt: {name}")
        assert (await client.call_tool("get_employee", {"employee_id": "E1"})).is_error is False  # still usable
    assert stk.backend(backend).reached() == ["get_employee"]


HIDDEN_AND_MISSING = [
    ("tools/call", "get_salary", "get_bonus"),  # get_bonus passes the rule; the backend has no such tool
    ("prompts/get", "salary_review", "no_such_prompt"),
]
# Headers that differ between any two answers.
PER_ANSWER = {"date", "x-request-id", "content-length", "transfer-encoding", "server"}


def comparable(answer: Answer, name: str) -> tuple[int, str, list[Any]]:
    """Status, media type and JSON-RPC messages, with `name` written as NAME."""
    text = json.dumps(messages(answer)).replace(name, "NAME")
    return answer.status, media_type(answer), json.loads(text)


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("backend", ["employees", "employees-json"])
async def test_a_hidden_name_is_answered_as_a_nonexistent_one(stk: Stack, backend: str, era: str) -> None:
    token = stk.token()
    headers = await session_headers(stk, backend, token, era)
    await call(stk, backend, token, era, "tools/list", 1, headers)  # a client lists before it calls
    for method, hidden, missing in HIDDEN_AND_MISSING:
        key = NAMED_PARAM[method]
        refused = await call(stk, backend, token, era, method, 7, headers, **{key: hidden})
        unknown = await call(stk, backend, token, era, method, 7, headers, **{key: missing})
        assert comparable(refused, hidden) == comparable(unknown, missing)
        assert refused.status == (200 if era == "legacy" else 400)
        noun = "tool" if method == "tools/call" else "prompt"
        error = {"code": -32602, "message": f"Unknown {noun}: {hidden}"}
        assert messages(refused) == [{"jsonrpc": "2.0", "id": 7, "error": error}]
    assert stk.backend(backend).reached() == [missing for _, _, missing in HIDDEN_AND_MISSING]


@pytest.mark.parametrize("era", ERAS)
async def test_a_hidden_resource_is_answered_as_a_nonexistent_one(stk: Stack, era: str) -> None:
    token = stk.token()
    headers = await session_headers(stk, "employees-json", token, era)
    hidden, missing = "employees://private/salaries", "employees://public/nobody"
    refused = await call(stk, "employees-json", token, era, "resources/read", 7, headers, uri=hidden)
    unknown = await call(stk, "employees-json", token, era, "resources/read", 7, headers, uri=missing)
    assert stk.json.reached() == [missing]
    assert comparable(refused, hidden) == comparable(unknown, missing)


async def test_a_batch_cannot_carry_a_hidden_call(stk: Stack) -> None:
    token = stk.token()
    batch = [request("legacy", "tools/call", 1, name="get_salary")[0], request("legacy", "tools/list", 2)[0]]
    answer = await send(stk.http, stk.url("employees-json"), token=token, body=batch)
    assert (answer.status, answer.error) == (400, "bad_request")
    assert stk.json.received == []


def answer_shape(answer: Answer) -> tuple[set[str], list[tuple[str, bool]]]:
    """The header names an answer has (but those every answer varies in) and its SSE events' (type, has data)."""
    names = {name.lower() for name in answer.headers} - PER_ANSWER
    events = (
        [(event, bool(data)) for event, data, _ in parse_sse(answer.body)]
        if media_type(answer) != "application/json"
        else []
    )
    return names, events


PRIMING_EVENT = (
    "an SSE-framed refusal has the headers of the backend's own answer (Mcp-Session-Id, Cache-Control, "
    "X-Accel-Buffering) but not the SDK server's priming event (`id: N` / `data:`), which only a server with an "
    "event store sends: a client comparing event ids could tell a hidden tool from a nonexistent one"
)


@pytest.mark.parametrize(
    "backend",
    [pytest.param("employees", marks=pytest.mark.xfail(strict=True, reason=PRIMING_EVENT)), "employees-json"],
)
async def test_a_hidden_name_has_the_headers_of_a_nonexistent_one(stk: Stack, backend: str) -> None:
    token = stk.token()
    headers = await session_headers(stk, backend, token, "legacy")
    refused = await call(stk, backend, token, "legacy", "tools/call", 7, headers, name="get_salary")
    unknown = await call(stk, backend, token, "legacy", "tools/call", 7, headers, name="get_bonus")
    assert answer_shape(refused) == answer_shape(unknown)


async def test_a_2026_refusal_is_not_framed_after_another_eras_stream(stk: Stack) -> None:
    url = stk.url("employees")
    async with sdk_client(url, stk.token(CURSOR), "legacy") as other:  # another agent, answered as SSE streams
        await other.list_tools()
    async with sdk_client(url, stk.token(), MODERN) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("get_salary", {})
    assert (raised.value.code, raised.value.error.message) == (-32602, "Unknown tool: get_salary")


# ---------------------------------------------------------------- streams


async def first_answer(response: aiohttp.ClientResponse) -> tuple[list[SseEvent], Any]:
    """The events of an SSE response up to and including the first JSON-RPC answer (bounded in time)."""
    seen: list[SseEvent] = []
    async with asyncio.timeout(BOUND):
        async for event in iter_sse(response.content):
            seen.append(event)
            if event.data and ("result" in event.json() or "error" in event.json()):
                return seen, event.json()
    raise AssertionError(f"the stream ended without an answer: {seen}")


@pytest.mark.parametrize(("agent", "expected"), [(CLAUDE, VISIBLE_TOOLS[:3]), (CURSOR, list(TOOLS[:PAGE]))])
async def test_a_list_answer_replayed_on_a_resumed_get_stream_is_filtered(
    stk: Stack, agent: str, expected: list[str]
) -> None:
    """A client whose POST stream broke resumes it with a GET and `Last-Event-ID`; the SDK backend replays the
    events after that id from its event store — here the `tools/list` answer — on the GET stream."""
    token = stk.token(agent)
    headers = await session_headers(stk, "employees", token, "legacy")
    listed = await call(stk, "employees", token, "legacy", "tools/list", 9, headers)
    priming, answer = parse_sse(listed.body)
    assert priming[1] == "" and priming[2] is not None  # the SDK's priming event: an id to resume from
    assert names_in(json.loads(answer[1])["result"]) == expected  # the POST's answer, filtered (or not) as well
    resume = {**headers, "Accept": "text/event-stream", "Last-Event-ID": priming[2], "Authorization": f"Bearer {token}"}
    async with stk.http.get(stk.url("employees"), headers=resume) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        _, replayed = await first_answer(response)
    assert replayed["id"] == 9
    assert names_in(replayed["result"]) == expected
    assert replayed["result"]["nextCursor"] == f"page-at-{PAGE}"
    assert stk.sse.methods().count("tools/list") == 1  # the list came from the event store, not a second call


@pytest.mark.parametrize("era", ERAS)
async def test_progress_before_an_sse_list_arrives_at_once_and_the_list_is_filtered(stk: Stack, era: str) -> None:
    stk.sse.list_progress, stk.sse.list_progress_gap = 3, 0.15
    token = stk.token()
    headers = await session_headers(stk, "employees", token, era)
    body, era_headers = request(era, "tools/list", 5)
    body["params"]["_meta"] = {**body["params"].get("_meta", {}), "progressToken": "listing"}
    sent = {**ACCEPT, **headers, **era_headers, "Authorization": f"Bearer {token}"}
    async with stk.http.post(stk.url("employees"), data=json.dumps(body), headers=sent) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events, answer = await first_answer(response)
    (done,) = stk.sse.list_done_at
    progress = [event for event in events if event.data and event.json().get("method") == "notifications/progress"]
    assert [event.json()["params"]["progress"] for event in progress] == [1, 2, 3]
    assert all(event.arrived < done for event in progress)  # each reached the client before the list existed
    assert progress[-1].arrived < done - 0.1  # …by the gap the backend waited after it, not by a hair
    assert names_in(answer["result"]) == VISIBLE_TOOLS[:3]
    assert answer["result"]["nextCursor"] == f"page-at-{PAGE}"


# ---------------------------------------------------------------- hostile names and huge lists

HOSTILE = [
    "get_sаlary",  # Cyrillic а (U+0430): no "salar" in it — another tool, which the rule lets through
    "get_salary\u200b",  # a zero-width space after: still "salar", hidden
    "ｇet_employee",  # fullwidth ｇ: not get_*, hidden
    "get_employee",
    "GET_EMPLOYEE",  # globs are case-sensitive: hidden
    "get_*",  # a literal star is just a character of the name: get_* matches it
    "*",
    "get_?",
    "search_[salary]",
    "list_[a-z]",
    "count_employees ",  # a trailing space
    "get_employee/../get_salary",
]
HOSTILE_VISIBLE = ["get_sаlary", "get_employee", "get_*", "get_?", "list_[a-z]", "count_employees "]
BIG = [f"tool_{index:05d}" for index in range(10_000)]
BIG_VISIBLE = [name for name in BIG if not name.endswith("7")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def hostile_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    extra = {
        "hostile": (PolicyBackend(tools=HOSTILE), False),
        "big": (PolicyBackend(tools=BIG), True),
        "big-sse": (PolicyBackend(tools=BIG), False),
    }
    rules = {"hostile": TOOL_RULE, "big": {"allow": ["tool_*"], "deny": ["*7"]}}
    rules["big-sse"] = rules["big"]
    async with stack(tmp_path_factory.mktemp("hostile"), extra, rules) as made:  # claude has `rules` on them
        yield made


async def called(client: Client, name: str) -> str:
    """What calling `name` did: "called <the name the backend got>", or the error's code and message."""
    try:
        result = await client.call_tool(name, {})
    except MCPError as error:
        return f"{error.code} {error.error.message}"
    content = result.content[0]
    assert isinstance(content, TextContent)
    return f"called {json.loads(content.text)['tool']}"


@pytest.mark.parametrize("mode", ERAS)
async def test_look_alike_and_glob_character_names_are_listed_and_called_alike(hostile_stack: Stack, mode: str) -> None:
    backend = hostile_stack.backend("hostile")
    backend.received.clear()
    async with sdk_client(hostile_stack.url("hostile"), hostile_stack.token(), mode) as client:
        listed = [tool.name for tool in (await client.list_tools()).tools]
        answered = {name: await called(client, name) for name in HOSTILE}
    assert listed == HOSTILE_VISIBLE  # byte for byte: nothing normalised, nothing lost
    assert answered == {
        name: f"called {name}" if name in HOSTILE_VISIBLE else f"-32602 Unknown tool: {name}" for name in HOSTILE
    }
    assert backend.reached() == HOSTILE_VISIBLE  # called ⇔ listed


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("backend", ["big", "big-sse"])
async def test_ten_thousand_tools_are_filtered(hostile_stack: Stack, backend: str, mode: str) -> None:
    async with sdk_client(hostile_stack.url(backend), hostile_stack.token(), mode) as client:
        listed = [tool.name for tool in (await client.list_tools()).tools]
        answered = [await called(client, name) for name in ("tool_09997", "tool_09998")]
    assert listed == BIG_VISIBLE
    assert answered == ["-32602 Unknown tool: tool_09997", "called tool_09998"]


async def test_a_list_answer_past_the_size_limit_is_a_502(hostile_stack: Stack) -> None:
    """`MAX_LIST_BYTES` (8 MiB): 10,000 tools with 1 KiB descriptions. JSON: 502 `bad_backend_response`; SSE (the
    status is out already): an `error` event instead of the list."""
    token = hostile_stack.token()
    assert len(BIG) * 1024 > MAX_LIST_BYTES
    for name in ("big", "big-sse"):
        hostile_stack.backend(name).description = "d" * 1024
    try:
        refused = await call(hostile_stack, "big", token, MODERN, "tools/list", 3)
        headers = await session_headers(hostile_stack, "big-sse", token, "legacy")
        streamed = await call(hostile_stack, "big-sse", token, "legacy", "tools/list", 4, headers)
    finally:
        for name in ("big", "big-sse"):
            hostile_stack.backend(name).description = ""
    assert refused.status == 502
    assert refused.json["error"] == "bad_backend_response"
    assert streamed.status == 200
    events = parse_sse(streamed.body)
    assert events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"] == "bad_backend_response"
    assert b"tool_00001" not in streamed.body
    still = await call(hostile_stack, "big", token, MODERN, "tools/list", 5)  # the gateway goes on serving
    assert still.status == 200
    assert names_in(still.json["result"]) == BIG_VISIBLE


def list_answer(*names: str, key: bytes = b'"result"') -> bytes:
    """A 2026-07-28 `tools/list` answer as the SDK client accepts it, with `key` for its result member."""
    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in names]
    result = {"cacheScope": "private", "resultType": "complete", "ttlMs": 0, "tools": tools}
    message = {"jsonrpc": "2.0", "id": "__ID__", "result": result}  # the scripted backend puts the request's id in
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    return text.replace(b'"result"', key, 1)


async def scripted_list(stk: Stack, path: str, answer: ScriptedAnswer, agent: str = CLAUDE) -> list[str]:
    """What the SDK client (2026-07-28) lists through the gateway when the backend answers `answer`."""
    stk.scripted.answers["/s" + path] = answer
    async with sdk_client(stk.url("scripted") + path, stk.token(agent), MODERN) as client:
        return [tool.name for tool in (await client.list_tools()).tools]


async def test_a_scripted_list_is_filtered_for_the_sdk_client(stk: Stack) -> None:
    """The control for the scripted cases below: the same answers, well formed, are filtered."""
    listed = await scripted_list(
        stk, "/plain", ScriptedAnswer("application/json", list_answer("get_employee", "get_salary"))
    )
    sse = b"event: message\r\ndata: " + list_answer("get_employee", "get_salary") + b"\r\n\r\n"
    streamed = await scripted_list(stk, "/plain-sse", ScriptedAnswer("text/event-stream", sse))
    unfiltered = await scripted_list(stk, "/plain-sse", ScriptedAnswer("text/event-stream", sse), CURSOR)
    assert listed == streamed == ["get_employee"]
    assert unfiltered == ["get_employee", "get_salary"]


async def test_an_escaped_result_key_does_not_carry_a_hidden_tool_past_the_filter(stk: Stack) -> None:
    escaped = list_answer("get_employee", "get_salary", key=b'"\\u0072esult"')
    listed = await scripted_list(stk, "/escaped", ScriptedAnswer("application/json", escaped))
    assert listed == ["get_employee"]


async def test_a_list_event_with_invalid_utf8_does_not_carry_a_hidden_tool_past_the_filter(stk: Stack) -> None:
    text = list_answer("get_employee", "get_salary").replace(b'"object"}', b'"object"},"title":"\xff"', 1)
    listed = await scripted_list(stk, "/bad-utf8", ScriptedAnswer("text/event-stream", b"data: " + text + b"\n\n"))
    assert listed == ["get_employee"]


async def test_a_list_event_ended_by_a_lone_cr_does_not_carry_a_hidden_tool_past_the_filter(stk: Stack) -> None:
    text = b"event: message\rdata: " + list_answer("get_employee", "get_salary") + b"\r\r"
    listed = await scripted_list(stk, "/cr", ScriptedAnswer("text/event-stream", text))
    assert listed == ["get_employee"]


MALFORMED = {
    "not-a-list": b'{"jsonrpc":"2.0","id":"__ID__","result":{"tools":{"name":"get_salary"}}}',
    "not-objects": b'{"jsonrpc":"2.0","id":"__ID__","result":{"tools":["get_salary"]}}',
    "no-name": b'{"jsonrpc":"2.0","id":"__ID__","result":{"tools":[{"title":"get_salary"}]}}',
    "number-name": b'{"jsonrpc":"2.0","id":"__ID__","result":{"prompts":[{"name":7}]}}',
    "cut": b'{"jsonrpc":"2.0","id":"__ID__","result":{"tools":[{"name":"get_salary"}',
    "not-json": b'<html>"result"</html>',
    "deep": b'{"result":' * 100_000 + b"1" + b"}" * 100_000,
}


async def test_a_malformed_list_answer_is_a_502_not_a_crash(stk: Stack) -> None:
    token = stk.token()
    for name, body in MALFORMED.items():
        stk.scripted.answers[f"/s/{name}"] = ScriptedAnswer("application/json", body)
    for name in MALFORMED:
        answer = await call(stk, f"scripted/{name}", token, MODERN, "tools/list", 2)
        assert (name, answer.status, answer.json["error"]) == (name, 502, "bad_backend_response")
        assert b"get_salary" not in answer.body
        untouched = await call(stk, f"scripted/{name}", stk.token(CURSOR), MODERN, "tools/list", 2)
        assert (untouched.status, untouched.body) == (200, MALFORMED[name].replace(b'"__ID__"', b"2"))
    assert len(stk.scripted.received) == 2 * len(MALFORMED)
    async with sdk_client(stk.url("employees-json"), token, MODERN) as client:  # the gateway goes on serving
        assert [tool.name for tool in (await client.list_tools()).tools] == VISIBLE_TOOLS[:3]


async def test_a_malformed_list_event_becomes_an_error_event(stk: Stack) -> None:
    stream = b'event: message\ndata: {"jsonrpc":"2.0","id":"__ID__","result":{"tools":[{"title":"get_salary"}]}}\n\n'
    stk.scripted.answers["/s/bad-sse"] = ScriptedAnswer("text/event-stream", stream)
    answer = await call(stk, "scripted/bad-sse", stk.token(), MODERN, "tools/list", 2)
    assert answer.status == 200, answer.body  # the stream had started
    (event,) = parse_sse(answer.body)
    assert (event[0], json.loads(event[1]).get("error")) == ("error", "bad_backend_response")


async def test_a_malformed_member_beside_the_tools_does_not_carry_a_hidden_tool_past_the_filter(stk: Stack) -> None:
    """The list event cannot be judged whole (`prompts` is no list): it is refused with an `event: error`, so the
    client gets no list at all — never one with the hidden tool."""
    text = list_answer("get_employee", "get_salary").replace(b'"ttlMs":0', b'"ttlMs":0,"prompts":5', 1)
    with pytest.raises(BaseException) as raised:  # noqa: PT011 - the SDK raises an ExceptionGroup of its own
        await scripted_list(stk, "/beside", ScriptedAnswer("text/event-stream", b"data: " + text + b"\n\n"))
    assert "get_salary" not in repr(raised.value)


async def held_stream(first: bytes, hold: float) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(hold)
    yield b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n'


async def test_a_refused_list_event_ends_the_stream(stk: Stack) -> None:
    oversized = b'event: message\ndata: {"jsonrpc":"2.0","id":2,"result":{"tools":[' + b" " * MAX_LIST_BYTES
    stk.scripted.answers["/s/held"] = ScriptedAnswer("text/event-stream", lambda: held_stream(oversized, 3.0))
    body, headers = request(MODERN, "tools/list", 2)
    sent = {**ACCEPT, **headers, "Authorization": f"Bearer {stk.token()}", "X-Request-ID": "req-held-list"}
    started = time.monotonic()
    async with stk.http.post(stk.url("scripted/held"), data=json.dumps(body), headers=sent) as response:
        received = await asyncio.wait_for(response.read(), BOUND)
    ended_after = time.monotonic() - started
    assert [event for event, _, _ in parse_sse(received)] == ["error"]
    row = await stk.gateway.row("req-held-list")
    assert (ended_after < 1.5, row["outcome"]) == (True, "bad_backend_response")


async def endless(head: bytes, filler: bytes, count: int) -> AsyncIterator[bytes]:
    yield head
    for _ in range(count):
        yield filler


async def test_an_endless_list_answer_is_refused_in_bounded_memory(stk: Stack) -> None:
    """A list answer that never ends (64 MiB if read whole): the gateway reads at most `MAX_LIST_BYTES` of it."""
    filler = b'{"name":"get_employee","description":"' + b"x" * 65_000 + b'"},'
    head = b'{"jsonrpc":"2.0","id":2,"result":{"tools":['
    stk.scripted.answers["/s/endless"] = ScriptedAnswer("application/json", lambda: endless(head, filler, 1024))
    stk.scripted.answers["/s/endless-sse"] = ScriptedAnswer(
        "text/event-stream", lambda: endless(b"event: message\ndata: " + head, filler, 1024)
    )
    tracemalloc.start()
    try:
        refused = await call(stk, "scripted/endless", stk.token(), MODERN, "tools/list", 2)
        json_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        streamed = await call(stk, "scripted/endless-sse", stk.token(), MODERN, "tools/list", 2)
        sse_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (refused.status, refused.json["error"]) == (502, "bad_backend_response")
    assert parse_sse(streamed.body)[-1][0] == "error"
    assert b"get_employee" not in streamed.body
    assert json_peak < 3 * MAX_LIST_BYTES, json_peak
    assert sse_peak < 3 * MAX_LIST_BYTES, sse_peak


# ---------------------------------------------------------------- routing headers, step-up, untouched streams


@pytest.mark.parametrize("agent", [CLAUDE, CURSOR])
async def test_routing_headers_that_disagree_with_the_body_are_refused(stk: Stack, agent: str) -> None:
    token = stk.token(agent)
    cases: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("tools/call", {"name": "get_salary", "arguments": {}}, {"Mcp-Name": "get_employee"}),  # hide behind a name
        ("tools/call", {"name": "get_employee", "arguments": {}}, {"Mcp-Name": "get_salary"}),
        ("tools/call", {"name": "get_employee", "arguments": {}}, {"Mcp-Method": "tools/list"}),
        ("resources/read", {"uri": "employees://private/salaries"}, {"Mcp-Name": "employees://public/directory"}),
        ("prompts/get", {"name": "salary_review"}, {"Mcp-Name": "=?base64?aW50cm9kdWNl?="}),  # "introduce"
    ]
    for number, (method, params, wrong) in enumerate(cases):
        answer = await call(stk, "employees-json", token, MODERN, method, number, wrong, **params)
        assert answer.status == 400, (method, wrong)
        assert media_type(answer) == "application/json"
        error = answer.json["error"]
        assert (answer.json["id"], error["code"]) == (number, -32020)
    matching = await call(
        stk,
        "employees-json",
        token,
        MODERN,
        "prompts/get",
        9,
        {"Mcp-Name": "=?base64?aW50cm9kdWNl?="},
        name="introduce",
    )
    assert matching.status == 200  # the same header, when it agrees (base64-encoded as PROTOCOL §4 allows)
    assert stk.json.reached() == ["introduce"]


async def test_a_tool_needing_step_up_scopes_is_listed_and_its_call_challenged(stk: Stack) -> None:
    url = stk.url("employees-json")
    for scopes in (("mcp:read",), ("mcp:read", "employees:write")):
        token = stk.token(scopes=scopes)
        async with sdk_client(url, token, MODERN) as client:
            assert "update_employee" in [tool.name for tool in (await client.list_tools()).tools]
        refused = await call(stk, "employees-json", token, MODERN, "tools/call", 1, name="update_employee")
        assert refused.status == 403
        assert refused.json["error"] == "insufficient_scope"
        challenge = refused.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ")
        assert 'error="insufficient_scope"' in challenge
        assert 'resource_metadata="' in challenge
        named = challenge.split('scope="', 1)[1].split('"', 1)[0].split()
        assert sorted(named) == sorted(["mcp:read", *STEP_UP])  # every scope needed, those held included
    allowed = await call(
        stk, "employees-json", stk.token(scopes=("mcp:read", *STEP_UP)), MODERN, "tools/call", 2, name="update_employee"
    )
    assert allowed.status == 200
    other = await call(stk, "employees-json", stk.token(), MODERN, "tools/call", 3, name="get_employee")
    assert other.status == 200  # tools no glob names need nothing more
    assert stk.json.reached() == ["update_employee", "get_employee"]


ODD_STREAM = (
    b": a comment\r\n"
    b"retry: 1500\r"
    b"id: 41\r\n"
    b"event: message\n"
    b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}\r\n\r\n'
    b"id: 42\n"
    b'data: {"jsonrpc":"2.0","id":"__ID__",\n'
    b'data: "result":{"tools":[{"name":"get_salary","inputSchema":{"type":"object"}},'
    b'{"name":"get_employee","inputSchema":{"type":"object"}}]}}\r\r'
    b'data: {"not": "json"\n\n'
    b"data: trailing, unterminated"
)


async def test_a_backend_without_rules_for_the_agent_streams_untouched(stk: Stack) -> None:
    stk.scripted.answers["/s/odd"] = ScriptedAnswer("text/event-stream", ODD_STREAM)
    untouched = await call(stk, "scripted/odd", stk.token(CURSOR), MODERN, "tools/list", 5)
    filtered = await call(stk, "scripted/odd", stk.token(), MODERN, "tools/list", 5)
    assert untouched.body == ODD_STREAM.replace(b'"__ID__"', b"5")  # byte for byte
    assert b"get_salary" not in filtered.body  # the control: with rules, the same stream is rewritten
    assert b"get_employee" in filtered.body
    # An SDK backend's JSON answer, directly and through the gateway: the same bytes.
    body, headers = request(MODERN, "tools/list", 6)
    async with stk.http.post(stk.json.url, data=json.dumps(body), headers={**ACCEPT, **headers}) as response:
        direct = await response.read()
    relayed = await call(stk, "employees-json", stk.token(CURSOR), MODERN, "tools/list", 6)
    assert relayed.body == direct
    assert b"get_salary" in direct


async def test_a_hidden_call_is_audited_as_tool_denied(stk: Stack) -> None:
    token = stk.token()
    for era, status in (("legacy", 200), (MODERN, 400)):
        headers = await session_headers(stk, "employees-json", token, era)
        answer = await call(stk, "employees-json", token, era, "tools/call", 8, headers, name="delete_employee")
        assert answer.status == status
        row = await stk.gateway.row(answer.request_id)
        assert (row["outcome"], row["status"], row["agent"], row["backend"]) == (
            "tool_denied",
            status,
            "claude",
            "employees-json",
        )
        assert (row["mcp_method"], row["mcp_name"], row["jsonrpc_id"]) == ("tools/call", "delete_employee", "8")
        assert row["upstream_status"] is None  # the backend was never asked
    assert stk.json.reached() == []


# ---------------------------------------------------------------- reload


async def test_a_reload_changes_the_policy_for_new_requests_not_streams_in_flight(tmp_path: Path) -> None:
    async with stack(tmp_path) as stk:
        token = stk.token()
        stk.sse.list_progress, stk.sse.list_progress_gap = 2, 0.3
        body, headers = request(MODERN, "tools/list", 1)
        body["params"]["_meta"]["progressToken"] = "in-flight"
        sent = {**ACCEPT, **headers, "Authorization": f"Bearer {token}"}
        async with stk.http.post(stk.url("employees"), data=json.dumps(body), headers=sent) as response:
            first = await anext(aiter(iter_sse(response.content)))  # the stream has started under the old rules
            assert first.json()["method"] == "notifications/progress"
            config = json.loads(json.dumps(stk.config))
            for name in ("employees", "employees-json"):
                config["agents"]["claude"]["tool_access"][name] = {"deny": ["delete_*"]}
            await stk.gateway.reload(config)
            _, in_flight = await first_answer(response)
        stk.sse.list_progress = 0
        assert names_in(in_flight["result"]) == VISIBLE_TOOLS[:3]  # the generation it started with
        async with sdk_client(stk.url("employees-json"), token, MODERN) as client:
            tools, _ = await every_page(lambda cursor: client.list_tools(cursor=cursor))
            assert not (await client.call_tool("get_salary", {})).is_error
            with pytest.raises(MCPError):
                await client.call_tool("delete_employee", {})
    assert tools == [name for name in TOOLS if not name.startswith("delete_")]
    assert stk.json.reached() == ["get_salary"]


async def test_a_compressed_list_answer_is_refused_not_passed_unjudged(stk: Stack) -> None:
    """The gateway asks for `identity`; a backend (or a proxy in front of it) that compresses anyway would hide the
    list from the filter while the client decompresses it: 502 for an agent with rules, untouched for one without."""
    compressed = gzip.compress(list_answer("get_employee", "get_salary").replace(b'"__ID__"', b"2"))
    for content_type in ("application/json", "text/event-stream"):
        path = "/s/gzip-" + content_type.split("/")[1]
        stk.scripted.answers[path] = ScriptedAnswer(content_type, compressed, headers={"Content-Encoding": "gzip"})
        answer = await call(stk, path.replace("/s/", "scripted/"), stk.token(), MODERN, "tools/list", 2)
        assert (answer.status, answer.json["error"]) == (502, "bad_backend_response"), content_type
        untouched = await call(stk, path.replace("/s/", "scripted/"), stk.token(CURSOR), MODERN, "tools/list", 2)
        assert untouched.status == 200 and b"get_salary" in untouched.body  # (the test's client decompresses)


async def test_completions_and_subscriptions_of_hidden_names_never_reach_the_backend(stk: Stack) -> None:
    """completion/complete (by its ref) and resources/subscribe name one prompt or resource too: the same rule; and
    a resource URI written otherwise than servers compare it (`EMPLOYEES://`, `..`, `%2e`) is judged hidden."""
    stk.scripted.answers["/s/any"] = ScriptedAnswer("application/json", b'{"jsonrpc":"2.0","id":"__ID__","result":{}}')
    token = stk.token()
    before = len(stk.scripted.received)
    hidden_uri = HIDDEN_RESOURCES[0]
    visible_uri = VISIBLE_RESOURCES[0]
    refused: list[tuple[str, dict[str, Any]]] = [
        ("completion/complete", {"ref": {"type": "ref/prompt", "name": HIDDEN_PROMPTS[0]}, "argument": {}}),
        ("resources/subscribe", {"uri": hidden_uri}),
        ("resources/read", {"uri": visible_uri.replace("employees://", "EMPLOYEES://", 1)}),
        ("resources/read", {"uri": visible_uri.replace("/public/", "/public/../public/", 1)}),
    ]
    for method, params in refused:
        answer = await call(stk, "scripted/any", token, "legacy", method, 3, **params)
        # framed as this backend last answered (an earlier test may have made it stream)
        sse = media_type(answer) == "text/event-stream"
        payload = json.loads(parse_sse(answer.body)[-1][1]) if sse else answer.json
        assert (answer.status, payload["error"]["code"]) == (200, -32602), (method, answer.body)
    assert len(stk.scripted.received) == before
