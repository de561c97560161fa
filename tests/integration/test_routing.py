"""Routing on the wire: longest prefix wins at segment boundaries; the request goes to `backend.url` + the rest of
the path with the query string kept verbatim; paths with dot segments never reach a backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from yarl import URL

from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import RunningGateway, gateway_config, psk_backend, running_gateway

PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@dataclass
class Routed:
    backend: RecordingBackend
    gateway: RunningGateway
    http: aiohttp.ClientSession

    async def post(self, raw_path: str) -> tuple[int, str | None, str | None]:
        """(status, gateway error code or None, the backend's path + query or None) for a POST to `raw_path`,
        sent exactly as written (no client-side normalisation)."""
        before = len(self.backend.requests)
        url = URL(self.gateway.url(raw_path), encoded=True)
        async with self.http.post(url, json=PING) as response:
            document = await response.json()
        code = document.get("error") if response.status >= 400 else None
        reached = self.backend.requests[before:]
        assert len(reached) <= 1
        return response.status, code, reached[0].path_qs if reached else None


@pytest.fixture
async def routed() -> AsyncIterator[Routed]:
    async with running_backend() as backend:
        config = gateway_config(
            hr=psk_backend(backend.url("/hr-backend/mcp"), "/hr"),
            payroll=psk_backend(backend.url("/payroll-backend"), "/hr/payroll"),
            deep=psk_backend(backend.url("/deep-backend"), "/hr/payroll/deep/er"),
            tools=psk_backend(backend.url("/tools-backend"), "/tools", "/t"),
        )
        async with running_gateway(config) as gateway, aiohttp.ClientSession() as http:
            yield Routed(backend, gateway, http)


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/hr", "/hr-backend/mcp"),
        ("/hr/", "/hr-backend/mcp/"),
        ("/hr/sub/path", "/hr-backend/mcp/sub/path"),
        ("/hr/payroll", "/payroll-backend"),  # longest prefix wins
        ("/hr/payroll/x/y", "/payroll-backend/x/y"),
        ("/hr/payrollx", "/hr-backend/mcp/payrollx"),  # a prefix matches whole segments only
        ("/hr/payroll/deep", "/payroll-backend/deep"),
        ("/hr/payroll/deep/er/z", "/deep-backend/z"),
        ("/t", "/tools-backend"),  # a second path of the same backend
        ("/tools/a", "/tools-backend/a"),
        ("/hr/caf%C3%A9/%7Euser", "/hr-backend/mcp/caf%C3%A9/%7Euser"),  # byte for byte
    ],
)
async def test_longest_prefix_and_sub_path(routed: Routed, path: str, upstream: str) -> None:
    assert await routed.post(path) == (200, None, upstream)


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/hr?a=1", "/hr-backend/mcp?a=1"),
        ("/hr/x?b=2&c=3", "/hr-backend/mcp/x?b=2&c=3"),
        ("/hr/payroll?q=a%26b&r=1%2B1", "/payroll-backend?q=a%26b&r=1%2B1"),  # escapes keep their meaning
        ("/hr?space=%20&plus=a+b&empty=", "/hr-backend/mcp?space=%20&plus=a+b&empty="),
        ("/hr?percent=%2541&hash=%23frag", "/hr-backend/mcp?percent=%2541&hash=%23frag"),  # not "A", not cut at '#'
        ("/hr?utf8=caf%C3%A9&raw=%FF", "/hr-backend/mcp?utf8=caf%C3%A9&raw=%FF"),
    ],
)
async def test_query_string_is_kept_verbatim(routed: Routed, path: str, upstream: str) -> None:
    assert await routed.post(path) == (200, None, upstream)


@pytest.mark.parametrize("path", ["/hrx", "/hrx/y", "/h", "/HR", "/toolsx", "/", "/other"])
async def test_no_prefix_match_is_404(routed: Routed, path: str) -> None:
    assert await routed.post(path) == (404, "not_found", None)


@pytest.mark.parametrize(
    "path",
    [
        "/hr/../tools",
        "/hr/payroll/../x",
        "/hr/./x",
        "/hr/..",
        "/hr/%2e%2e/tools",
        "/hr/.%2E/tools",
        "/hr/%2E/x",
        "/hr/a%2F..%2Fb",
    ],
)
async def test_dot_segments_are_rejected(routed: Routed, path: str) -> None:
    assert await routed.post(path) == (404, "not_found", None)
