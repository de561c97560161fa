"""The one place that reaches past aiohttp's client API: taking a response's read timeout off once it streams.

Why: a request's `ClientTimeout(sock_read=…)` bounds the wait for the response headers at no extra cost (aiohttp
re-arms one timer per read it does anyway; an `asyncio.timeout` around the request cost several µs per request in
the bench). But the same timer would then bound every gap of the body by `timeout_seconds`, and an SSE stream's gaps
are bounded by `stream_idle_timeout_seconds` instead — by the relay's own deadline, which also covers a client that
stops reading. So when the relay starts streaming a body it stops aiohttp's timer.

How: `ClientResponse.connection.protocol` is aiohttp's `ResponseHandler`, whose `read_timeout` setter and
`start_timeout()` (which re-arms the timer, or only cancels it for `None`) are public methods of a class aiohttp does
not export. tests/integration/test_stream_limits.py (a POST stream pausing longer than `timeout_seconds`) fails if
this stops working.
"""

from __future__ import annotations

import aiohttp


def stop_read_timeout(response: aiohttp.ClientResponse) -> None:
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is not None:
        protocol.read_timeout = None
        protocol.start_timeout()
