"""A document that arrives in several pieces is read whole (JWKS, token endpoints, doctor's probes), and one larger
than its bound is refused without reading it all: `http.bodies.read_at_most` against a real aiohttp server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from okta_agent_proxy.http.bodies import read_at_most
from okta_agent_proxy.inbound.jwks import JwksFetchError, fetch_json
from tests.support.processes import LOOPBACK

KEYS = {"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB" * 64, "e": "AQAB"}]}


@asynccontextmanager
async def trickling(body: bytes, pieces: int) -> AsyncIterator[str]:
    """A server sending `body` as `pieces` writes 20 ms apart (chunked)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            await response.write(body[start : start + size])
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/doc", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        yield f"http://{LOOPBACK}:{runner.addresses[0][1]}/doc"
    finally:
        await runner.cleanup()


async def test_a_jwks_in_pieces_is_read_whole() -> None:
    async with trickling(json.dumps(KEYS).encode(), pieces=4) as url, aiohttp.ClientSession() as session:
        assert await fetch_json(session, url, timeout=5) == KEYS


async def test_a_document_over_the_bound_is_cut_just_past_it() -> None:
    async with (
        trickling(b"x" * 10_000, pieces=10) as url,
        aiohttp.ClientSession() as session,
        session.get(url) as response,
    ):
        body = await read_at_most(response.content, 2500)
    assert len(body) == 2501


async def test_too_large_a_jwks_is_refused() -> None:
    async with trickling(b"[" + b" " * (600 * 1024) + b"]", pieces=3) as url, aiohttp.ClientSession() as session:
        with pytest.raises(JwksFetchError, match="too large"):
            await fetch_json(session, url, timeout=5)
