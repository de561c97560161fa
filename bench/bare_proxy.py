"""The yardstick: a bare aiohttp pass-through on uvloop, with none of the gateway's checks.

Reads the request body, forwards it with one pooled ClientSession, streams the answer back. Single process.
Usage: bare_proxy.py PORT UPSTREAM_BASE_URL   (the request's path and query are appended to the base URL)
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

REQUEST_HEADERS = ("Content-Type", "Accept")
RESPONSE_HEADERS = ("Content-Type", "Content-Length")


async def serve(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024), auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name: request.headers[name] for name in REQUEST_HEADERS if name in request.headers}
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body) as answer:
            out_headers = {name: answer.headers[name] for name in RESPONSE_HEADERS if name in answer.headers}
            response = web.StreamResponse(status=answer.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until SIGTERM ends the process


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2].rstrip("/")))
