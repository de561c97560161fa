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
from typing import Any

from okta_agent_proxy.errors import BadBackendResponse
from okta_agent_proxy.mcp.forward import sse_error_event
from okta_agent_proxy.policy.tools import MalformedList, Visibility, filter_result

MAX_LIST_BYTES = 8 * 1024 * 1024  # a list answer (or one SSE event) larger than this is refused
MAX_CACHED_BYTES = 1024 * 1024  # list results up to this size are remembered, filtered (see `filtered_json`)
MAX_CACHED = 32  # per agent and backend
_RESULT = b'"result"'
_BOM = b"\xef\xbb\xbf"
_ESCAPE = b"\\u"  # a key may be spelled with \u escapes ("\u0072esult" is "result" to every JSON reader)


def _filtered(document: Any, rules: Visibility) -> bool:
    """Filter `document` in place if it is a JSON-RPC result of list shape; whether it was."""
    result = document.get("result") if isinstance(document, dict) else None
    return isinstance(result, dict) and filter_result(result, rules)


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def filtered_json(body: bytes, rules: Visibility, request_id: str | int | None = None) -> bytes:
    """A whole JSON answer with the hidden entries of its list result dropped; the same bytes when it is not a list
    answer; 502 when it cannot be read."""
    try:
        filtered = filtered_message(body, rules, request_id)
    except (ValueError, RecursionError, MalformedList):
        raise BadBackendResponse("the backend's answer could not be read as a JSON-RPC message") from None
    return body if filtered is None else filtered


def filtered_message(body: bytes, rules: Visibility, request_id: str | int | None) -> bytes | None:
    """A JSON-RPC message with the hidden entries of its list result dropped, or None when it holds no list;
    ValueError (not JSON) or MalformedList (a list the rules cannot judge) otherwise.

    A backend answers `tools/list` with the same list again and again, and parsing a 50 KB list costs more than
    everything else the gateway does for the request (`bench/tool_policy.py`). So the filtered result is
    remembered per agent and backend, keyed by the result's exact bytes, for answers in the canonical form SDK
    servers write — `{"jsonrpc":"2.0","id":<the request's id>,"result":…}` — where those bytes are known without
    parsing: the next identical list costs a dictionary lookup. Whatever the form, the message sent is made by the
    gateway from what it parsed (or remembered), never the backend's bytes with a list the rules did not judge."""
    if _RESULT not in body and _ESCAPE not in body:
        return None  # an error, an empty 202, a notification: no list in it
    prefix = b'{"jsonrpc":"2.0","id":' + _dump(request_id) + b',"result":' if request_id is not None else b""
    canonical = bool(prefix) and body.startswith(prefix) and body.endswith(b"}")
    if canonical:
        remembered = rules.answers.get(body[len(prefix) : -1])
        if remembered is not None:
            return prefix + remembered + b"}"
    document = json.loads(body)
    if not _filtered(document, rules):
        return None
    result = _dump(document["result"])
    if not (canonical and list(document) == ["jsonrpc", "id", "result"]):
        return _dump(document)
    if len(body) <= MAX_CACHED_BYTES:  # the bytes between the prefix and the last "}" are the result's
        if len(rules.answers) >= MAX_CACHED:
            rules.answers.clear()
        rules.answers[body[len(prefix) : -1]] = result
    return prefix + result + b"}"


class SseListFilter:
    """A `ResponseTransformer` for one SSE answer (see the module docstring)."""

    def __init__(
        self, rules: Visibility, request_id: str | int | None = None, *, max_event_bytes: int = MAX_LIST_BYTES
    ) -> None:
        self._rules = rules
        self._request_id = request_id
        self._max = max_event_bytes
        self._pending = bytearray()  # bytes not yet a complete line
        self._event: list[bytes] = []  # the complete lines (with their ends) of the event being read
        self._size = 0
        self._at_start = True  # a UTF-8 BOM may begin the stream
        self.failure: str | None = None  # set when the stream must end here (the relay ends it)

    def feed(self, chunk: bytes) -> bytes:
        if self.failure is not None:
            return b""
        pending = self._pending
        pos = max(len(pending) - 1, 0)  # a CR kept at the end may be the first half of a CR LF
        pending += chunk
        if self._at_start and len(pending) >= len(_BOM):
            self._at_start = False
            if pending.startswith(_BOM):  # a client's decoder drops it (WHATWG SSE): so must the line reader
                del pending[: len(_BOM)]
                pos = 0
        out = bytearray()
        start = 0
        # Line ends found with `bytes.find` (memchr), a CR's position remembered: a regex over a 50 KB event line
        # cost 0.3 ms (`bench/tool_policy.py`).
        next_cr = pending.find(b"\r", pos)
        while True:
            if 0 <= next_cr < pos:
                next_cr = pending.find(b"\r", pos)
            lf = pending.find(b"\n", pos)
            end = lf if next_cr < 0 or (0 <= lf < next_cr) else next_cr
            if end < 0:
                break
            if end == next_cr:
                if end + 1 == len(pending):
                    break  # maybe half of a CR LF: decide with the next chunk
                stop = end + 2 if pending[end + 1] == 0x0A else end + 1
            else:
                stop = end + 1
            blank = end == start
            self._event.append(bytes(pending[start:stop]))
            self._size += stop - start
            start = pos = stop
            if blank:  # the event is complete
                out += self._finish_event()
        del pending[:start]
        if self._size + len(pending) > self._max:
            self.failure = "bad_backend_response"
            return bytes(out) + sse_error_event("bad_backend_response", "a backend event exceeded the size limit")
        return bytes(out)

    def end(self) -> bytes:
        """The stream ended: a last event without its blank line is judged as if complete (a client may read it;
        a CR held back as maybe half of a CR LF ends its line)."""
        if self.failure is not None:
            return b""
        if self._pending:
            self._event.append(bytes(self._pending))
            self._pending = bytearray()
        return self._finish_event() if self._event else b""

    def _finish_event(self) -> bytes:
        lines, self._event, self._size = self._event, [], 0
        data = [line for line in lines if line.startswith(b"data")]
        if not data or not any(_RESULT in line or _ESCAPE in line for line in data):
            return b"".join(lines)
        # Decoded as a client decodes it (invalid UTF-8 replaced): what the client could read is what is judged.
        payload = b"\n".join(_data_value(line) for line in data).decode("utf-8", "replace").encode()
        try:
            text = filtered_message(payload, self._rules, self._request_id)
        except (ValueError, RecursionError, MalformedList):
            # Not JSON to Python's reader (too deep, a number of more than 4 300 digits…) may still be JSON to a
            # client's: an event that may hold a list and cannot be judged is refused, never passed.
            self.failure = "bad_backend_response"
            return sse_error_event("bad_backend_response", "the backend's list answer could not be read")
        if text is None:
            return b"".join(lines)
        kept = [line for line in lines if line.strip(b"\r\n") and not line.startswith(b"data")]
        return b"".join(kept) + b"data: " + text + b"\n\n"


def _data_value(line: bytes) -> bytes:
    """The value of a `data` line, without its line end and the one space after the colon."""
    value = line.rstrip(b"\r\n")
    field, _, rest = value.partition(b":")
    if field != b"data":
        return b""
    return rest[1:] if rest.startswith(b" ") else rest
