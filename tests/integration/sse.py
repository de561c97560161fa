"""A small SSE reader for raw-HTTP tests: events with their fields and the moment each one arrived."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import aiohttp

MCP_ACCEPT = "application/json, text/event-stream"


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str | None
    id: str | None
    retry: int | None
    arrived: float  # time.monotonic() when the blank line ending the event was read

    def json(self) -> Any:
        return json.loads(self.data)


async def iter_sse(content: aiohttp.StreamReader) -> AsyncGenerator[SseEvent, None]:
    """Events from an SSE body as they arrive (WHATWG rules for the fields used by MCP; comments skipped)."""
    data: list[str] = []
    event: str | None = None
    event_id: str | None = None
    retry: int | None = None
    seen_field = False
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if seen_field:
                yield SseEvent("\n".join(data), event, event_id, retry, time.monotonic())
            data, event, event_id, retry, seen_field = [], None, None, None, False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        seen_field = True
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)


async def read_sse(content: aiohttp.StreamReader) -> list[SseEvent]:
    """Every event until the stream ends (bound the call with a timeout)."""
    return [event async for event in iter_sse(content)]
