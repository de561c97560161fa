"""Failed requests leave no reference cycles behind: the gateway raises the cyclic collector's threshold (see
app.GC_YOUNG_THRESHOLD), so a cycle through a request — its record, its body — would hold that memory for
thousands of requests. Malformed bodies (400) and an unreachable backend (502) are the failures a client controls.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import aiohttp

from okta_agent_proxy.record import RequestRecord
from tests.support.gateway import gateway_config, psk_backend, running_gateway
from tests.support.processes import free_port

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
REQUESTS = 20


@contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """What the cyclic collector finds (kept, not freed) from the requests made inside the block."""
    garbage: list[object] = []
    gc.collect()
    gc.disable()
    try:
        yield garbage
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def gateway_objects(garbage: list[object]) -> list[str]:
    """The garbage that belongs to the gateway: request records, and frames of its code."""
    found = [type(o).__name__ for o in garbage if isinstance(o, RequestRecord)]
    frames = [o for o in garbage if isinstance(o, FrameType)]
    found += [f.f_code.co_qualname for f in frames if "okta_agent_proxy" in f.f_code.co_filename]
    return found


async def test_failed_requests_leave_no_cycles() -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there: 502
    config = gateway_config(dead=psk_backend(dead, "/dead"))
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"pad": "x" * 100_000}})
    async with running_gateway(config) as gw, aiohttp.ClientSession() as http:
        for path, body, status in (("/dead", b"{not json" + b"x" * 100_000, 400), ("/dead", call.encode(), 502)):
            async with http.post(gw.url(path), data=body, headers=ACCEPT) as warm:
                assert warm.status == status
            with cyclic_garbage() as garbage:
                for _ in range(REQUESTS):
                    async with http.post(gw.url(path), data=body, headers=ACCEPT) as response:
                        assert response.status == status
                        await response.read()
            assert gateway_objects(garbage) == [], (status, gateway_objects(garbage)[:10])
