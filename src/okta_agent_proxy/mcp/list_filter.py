"""Filtering a backend's list answers on their way to the client (DESIGN.md §7): the stream side of the tool policy.

The decision is `policy.tools` (pure); this module finds the answers it applies to, in the two ways a backend
answers a POST, and on GET streams:

- **JSON** (`filtered_json`): the answer is read whole before anything is sent (bounded by `MAX_LIST_BYTES`: past
  it, or unreadable, the client gets 502 `bad_backend_response` rather than a cut answer), filtered if it is a
  JSON-RPC result of list shape, and sent with the backend's status and headers.
- **SSE** (`SseListFilter`, a `ResponseTransformer`): each event passes as soon as it is complete — progress, logs
  and notifications at once, byte for byte — and only an event whose `data` is a JSON-RPC result of list shape is
  rewritten (its `id:`, `event:` and `retry:` lines kept). An event can only be judged whole, so a partial one is
  held until its blank line; one larger than `MAX_LIST_BYTES` ends the stream with an `event: error`
  (`bad_backend_response`), and nothing after it is sent.

Entries are matched by `tools[].name`, `resources[].uri`, `resourceTemplates[].uriTemplate` and `prompts[].name`;
`nextCursor` and everything else pass untouched, so pagination works page by page. A list whose entries are not
named objects is the backend's error (502, or the error event).
"""

from __future__ import annotations

import json
import re
from typing import Any

from okta_agent_proxy.errors import BadBackendResponse
from okta_agent_proxy.mcp.forward import sse_error_event
from okta_agent_proxy.policy.tools import MalformedList, Visibility, filter_result

MAX_LIST_BYTES = 8 * 1024 * 1024  # a list answer (or one SSE event) larger than this is refused
_LINE = re.compile(rb"\r\n|\r|\n")
_RESULT = b'"result"'


def _filtered(document: Any, rules: Visibility) -> bool:
    """Filter `document` in place if it is a JSON-RPC result of list shape; whether it was."""
    result = document.get("result") if isinstance(document, dict) else None
    return isinstance(result, dict) and filter_result(result, rules)


def filtered_json(body: bytes, rules: Visibility) -> bytes:
    """A whole JSON answer with the hidden entries dropped; the same bytes when it is not a list answer."""
    if _RESULT not in body:
        return body  # an error, an empty 202, a notification: no list in it
    try:
        document = json.loads(body)
        changed = _filtered(document, rules)
    except (ValueError, RecursionError, MalformedList):
        raise BadBackendResponse("the backend's answer could not be read as a JSON-RPC message") from None
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() if changed else body


class SseListFilter:
    """A `ResponseTransformer` for one SSE answer (see the module docstring)."""

    def __init__(self, rules: Visibility, *, max_event_bytes: int = MAX_LIST_BYTES) -> None:
        self._rules = rules
        self._max = max_event_bytes
        self._pending = bytearray()  # bytes not yet a complete line
        self._event: list[bytes] = []  # the complete lines (with their ends) of the event being read
        self._size = 0
        self._failed = False

    def feed(self, chunk: bytes) -> bytes:
        if self._failed:
            return b""
        pending = self._pending
        scan_from = max(len(pending) - 1, 0)  # a CR kept at the end may be the first half of a CR LF
        pending += chunk
        out = bytearray()
        start = 0
        for match in _LINE.finditer(pending, scan_from):
            if match.group() == b"\r" and match.end() == len(pending):
                break  # maybe half of a CR LF: decide with the next chunk
            blank = match.start() == start
            self._event.append(bytes(pending[start : match.end()]))
            self._size += match.end() - start
            start = match.end()
            if blank:  # the event is complete
                out += self._finish_event()
        del pending[:start]
        if self._size + len(pending) > self._max:
            self._failed = True
            return bytes(out) + sse_error_event("bad_backend_response", "a backend event exceeded the size limit")
        return bytes(out)

    def end(self) -> bytes:
        if self._failed:
            return b""
        rest = b"".join(self._event) + bytes(self._pending)  # an unterminated last event passes as it came
        self._event, self._pending, self._size = [], bytearray(), 0
        return rest

    def _finish_event(self) -> bytes:
        lines, self._event, self._size = self._event, [], 0
        data = [line for line in lines if line.startswith(b"data")]
        if not data or not any(_RESULT in line for line in data):
            return b"".join(lines)
        payload = b"\n".join(_data_value(line) for line in data)
        try:
            document = json.loads(payload)
            changed = _filtered(document, self._rules)
        except (ValueError, RecursionError):
            return b"".join(lines)  # not JSON: not a message we judge
        except MalformedList:
            self._failed = True
            return sse_error_event("bad_backend_response", "the backend's list answer could not be read")
        if not changed:
            return b"".join(lines)
        kept = [line for line in lines[:-1] if not line.startswith(b"data")]
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        return b"".join(kept) + b"data: " + text + b"\n\n"


def _data_value(line: bytes) -> bytes:
    """The value of a `data` line, without its line end and the one space after the colon."""
    value = line.rstrip(b"\r\n")
    field, _, rest = value.partition(b":")
    if field != b"data":
        return b""
    return rest[1:] if rest.startswith(b" ") else rest
