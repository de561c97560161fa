"""The OAuth front door's full login (DESIGN.md §8): CPU time per login, of the gateway and of the Okta emulator.

    .venv/bin/python bench/front_door_login.py [--logins 50] [--rounds 3] [--warmup 5]

One process, three threads, each with its own event loop, all on 127.0.0.1:

- **gateway**: as `serve` assembles it (`store.db.migrate`, `open_store`, the audit writer, `build_app`, the same
  `GatewayRunner` options; `FRONT_DOOR=on`, logging at INFO into a file of the run's temporary folder), with a
  SQLite store and one pre-shared-key backend at `/mcp`;
- **emulator**: the devkit Okta emulator with the gateway's own OIDC app (client secret) and a user who signs in with
  a password, plus the backend (a few lines of aiohttp: the pre-shared key, or 403);
- **client** (the main thread): each login is a new person with a new browser (cookie jar) from a loopback address
  of its own (127.0.x.y: registrations are rate-limited per address), doing what an MCP client and its user do —
  register (`POST /oauth/register`), `GET /oauth/authorize`, the emulator's sign-in page and form POST, the
  gateway's callback (which redeems Okta's code at the emulator and verifies the ID token), the consent form POST,
  and `POST /oauth/token` — one hop at a time, each answer checked. A new client each time, so the consent page is
  never skipped; the emulator keeps no sessions, so the sign-in form never is either.

After `--warmup` logins (caches, the emulator's and the gateway's keys, the SQLite pages), `--rounds` rounds of
`--logins` logins are timed, each round on its own (the VM this was written on slows down by up to 2x for 10-20 s at
a time: compare the rounds, take the median). Each thread's CPU clock (`time.pthread_getcpuclockid` of its pthread:
the `CLOCK_THREAD_CPUTIME_ID` that thread would read itself) is read before and after every step — the threads are
idle between steps, since the client waits for each answer — and so is the process's CPU clock: what no named thread
used is the store's SQLite threads and the audit writer's, all the gateway's. Printed per login, for each round and
their median: the gateway's event-loop thread, those other threads, the emulator's thread, the client's, and the
wall time; then per step, over all rounds. Before the timing, the first login's token must get the backend's answer
through the gateway's `/mcp`, and after it the last one's — a login that yields a token the gateway refuses would
time the wrong thing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import uvloop
import yarl
from aiohttp import web

from okta_agent_proxy.app import build_app, server_events, tune_gc_for_serving
from okta_agent_proxy.config.loader import load
from okta_agent_proxy.devkit.okta_emulator import App, OktaEmulator, User
from okta_agent_proxy.http.server import ConnectionLimits, GatewayRunner
from okta_agent_proxy.observability.logging import configure
from okta_agent_proxy.store.db import migrate, open_store

LOOPBACK = "127.0.0.1"
STARTUP_SECONDS = 30.0
REQUEST_SECONDS = 15.0
MAX_HOPS = 5  # redirects followed within one step
GATEWAY_APP = App(
    "0oabenchgateway00001",
    "Okta Agent Proxy (bench)",
    client_secret="bench-gateway-app-secret-0123456789",
    redirect_uris=(),  # set once the gateway's port is known
)
USER = User("bench.user@example.com", "00ubenchuser0000001", password="bench password", name="Bench User")
STATE_KEY = "oap-bench-state-encryption-key-0123456789"
PSK = "bench-pre-shared-key"
BACKEND_BODY = {"jsonrpc": "2.0", "id": 1, "result": {}}
REDIRECT_URI = "http://127.0.0.1:33418/callback"  # the client's; never followed
STEPS = ("register", "authorize", "sign-in page", "sign-in post", "callback", "consent post", "token")
FIGURES = {
    "gateway": "CPU of the gateway's event-loop thread",
    "gateway others": "CPU of the gateway's other threads (SQLite connections, audit writer)",
    "emulator": "CPU of the Okta emulator's thread",
    "client": "CPU of the client's thread",
    "wall": "wall time",
}

T = TypeVar("T")


class BenchError(Exception):
    """A login did not go as a real one does: the figures would time something else."""


# ---------------------------------------------------------------- threads with their own event loop


class LoopThread(Generic[T]):
    """Runs `serve()` (an async context manager) in a thread of its own, on a uvloop loop, until `stop()`."""

    def __init__(self, name: str, serve: Callable[[], AbstractAsyncContextManager[T]]) -> None:
        self._serve = serve
        self._ready = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> T:
        self.thread.start()
        if not self._ready.wait(STARTUP_SECONDS):
            raise BenchError(f"{self.thread.name} did not start within {STARTUP_SECONDS:.0f} s")
        if self._error is not None or self._value is None:
            raise BenchError(f"{self.thread.name} failed to start: {self._error!r}") from self._error
        return self._value

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(STARTUP_SECONDS)

    def cpu_seconds(self) -> float:
        """This thread's CPU time so far (its pthread's CPU clock, read from any thread)."""
        assert self.thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def _run(self) -> None:
        self._loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with self._serve() as value:
                self._value = value
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._ready.set()


# ---------------------------------------------------------------- the emulator (and the backend) and the gateway


@dataclass(frozen=True)
class EmulatorFacts:
    org: str
    backend_url: str


def emulator(callback_url: str) -> Callable[[], AbstractAsyncContextManager[EmulatorFacts]]:
    """The Okta emulator with the gateway's app, and the backend the gateway forwards `/mcp` to."""

    @asynccontextmanager
    async def serve() -> AsyncIterator[EmulatorFacts]:
        app = App(
            GATEWAY_APP.client_id,
            GATEWAY_APP.name,
            client_secret=GATEWAY_APP.client_secret,
            redirect_uris=(callback_url,),
        )

        async def answer(request: web.Request) -> web.Response:
            if request.headers.get("X-API-Key") != PSK or "Authorization" in request.headers:
                return web.json_response({"bench": "wrong credential reached the backend"}, status=403)
            return web.json_response(BACKEND_BODY)

        backend = web.Application()
        backend.router.add_post("/mcp", answer)
        runner = web.AppRunner(backend, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with OktaEmulator(users=[USER], apps=[app]) as idp:
                yield EmulatorFacts(idp.base_url, f"http://{LOOPBACK}:{port}/mcp")
        finally:
            await runner.cleanup()

    return serve


def gateway_yaml(backend_url: str) -> str:
    return f"""backends:
  bench:
    url: {backend_url}
    paths: [/mcp]
    auth_method: pre-shared-key
    auth_config:
      key: {PSK}
      header_name: X-API-Key
agents:
  bench-agent:
    client_id: 0oabenchagent0000001
    backend_access: [bench]
front_door:
  default_agent: bench-agent
"""


def gateway(
    sock: socket.socket, org: str, backend_url: str, workdir: Path
) -> Callable[[], AbstractAsyncContextManager[str]]:
    """The gateway as `serve` assembles it (see `app.run_until_stopped`), on `sock`; yields its base URL."""

    @asynccontextmanager
    async def serve() -> AsyncIterator[str]:
        port: int = sock.getsockname()[1]
        base_url = f"http://{LOOPBACK}:{port}"
        database_url = f"sqlite:///{workdir / 'gateway.db'}"
        config = workdir / "gateway.yaml"
        config.write_text(gateway_yaml(backend_url))
        settings = {
            "FRONT_DOOR": "on",
            "OKTA_DOMAIN": org,
            "OKTA_CLIENT_ID": GATEWAY_APP.client_id,
            "OKTA_CLIENT_SECRET": GATEWAY_APP.client_secret,
            "STATE_ENCRYPTION_KEY": STATE_KEY,
            "GATEWAY_BASE_URL": base_url,
            "GATEWAY_PORT": port,
            "DATABASE_URL": database_url,
            "DATA_DIR": str(workdir / "data"),
            "LOG_LEVEL": "INFO",
        }
        loaded = load(config, environ={}, env_file=None, overrides=settings)
        await migrate(database_url)
        store = await open_store(database_url)
        try:
            writer = store.writer(loaded.config.audit) if loaded.settings.AUDIT_ENABLED else None
            if writer is not None:
                await writer.start()
            runner = GatewayRunner(
                build_app(loaded, store=store, audit=writer),
                limits=ConnectionLimits.from_settings(loaded.settings),
                events=server_events(),
                handle_signals=False,
                access_log=None,
                handler_cancellation=True,
                shutdown_timeout=1.0,
            )
            await runner.setup()
            try:
                await web.SockSite(runner, sock).start()
                yield base_url
            finally:
                await runner.cleanup()
        finally:
            await store.close()

    return serve


# ---------------------------------------------------------------- the client: one person's login, hop by hop


class Form(HTMLParser):
    """A page's one form: its action, method, fields and submit buttons."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms = 0
        self.action = ""
        self.method = ""
        self.fields: dict[str, str] = {}
        self.buttons: list[tuple[str, str]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.forms += 1
            self.action, self.method = attributes.get("action") or "", (attributes.get("method") or "get").lower()
        elif tag == "input" and attributes.get("name") and attributes.get("type") != "submit":
            self.fields[str(attributes["name"])] = attributes.get("value") or ""
        elif tag in ("button", "input") and attributes.get("type", "submit") == "submit" and attributes.get("name"):
            self.buttons.append((str(attributes["name"]), attributes.get("value") or ""))


@dataclass
class Hop:
    status: int
    location: str
    text: str
    url: str

    def safe(self) -> tuple[int, str]:
        """The status and what may be printed of this answer: the redirect's path (its query may hold a code), or
        the page."""
        return self.status, urlsplit(self.location).path if self.location else self.text


@dataclass
class Clocks:
    """CPU seconds of each thread, per step (summed over the timed logins), and the wall time."""

    threads: Mapping[str, Callable[[], float]]
    steps: dict[str, dict[str, float]] = field(default_factory=dict)

    def read(self) -> dict[str, float]:
        return {name: clock() for name, clock in self.threads.items()} | {"wall": time.perf_counter()}

    def add(self, step: str, before: dict[str, float], after: dict[str, float]) -> None:
        totals = self.steps.setdefault(step, dict.fromkeys(after, 0.0))
        for name in after:
            totals[name] += after[name] - before[name]


class Person:
    """One login: a new browser (cookie jar) from its own loopback address; `clocks` is read around each step."""

    def __init__(self, base_url: str, org: str, address: str, clocks: Clocks | None) -> None:
        self.base_url = base_url
        self.org = org
        self.address = address
        self.clocks = clocks
        self._mark: dict[str, float] = {}

    def step_done(self, step: str) -> None:
        if self.clocks is not None:
            now = self.clocks.read()
            self.clocks.add(step, self._mark, now)
            self._mark = now

    async def login(self) -> str:
        """The whole flow; the access token the client gets."""
        connector = aiohttp.TCPConnector(local_addr=(self.address, 0))
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1, as a browser keeps them
        timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=jar, timeout=timeout) as http:
            if self.clocks is not None:
                self._mark = self.clocks.read()
            client_id = await self.register(http)
            verifier, state = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
            code = await self.authorize(http, client_id, verifier, state)
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "client_id": client_id,
                "code_verifier": verifier,
            }
            async with http.post(self.base_url + "/oauth/token", data=form) as response:
                tokens = await response.json(content_type=None)
                ok = response.status == 200 and "access_token" in tokens
                expect(ok, "token", response.status, "" if ok else str(tokens))
            self.step_done("token")
            return str(tokens["access_token"])

    async def register(self, http: aiohttp.ClientSession) -> str:
        body = {"client_name": "Bench client", "redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none"}
        async with http.post(self.base_url + "/oauth/register", json=body) as response:
            registered = await response.json(content_type=None)
            expect(response.status == 201, "register", response.status, str(registered))
        self.step_done("register")
        return str(registered["client_id"])

    async def authorize(self, http: aiohttp.ClientSession, client_id: str, verifier: str, state: str) -> str:
        """From the gateway's /oauth/authorize through Okta's sign-in and the consent page; the code."""
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
            "resource": self.base_url + "/mcp",
            "scope": "mcp:read",
        }
        hop = await get(http, str(yarl.URL(self.base_url + "/oauth/authorize").with_query(query)))
        expect(hop.status in (302, 303) and hop.location.startswith(self.org), "authorize", *hop.safe())
        self.step_done("authorize")
        hop = await follow(http, hop)  # to the emulator's sign-in page
        page = Form(hop.text)
        expect(hop.status == 200 and page.method == "post" and "password" in page.fields, "sign-in page", *hop.safe())
        self.step_done("sign-in page")
        form = {**page.fields, "username": USER.login, "password": str(USER.password)}
        hop = await post(http, urljoin(hop.url, page.action), form)
        expect(hop.status in (302, 303) and hop.location.startswith(self.base_url), "sign-in post", *hop.safe())
        self.step_done("sign-in post")
        hop = await follow(http, hop)  # the gateway's callback, then its consent page
        consent = Form(hop.text)
        expect(hop.status == 200 and ("decision", "approve") in consent.buttons, "callback", *hop.safe())
        self.step_done("callback")
        hop = await post(http, urljoin(hop.url, consent.action), {**consent.fields, "decision": "approve"})
        expect(hop.status in (302, 303) and hop.location.startswith(REDIRECT_URI), "consent", *hop.safe())
        params = {name: values[0] for name, values in parse_qs(urlsplit(hop.location).query).items()}
        expect(params.get("state") == state and "code" in params, "consent", hop.status, params.get("error", ""))
        self.step_done("consent post")
        return params["code"]


def expect(condition: bool, step: str, status: int, detail: str) -> None:
    """`detail`: what may be printed — an error page or an error code, never a code or a token."""
    if not condition:
        raise BenchError(f"the login failed at {step} ({status}): {detail[:500]}")


async def get(http: aiohttp.ClientSession, url: str) -> Hop:
    async with http.get(url, allow_redirects=False) as response:
        return Hop(response.status, response.headers.get("Location", ""), await response.text(), url)


async def post(http: aiohttp.ClientSession, url: str, form: Mapping[str, str]) -> Hop:
    async with http.post(url, data=dict(form), allow_redirects=False) as response:
        return Hop(response.status, response.headers.get("Location", ""), await response.text(), url)


async def follow(http: aiohttp.ClientSession, hop: Hop) -> Hop:
    """Follow redirects (at most MAX_HOPS) to a page."""
    for _ in range(MAX_HOPS):
        if hop.status not in (301, 302, 303, 307):
            return hop
        hop = await get(http, urljoin(hop.url, hop.location))
    raise BenchError(f"more than {MAX_HOPS} redirects from {hop.url}")


async def mcp_call(base_url: str, token: str) -> None:
    """One MCP request with the login's token: the backend's answer must come back through the gateway."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(base_url + "/mcp", json=message, headers=headers) as response,
    ):
        text = await response.text()
    if response.status != 200 or json.loads(text) != BACKEND_BODY:
        raise BenchError(f"the login's token did not reach the backend: {response.status} {text[:300]}")


def address(index: int) -> str:
    """A loopback address of its own for the `index`-th login (Linux routes all of 127/8 to `lo`)."""
    return f"127.0.{1 + index // 250}.{2 + index % 250}"


# ---------------------------------------------------------------- the run


async def logins(base_url: str, org: str, count: int, warmup: int, rounds: list[Clocks]) -> None:
    """`warmup` logins, then `count` logins timed by each of `rounds`; the first and the last token checked."""
    token = ""
    for index in range(warmup):
        token = await Person(base_url, org, address(index), None).login()
        if index == 0:
            await mcp_call(base_url, token)
    index = warmup
    for clocks in rounds:
        for _ in range(count):
            token = await Person(base_url, org, address(index), clocks).login()
            index += 1
    await mcp_call(base_url, token)


def per_login(clocks: Clocks, count: int) -> dict[str, float]:
    """ms per login of each figure in FIGURES, over one round's logins."""
    totals = {name: sum(clocks.steps[step][name] for step in STEPS) for name in clocks.steps[STEPS[0]]}
    totals["gateway others"] = totals["process"] - totals["gateway"] - totals["emulator"] - totals["client"]
    return {name: totals[name] / count * 1000 for name in FIGURES}


def report(rounds: list[Clocks], count: int) -> None:
    print(f"ms per login, rounds of {count} logins ({', '.join(STEPS)}):")
    for name, label in FIGURES.items():
        print(f"  {name:14} {label}")
    print("  " + f"{'round':8}" + "".join(f"{name:>16}" for name in FIGURES))
    figures = [per_login(clocks, count) for clocks in rounds]
    for number, row in enumerate(figures, 1):
        print("  " + f"{number:<8}" + "".join(f"{row[name]:16.2f}" for name in FIGURES))
    print("  " + f"{'median':8}" + "".join(f"{statistics.median(r[name] for r in figures):16.2f}" for name in FIGURES))
    print(f"\nper step, ms per login over all {len(rounds) * count} logins (CPU: gateway event loop, emulator; wall):")
    print(f"  {'step':14} {'gateway':>8} {'emulator':>9} {'wall':>8}")
    logins = len(rounds) * count
    for step in STEPS:
        spent = {
            name: sum(clocks.steps[step][name] for clocks in rounds) / logins * 1000
            for name in ("gateway", "emulator", "wall")
        }
        print(f"  {step:14} {spent['gateway']:8.2f} {spent['emulator']:9.2f} {spent['wall']:8.2f}")


def bound_socket() -> socket.socket:
    """A socket bound to a free loopback port: the gateway's, known before the emulator (its redirect URI) starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


def run(count: int, warmup: int, rounds: int, workdir: Path) -> None:
    sock = bound_socket()
    port: int = sock.getsockname()[1]
    emulator_thread = LoopThread("emulator", emulator(f"http://{LOOPBACK}:{port}/oauth/callback"))
    facts = emulator_thread.start()
    try:
        gateway_thread = LoopThread("gateway", gateway(sock, facts.org, facts.backend_url, workdir))
        base_url = gateway_thread.start()
        try:
            tune_gc_for_serving()  # as serve does, once started (process-wide)
            threads = {
                "gateway": gateway_thread.cpu_seconds,
                "emulator": emulator_thread.cpu_seconds,
                "client": time.thread_time,
                "process": time.process_time,
            }
            timed = [Clocks(threads) for _ in range(rounds)]
            uvloop.run(logins(base_url, facts.org, count, warmup, timed))
        finally:
            gateway_thread.stop()
    finally:
        emulator_thread.stop()
        sock.close()
    report(timed, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=50, help="timed logins (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="logins before the timing (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --logins logins (default 3)")
    options = parser.parse_args(argv)
    if not 1 <= options.logins <= 2000 or not 1 <= options.warmup <= 100 or not 1 <= options.rounds <= 10:
        parser.error("--logins: 1 to 2000; --warmup: 1 to 100; --rounds: 1 to 10")
    with tempfile.TemporaryDirectory(prefix="oap-front-door-login-") as tmp:
        workdir = Path(tmp)
        log = workdir / "gateway.log"
        with log.open("w") as lines:
            with contextlib.redirect_stderr(lines):
                configure("INFO")  # the production default; the log lines go to the file, kept open for the run
            try:
                run(options.logins, options.warmup, options.rounds, workdir)
            except BenchError:
                lines.flush()
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(1)
