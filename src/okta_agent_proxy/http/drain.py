"""Graceful drain on SIGTERM (DESIGN.md §9, "Graceful drain"): deploys that do not cut streams in half.

From the signal on, in this order:
1. **At once**: `/readyz` answers 503 `{"status": "draining"}`, so load balancers stop sending new traffic (`/healthz`
   stays 200: the process is alive). Everything else is served as before, new connections included, but every
   response says `Connection: close`, so a client takes its next request elsewhere.
2. **After `SHUTDOWN_DRAIN_SECONDS`** (the drain window, 5 s by default): the listening sockets close — a new
   connection is refused (ECONNREFUSED) — and idle connections are closed.
3. **The grace**, `SHUTDOWN_GRACE_SECONDS` (30 s by default) from the end of the drain window: requests and streams
   in flight finish by themselves; each connection closes after its response.
4. **At the end of the grace**, each request still in flight is cancelled with `SHUTDOWN_MESSAGE`. The forwarder
   (`mcp/forward.py`) tells that cancellation from aiohttp's own (a client that left): an SSE stream gets an
   `event: error` (`gateway_shutdown`) and the end of its body — a clean end, where a client would see a reset; a
   JSON body already under way is cut (it cannot end cleanly); a request not answered yet — waiting for its backend,
   its body still arriving, an Okta exchange under way — gets 503 `gateway_shutdown` (`Pipeline.handle`). Each is
   audited, outcome `gateway_shutdown`, even when its client does not read that end. They get `CLOSING_SECONDS` to
   send it.
5. The server's clean-up (anything still running is cancelled then), and last — the caller's part — the audit
   queue is flushed (`Store.close`).

So the grace starts where the drain window ends, and a stop takes at most drain + grace + 2 × `CLOSING_SECONDS`,
plus the audit flush (well under a second with the database up; `Store.close` gives up after 30 s without it):
`stop_budget` is that bound. SIGINT (Ctrl-C) stops the same way without the drain window: no load balancer sends
traffic to a gateway stopped by hand. Signals after the first change nothing.

Why cancel with a message: streams pay nothing for it (no check per chunk relayed; the connection guard finds the
requests in flight, `http/server.py`), and Python ≥ 3.11 carries the message on the `CancelledError`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from okta_agent_proxy.errors import GatewayShuttingDown
from okta_agent_proxy.observability.logging import get_logger

if TYPE_CHECKING:  # the forwarder imports this module for `is_shutdown`: it needs nothing of the server
    from okta_agent_proxy.http.server import GatewayRunner

__all__ = [
    "CLOSING_SECONDS",
    "SHUTDOWN",
    "SHUTDOWN_MESSAGE",
    "Drain",
    "DrainReport",
    "GatewayShuttingDown",
    "ended_by_shutdown",
    "is_shutdown",
    "only_cancellation",
    "stop_budget",
]

log = get_logger(__name__)
SHUTDOWN = GatewayShuttingDown.code  # the outcome code of a request the drain ended, and its SSE error event's code
SHUTDOWN_MESSAGE = "okta-agent-proxy: " + SHUTDOWN  # the message of the drain's cancellation (and only of it)
CLOSING_SECONDS = 1.0  # for the requests cancelled at the grace's end to send their last bytes (and as much again
# for the server's clean-up to cancel what is left)
AUDIT_FLUSH_SECONDS = 30.0  # `Store.close`'s budget for the audit queue, with the database unreachable
STOP_MARGIN_SECONDS = 5.0  # start-up of the clean-up, logs, process exit


def is_shutdown(cancelled: asyncio.CancelledError) -> bool:
    """Whether `cancelled` is the drain's cancellation (aiohttp's, when a client goes away, carries no message)."""
    return cancelled.args == (SHUTDOWN_MESSAGE,)


def ended_by_shutdown(cancelled: asyncio.CancelledError) -> bool:
    """Whether `cancelled` is the drain's and nothing else cancelled the task too (its client leaving in the same
    instant, say); if so the task is uncancelled and the caller ends its request itself (the module docstring, step
    4). Otherwise the task is left as it is, for the cancellation to go on."""
    return is_shutdown(cancelled) and only_cancellation()


def only_cancellation() -> bool:
    """Whether the current task was cancelled exactly once; if so, uncancelled (its caller has dealt with it)."""
    task = asyncio.current_task()
    if task is None or task.cancelling() != 1:
        return False
    task.uncancel()
    return True


def stop_budget(drain_seconds: float, grace_seconds: float) -> float:
    """The longest a serving process may take to stop after the signal (see the module docstring); a supervisor (the
    `--workers` parent, Kubernetes' `terminationGracePeriodSeconds`) should wait that long before SIGKILL."""
    return drain_seconds + grace_seconds + 2 * CLOSING_SECONDS + AUDIT_FLUSH_SECONDS + STOP_MARGIN_SECONDS


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What a drain did, for the `gateway_stopped` log line."""

    in_flight: int  # requests in flight at the end of the drain window
    cut: int  # of those, still in flight at the end of the grace (ended by the drain)
    seconds: float  # from the signal to the end of the server's clean-up


class Drain:
    """The shutdown of one serving process: `begin` (from a signal handler) starts it, `run` carries it out."""

    def __init__(self, drain_seconds: float, grace_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.grace_seconds = grace_seconds
        self.window = drain_seconds  # the drain window of this stop: 0 after SIGINT
        self.draining = False  # read by /readyz
        self._signalled = asyncio.Event()
        self._reason = ""
        self._began_at = 0.0

    def begin(self, reason: str, *, window: bool = True) -> None:
        """Start draining (a second call changes nothing): `reason` for the log (the signal's name), `window`
        whether the drain window applies (SIGTERM) or not (SIGINT)."""
        if self.draining:
            return
        self.draining = True
        self._began_at = time.monotonic()
        self._reason = reason
        self.window = self.drain_seconds if window else 0.0
        self._signalled.set()

    async def requested(self) -> None:
        """Return once `begin` was called."""
        await self._signalled.wait()

    async def run(self, runner: GatewayRunner) -> DrainReport:
        """Steps 1-4 and the server's clean-up (module docstring), for `runner`; returns once it is done."""
        guard = runner.guard
        guard.drain()
        log.info(
            "gateway_draining",
            reason=self._reason,
            connections=guard.open_connections,
            in_flight=guard.in_flight,
            drain_seconds=self.window,
            grace_seconds=self.grace_seconds,
        )
        await asyncio.sleep(self.window)
        await runner.stop_listening()
        in_flight = await guard.close_idle()
        log.info("gateway_stopped_listening", in_flight=in_flight)
        cancelled: set[asyncio.Task[None]] = set()
        if not await guard.until_all_closed(self.grace_seconds):
            cancelled = guard.cancel_in_flight(SHUTDOWN_MESSAGE)
            log.info("gateway_grace_over", cut=len(cancelled))
            if cancelled:
                await asyncio.wait(cancelled, timeout=CLOSING_SECONDS)
        await runner.cleanup()
        # aiohttp's clean-up cancels what is still running without waiting for it: let each request's own clean-up
        # (its audit row) run before the audit queue is flushed.
        leftover = {task for task in cancelled if not task.done()}
        if leftover:
            await asyncio.wait(leftover, timeout=CLOSING_SECONDS)
        return DrainReport(in_flight, len(cancelled), time.monotonic() - self._began_at)
