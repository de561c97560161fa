"""`http/drain.py` in isolation: its settings, which cancellation is its own, when a drain begins, and the stop budget a
supervisor waits for. The drain itself, on a real `serve`, is tests/integration/test_drain.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from okta_agent_proxy.config.models import Backend, GatewayConfig
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.errors import GatewayShuttingDown
from okta_agent_proxy.http.drain import SHUTDOWN_MESSAGE, Drain, ended_by_shutdown, is_shutdown, stop_budget
from okta_agent_proxy.mcp.forward import Forwarder, UpstreamPool
from tests.support.gateway import psk_backend
from tests.support.loopback import serving


def test_the_drain_settings_default_to_5_and_30_seconds_and_refuse_a_negative_time() -> None:
    settings = Settings(_env_file=None)
    assert (settings.SHUTDOWN_DRAIN_SECONDS, settings.SHUTDOWN_GRACE_SECONDS) == (5.0, 30.0)
    assert Settings(_env_file=None, SHUTDOWN_DRAIN_SECONDS=0, SHUTDOWN_GRACE_SECONDS=0).SHUTDOWN_GRACE_SECONDS == 0
    with pytest.raises(ValidationError, match="SHUTDOWN_DRAIN_SECONDS"):
        Settings(_env_file=None, SHUTDOWN_DRAIN_SECONDS=-1)
    with pytest.raises(ValidationError, match="SHUTDOWN_GRACE_SECONDS"):
        Settings(_env_file=None, SHUTDOWN_GRACE_SECONDS=-0.5)


def test_only_the_drains_own_cancellation_is_taken_for_a_shutdown() -> None:
    assert is_shutdown(asyncio.CancelledError(SHUTDOWN_MESSAGE))
    assert not is_shutdown(asyncio.CancelledError())  # aiohttp's, when a client goes away
    assert not is_shutdown(asyncio.CancelledError("another message"))


async def test_a_drain_begins_once_sigterm_with_its_window_and_sigint_without() -> None:
    by_sigterm, by_sigint = Drain(5, 30), Drain(5, 30)
    assert not by_sigterm.draining
    by_sigterm.begin("SIGTERM")
    by_sigterm.begin("SIGINT", window=False)  # a later signal changes nothing
    by_sigint.begin("SIGINT", window=False)
    async with asyncio.timeout(1):
        await by_sigterm.requested()
        await by_sigint.requested()
    assert by_sigterm.draining and by_sigint.draining
    assert (by_sigterm.window, by_sigint.window) == (5, 0)


def test_the_stop_budget_covers_drain_grace_closing_and_the_audit_flush() -> None:
    assert stop_budget(5, 30) >= 5 + 30 + 30  # the audit flush may take 30 s with the database unreachable
    assert stop_budget(5, 30) - stop_budget(0, 0) == 35


# --- the drain's cancellation, told from any other even when both arrive together ----------------------------------


@asynccontextmanager
async def silent_backend() -> AsyncIterator[tuple[Forwarder, Backend, str]]:
    """A loopback backend that never answers, and a forwarder with its pool: (forwarder, backend, its URL)."""

    async def never(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/mcp", never)
    async with serving(app, handler_cancellation=True) as url:
        config = GatewayConfig.model_validate({"backends": {"silent": psk_backend(f"{url}/mcp", "/silent")}})
        pool = UpstreamPool(config.backends, call_connections=4)
        await pool.start()
        try:
            yield Forwarder(pool), config.backends["silent"], f"{url}/mcp"
        finally:
            await pool.close()


async def waiting_for_the_backend(*cancels: str | None) -> tuple[BaseException | None, int]:
    """Cancel a request waiting for its backend's headers with these messages, in one turn of the loop: what it
    raised, and the task's count of cancellations still pending then (what the pipeline above it would see)."""
    async with silent_backend() as (forwarder, backend, url):
        started = asyncio.Event()
        pending = -1

        async def call() -> None:
            nonlocal pending
            started.set()
            try:
                await forwarder.open("silent", backend, "POST", url, CIMultiDict(), b"{}")
            finally:
                task = asyncio.current_task()
                assert task is not None
                pending = task.cancelling()

        task = asyncio.create_task(call())
        await started.wait()
        await asyncio.sleep(0.2)  # the request is on the wire, its headers awaited
        for message in cancels:
            task.cancel(message)
        try:
            await asyncio.wait_for(task, 5)
        except BaseException as exc:
            return exc, pending
        return None, pending


async def test_the_drains_cancellation_alone_is_a_503_and_with_a_clients_it_stays_a_cancellation() -> None:
    alone, pending = await waiting_for_the_backend(SHUTDOWN_MESSAGE)
    assert isinstance(alone, GatewayShuttingDown) and pending == 0
    # The client left in the same instant (aiohttp cancels without a message): the request stays cancelled — both
    # cancellations pending, so that no step above takes the drain's for its own and answers — whichever came first.
    for both in ((SHUTDOWN_MESSAGE, None), (None, SHUTDOWN_MESSAGE)):
        raised, pending = await waiting_for_the_backend(*both)
        assert isinstance(raised, asyncio.CancelledError) and pending == 2, (both, raised, pending)


async def test_ended_by_shutdown_uncancels_only_a_task_cancelled_once_by_the_drain() -> None:
    results: list[tuple[bool, int]] = []

    async def victim(*cancels: str | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        for message in cancels:
            task.cancel(message)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError as exc:
            results.append((ended_by_shutdown(exc), task.cancelling()))

    await asyncio.create_task(victim(SHUTDOWN_MESSAGE))
    await asyncio.create_task(victim(SHUTDOWN_MESSAGE, None))
    await asyncio.create_task(victim(None, SHUTDOWN_MESSAGE))  # the exception carries the drain's message
    await asyncio.create_task(victim(None))
    assert results == [(True, 0), (False, 2), (False, 2), (False, 1)]
