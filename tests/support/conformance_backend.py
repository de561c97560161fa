"""An MCP server with every fixture the official conformance suite's server scenarios call.

`@modelcontextprotocol/conformance` 0.1.16 (`conformance list --server`) drives a server through 32 scenarios
that call fixed names: tools such as `test_simple_text` and `test_sampling`, resources such as
`test://static-text`, prompts such as `test_simple_prompt`, plus `logging/setLevel`, `completion/complete`
and `resources/subscribe`. This module implements them with the official Python SDK (`MCPServer`), so the
suite can measure the SDK directly and then through the gateway: a correct pass-through gateway scores exactly
what this backend scores on its own.

Shaped by two constraints:
- Nothing here may be racy, or the direct-vs-gateway comparison becomes noise. Every server-to-client message
  a tool sends (log lines, sampling and elicitation requests) is tied to the tool call with
  `related_request_id`, so it travels on that call's own SSE stream. Without it the message leaves on the
  standalone GET stream, which the client may not have opened yet, and the call times out intermittently.
- The fixtures use only non-deprecated SDK entry points (plain notifications and requests instead of the
  SEP-2577-deprecated `ctx.info` / `create_message` helpers), so the module also runs inside a pytest process
  that turns warnings into errors.

Run: `python tests/support/conformance_backend.py --host 127.0.0.1 --port N` serves Streamable HTTP at `/mcp`.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import struct
import wave
import zlib
from collections import deque
from typing import Any

import anyio
import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer, UserMessage
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.shared.message import ServerMessageMetadata

__all__ = ["InMemoryEventStore", "build_server", "main"]

SERVER_NAME = "oap-conformance-fixture"
JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"
# The scenario descriptions ask for pauses between notifications "to test that clients can receive multiple
# notifications during tool execution"; they are part of the fixture's behaviour, not waits.
NOTIFICATION_GAP_SECONDS = 0.05
# The SSE `retry:` hint (ms) sent in priming events, so a client whose stream was closed reconnects quickly.
SSE_RETRY_MILLISECONDS = 100


def _png_1x1() -> bytes:
    """A valid 1x1 red PNG (built, not pasted, so it is obviously well-formed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte 0, then one red pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _wav_silence() -> bytes:
    """A valid 10 ms mono 8 kHz 16-bit WAV of silence."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x00" * 80)
    return buffer.getvalue()


PNG_BYTES = _png_1x1()
PNG_BASE64 = base64.b64encode(PNG_BYTES).decode("ascii")
WAV_BASE64 = base64.b64encode(_wav_silence()).decode("ascii")


class InMemoryEventStore(EventStore):
    """Keeps recent SSE events so a client can resume a closed stream with `Last-Event-ID` (SEP-1699).

    Bounded: a long test session must not grow the fixture without limit; the oldest events are dropped.
    """

    def __init__(self, max_events: int = 10_000) -> None:
        self._events: deque[tuple[str, int, types.JSONRPCMessage | None]] = deque(maxlen=max_events)
        self._ids = itertools.count(1)

    async def store_event(self, stream_id: str, message: types.JSONRPCMessage | None) -> str:
        event_id = next(self._ids)
        self._events.append((stream_id, event_id, message))
        return str(event_id)

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        try:
            after = int(last_event_id)
        except ValueError:
            return None
        stream_id = next((stream for stream, event_id, _ in self._events if event_id == after), None)
        if stream_id is None:
            return None
        # Snapshot first: send_callback awaits, and new events may be appended meanwhile.
        pending = [
            (event_id, message)
            for stream, event_id, message in list(self._events)
            if stream == stream_id and event_id > after and message is not None  # None = priming event
        ]
        for event_id, message in pending:
            assert message is not None
            await send_callback(EventMessage(message, str(event_id)))
        return stream_id


async def _log(ctx: Context[Any, Any], level: types.LoggingLevel, text: str) -> None:
    """Send `notifications/message` on the calling request's own stream."""
    notification = types.LoggingMessageNotification(
        params=types.LoggingMessageNotificationParams(level=level, data=text, logger=SERVER_NAME)
    )
    await ctx.session.send_notification(notification, related_request_id=ctx.request_id)


async def _elicit(ctx: Context[Any, Any], message: str, schema: dict[str, Any]) -> str:
    """Ask the client for input on the calling request's stream; describe the answer as text."""
    result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
    content = json.dumps(result.content or {}, sort_keys=True)
    return f"action={result.action}, content={content}"


# -- tools ---------------------------------------------------------------------------------------------------


def test_simple_text() -> str:
    """Returns one text block."""
    return "This is a simple text response for testing."


def test_image_content() -> list[types.ContentBlock]:
    """Returns one PNG image block."""
    return [types.ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")]


def test_audio_content() -> list[types.ContentBlock]:
    """Returns one WAV audio block."""
    return [types.AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav")]


def test_embedded_resource() -> list[types.ContentBlock]:
    """Returns one embedded text resource."""
    resource = types.TextResourceContents(
        uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
    )
    return [types.EmbeddedResource(type="resource", resource=resource)]


def test_multiple_content_types() -> list[types.ContentBlock]:
    """Returns text, image and embedded resource blocks together."""
    resource = types.TextResourceContents(
        uri="test://mixed-content-resource", mime_type="application/json", text='{"test":"data","value":123}'
    )
    return [
        types.TextContent(type="text", text="Multiple content types test:"),
        types.ImageContent(type="image", data=PNG_BASE64, mime_type="image/png"),
        types.EmbeddedResource(type="resource", resource=resource),
    ]


async def test_tool_with_logging(ctx: Context[Any, Any]) -> str:
    """Sends three info log notifications while it runs."""
    await _log(ctx, "info", "Tool execution started")
    await anyio.sleep(NOTIFICATION_GAP_SECONDS)
    await _log(ctx, "info", "Tool processing data")
    await anyio.sleep(NOTIFICATION_GAP_SECONDS)
    await _log(ctx, "info", "Tool execution completed")
    return "Tool with logging executed successfully"


async def test_tool_with_progress(ctx: Context[Any, Any]) -> str:
    """Reports progress 0, 50, 100 of 100 against the caller's progress token."""
    for step in (0, 50, 100):
        if step:
            await anyio.sleep(NOTIFICATION_GAP_SECONDS)
        await ctx.report_progress(step, 100, f"Completed step {step} of 100")
    meta = ctx.request_context.meta
    token = meta.get("progress_token") if meta else None
    return f"progress token: {token}"


def test_error_handling() -> str:
    """Always fails: the SDK turns a `ToolError` into a result with `isError: true` and the message."""
    raise ToolError("This tool intentionally returns an error for testing")


async def test_sampling(prompt: str, ctx: Context[Any, Any]) -> str:
    """Asks the client's LLM (`sampling/createMessage`) and returns its answer."""
    request = types.CreateMessageRequest(
        params=types.CreateMessageRequestParams(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))],
            max_tokens=100,
        )
    )
    result = await ctx.session.send_request(
        request,
        types.CreateMessageResult,
        metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
    )
    answer = result.content.text if isinstance(result.content, types.TextContent) else "(non-text content)"
    return f"LLM response: {answer}"


async def test_elicitation(message: str, ctx: Context[Any, Any]) -> str:
    """Asks the user for a username and an email (`elicitation/create`)."""
    schema = {
        "type": "object",
        "properties": {
            "username": {"type": "string", "description": "User's response"},
            "email": {"type": "string", "description": "User's email address"},
        },
        "required": ["username", "email"],
    }
    return f"User response: {await _elicit(ctx, message, schema)}"


async def test_elicitation_sep1034_defaults(ctx: Context[Any, Any]) -> str:
    """Elicits with a default for every primitive type (SEP-1034)."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "User name", "default": "John Doe"},
            "age": {"type": "integer", "description": "User age", "default": 30},
            "score": {"type": "number", "description": "User score", "default": 95.5},
            "status": {
                "type": "string",
                "description": "User status",
                "enum": ["active", "inactive", "pending"],
                "default": "active",
            },
            "verified": {"type": "boolean", "description": "Verification status", "default": True},
        },
    }
    return f"Elicitation completed: {await _elicit(ctx, 'Please provide user information', schema)}"


async def test_elicitation_sep1330_enums(ctx: Context[Any, Any]) -> str:
    """Elicits with all five enum schema shapes (SEP-1330)."""
    options = ["option1", "option2", "option3"]
    schema = {
        "type": "object",
        "properties": {
            "untitledSingle": {"type": "string", "enum": options},
            "titledSingle": {
                "type": "string",
                "oneOf": [
                    {"const": "value1", "title": "First Option"},
                    {"const": "value2", "title": "Second Option"},
                    {"const": "value3", "title": "Third Option"},
                ],
            },
            "legacyEnum": {
                "type": "string",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            },
            "untitledMulti": {"type": "array", "items": {"type": "string", "enum": options}},
            "titledMulti": {
                "type": "array",
                "items": {
                    "anyOf": [
                        {"const": "value1", "title": "First Choice"},
                        {"const": "value2", "title": "Second Choice"},
                        {"const": "value3", "title": "Third Choice"},
                    ]
                },
            },
        },
    }
    return f"Elicitation completed: {await _elicit(ctx, 'Please choose from each list', schema)}"


async def test_reconnection(ctx: Context[Any, Any]) -> str:
    """Closes its own SSE stream mid-call; the result is stored and replayed on resume (SEP-1699).

    The SDK offers the close only to clients of protocol 2025-11-25 or later, which can resume; for older ones
    the call simply completes on the open stream.
    """
    await _log(ctx, "info", "Before disconnect")
    await ctx.close_sse_stream()
    await _log(ctx, "info", "After disconnect")
    return "Reconnection test completed"


def json_schema_2020_12_tool(name: str | None = None, address: dict[str, Any] | None = None) -> str:
    """Tool with JSON Schema 2020-12 features"""
    return json.dumps({"name": name, "address": address})


def _json_schema_2020_12_tool() -> Tool:
    """The SEP-1613 fixture: its inputSchema keeps `$schema`, `$defs` and `additionalProperties` verbatim."""
    tool = Tool.from_function(json_schema_2020_12_tool)
    schema = {
        "$schema": JSON_SCHEMA_2020_12,
        "type": "object",
        "$defs": {
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            }
        },
        "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
        "additionalProperties": False,
    }
    return tool.model_copy(update={"parameters": schema})


TOOLS = (
    test_simple_text,
    test_image_content,
    test_audio_content,
    test_embedded_resource,
    test_multiple_content_types,
    test_tool_with_logging,
    test_tool_with_progress,
    test_error_handling,
    test_sampling,
    test_elicitation,
    test_elicitation_sep1034_defaults,
    test_elicitation_sep1330_enums,
    test_reconnection,
)


# -- prompts -------------------------------------------------------------------------------------------------


def test_simple_prompt() -> list[UserMessage]:
    """A simple prompt without arguments."""
    return [UserMessage("This is a simple prompt for testing.")]


def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
    """A prompt with two required arguments."""
    return [UserMessage(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")]


def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    """A prompt that embeds a resource."""
    resource = types.TextResourceContents(
        uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
    )
    return [
        UserMessage(types.EmbeddedResource(type="resource", resource=resource)),
        UserMessage("Please process the embedded resource above."),
    ]


def test_prompt_with_image() -> list[UserMessage]:
    """A prompt that carries an image."""
    return [
        UserMessage(types.ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")),
        UserMessage("Please analyze the image above."),
    ]


PROMPTS = (
    test_simple_prompt,
    test_prompt_with_arguments,
    test_prompt_with_embedded_resource,
    test_prompt_with_image,
)


# -- server --------------------------------------------------------------------------------------------------


def build_server() -> MCPServer[Any]:
    """The fixture server: every tool, resource and prompt above, plus the 2025-era utility methods."""
    server: MCPServer[Any] = MCPServer(
        SERVER_NAME, version="1.0.0", tools=[_json_schema_2020_12_tool()], log_level="WARNING"
    )
    for tool in TOOLS:
        server.add_tool(tool)
    for prompt in PROMPTS:
        server.prompt()(prompt)

    @server.resource("test://static-text", mime_type="text/plain", description="A static text resource")
    def static_text() -> str:
        return "This is the content of the static text resource."

    @server.resource("test://static-binary", mime_type="image/png", description="A static binary resource")
    def static_binary() -> bytes:
        return PNG_BYTES

    @server.resource("test://template/{id}/data", mime_type="application/json", description="A templated resource")
    def template_data(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @server.resource("test://watched-resource", mime_type="text/plain", description="A subscribable resource")
    def watched() -> str:
        return "Watched resource content"

    async def complete(ctx: Any, params: types.CompleteRequestParams) -> types.CompleteResult:
        values = [value for value in ("paris", "park", "party") if value.startswith(params.argument.value)]
        return types.CompleteResult(completion=types.Completion(values=values, total=len(values), has_more=False))

    async def acknowledge(ctx: Any, params: Any) -> types.EmptyResult:
        return types.EmptyResult()

    # MCPServer has no typed public hook for these methods (`completion()` is an untyped decorator; the
    # others are 2025-era methods deprecated by SEP-2577 but still exercised by the suite). Registering them
    # on the low-level server also advertises the matching capabilities.
    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("completion/complete", types.CompleteRequestParams, complete)
    lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, acknowledge)
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, acknowledge)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, acknowledge)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/mcp", help="Streamable HTTP endpoint path (default /mcp)")
    args = parser.parse_args(argv)
    server = build_server()
    server.run(
        "streamable-http",
        host=args.host,
        port=args.port,
        streamable_http_path=args.path,
        event_store=InMemoryEventStore(),
        retry_interval=SSE_RETRY_MILLISECONDS,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
