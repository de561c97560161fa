"""Backends for the tool-policy tests (DESIGN.md §7): a real MCP SDK server, and a scripted one for odd answers.

`sdk_backend(...)` serves an employee directory — a dozen tools, four resources, two resource templates, three
prompts — built on the official SDK's low-level `Server` (the `mcp` package), with uvicorn on 127.0.0.1 in the
test's own event loop, at `/mcp`. One app speaks both protocol eras: the initialize handshake (sessions, a GET
stream) and 2026-07-28 (self-contained POSTs). It answers POSTs as SSE streams or, with `json_response=True`, as
JSON; in 2026-07-28 the SDK streams only once a handler has sent a notification, and answers JSON otherwise. The
low-level server is used rather than `MCPServer` because the policy must be tested against two things `MCPServer`
does not do:

- pagination (`page_size`): `tools/list`, `resources/list`, `resources/templates/list` and `prompts/list` hand out
  pages with an opaque `nextCursor`, so a filter that loses or rewrites cursors is seen;
- the MCP specification's answer for a tool or prompt it does not have (`-32602 Unknown tool: <name>`, `Unknown
  prompt: <name>`), which is what a hidden one must look like. (`MCPServer` answers an unknown tool with an
  `isError` result and an unknown prompt with -32603.) An unknown resource is answered as `MCPServer` answers it:
  -32602 `Unknown resource: <uri>` with `data: {"uri": <uri>}`.

Every HTTP request is logged before the SDK sees it (`PolicyBackend.received`; `reached()` lists the names of the
calls, reads and gets), so a test can prove that a refused call never reached the backend. With `list_progress`,
a `tools/list` that asks for progress gets that many `notifications/progress` on its own stream,
`list_progress_gap` seconds apart, before its page is built; the moment the handler returned is kept
(`list_done_at`, `time.monotonic()`) to compare with arrival times. With `event_store=True` the SSE events are
kept for resumption (`Last-Event-ID` on a GET). A test may change `list_progress` or `description` while it runs.

`scripted_backend(...)` is a small aiohttp server for what no SDK server sends — a list answer that is malformed,
endless, oddly encoded or oddly framed: `ScriptedBackend.answers[path]` gives each path's content type and body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
import uvicorn
from aiohttp import web
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http import EventStore
from mcp.shared.exceptions import MCPError

from .conformance_backend import InMemoryEventStore
from .processes import LOOPBACK

__all__ = [
    "ID_PLACEHOLDER",
    "PROMPTS",
    "RESOURCES",
    "TEMPLATES",
    "TOOLS",
    "PolicyBackend",
    "Received",
    "ScriptedAnswer",
    "ScriptedBackend",
    "scripted_backend",
    "sdk_backend",
]

TOOLS = (
    "get_employee",
    "get_salary",
    "search_employees",
    "delete_employee",
    "update_employee",
    "list_departments",
    "get_department",
    "export_salaries",
    "search_salaries",
    "update_salary",
    "archive_employee",
    "count_employees",
)
RESOURCES = (
    "employees://public/directory",
    "employees://public/holidays",
    "employees://private/salaries",
    "employees://private/reviews",
)
TEMPLATES = ("employees://public/{employee_id}", "employees://private/{employee_id}/salary")
PROMPTS = ("introduce", "salary_review", "onboarding")
NAMED = ("tools/call", "resources/read", "prompts/get")
_SCHEMA = {"type": "object", "properties": {"employee_id": {"type": "string"}}}
_TEMPLATED = re.compile(r"employees://public/E[0-9]+|employees://private/E[0-9]+/salary")  # what TEMPLATES name

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_START_SECONDS = 10.0


@dataclass(frozen=True)
class Received:
    """One HTTP request as the backend received it (before the SDK or the script judged it)."""

    method: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic()

    @property
    def message(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    @property
    def rpc_method(self) -> str | None:
        message = self.message
        return message.get("method") if isinstance(message, dict) else None

    @property
    def target(self) -> str | None:
        """The tool, prompt (`name`) or resource (`uri`) a named request asks for."""
        message = self.message
        if not isinstance(message, dict) or message.get("method") not in NAMED:
            return None
        params = message.get("params") or {}
        return params.get("uri") if message["method"] == "resources/read" else params.get("name")


@dataclass
class PolicyBackend:
    """What the SDK backend serves and what it saw. `url` is its MCP endpoint once it runs."""

    tools: Sequence[str] = TOOLS
    resources: Sequence[str] = RESOURCES
    templates: Sequence[str] = TEMPLATES
    prompts: Sequence[str] = PROMPTS
    page_size: int | None = None
    list_progress: int = 0
    list_progress_gap: float = 0.0
    description: str = ""  # every tool's description (long ones make a large list)
    received: list[Received] = field(default_factory=list)
    list_done_at: list[float] = field(default_factory=list)
    url: str = ""

    def reached(self) -> list[str]:
        """The names every `tools/call`, `resources/read` and `prompts/get` that reached the backend asked for."""
        return [target for seen in self.received if (target := seen.target) is not None]

    def methods(self) -> list[str]:
        return [method for seen in self.received if (method := seen.rpc_method) is not None]

    # --- the SDK server ---------------------------------------------------------------------------------------

    def server(self) -> Server[Any]:
        return Server(
            "policy-employees",
            version="1.0.0",
            # As MCPServer does: without it a 2026-07-28 call makes the SDK walk tools/list to find the schema.
            get_tool_input_schema=lambda name: _SCHEMA if name in self.tools else None,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_list_prompts=self._list_prompts,
            on_get_prompt=self._get_prompt,
        )

    def _page(self, names: Sequence[str], params: types.PaginatedRequestParams | None) -> tuple[list[str], str | None]:
        """One page of `names` and the cursor of the next (None: the last page). Cursors are opaque offsets."""
        if self.page_size is None:
            return list(names), None
        cursor = params.cursor if params is not None else None
        start = int(cursor.removeprefix("page-at-")) if cursor else 0
        end = start + self.page_size
        return list(names[start:end]), f"page-at-{end}" if end < len(names) else None

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        for step in range(1, self.list_progress + 1):
            await ctx.session.report_progress(step, self.list_progress, f"listing {step}")
            await asyncio.sleep(self.list_progress_gap)
        names, cursor = self._page(self.tools, params)
        tools = [types.Tool(name=name, description=self.description or name, input_schema=_SCHEMA) for name in names]
        self.list_done_at.append(time.monotonic())
        return types.ListToolsResult(tools=tools, next_cursor=cursor)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if params.name not in self.tools:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        text = json.dumps({"tool": params.name, "arguments": params.arguments or {}}, sort_keys=True)
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    async def _list_resources(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        uris, cursor = self._page(self.resources, params)
        resources = [types.Resource(uri=uri, name=uri.rsplit("/", 1)[-1]) for uri in uris]
        return types.ListResourcesResult(resources=resources, next_cursor=cursor)

    async def _list_templates(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        templates, cursor = self._page(self.templates, params)
        listed = [types.ResourceTemplate(uri_template=template, name=template) for template in templates]
        return types.ListResourceTemplatesResult(resource_templates=listed, next_cursor=cursor)

    async def _read_resource(
        self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        if uri not in self.resources and not _TEMPLATED.fullmatch(uri):
            # As `MCPServer` answers a URI it has no resource for (its ResourceNotFoundError).
            raise MCPError(types.INVALID_PARAMS, f"Unknown resource: {uri}", data={"uri": uri})
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, text=f"contents of {uri}")])

    async def _list_prompts(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        names, cursor = self._page(self.prompts, params)
        return types.ListPromptsResult(prompts=[types.Prompt(name=name) for name in names], next_cursor=cursor)

    async def _get_prompt(
        self, ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        if params.name not in self.prompts:
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        message = types.PromptMessage(role="user", content=types.TextContent(type="text", text=params.name))
        return types.GetPromptResult(messages=[message])

    # --- the request log (ASGI, in front of the SDK app) ------------------------------------------------------

    def logged(self, app: Any) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def log_requests(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            chunks: list[bytes] = []
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks)
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
            self.received.append(Received(scope["method"], headers, body, time.monotonic()))
            replayed = False

            async def replay() -> MutableMapping[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await app(scope, replay, send)

        return log_requests


def _bound_socket() -> socket.socket:
    """A loopback socket for uvicorn. TCP_NODELAY on it is inherited by the connections it accepts: uvicorn sets it
    only on sockets it binds itself, and without it every answer on a kept-alive connection waits ~40 ms (Nagle's
    algorithm against the client's delayed ACK)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((LOOPBACK, 0))
    return sock


@asynccontextmanager
async def sdk_backend(
    backend: PolicyBackend | None = None,
    *,
    json_response: bool = False,
    stateless: bool = False,
    event_store: bool = False,
) -> AsyncIterator[PolicyBackend]:
    """`backend` (default: the dozen tools, no pages) served by the SDK's Streamable HTTP app at `url`."""
    backend = backend or PolicyBackend()
    store: EventStore | None = InMemoryEventStore() if event_store else None
    app = backend.server().streamable_http_app(
        streamable_http_path="/mcp", json_response=json_response, stateless_http=stateless, event_store=store
    )
    config = uvicorn.Config(
        backend.logged(app),
        log_level="warning",
        lifespan="on",
        ws="none",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    with _bound_socket() as sock:
        backend.url = f"http://{LOOPBACK}:{sock.getsockname()[1]}/mcp"
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(_START_SECONDS):
                while not server.started:
                    if task.done():
                        task.result()
                        raise RuntimeError("the SDK backend stopped before it started")
                    await asyncio.sleep(0.005)
            yield backend
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, _START_SECONDS)


# ---------------------------------------------------------------- the scripted backend

Chunks = Callable[[], AsyncIterator[bytes]]
ID_PLACEHOLDER = b'"__ID__"'  # replaced, in a scripted body, by the JSON-RPC id of the request it answers


@dataclass(frozen=True)
class ScriptedAnswer:
    """What one path answers to every POST: a content type and a body — bytes (with `ID_PLACEHOLDER` replaced by
    the request's id), or chunks from a generator (streamed as they come)."""

    content_type: str
    body: bytes | Chunks
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)  # more response headers (e.g. Content-Encoding)


@dataclass
class ScriptedBackend:
    answers: dict[str, ScriptedAnswer] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    base_url: str = ""

    def url(self, path: str) -> str:
        return self.base_url + path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        seen = Received(request.method, headers, body, time.monotonic())
        self.received.append(seen)
        answer = self.answers.get(request.path)
        if answer is None:
            return web.Response(status=404)
        if isinstance(answer.body, bytes):
            message = seen.message
            request_id = json.dumps(message.get("id") if isinstance(message, dict) else None).encode()
            text = answer.body.replace(ID_PLACEHOLDER, request_id)
            headers = {"Content-Type": answer.content_type, **answer.headers}
            return web.Response(status=answer.status, body=text, headers=headers)
        response = web.StreamResponse(
            status=answer.status, headers={"Content-Type": answer.content_type, **answer.headers}
        )
        await response.prepare(request)
        async for chunk in answer.body():
            await response.write(chunk)
        await response.write_eof()
        return response


@asynccontextmanager
async def scripted_backend(answers: Mapping[str, ScriptedAnswer] | None = None) -> AsyncIterator[ScriptedBackend]:
    """A `ScriptedBackend` on 127.0.0.1 answering `answers` (path → answer; more can be added while it runs)."""
    backend = ScriptedBackend(dict(answers or {}))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        backend.base_url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
        yield backend
    finally:
        await runner.cleanup()
