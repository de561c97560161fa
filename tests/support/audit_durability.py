"""Durability and throughput probe for the AuditWriter, run as its own process so that it can be signalled.

    python -m tests.support.audit_durability DATABASE_URL [--events N] [--rate R] [--max-delay S] [--exit-when-done]

Records events `probe-000000`, `probe-000001`, … into a migrated store, `--rate` per second (0: as fast as the
writer takes them, with `when_full: block`), and prints one JSON line per status on stdout:
- `{"recorded": n, "written": w, "depth": d}` every 20 ms while recording (the last one seen before a `kill -9`
  bounds what the process had accepted);
- `{"done": n}` once N events are recorded (N = 0 records until stopped);
- `{"closed": true, "written": w, "dropped": x, "failed": f, "seconds": t, "rows_per_s": r, "batches": b,
  "loop_cpu_us_per_row": c}` after SIGTERM (or at once with `--exit-when-done`): `close()` has flushed the queue.
`loop_cpu_us_per_row` is the CPU time of the event-loop thread (recording, batching, building INSERTs) per row
written — what audit costs the gateway's own thread; the driver's thread (aiosqlite) is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from datetime import UTC, datetime

from okta_agent_proxy.config.models import AuditConfig
from okta_agent_proxy.store.audit import AuditWriter
from okta_agent_proxy.store.db import open_store
from okta_agent_proxy.store.events import AuditEvent

STATUS_INTERVAL = 0.02


def probe_event(index: int) -> AuditEvent:
    """A realistic row: every field set, as a successful tools/call through a Cross App Access backend."""
    return AuditEvent(
        time=datetime.now(UTC),
        request_id=f"probe-{index:06d}",
        replica="probe",
        http_method="POST",
        path="/employees/mcp",
        status=200,
        outcome="ok",
        latency_ms=12.5,
        headers_ms=3.25,
        backend="employees",
        user_sub="ada@example.com",
        user_uid="00uada0000000000001x",
        token_jti="AT.probe-jti",
        agent="cursor",
        client_id="0oacursor00000000001",
        mcp_method="tools/call",
        mcp_name="lookup_employee",
        jsonrpc_id=str(index),
        credential_method="okta-cross-app",
        credential_cache_hit=index % 10 != 0,
        id_jag_jti=None if index % 10 else "idjag-probe",
        upstream_status=200,
        bytes_in=180,
        bytes_out=640,
    )


def _emit(data: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _report(writer: AuditWriter, recorded: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        _emit({"recorded": recorded[0], "written": writer.written, "depth": writer.queue_depth})
        try:
            async with asyncio.timeout(STATUS_INTERVAL):
                await stop.wait()
        except TimeoutError:
            pass


async def _record(writer: AuditWriter, events: int, rate: float, recorded: list[int], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    index = 0
    while (events == 0 or index < events) and not stop.is_set():
        await writer.record(probe_event(index))
        index += 1
        recorded[0] = index
        if rate > 0:
            delay = started + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elif index % 100 == 0:
            await asyncio.sleep(0)  # let the writer run, as a server's other requests would
    _emit({"done": index})


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database_url")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--max-batch", type=int, default=500)
    parser.add_argument("--max-delay", type=float, default=0.2)
    parser.add_argument("--queue-size", type=int, default=10_000)
    parser.add_argument("--exit-when-done", action="store_true")
    args = parser.parse_args(argv)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    store = await open_store(args.database_url)
    config = AuditConfig(queue_size=args.queue_size, when_full="block")
    writer = store.writer(config, max_batch=args.max_batch, max_delay=args.max_delay)
    await writer.start()
    recorded = [0]
    cpu, wall = time.thread_time(), time.perf_counter()
    reporter = asyncio.create_task(_report(writer, recorded, stop))
    await _record(writer, args.events, args.rate, recorded, stop)
    if not args.exit_when_done:
        await stop.wait()
    stop.set()
    await reporter
    await store.close()
    seconds = time.perf_counter() - wall
    written = max(writer.written, 1)
    _emit(
        {
            "closed": True,
            "written": writer.written,
            "dropped": writer.dropped,
            "failed": writer.failed,
            "batches": writer.batches,
            "seconds": round(seconds, 3),
            "rows_per_s": round(writer.written / seconds),
            "loop_cpu_us_per_row": round((time.thread_time() - cpu) / written * 1e6, 1),
        }
    )


if __name__ == "__main__":
    asyncio.run(main())
