"""Each process publishes its own audit queue's gauges every AUDIT_GAUGE_SECONDS, not only when it serves a scrape:
under `--workers` a scrape sums every worker's last published values (prometheus multiprocess `livesum`)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import cast

from prometheus_client import REGISTRY

from okta_agent_proxy.app import keep_publishing_audit_gauges
from okta_agent_proxy.store.audit import AuditWriter


@dataclass
class Queue:
    """What the publisher reads of an audit writer (the writer itself is tested in tests/integration)."""

    queue_depth: int
    dropped: int


async def test_the_gauges_follow_the_queue_without_a_scrape() -> None:
    queue = Queue(queue_depth=7, dropped=3)
    task = asyncio.ensure_future(keep_publishing_audit_gauges(cast(AuditWriter, queue), every=0.01))
    try:
        await asyncio.sleep(0.05)
        assert REGISTRY.get_sample_value("oap_audit_queue_depth") == 7
        assert REGISTRY.get_sample_value("oap_audit_dropped_events") == 3
        queue.queue_depth, queue.dropped = 0, 5
        await asyncio.sleep(0.05)
        assert REGISTRY.get_sample_value("oap_audit_queue_depth") == 0
        assert REGISTRY.get_sample_value("oap_audit_dropped_events") == 5
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
