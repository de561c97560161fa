"""What the Cross App Access targets are checked with: the gateway's credential counters, the IdP's, and Redis.

The `redis` part measures a gateway whose backend credential is an `okta-cross-app` token (ID-JAG from the devkit
Okta emulator, then an access token from the backend's authorization server), with and without `REDIS_URL`. The
figure means something only if, after the warm-up, every request is a cache hit: so around every run the gateway's
`oap_backend_credentials_total{result="cache_hit"|"cache_miss"}` are read from its /metrics (a miss during a run
stops the bench), and at the end the emulator's own counters (`GET /bench/xaa-counts` of `bench/idp.py`) must show
at most one exchange per gateway process and no refusal. Redis is spoken to over a plain socket (`PING`, `INFO
stats`), so the bench needs no client library: whether the server is there, and how many commands it processed
during a run (all its clients' — another suite using the same server adds to it).
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from collections.abc import Sequence
from typing import Protocol

from processes import BenchError, http
from wrk_runner import Run

CREDENTIALS_METRIC = "oap_backend_credentials_total{"
REDIS_TIMEOUT_SECONDS = 2.0


def credential_counts(metrics_url: str) -> tuple[int, int] | None:
    """(cache hits, cache misses) the gateway has counted since it started; None if it does not count them."""
    status, text = http("GET", metrics_url)
    if status != 200:
        raise BenchError(f"{metrics_url} answered {status}")
    hits = misses = 0
    found = False
    for line in text.splitlines():
        if not line.startswith(CREDENTIALS_METRIC):
            continue
        found = True
        value = int(float(line.rsplit(" ", 1)[1]))
        if 'result="cache_hit"' in line:
            hits += value
        elif 'result="cache_miss"' in line:
            misses += value
    return (hits, misses) if found else None


def idp_counts(counts_url: str) -> dict[str, int]:
    """The emulator's Cross App Access counters: ID-JAGs issued, access tokens redeemed, refusals."""
    status, text = http("GET", counts_url)
    if status != 200:
        raise BenchError(f"the IdP's counters at {counts_url} answered {status}: {text[:200]!r}")
    counts: dict[str, int] = json.loads(text)
    return counts


class CrossAppTarget(Protocol):
    name: str
    redis_url: str | None
    runs: list[Run]


def check_exchanges(before: dict[str, int], after: dict[str, int], targets: Sequence[CrossAppTarget]) -> list[str]:
    """The IdP's counters after the probes (`before`) and after the rounds: each gateway process exchanged at most
    once, on its first request, none during the load, nothing was refused. Returns the lines for the report."""
    if after["failures"]:
        raise BenchError(f"the IdP refused {after['failures']} token requests of the cross-app gateways: {after}")
    if not 1 <= after["id_jag_exchanges"] <= len(targets) or after["jwt_bearer_grants"] > len(targets):
        raise BenchError(
            f"{after['id_jag_exchanges']} ID-JAG exchanges for {len(targets)} cross-app gateway processes: expected "
            "one per process at most (a shared cache may make it fewer), and at least one"
        )
    if after != before:
        raise BenchError(f"the IdP was asked for credentials during the load ({before} -> {after}): cache misses")
    served = sum(run.requests for target in targets for run in target.runs)
    hits = sum(run.credential_hits or 0 for target in targets for run in target.runs)
    lines = [
        f"cross-app: the IdP issued {after['id_jag_exchanges']} ID-JAGs and {after['jwt_bearer_grants']} access "
        f"tokens for {len(targets)} gateway processes, all on their first request (the probe); none during the "
        f"load: {served} requests served, {hits} credential cache hits, no miss"
    ]
    for target in targets:
        counted = [run.redis_commands for run in target.runs if run.redis_commands is not None]
        requests = sum(run.requests for run in target.runs)
        if target.redis_url is not None and counted and requests:
            lines.append(
                f"{target.name}: the Redis server processed {sum(counted)} commands during its runs "
                f"({sum(counted) / requests:.2f} per request; the server's count, from all its clients)"
            )
    return lines


def _redis_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise BenchError(f"--redis-url {url!r}: expected redis://HOST:PORT/DB")
    return parts.hostname, parts.port or 6379


def _redis_command(url: str, command: str) -> bytes:
    """One inline command; the whole reply (a simple string, or a bulk string read to its announced length)."""
    with socket.create_connection(_redis_address(url), timeout=REDIS_TIMEOUT_SECONDS) as connection:
        connection.sendall(command.encode() + b"\r\n")
        reply = b""
        while b"\r\n" not in reply:
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
        if reply.startswith(b"$"):
            head, _, rest = reply.partition(b"\r\n")
            length = int(head[1:])
            while len(rest) < length:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest[:length]
        return reply


def redis_unusable(url: str) -> str | None:
    """Why the Redis server at `url` cannot be used (None: it answers PING)."""
    try:
        reply = _redis_command(url, "PING")
    except (OSError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None if reply.startswith(b"+PONG") else f"PING answered {reply[:100]!r}"


def redis_commands(url: str) -> int | None:
    """Commands the server has processed since it started (`INFO stats`), None when it cannot be read."""
    try:
        info = _redis_command(url, "INFO stats").decode(errors="replace")
    except (OSError, ValueError):
        return None
    for line in info.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    return None
