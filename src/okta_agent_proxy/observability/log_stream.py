"""Where log lines go: the process's stderr, written at most once per event-loop iteration.

Under load the gateway logs a line per request, and a `write` system call per line cost about a tenth of a
request's CPU. Lines logged while the event loop runs are kept in memory until the end of the loop's current
iteration and then written together, in order, with one call: they reach the output a fraction of a millisecond
later, and a hard crash (`kill -9`) can lose at most the lines of that one iteration. Lines logged outside a running
loop (start-up, shutdown, other threads) are written at once, after anything still waiting, and whatever is waiting
when the interpreter exits is written then.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from typing import Any, TextIO

_MAX_WAITING = 256 * 1024  # characters: past this, a line is written at once instead of waiting for the loop
_writers: weakref.WeakSet[LineWriter] = weakref.WeakSet()


class LineWriter:
    """structlog's final logger (and its factory): each rendered line goes to `target` as described above."""

    def __init__(self, target: TextIO) -> None:
        self.target = target
        # Reentrant: a line may be logged while this thread writes (a signal handler, a callback of the garbage
        # collector); it is appended and goes out with the write under way.
        self._lock = threading.RLock()
        self._writing = False
        self._waiting: list[str] = []
        self._size = 0
        self._scheduled_in: asyncio.AbstractEventLoop | None = None  # the loop that will write what is waiting
        _writers.add(self)

    def __call__(self, *args: Any) -> LineWriter:
        return self  # as a logger factory: one writer serves every logger

    def msg(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._waiting.append(line + "\n")
            self._size += len(line) + 1
            if loop is not None and self._size < _MAX_WAITING:
                if self._scheduled_in is loop:
                    return
                if self._scheduled_in is None:
                    self._scheduled_in = loop
                    loop.call_soon(self.write_waiting)
                    return
        # Outside a loop, in another thread's loop than the one that will write, or too much waiting: write now.
        self.write_waiting()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def write_waiting(self) -> None:
        with self._lock:
            if self._writing:
                return  # called from within a write (see __init__): the loop below takes the new line too
            self._writing = True
            try:
                while self._waiting:
                    waiting, self._waiting, self._size = self._waiting, [], 0
                    try:
                        self.target.write("".join(waiting))
                        self.target.flush()
                    except (OSError, ValueError):  # a closed or broken stderr: logging must never fail a request
                        pass
            finally:
                self._writing = False
                self._scheduled_in = None  # whatever comes next is scheduled afresh


def write_all_waiting() -> None:
    """Write what every writer holds. Run at exit; call it too where a process ends without running `atexit`
    handlers (a multiprocessing worker)."""
    for writer in list(_writers):
        writer.write_waiting()


atexit.register(write_all_waiting)
