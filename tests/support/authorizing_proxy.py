"""A forward proxy that adds `Authorization: Bearer <token>` to every request, for clients that cannot send headers.

The MCP conformance suite (`conformance server`, 0.1.16) takes only a URL: it has no option for request headers
(`conformance server --help`: `--url`, `--scenario`, `--suite`, `--expected-failures`, `-o`, `--spec-version`,
`--verbose`) and reads no environment variable for them. A gateway that authenticates every request would answer
each of its requests 401. So the suite talks to this proxy, which sends each request on to the gateway with the
caller's bearer token, as a real MCP client that holds a token sends it.

What it changes, and nothing else:
- `Authorization` is set to `Bearer <token>` (a client's own `Authorization` is replaced);
- the hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and the headers it names, `Keep-Alive`,
  `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Proxy-*`) belong to each connection and are not copied.
Every other request header goes on in order and with duplicates, `Host` and `Origin` included (the suite's DNS
rebinding scenario sends its own); the method, the raw path and query are kept. Bodies stream both ways chunk by
chunk as they arrive — nothing is buffered, decompressed or re-encoded (`auto_decompress=False`, and no default
`Accept`, `Accept-Encoding`, `User-Agent` or `Content-Type` is added), so an SSE event reaches the client when the
gateway writes it. A client that hangs up cancels the upstream request (`handler_cancellation`); an upstream body
that ends early drops the client's connection instead of ending its response cleanly.

Only 127.0.0.1 is bound. The token never appears in a log or an error body.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from .processes import LOOPBACK

__all__ = ["AuthorizingProxy", "authorizing_proxy"]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Headers aiohttp's client would add on its own when the client did not send them.
_NO_DEFAULTS = frozenset({hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONNECT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


@dataclass
class AuthorizingProxy:
    """The proxy at `base_url`; `requests` counts the requests it has passed on."""

    base_url: str = ""
    requests: int = 0

    def url(self, path: str = "") -> str:
        return self.base_url + path


def _connection_tokens(headers: CIMultiDict[str]) -> set[str]:
    """The header names a `Connection` header lists (they are hop-by-hop too)."""
    return {token.strip().lower() for value in headers.getall(hdrs.CONNECTION, []) for token in value.split(",")}


def _end_to_end(raw: tuple[tuple[bytes, bytes], ...]) -> CIMultiDict[str]:
    """The raw headers (order and duplicates kept) minus the hop-by-hop ones."""
    headers: CIMultiDict[str] = CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)
    dropped = _HOP_BY_HOP | _connection_tokens(headers)
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in dropped)


def _handler(session: aiohttp.ClientSession, target: URL, token: str, proxy: AuthorizingProxy) -> Handler:
    async def forward(request: web.Request) -> web.StreamResponse:
        headers = _end_to_end(request.raw_headers)
        headers.popall(hdrs.AUTHORIZATION, None)
        headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        body = request.content.iter_any() if request.body_exists else None
        url = target.join(URL(request.raw_path, encoded=True))
        proxy.requests += 1
        async with session.request(
            request.method, url, headers=headers, data=body, skip_auto_headers=_NO_DEFAULTS, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_end_to_end(upstream.raw_headers))
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientPayloadError:
                # The upstream body ended early: so does the client's (no clean end it could mistake for complete).
                if request.transport is not None:
                    request.transport.close()
                return response
            except ConnectionResetError:
                return response  # the client hung up mid-body; leaving the block closes the upstream request
            await response.write_eof()
            return response

    return forward


@asynccontextmanager
async def authorizing_proxy(
    target_base_url: str, token: str, *, sock: socket.socket | None = None
) -> AsyncIterator[AuthorizingProxy]:
    """The proxy on `sock` (a bound loopback socket, e.g. to know its URL in advance) or a fresh loopback port,
    sending everything to `target_base_url` with `Authorization: Bearer <token>`."""
    connector = aiohttp.TCPConnector(limit=0, family=socket.AF_INET)
    proxy = AuthorizingProxy()
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=_CONNECT_TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _handler(session, URL(target_base_url), token, proxy))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, LOOPBACK, 0)
            await site.start()
            proxy.base_url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
            yield proxy
        finally:
            await runner.cleanup()
