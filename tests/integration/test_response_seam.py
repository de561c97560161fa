"""The response seam (`Pipeline.transformers`): a transformer chosen per route sees every byte of the backend's
answer — a whole JSON body or an SSE stream — and what it returns is what the client gets, with a correct framing
(no stale `Content-Length`); a route without one is streamed untouched. The tool policy plugs in here."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from okta_agent_proxy.app import GATEWAY, build_app
from okta_agent_proxy.inbound.caller import Caller
from okta_agent_proxy.mcp.forward import ResponseTransformer
from okta_agent_proxy.routing import Route
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import bound_socket, gateway_config, load_config, psk_backend

BODY = b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{}}'
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class Marking:
    """Replaces "echo" with "ECHO" as bytes pass, holding back nothing (a stand-in for the tool policy's filter);
    counts what it was shown."""

    def __init__(self, seen: list[str]) -> None:
        self._seen = seen

    def feed(self, chunk: bytes) -> bytes:
        self._seen.append("feed")
        return chunk.replace(b"echo", b"ECHO")

    def end(self) -> bytes:
        self._seen.append("end")
        return b""


@asynccontextmanager
async def seam_gateway(backend: RecordingBackend, tmp: Path, seen: list[str]) -> AsyncIterator[str]:
    config = gateway_config(
        plain=psk_backend(backend.url("/json"), "/plain"),
        marked=psk_backend(backend.url("/json"), "/marked"),
        streamed=psk_backend(backend.url("/sse"), "/streamed"),
    )
    with bound_socket() as sock:
        port = sock.getsockname()[1]
        loaded = load_config(config, tmp, settings={"GATEWAY_BASE_URL": f"http://127.0.0.1:{port}"})
        app = build_app(loaded)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            generation = app[GATEWAY].current

            def transformers(route: Route, caller: Caller | None) -> ResponseTransformer | None:
                return Marking(seen) if route.name in ("marked", "streamed") else None

            generation.pipeline = dataclasses.replace(generation.pipeline, transformers=transformers)
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def test_a_transformer_rewrites_a_json_answer_and_its_length(tmp_path: Path) -> None:
    seen: list[str] = []
    async with (
        running_backend() as backend,
        seam_gateway(backend, tmp_path, seen) as url,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(url + "/plain", data=BODY, headers=HEADERS) as plain:
            untouched = await plain.read()
            assert plain.status == 200 and b'"echo"' in untouched and seen == []
        async with http.post(url + "/marked", data=BODY, headers=HEADERS) as marked:
            body = await marked.read()
            assert marked.status == 200
            assert body == untouched.replace(b"echo", b"ECHO")
            assert marked.headers.get("Content-Length") in (None, str(len(body)))
    assert seen[-1] == "end" and "feed" in seen


async def test_a_transformer_sees_an_sse_stream_event_by_event(tmp_path: Path) -> None:
    seen: list[str] = []
    async with (
        running_backend() as backend,
        seam_gateway(backend, tmp_path, seen) as url,
        aiohttp.ClientSession() as http,
        http.post(url + "/streamed", data=BODY, headers=HEADERS) as streamed,
    ):
        text = (await streamed.read()).decode()
        assert streamed.status == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
        assert "ECHO" in text and "echo" not in text
    assert seen[-1] == "end"
