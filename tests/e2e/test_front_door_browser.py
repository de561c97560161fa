"""The OAuth front door (DESIGN.md §8) in a real browser: Chromium walks Okta's sign-in page and the gateway's consent
page once, as a person would, and the consent page's screenshot is kept as a test artifact.

The issue asked for "Playwright for Python or playwright-core from npm"; this drives the browser with puppeteer
instead, which the project already installs (`scripts/install-mermaid` puts it in `.cache/mermaid` for the docs
test) and which plays the same role: driving Debian's `chromium` package — no npm package added, no browser
downloaded. `tests/node/front_door_browser.mjs` is the person; this test is the MCP client around them: it registers,
builds the PKCE authorization URL, runs a loopback redirect URI, and redeems the code the browser brings back.

What only a browser shows: the pages render and work with no script (the pages' CSP is `default-src 'none'`; the
script fails on any CSP violation or page error, and on any console error on the gateway's pages), the sign-in form's
redirect chain and cookies work as Chromium applies them (SameSite=Lax, `Origin` and `Sec-Fetch-Site` on the consent
POST: a page under `Referrer-Policy: no-referrer` makes Chromium send `Origin: null` on its own same-origin form POST,
which the hand-driven walk of `tests/support/front_door.py` never shows), and the consent page looks like one (the
screenshot's pixels are checked where the Allow button is).

The screenshot goes to `.cache/test-artifacts/front-door-consent.png` (git-ignored) and into the test's `tmp_path`.
Without Chromium, Node 22 or puppeteer the test skips with the reason; under `OAP_REQUIRE_SERVICES=1` it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
import yarl
from aiohttp import web

from tests.integration.conftest import SampleBackends, _start_sample
from tests.support.front_door import ADA, FrontDoorStack, Pkce, front_door_stack
from tests.support.gateway import DEFAULT_BASIC, DEFAULT_KEY
from tests.support.mermaid import MERMAID_DIR, chromium_path
from tests.support.node_tools import CACHE_DIR, NODE22_BIN_DIR, REPO_ROOT, services_required
from tests.support.processes import LOOPBACK
from tests.support.stacks import ACCEPT

SCRIPT = REPO_ROOT / "tests" / "node" / "front_door_browser.mjs"
PUPPETEER = MERMAID_DIR / "node_modules" / "puppeteer" / "package.json"
ARTIFACT = CACHE_DIR / "test-artifacts" / "front-door-consent.png"
CLIENT_NAME = "Claude Code (employees)"
BROWSER_SECONDS = 60.0  # the whole walk, Chromium's start included
STEP_MS = 15_000  # one page in the browser
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
APPROVE_BLUE = (0x16, 0x62, 0xDD)  # the Allow button's background (frontdoor/pages.py)
PAGE_GREY = (0xF4, 0xF5, 0xF7)  # the page's background


@dataclass(frozen=True)
class BrowserTools:
    node: Path
    chromium: Path


def _unavailable(reason: str) -> NoReturn:
    if services_required():
        pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def require_browser() -> BrowserTools:
    """Node 22, puppeteer from the Mermaid cache and Debian's Chromium, or skip (fail under OAP_REQUIRE_SERVICES=1)."""
    chromium = chromium_path()
    if chromium is None or not _executable(chromium):
        _unavailable("Chromium is not installed (apt-get install -y chromium, or set OAP_CHROMIUM)")
    node = NODE22_BIN_DIR / "node"
    if not _executable(node):
        _unavailable("Node 22 is not installed in .cache/node22; run scripts/install-node-tools")
    if not PUPPETEER.is_file():
        _unavailable("puppeteer is not installed in .cache/mermaid; run scripts/install-mermaid")
    return BrowserTools(node, chromium)


@pytest.fixture(scope="module")
def browser_tools() -> BrowserTools:
    """Checked before anything is started, so that a missing piece skips at once."""
    return require_browser()


@pytest.fixture(scope="module")
def backends() -> Iterator[SampleBackends]:
    """The devkit's employees and partners servers, as `tests/integration/conftest.py`'s `sample_backends` starts
    them (that fixture lives in a conftest this directory does not see)."""
    with ExitStack() as stack:
        employees = _start_sample("employees", stateful=False, credential={"SAMPLE_BACKEND_API_KEY": DEFAULT_KEY})
        stack.callback(employees.close)
        partners = _start_sample(
            "partners", stateful=True, credential={"SAMPLE_BACKEND_BASIC": ":".join(DEFAULT_BASIC)}
        )
        stack.callback(partners.close)
        yield SampleBackends(employees, partners)


@dataclass
class RedirectTarget:
    """The MCP client's loopback redirect URI: records each query it receives and answers "done"."""

    url: str = ""
    queries: list[dict[str, list[str]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        query: dict[str, list[str]] = {}
        for name, value in request.query.items():
            query.setdefault(name, []).append(value)
        self.queries.append(query)
        return web.Response(text="done")


@asynccontextmanager
async def redirect_target() -> AsyncIterator[RedirectTarget]:
    target = RedirectTarget()
    app = web.Application()
    app.router.add_get("/callback", target.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        port = runner.addresses[0][1]
        target.url = f"http://{LOOPBACK}:{port}/callback"
        yield target
    finally:
        await runner.cleanup()


async def run_browser(tools: BrowserTools, request: dict[str, Any]) -> dict[str, Any]:
    """Run the Node script (bounded); its JSON line. Chromium is its child: on a timeout the whole group goes."""
    env = {**os.environ, "OAP_MERMAID_DIR": str(MERMAID_DIR)}
    process = await asyncio.create_subprocess_exec(
        str(tools.node),
        str(SCRIPT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(request).encode()), BROWSER_SECONDS)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        pytest.fail(f"the browser did not finish within {BROWSER_SECONDS:.0f} s")
    lines = stdout.decode().strip().splitlines()
    assert lines, f"the browser script printed nothing (exit {process.returncode}):\n{stderr.decode()[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    failure = f"\n(the page then: {result['failure_screenshot']})" if result.get("failure_screenshot") else ""
    assert result["ok"] and process.returncode == 0, f"{result.get('error')}{failure}\n{stderr.decode()[-4000:]}"
    return result


async def register(http: aiohttp.ClientSession, stack: FrontDoorStack, redirect_uri: str) -> str:
    body = {"client_name": CLIENT_NAME, "redirect_uris": [redirect_uri], "token_endpoint_auth_method": "none"}
    async with http.post(stack.url("/oauth/register"), json=body) as response:
        assert response.status == 201, await response.text()
        client_id: str = (await response.json())["client_id"]
        return client_id


def authorize_url(stack: FrontDoorStack, client_id: str, redirect_uri: str, pkce: Pkce) -> str:
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "state": pkce.state,
        "resource": stack.url("/employees"),
    }
    return str(yarl.URL(stack.url("/oauth/authorize")).with_query(query))


async def redeem(
    http: aiohttp.ClientSession, stack: FrontDoorStack, client_id: str, redirect_uri: str, code: str, pkce: Pkce
) -> dict[str, Any]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": client_id,
        "code_verifier": pkce.verifier,
    }
    async with http.post(stack.url("/oauth/token"), data=form) as response:
        assert response.status == 200, await response.text()
        tokens: dict[str, Any] = await response.json()
        return tokens


async def list_tools(http: aiohttp.ClientSession, stack: FrontDoorStack, token: str | None) -> tuple[int, str]:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {**ACCEPT, "MCP-Protocol-Version": "2025-06-18"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(stack.url("/employees"), json=message, headers=headers) as response:
        return response.status, await response.text()


# ---- the screenshot ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Png:
    width: int
    height: int
    rows: list[bytes]  # decoded rows, from the top, as far as `decode_png` was asked to go
    channels: int

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        row = self.rows[y]
        red, green, blue = row[x * self.channels : x * self.channels + 3]
        return red, green, blue


def decode_png(data: bytes, rows_needed: int) -> Png:
    """The first `rows_needed` rows of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    assert data.startswith(PNG_MAGIC), "not a PNG"
    offset, idat, header = len(PNG_MAGIC), bytearray(), b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, chunk = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        offset += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    channels = 3 if color == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * channels
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(min(rows_needed, height)):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - corner
                distances = (abs(estimate - left), abs(estimate - up), abs(estimate - corner))
                nearest = left if distances[0] <= min(distances[1:]) else up if distances[1] <= distances[2] else corner
                line[i] = (line[i] + nearest) & 0xFF
        previous = bytes(line)
        rows.append(previous)
    return Png(width, height, rows, channels)


def close_to(seen: tuple[int, int, int], expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(seen, expected, strict=True))


def check_screenshot(path: Path, consent: dict[str, Any]) -> None:
    """A real PNG of the whole consent page: the page's size, its grey background, the blue Allow button."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"
    scale = consent["device_pixel_ratio"]
    box = consent["approve_box"]
    # inside the button, left of its white label and clear of its rounded corners
    x, y = int((box["x"] + 8) * scale), int((box["y"] + box["height"] / 2) * scale)
    png = decode_png(data, y + 1)
    size = consent["page_size"]
    assert (png.width, png.height) == (int(size["width"] * scale), int(size["height"] * scale)), (png, size)
    assert close_to(png.pixel(2, 2), PAGE_GREY), f"the corner is {png.pixel(2, 2)}, not the page's background"
    assert close_to(png.pixel(x, y), APPROVE_BLUE), f"the Allow button is {png.pixel(x, y)} at ({x}, {y}), not blue"


def keep_artifact(screenshot: Path) -> Path:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    partial = ARTIFACT.with_suffix(f".{os.getpid()}.partial")
    shutil.copyfile(screenshot, partial)
    partial.replace(ARTIFACT)  # whole or not at all, should two runs race
    return ARTIFACT


# ---- the test ---------------------------------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.slow
async def test_a_person_signs_in_and_approves_in_chromium(
    browser_tools: BrowserTools, backends: SampleBackends, tmp_path: Path
) -> None:
    screenshot = tmp_path / "front-door-consent.png"
    async with (
        front_door_stack(
            f"sqlite:///{tmp_path}/gateway.db",
            backends.employees.url("/mcp"),
            backends.partners.url("/mcp"),
            settings={"DATA_DIR": str(tmp_path)},
        ) as stack,
        redirect_target() as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
    ):
        client_id = await register(http, stack, client.url)
        pkce = Pkce()
        started = time.monotonic()
        seen = await run_browser(
            browser_tools,
            {
                "authorize_url": authorize_url(stack, client_id, client.url, pkce),
                "redirect_uri": client.url,
                "gateway_origin": stack.base_url,
                "username": ADA.login,
                "password": ADA.password,
                "screenshot": str(screenshot),
                "expect": [CLIENT_NAME, f"employees ({stack.url('/employees')})", "Ada Lovelace"],
                "chromium": str(browser_tools.chromium),
                "no_sandbox": hasattr(os, "geteuid") and os.geteuid() == 0,  # Chromium's sandbox refuses root
                "step_timeout_ms": STEP_MS,
            },
        )
        browsed = time.monotonic() - started

        # the browser went Okta → consent → the client, and saw what a person should
        assert seen["sign_in_title"] == "Sign In", seen
        assert any(page["url"].startswith(stack.idp.base_url) and page["status"] == 200 for page in seen["pages"])
        assert seen["consent_title"] == "Allow access?", seen
        assert seen["consent"]["heading"] == "Allow access to employees?", seen["consent"]
        assert seen["consent"]["approve_label"] == "Allow" and seen["consent"]["scripts"] == 0, seen["consent"]
        consent_answer = next(page for page in seen["pages"] if page["url"] == seen["consent_url"])
        assert "default-src 'none'" in (consent_answer["csp"] or ""), consent_answer  # no violation, under a CSP
        assert seen["final_url"] == client.url and seen["final_text"] == "done", seen

        # what the client's redirect URI received, and what the code is worth
        assert len(client.queries) == 1, client.queries
        query = client.queries[0]
        assert all(len(values) == 1 for values in query.values()), query
        assert query["state"] == [pkce.state] and query["iss"] == [stack.base_url], query
        tokens = await redeem(http, stack, client_id, client.url, query["code"][0], pkce)
        assert tokens["token_type"].lower() == "bearer"
        assert (await list_tools(http, stack, None))[0] == 401
        status, body = await list_tools(http, stack, tokens["access_token"])
        assert status == 200 and "get_employee" in body, (status, body[:500])

    check_screenshot(screenshot, seen["consent"])
    kept = keep_artifact(screenshot)
    print(f"consent page screenshot: {kept} ({kept.stat().st_size} bytes; browser walk {browsed:.1f} s)")
