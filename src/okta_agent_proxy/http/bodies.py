"""Reading a response body the gateway fetched (JWKS, token endpoints, metadata documents), bounded.

aiohttp's `StreamReader.read(n)` returns what has arrived so far — for a body sent in several pieces, only the first —
so a single `read(limit + 1)` can cut a document short. `read_at_most` reads until the end or past the limit.
"""

from __future__ import annotations

import aiohttp


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body when it is at most `limit` bytes; more than `limit` bytes (and no more read) when it is not."""
    body = bytearray()
    while len(body) <= limit and (chunk := await content.read(limit + 1 - len(body))):
        body += chunk
    return bytes(body)
