"""The request line: one JSON log line per request, the same bytes structlog's JSON setup writes, for less work.

`log_info(logger, event, fields)` is `logger.info(event, **fields)` for a logger without bound values: while the
JSON setup of `logging.configure` is in place, the event takes that setup's steps in their order (context
variables, level, time, `redact`, the renderer, the output) without structlog's per-call machinery, and a flat
event with nothing to mask is rendered straight from its values. `RequestLine` goes further for the line written
once per request: of its values only the request id and the time vary from one request to the next, so the text of
the others is rendered once per combination and remembered. Anything unusual — another setup, a bound context
variable, a value that is not plain, text that `redact` might mask — takes structlog's own path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import structlog

from okta_agent_proxy.observability.logging import (
    add_timestamp,
    is_secret_key,
    json_lines,
    needs_masking,
    now_iso,
    redact,
    summarize_exception,
)

__all__ = ["RequestLine", "log_info"]

_encode = json.JSONEncoder().encode  # what the JSON renderer (`json.dumps`) writes, text included (ensure_ascii)
_RESERVED = frozenset({"event", "level", "timestamp", "exc_info"})  # keys the processors write or read
_FLAT = frozenset({str, int, float, bool, type(None)})  # values with nothing inside that `redact` would mask
_REMEMBERED_MAX = 1024  # key tuples (from code: a small set), and value combinations (paths vary)
_LINE_STARTS: dict[tuple[str, ...], tuple[str, ...] | None] = {}


def log_info(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """`logger.info(event, **fields)` — the same line, for less work (see the module's docstring)."""
    lines = json_lines()
    if lines is None:
        logger.info(event, **fields)
        return
    if lines.level > logging.INFO:
        return
    line = _flat_line(event, fields)
    if line is None:
        event_dict = dict(fields)
        event_dict["event"] = event
        structlog.contextvars.merge_contextvars(None, "info", event_dict)
        event_dict["level"] = "info"
        add_timestamp(None, "info", event_dict)
        summarize_exception(None, "info", event_dict)
        redact(None, "info", event_dict)
        line = lines.renderer(None, "info", event_dict)
    lines.out.info(line)


def _line_starts(keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """What goes before each value in the line: `{"k0": `, `, "k1": `, …; None if a key is masked or written by a
    processor (such events take the general path)."""
    if any(type(key) is not str or key in _RESERVED or is_secret_key(key) for key in keys):
        starts = None
    else:
        starts = tuple(("{" if i == 0 else ", ") + _encode(key) + ": " for i, key in enumerate(keys))
    if len(_LINE_STARTS) < _REMEMBERED_MAX:
        _LINE_STARTS[keys] = starts
    return starts


def _flat_line(event: str, fields: dict[str, Any]) -> str | None:
    """The line the JSON setup writes for `info(event, **fields)` — the fields in order, then `event`, `level` and
    `timestamp` — built from the values directly. Only for the plain case: every value text, None, a bool, an int
    or a finite float; no key or text that `redact` would touch; no context variables bound. Else None."""
    if not fields:
        return None
    keys = tuple(fields)
    starts = _LINE_STARTS[keys] if keys in _LINE_STARTS else _line_starts(keys)
    if starts is None or type(event) is not str:
        return None
    parts: list[str] = []
    texts = [event]
    for start, value in zip(starts, fields.values(), strict=True):
        kind = type(value)
        if kind is str:
            texts.append(value)
            parts += (start, _encode(value))
        elif value is None:
            parts += (start, "null")
        elif kind is int:
            parts += (start, int.__repr__(value))
        elif kind is bool:
            parts += (start, "true" if value else "false")
        elif kind is float and value - value == 0.0:  # finite (NaN and infinities take the general path)
            parts += (start, float.__repr__(value))
        else:
            return None
    if needs_masking("\n".join(texts)) or structlog.contextvars.get_contextvars():
        return None
    parts += (', "event": ', _encode(event), ', "level": "info", "timestamp": "', now_iso(), '"}')
    return "".join(parts)


_REQUEST_FIELDS = ("method", "path", "backend", "agent", "status", "outcome")  # between request_id and ms
_REQUEST_TAIL = ', "event": "request", "level": "info", "timestamp": "'


class RequestLine:
    """The request line: `log_info(logger, "request", {"request_id": …, "method": …, "path": …, "backend": …,
    "agent": …, "status": …, "outcome": …, "ms": …})`, the same bytes for less work. The text between the request
    id and the time (with the verdict that nothing in it needs masking) is rendered once per combination of values
    and remembered, so a line is the id, that text, the time and the timestamp."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._middles: dict[tuple[Any, ...], str] = {}  # "" marks a combination that takes the general path

    def write(
        self,
        request_id: str,
        http_method: str,
        path: str,
        backend: str | None,
        agent_id: str | None,
        status: int,
        code: str,
        ms: float,
    ) -> None:
        lines = json_lines()
        if lines is not None and lines.level > logging.INFO:
            return  # not logged at this level
        key = (http_method, path, backend, agent_id, status, code)
        middle = self._middles.get(key)
        if middle is None:
            middle = self._middle(key)
        if (
            middle
            and lines is not None
            and type(request_id) is str
            and type(ms) is float
            and ms - ms == 0.0
            and not needs_masking(request_id)
            and not structlog.contextvars.get_contextvars()
        ):
            line = '{"request_id": ' + _encode(request_id) + middle + ', "ms": ' + float.__repr__(ms)
            lines.out.info(line + _REQUEST_TAIL + now_iso() + '"}')
            return
        fields = {"request_id": request_id, **dict(zip(_REQUEST_FIELDS, key, strict=True)), "ms": ms}
        log_info(self._logger, "request", fields)

    def _middle(self, key: tuple[Any, ...]) -> str:
        middle = ""
        texts = "\n".join(value for value in key if type(value) is str)  # as `redact` sees them, not escaped
        if _FLAT.issuperset(map(type, key)) and not needs_masking(texts):
            middle = ", " + _encode(dict(zip(_REQUEST_FIELDS, key, strict=True)))[1:-1]
        if len(self._middles) >= _REMEMBERED_MAX:
            self._middles.clear()  # many distinct paths: start over, so the common ones are remembered again
        self._middles[key] = middle
        return middle
