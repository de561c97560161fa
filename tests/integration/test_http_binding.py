"""The aiohttp binding (`http/aiohttp_binding.py`) serves requests without aiohttp's router: each request finds its
endpoint as the router would (an exact path for its method, then a prefix, then the pipeline), and `Expect:
100-continue` is still answered before the client sends its body."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.support.backends import running_backend
from tests.support.gateway import gateway_config, psk_backend, running_gateway
from tests.support.processes import LOOPBACK

BODY = b'{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{}}'
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def test_a_client_that_expects_100_continue_gets_it_before_it_sends_the_body() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(hr=psk_backend(backend.url(), "/hr"))) as gw,
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, gw.port)
        try:
            head = (
                f"POST /hr HTTP/1.1\r\nHost: {LOOPBACK}:{gw.port}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json, text/event-stream\r\nContent-Length: {len(BODY)}\r\n"
                "Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode())
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(BODY)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["id"] == 3
        assert [r.body for r in backend.requests if r.method == "POST"] == [BODY]


async def test_endpoints_are_found_as_aiohttps_router_found_them() -> None:
    async with (
        running_backend() as backend,
        running_gateway(gateway_config(everything=psk_backend(backend.url(), "/"))) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(gw.url("/healthz")) as health:
            assert health.status == 200 and await health.json() == {"status": "ok"}
        async with http.get(gw.url("/.well-known/oauth-protected-resource/anything")) as metadata:
            assert metadata.status == 200 and metadata.headers["Access-Control-Allow-Origin"] == "*"
        async with http.options(gw.url("/.well-known/oauth-protected-resource")) as preflight:
            assert preflight.status == 204
        # A path served for GET only: another method falls through to the backend on "/", as with the router.
        async with http.post(gw.url("/healthz"), data=BODY, headers=ACCEPT) as post:
            assert post.status == 200 and (await post.json())["id"] == 3
        assert [r.path_qs for r in backend.requests if r.method == "POST"] == ["/healthz"]


def _unreadable(metrics_text: str) -> float:
    line = next(ln for ln in metrics_text.splitlines() if ln.startswith("oap_unreadable_requests_total "))
    return float(line.split()[1])


async def test_a_request_the_parser_refuses_is_counted_in_metrics() -> None:
    async with running_gateway(gateway_config()) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/metrics")) as before:
            counted = _unreadable(await before.text())
        reader, writer = await asyncio.open_connection(LOOPBACK, gw.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert answer.split(b" ", 2)[1] == b"400" and b'"bad_request"' in answer
        async with http.get(gw.url("/metrics")) as after:
            assert _unreadable(await after.text()) == counted + 1
