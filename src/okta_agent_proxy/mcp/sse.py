"""Reading a Server-Sent Events stream as it passes, without holding it back (WHATWG HTML §9.2.6).

The relay writes every chunk to the client as it arrives; `SseEvents` only watches: fed the same chunks, it returns
the `data` of each event the chunk completed. Lines end in CR LF, LF or CR; an event ends at a blank line; `data`
lines are joined with LF; comments and other fields are skipped. A CR at the very end of a chunk may be the first
half of a CR LF, so it waits for the next chunk. The buffer holds at most one incomplete event, bounded by
`max_event_bytes` (beyond it the watcher gives up on that event, and the bytes still flow to the client).
"""

from __future__ import annotations

import json
import re
from typing import Any

_LINE = re.compile(rb"\r\n|\r|\n")
MAX_EVENT_BYTES = 4 * 1024 * 1024


class SseEvents:
    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()  # bytes after the last complete line
        self._data: list[bytes] = []  # data lines of the event being read
        self._size = 0
        self._max = max_event_bytes
        self._overflow = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The `data` of every event that `chunk` completes, in order. Only the new bytes are searched for line
        ends, and only complete lines are copied out: the work is linear in what passes, however it is chunked."""
        buffer = self._buffer
        scan_from = max(len(buffer) - 1, 0)  # a CR kept at the end may be the first half of a CR LF
        buffer += chunk
        events: list[bytes] = []
        start = 0
        for match in _LINE.finditer(buffer, scan_from):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # maybe half of a CR LF: decide with the next chunk
            self._line(bytes(buffer[start : match.start()]), events)
            start = match.end()
        del buffer[:start]
        if len(buffer) > self._max:
            buffer.clear()  # a line this long is no event we watch: let it pass
            self._overflow = True
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data and not self._overflow:
                events.append(b"\n".join(self._data))
            self._data, self._size, self._overflow = [], 0, False
            return
        field, colon, value = line.partition(b":")
        if field != b"data" or self._overflow:
            return
        if colon and value.startswith(b" "):
            value = value[1:]
        self._size += len(value)
        if self._size > self._max:
            self._overflow = True
            self._data = []
            return
        self._data.append(value)


def is_response_to(data: bytes, request_id: str | int) -> bool:
    """Whether an event's data is the JSON-RPC response (result or error) to the request with this id."""
    try:
        message: Any = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not isinstance(message, dict) or ("result" not in message and "error" not in message):
        return False
    answered = message.get("id")
    return answered == request_id and type(answered) is type(request_id)
