"""`http/drain.py` in isolation: its settings, which cancellation is its own, when a drain begins, and the stop budget a
supervisor waits for. The drain itself, on a real `serve`, is tests/integration/test_drain.py."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.http.drain import SHUTDOWN_MESSAGE, Drain, is_shutdown, stop_budget


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
