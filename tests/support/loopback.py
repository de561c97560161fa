"""An aiohttp application served on loopback for the length of a test: the one place tests start a small server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from tests.support.processes import LOOPBACK


@asynccontextmanager
async def serving(app: web.Application, **options: Any) -> AsyncIterator[str]:
    """`app` on 127.0.0.1 and an ephemeral port, in the running loop: yields its base URL `http://127.0.0.1:PORT`.
    `options` are `web.AppRunner`'s (default: no access log, half a second for requests in flight at the end)."""
    options.setdefault("access_log", None)
    options.setdefault("shutdown_timeout", 0.5)
    runner = web.AppRunner(app, **options)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        yield f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
