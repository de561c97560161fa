"""Gateway replicas behind a load balancer, started from the example configs a user copies (`deploy/`, issue 13).

`replicated_gateway(kind, config, settings=…)` — async context manager, in the running event loop:
- skips unless `kind` (`nginx` or `haproxy`), PostgreSQL (`OAP_TEST_POSTGRES_URL`) and Redis (`OAP_TEST_REDIS_URL`,
  default redis://127.0.0.1:6379/0) are there; under `OAP_REQUIRE_SERVICES=1` a missing one fails the test instead
  (`scripts/install-system-tools` installs nginx and HAProxy);
- starts `REPLICAS` gateways, each `okta-agent-proxy serve` (`gateway_process`), at once, with the same YAML, the same
  `SESSION_SECRET`, one scratch PostgreSQL database for the audit (created, and dropped afterwards, by
  `postgres_database`), `REDIS_URL`, and `GATEWAY_BASE_URL` = `PUBLIC_URL` — the load balancer's public URL, as a
  user sets it. Each replica keeps its own `DATA_DIR`, so only the secret lets them open each other's session ids;
- renders `deploy/nginx-replicas.conf` or `deploy/haproxy-replicas.cfg` (`render`: only the four loopback addresses
  change — the files keep no other path that needs one: nginx runs with `-p <temp dir>`, and every path in it is
  relative to that prefix) and starts the balancer on a free loopback port in front of them; ready once `/readyz`
  answers through it, and for HAProxy once its own health check on `/readyz` has passed for every replica.
The replicas start in worker threads, so the event loop (an in-process IdP serving their JWKS fetch, say) keeps
running. Every process is stopped on exit, then the database is dropped.

Clients reach `ReplicatedGateway.url(path)` and send `Host: PUBLIC_HOST` (`ReplicatedGateway.headers`), as a client
of `PUBLIC_URL` would; `audit_rows()` reads what the replicas wrote, each row naming the `replica` (host:pid) that
served it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from okta_agent_proxy.store.db import async_database_url
from okta_agent_proxy.store.models import audit_events

from .gateway import ConfigInput, gateway_process
from .node_tools import REPO_ROOT, services_required
from .processes import LOOPBACK, ServerProcess, start_server
from .stacks import postgres_database

__all__ = [
    "BALANCERS",
    "PUBLIC_HOST",
    "PUBLIC_URL",
    "REDIS_URL",
    "REPLICAS",
    "SESSION_SECRET",
    "ReplicatedGateway",
    "gateway_replicas",
    "load_balancer",
    "render",
    "replicated_gateway",
    "require_balancer",
    "require_redis",
]

BALANCERS = ("nginx", "haproxy")
DEPLOY_FILES = {
    "nginx": REPO_ROOT / "deploy" / "nginx-replicas.conf",
    "haproxy": REPO_ROOT / "deploy" / "haproxy-replicas.cfg",
}
REPLICAS = 3
# The addresses the deploy files name: the balancer's, then the replicas' (`serve --port 8081` …).
LISTEN_PORT, REPLICA_PORTS = 8080, (8081, 8082, 8083)
_ADDRESS = re.compile(r"\b127\.0\.0\.1:(808[0-3])\b")
PUBLIC_HOST = "mcp.example.test"  # a name the gateway only knows from GATEWAY_BASE_URL: `Host` must arrive intact
PUBLIC_URL = f"http://{PUBLIC_HOST}"
SESSION_SECRET = "replicas-test-session-secret-0123456789abcdef"
REDIS_URL = os.environ.get("OAP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_INSTALL_HINT = "run scripts/install-system-tools"


def _unavailable(reason: str) -> NoReturn:
    if services_required():
        pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def require_balancer(kind: str) -> str:
    """The path of `nginx` or `haproxy` (also looked for in /usr/sbin, which a non-root PATH may lack)."""
    found = shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        _unavailable(f"{kind} is not installed; {_INSTALL_HINT}")
    return found


def require_redis(url: str = REDIS_URL) -> str:
    """`url` when a Redis server answers there (any reply to PING counts: a password it asks for is the gateway's
    business), else skip (fail under OAP_REQUIRE_SERVICES=1)."""
    parts = urlsplit(url)
    address = (parts.hostname or LOOPBACK, parts.port or 6379)
    try:
        with socket.create_connection(address, timeout=2.0) as sock:
            sock.settimeout(2.0)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        reply, why = b"", type(exc).__name__
    else:
        why = f"reply {reply[:20]!r}"
    if not reply.startswith((b"+", b"-")):
        _unavailable(f"Redis at {address[0]}:{address[1]} does not answer ({why})")
    return url


def render(kind: str, listen_port: int, replica_ports: Sequence[int]) -> str:
    """The deploy file for `kind` with its loopback addresses moved to these ports. Each address must occur once,
    so a change to the file's shape shows here rather than as a balancer quietly sending to port 8081."""
    ports = dict(zip((LISTEN_PORT, *REPLICA_PORTS), (listen_port, *replica_ports), strict=True))
    text = DEPLOY_FILES[kind].read_text(encoding="utf-8")
    found = [int(port) for port in _ADDRESS.findall(text)]
    if sorted(found) != sorted(ports):
        raise ValueError(f"{DEPLOY_FILES[kind].name}: expected each of {sorted(ports)} once, found {found}")
    return _ADDRESS.sub(lambda match: f"{LOOPBACK}:{ports[int(match.group(1))]}", text)


@contextmanager
def load_balancer(kind: str, replica_ports: Sequence[int]) -> Iterator[ServerProcess]:
    """`kind` running the rendered deploy file on a free loopback port, ready once `/readyz` answers 200 through it."""
    executable = require_balancer(kind)
    with tempfile.TemporaryDirectory(prefix=f"oap-{kind}-") as tmp:
        prefix = Path(tmp)
        prefix.chmod(0o755)  # started as root, nginx's workers run as an unprivileged user and use this directory
        conf = prefix / DEPLOY_FILES[kind].name

        def command(port: int) -> list[str]:
            conf.write_text(render(kind, port, replica_ports), encoding="utf-8")
            if kind == "haproxy":
                return [executable, "-db", "-f", str(conf)]
            # In the foreground, its errors also on stderr (into the process's log); -e: the log used before the
            # config is read (else the built-in /var/log/nginx/error.log).
            flags = "daemon off; error_log stderr warn;"
            return [executable, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "startup.log"), "-g", flags]

        with start_server(command, http_path="/readyz", expect_status=200, timeout=15.0, name=kind) as balancer:
            if kind == "haproxy":
                wait_for_health_checks(balancer, len(replica_ports))
            yield balancer


_CHECK_RESULT = re.compile(r"Health check for server \S+/(\S+) (succeeded|failed)")


def wait_for_health_checks(haproxy: ServerProcess, count: int, timeout: float = 10.0) -> None:
    """Wait (bounded) until HAProxy has logged the first /readyz check of each of its `count` servers (the deploy
    file's `option log-health-checks`), and fail unless all passed: HAProxy takes its servers as up until a check
    says otherwise, so a check the gateway refuses would only show seconds into a test."""
    deadline = time.monotonic() + timeout
    results: dict[str, str] = {}
    while len(results) < count and haproxy.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        results = dict(_CHECK_RESULT.findall(haproxy.output()))
    if len(results) < count or set(results.values()) != {"succeeded"}:
        raise AssertionError(f"HAProxy's health checks on /readyz: {results or 'none logged'}\n{haproxy.describe()}")


@contextmanager
def gateway_replicas(
    config: ConfigInput, *, settings: Mapping[str, Any], count: int = REPLICAS
) -> Iterator[list[ServerProcess]]:
    """`count` gateway processes with the same YAML and settings, started at once (they also migrate the database
    at once, as replicas do). If one fails to start, those that did are stopped."""
    with ExitStack() as stack:
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [
                pool.submit(stack.enter_context, gateway_process(config, settings=settings)) for _ in range(count)
            ]
        yield [future.result() for future in futures]


@dataclass(frozen=True)
class ReplicatedGateway:
    """The balancer in front of the replicas, all sharing `database_url`."""

    kind: str
    balancer: ServerProcess
    replicas: list[ServerProcess]
    database_url: str

    def url(self, path: str = "") -> str:
        return self.balancer.url(path)

    @property
    def headers(self) -> dict[str, str]:
        """What a client of `PUBLIC_URL` sends that a client of the loopback address would not."""
        return {"Host": PUBLIC_HOST}

    async def audit_rows(self) -> list[dict[str, Any]]:
        """Every audit row the replicas have written so far, oldest request first."""
        engine = create_async_engine(async_database_url(self.database_url))
        try:
            async with engine.connect() as connection:
                result = await connection.execute(select(audit_events).order_by(audit_events.c.time, audit_events.c.id))
                return [dict(row) for row in result.mappings()]
        finally:
            await engine.dispose()

    def describe(self) -> str:
        """The output of every process, for assertion messages."""
        return "\n\n".join(process.describe() for process in (self.balancer, *self.replicas))


@asynccontextmanager
async def replicated_gateway(
    kind: str, config: ConfigInput, *, settings: Mapping[str, Any] | None = None, count: int = REPLICAS
) -> AsyncIterator[ReplicatedGateway]:
    """See the module docstring. `settings` are added to (or override) the replicas' shared environment."""
    require_balancer(kind)
    redis_url = require_redis()
    async with postgres_database() as database:
        values = {
            "DATABASE_URL": database,
            "REDIS_URL": redis_url,
            "SESSION_SECRET": SESSION_SECRET,
            "GATEWAY_BASE_URL": PUBLIC_URL,
            **(settings or {}),
        }
        stack = ExitStack()
        try:
            replicas = await asyncio.to_thread(
                stack.enter_context, gateway_replicas(config, settings=values, count=count)
            )
            balancer = await asyncio.to_thread(
                stack.enter_context, load_balancer(kind, [replica.port for replica in replicas])
            )
            yield ReplicatedGateway(kind, balancer, replicas, database)
        finally:
            await asyncio.to_thread(stack.close)
