"""The log output: lines batched per event-loop iteration, in order; exceptions logged by type and stack only."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator

import pytest
import structlog

from okta_agent_proxy.observability.log_stream import LineWriter
from okta_agent_proxy.observability.logging import configure, get_logger
from okta_agent_proxy.observability.request_line import RequestLine, log_info


class CountingStream(io.StringIO):
    """A text stream that counts the `write` calls it gets (each would be a system call on a real stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingStream]:
    stream = CountingStream()
    monkeypatch.setattr("sys.stderr", stream)
    configure("INFO", "json")
    structlog.configure(cache_logger_on_first_use=False)
    try:
        yield stream
    finally:
        structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_logged_in_one_loop_iteration_are_written_together_in_order_after_it(stderr: CountingStream) -> None:
    log = get_logger("test")

    async def burst() -> tuple[int, int]:
        for index in range(50):
            if index % 2:
                log.info("plain", index=index)  # structlog's own path
            else:
                log_info(log, "fast", {"index": index})  # the request line's path
        during = stderr.writes
        await asyncio.sleep(0)  # the loop's next iteration
        await asyncio.sleep(0)
        return during, stderr.writes

    during, after = asyncio.run(burst())
    assert during == 0  # nothing written while the iteration runs…
    assert after == 1  # …then everything in one write
    assert [line["index"] for line in lines(stderr)] == list(range(50))


def test_lines_outside_a_loop_or_from_another_thread_are_written_at_once(stderr: CountingStream) -> None:
    log = get_logger("test")
    log.info("outside", n=1)
    assert stderr.writes == 1

    async def with_a_thread() -> int:
        log.info("in the loop", n=2)  # waits for the end of the iteration
        thread = threading.Thread(target=lambda: log.info("thread", n=3))
        thread.start()
        thread.join()
        return stderr.writes

    writes_after_thread = asyncio.run(with_a_thread())
    assert writes_after_thread == 2  # the thread's line went at once, with the loop's waiting line before it
    assert [line["n"] for line in lines(stderr)] == [1, 2, 3]


def test_whatever_waits_when_the_loop_ends_unexpectedly_is_written_by_the_next_line() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.call_soon(writer.msg, "first")  # schedules the write on this loop…
    loop.stop()
    loop.run_forever()  # runs `first`, then stops before the scheduled write
    loop.close()
    assert stream.getvalue() == ""
    writer.msg("second")  # no loop running: written at once, after what was waiting
    assert stream.getvalue() == "first\nsecond\n"


def test_a_logged_exception_shows_its_type_and_stack_but_not_its_message(stderr: CountingStream) -> None:
    secret = "psk-VERY-SECRET-value"

    def fail() -> None:
        raise ValueError(f"the backend refused key {secret}")

    try:
        fail()
    except ValueError:
        get_logger("test").exception("unhandled_error", request_id="r1")
    (line,) = lines(stderr)
    assert line["event"] == "unhandled_error" and line["level"] == "error"
    assert line["error"] == "ValueError"
    stack = line["stack"]
    assert isinstance(stack, list) and stack[-1].endswith(" fail") and "test_logging.py:" in stack[-1]
    assert "exc_info" not in line and "exception" not in line
    assert secret not in stderr.getvalue()


@pytest.mark.parametrize(
    "values",
    [
        ("0196c0ffee0000000000000000000001", "POST", "/mcp", "bench", None, 200, "ok", 2.3),
        ("r-2", "GET", "/employees/mcp", "employees", "cursor", 499, "client_closed", 12345.6),
        ("r-3", "DELETE", '/ünïcode/"quoted"\\', "b", "a", 404, "session_not_found", 0.0),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.sig", "POST", "/mcp", "bench", None, 401, "invalid_token", 1.5),
        ("r-5", "POST", "/mcp/Bearer abc.def", "bench", None, 200, "ok", 1.0),
        ("r-6", "POST", "/mcp", "bench", None, 200, "ok", float("nan")),
        ("r-7", "POST", "/x/basıc dG9rZW4", "bench", None, 200, "ok", 1.0),  # "ı" matches "i" case-insensitively
    ],
)
def test_the_request_line_is_the_line_log_info_writes(stderr: CountingStream, values: tuple[object, ...]) -> None:
    """`RequestLine` (the per-request fast path) and `log_info` write exactly what structlog's own path does,
    masking included."""
    log = get_logger("test")
    keys = ("request_id", "method", "path", "backend", "agent", "status", "outcome", "ms")
    line = RequestLine(log)
    line.write(*values)  # type: ignore[arg-type]
    line.write(*values)  # type: ignore[arg-type]  # the second time from what was remembered
    log_info(log, "request", dict(zip(keys, values, strict=True)))
    log.info("request", **dict(zip(keys, values, strict=True)))  # structlog's processors and renderer
    written = [line.rsplit('"timestamp"', 1)[0] for line in stderr.getvalue().splitlines()]
    assert len(written) == 4 and written[0] == written[1] == written[2] == written[3], written
    output = stderr.getvalue()
    assert "eyJzdWIiOiJ4In0" not in output and "Bearer abc" not in output and "dG9rZW4" not in output


def test_a_line_logged_while_a_write_is_under_way_goes_out_with_it() -> None:
    """A signal handler or a garbage-collector callback may log while this thread is inside a write: no deadlock,
    and the line follows the ones being written."""

    class Nested(CountingStream):
        def write(self, text: str) -> int:
            written = super().write(text)
            if self.writes == 1:
                writer.msg("nested")  # re-entered from within the write
            return written

    stream = Nested()
    writer = LineWriter(stream)
    writer.msg("first")  # outside a loop: written at once
    assert stream.getvalue() == "first\nnested\n"


def test_the_request_line_follows_a_setup_configured_after_ours(stderr: CountingStream) -> None:
    """Once structlog runs another setup (here a test's capture), the request line goes through it, not around it."""
    line = RequestLine(get_logger("test"))
    with structlog.testing.capture_logs() as captured:
        line.write("r-1", "POST", "/mcp", "bench", None, 200, "ok", 2.5)
    assert stderr.getvalue() == ""
    assert captured == [
        {
            "event": "request",
            "log_level": "info",
            "request_id": "r-1",
            "method": "POST",
            "path": "/mcp",
            "backend": "bench",
            "agent": None,
            "status": 200,
            "outcome": "ok",
            "ms": 2.5,
        }
    ]
    line.write("r-2", "POST", "/mcp", "bench", None, 200, "ok", 2.5)  # our setup is back in force
    assert [entry["request_id"] for entry in lines(stderr)] == ["r-2"]
