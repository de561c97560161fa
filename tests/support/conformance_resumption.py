"""A resumed SSE stream, the way an MCP client resumes one (SEP-1699): run against a backend directly or through
the gateway, and compare what each delivers.

The conformance suite's own resumption scenario (`server-sse-polling`, conformance 0.1.16) cannot check this
against the fixture backend: its raw requests declare protocol 2025-03-26, for which the Python SDK neither primes
nor closes streams, so the scenario never reconnects (0 checks, 2 warnings, and `ServerDisconnectResume` is INFO
"server did not disconnect mid-call"). `resume_dropped_call` does what it would do, against
`@modelcontextprotocol/server-everything` (stateful, with an event store):

1. `initialize` (2025-11-25) and `notifications/initialized`; the session id is kept;
2. `tools/call trigger-long-running-operation` (`steps` progress notifications, then the result) on a POST SSE
   stream; after the first progress event the client hangs up — the result has not been sent yet;
3. `GET` with `Last-Event-ID` = the id of the last event received. The backend replays what its store holds after
   that id and keeps sending on the new stream; its example store only replays what is already stored, so a GET
   that ends without the result is made again with the same `Last-Event-ID`, until a deadline.

The result (`ResumedCall`) is what was received before and after the drop, reduced to what must not depend on who
relayed it: the kind of each event (`progress N` or `result`) and whether each carried an id. A pass-through that
drops `Last-Event-ID` gets the backend's standalone stream instead, which never carries the result: the call
times out (`ResumptionFailed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.integration.sse import MCP_ACCEPT, SseEvent, iter_sse

__all__ = ["PROTOCOL_VERSION", "ResumedCall", "ResumptionFailed", "resume_dropped_call"]

PROTOCOL_VERSION = "2025-11-25"
LONG_RUNNING_TOOL = "trigger-long-running-operation"
_STEP_TIMEOUT = 10.0
_REPLAY_IDLE_SECONDS = 0.5  # a GET stream quiet this long without the result is closed and made again


class ResumptionFailed(AssertionError):
    """The resumed stream did not deliver the call's result in time (or a step answered wrongly)."""


@dataclass(frozen=True)
class ResumedCall:
    before: tuple[str, ...]  # events received on the POST stream before the drop: "progress N"
    after: tuple[str, ...]  # events of the resumed GET that delivered the result: "progress N", …, "result"
    last_event_id: str  # the id sent as Last-Event-ID
    after_ids: tuple[str | None, ...]  # the ids of the `after` events
    result_text: str
    gets: int  # GET requests it took


def _kind(event: SseEvent, call_id: int) -> str | None:
    """`progress N` or `result` for the events of this call; None for anything else (priming events, logs)."""
    if not event.data:
        return None
    message = event.json()
    if message.get("method") == "notifications/progress":
        return f"progress {message['params']['progress']}"
    if message.get("id") == call_id:
        return "result"
    return None


async def _post(http: aiohttp.ClientSession, url: str, headers: Mapping[str, str], message: Any) -> str | None:
    """POST a message and read its answer whole; return the session id the backend named, if any."""
    async with asyncio.timeout(_STEP_TIMEOUT), http.post(url, json=message, headers=headers) as response:
        if response.status not in (200, 202):
            raise ResumptionFailed(f"{message.get('method')} answered {response.status}: {await response.text()}")
        await response.read()
        return response.headers.get("Mcp-Session-Id")


async def resume_dropped_call(
    http: aiohttp.ClientSession, url: str, *, token: str | None = None, steps: int = 3, duration: float = 0.6
) -> ResumedCall:
    """Open a session at `url`, drop a long-running call's stream after its first progress event and resume it."""
    headers = {"Accept": MCP_ACCEPT, "MCP-Protocol-Version": PROTOCOL_VERSION}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    client = {"name": "oap-resumption-probe", "version": "1"}
    initialize = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": client}
    session_id = await _post(
        http, url, headers, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": initialize}
    )
    if not session_id:
        raise ResumptionFailed("the backend opened no session")
    headers["Mcp-Session-Id"] = session_id
    await _post(http, url, headers, {"jsonrpc": "2.0", "method": "notifications/initialized"})

    call_id = 2
    params = {"name": LONG_RUNNING_TOOL, "arguments": {"duration": duration, "steps": steps}}
    call = {
        "jsonrpc": "2.0",
        "id": call_id,
        "method": "tools/call",
        "params": {**params, "_meta": {"progressToken": 7}},
    }
    before: list[str] = []
    last_event_id: str | None = None
    async with asyncio.timeout(_STEP_TIMEOUT), http.post(url, json=call, headers=headers) as response:
        if response.status != 200 or response.content_type != "text/event-stream":
            raise ResumptionFailed(f"tools/call answered {response.status} {response.content_type}")
        async with contextlib.aclosing(iter_sse(response.content)) as events:
            async for event in events:
                last_event_id = event.id or last_event_id
                kind = _kind(event, call_id)
                if kind is not None:
                    before.append(kind)
                if kind is not None and kind.startswith("progress"):
                    break  # hang up: leaving the block drops the connection before the result
    if last_event_id is None or not before or before[-1] == "result":
        raise ResumptionFailed(f"no event id to resume from, or the call ended before the drop: {before}")

    resume_headers = {**headers, "Accept": "text/event-stream", "Last-Event-ID": last_event_id}
    deadline = time.monotonic() + _STEP_TIMEOUT
    gets = 0
    while time.monotonic() < deadline:
        gets += 1
        async with http.get(url, headers=resume_headers) as stream:
            if stream.status != 200 or stream.content_type != "text/event-stream":
                raise ResumptionFailed(f"GET with Last-Event-ID answered {stream.status} {stream.content_type}")
            received = await _until_result(stream.content, call_id)
        if received is not None:
            return ResumedCall(
                before=tuple(before),
                after=tuple(str(_kind(event, call_id)) for event in received),
                last_event_id=last_event_id,
                after_ids=tuple(event.id for event in received),
                result_text=received[-1].json()["result"]["content"][0]["text"],
                gets=gets,
            )
    raise ResumptionFailed(f"no result after {gets} GET(s) with Last-Event-ID in {_STEP_TIMEOUT:.0f}s")


async def _until_result(content: aiohttp.StreamReader, call_id: int) -> list[SseEvent] | None:
    """This call's events up to its result; None when the stream ends or goes quiet first."""
    received: list[SseEvent] = []
    async with contextlib.aclosing(iter_sse(content)) as events:
        while True:
            try:
                async with asyncio.timeout(_REPLAY_IDLE_SECONDS):
                    event = await anext(events)
            except (TimeoutError, StopAsyncIteration):
                return None
            kind = _kind(event, call_id)
            if kind is not None:
                received.append(event)
            if kind == "result":
                return received
