"""Reading a request's body: whole (it is inspected, and resent on a retry), bounded in size and in time.

`MAX_BODY_BYTES` bounds the size (413 as soon as it is passed, never buffering more). A body still arriving when
its headers are in must keep coming: no pause between its parts may be longer than `HEADER_READ_TIMEOUT_SECONDS`
(408) — without that, a client that sends headers and then trickles its body would hold a handler forever. A body
that arrived with its headers (nearly every MCP message) is read without any timer.
"""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader, web

from okta_agent_proxy.errors import PayloadTooLarge, RequestTimeout

_READ_CHUNK = 64 * 1024


async def read_body(request: web.Request, limit: int, gap: float) -> bytes:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    content = request.content
    if content.is_eof():  # all of it arrived with the headers (nearly every MCP message)
        if declared is not None:
            return await request.read()  # bounded by the declared length, which is within the limit
        return await _read(content, limit, None, gap)
    try:
        async with asyncio.timeout(gap) as deadline:
            return await _read(content, limit, deadline, gap)
    except TimeoutError:
        raise RequestTimeout("the request body stopped arriving") from None


async def _read(content: StreamReader, limit: int, deadline: asyncio.Timeout | None, gap: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if deadline is not None:
            deadline.reschedule(asyncio.get_running_loop().time() + gap)
    return b"".join(chunks)
