"""Structured logs (structlog): JSON lines by default, `LOG_FORMAT=console` for people.

Every event passes through `redact`, the one redaction step: values under secret-looking keys are replaced, and
bearer tokens or JWT-shaped strings anywhere in a value are masked, so a secret handed to a log call by mistake
still never reaches the output.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog

from okta_agent_proxy.observability.log_stream import LineWriter

_SECRET_KEY = re.compile(r"(authorization|password|secret|token|assertion|private_key|^key$|api_key|cookie)", re.I)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# What every match of `_JWT` or `_BEARER` contains: a string without it needs no substitution (one scan, not two).
_SUSPECT = re.compile(r"eyJ|(?i:bearer|basic)\s")
MASK = "[redacted]"
_BEARER_MASK = r"\1 " + MASK
_PLAIN = frozenset({int, float, bool, type(None)})  # values that cannot hold a secret's text
_KEY_VERDICTS: dict[str, bool] = {}  # event keys come from code: a small, fixed set
_KEY_VERDICTS_MAX = 1024


def _secret_key(key: str) -> bool:
    verdict = _KEY_VERDICTS.get(key) if type(key) is str else None
    if verdict is None:
        verdict = _SECRET_KEY.search(key) is not None
        if type(key) is str and len(_KEY_VERDICTS) < _KEY_VERDICTS_MAX:
            _KEY_VERDICTS[key] = verdict
    return verdict


def _needs_masking(value: str) -> bool:
    """False only when neither `_JWT` nor `_BEARER` can match `value`. ASCII text is checked with substring tests
    (case-insensitive matching of ASCII letters cannot involve other characters); anything else with `_SUSPECT`."""
    if value.isascii():
        if "eyJ" in value:
            return True
        lower = value.lower()
        return "bearer" in lower or "basic" in lower
    return _SUSPECT.search(value) is not None


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        if type(value) is str and not _needs_masking(value):
            return value
        return _BEARER.sub(_BEARER_MASK, _JWT.sub(MASK, value))
    if isinstance(value, dict):
        return {k: MASK if _secret_key(str(k)) else redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    changed: dict[str, Any] = {}
    texts: list[str] = []
    verdicts = _KEY_VERDICTS
    for key, value in event.items():
        secret = verdicts.get(key)
        if secret is None:
            secret = _secret_key(key)
        if secret:
            changed[key] = MASK
        elif type(value) is str:
            texts.append(value)
        elif type(value) not in _PLAIN:
            redacted = redact_value(value)
            if redacted is not value:
                changed[key] = redacted
    # The text values are checked together (what cannot match in the whole cannot match in a part); only if
    # something might match is each one redacted.
    if texts and _needs_masking("\n".join(texts)):
        for key, value in event.items():
            if type(value) is str and key not in changed:
                redacted = redact_value(value)
                if redacted is not value:
                    changed[key] = redacted
    if changed:
        event.update(changed)
    return event


# json.dumps' own encoder (the C one), made once instead of per call; `_markers` is its circular-reference check.
_markers: dict[int, Any] = {}
_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # CPython's _json accelerator
_encode = (
    _c_encoder(
        _markers, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    if _c_encoder is not None
    else None
)


def _dumps(event: Any, **kwargs: Any) -> str:
    """`json.dumps(event, **kwargs)` — what `JSONRenderer` calls — with the same output, but straight through the C
    encoder when every value is plain JSON (the usual case); only other values need the renderer's `default`."""
    if _encode is not None:
        try:
            return "".join(_encode(event, 0))
        except (TypeError, ValueError, RecursionError):
            _markers.clear()  # an encoding that stopped half-way leaves its marks behind
    return json.dumps(event, **kwargs)


_second = -1  # the last whole second stamped, and its text
_second_text = ""


def _now_iso() -> str:
    """Now, in UTC, as `TimeStamper(fmt="iso", utc=True)` writes it — `datetime.isoformat` with `Z` for `+00:00`
    (no fraction when the microseconds are 0) — with the date and time of day made once a second."""
    global _second, _second_text
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    if seconds != _second:
        _second_text = datetime.fromtimestamp(seconds, UTC).isoformat().removesuffix("+00:00")
        _second = seconds
    micros = nanos // 1000
    return f"{_second_text}.{micros:06d}Z" if micros else f"{_second_text}Z"


_STACK_FRAMES = 20  # the innermost frames kept in a logged exception's stack


def summarize_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`log.exception(...)` (or `exc_info=`) becomes `error` (the exception's type) and `stack` (its frames, as
    `file:line function`), without the exception's message or any local value: a driver's or library's message
    may quote the data it was handling, a token or a key among it. What failed, and where, is enough to start."""
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if isinstance(exc_info, BaseException):
        error: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        error = exc_info[1]
    else:
        error = sys.exc_info()[1]
    if error is not None:
        kind = type(error)
        module = "" if kind.__module__ == "builtins" else kind.__module__ + "."
        event["error"] = module + kind.__qualname__
        frames = traceback.extract_tb(error.__traceback__)[-_STACK_FRAMES:]
        event["stack"] = [f"{frame.filename}:{frame.lineno} {frame.name}" for frame in frames]
    return event


def add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["timestamp"] = _now_iso()
    return event


class DropRequestContent(logging.Filter):
    """aiohttp logs a rejected request with the offending bytes (e.g. the start of an oversized `Authorization`
    header) and a traceback that repeats them: keep the message and the error's type, drop its content."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {type(record.exc_info[1]).__name__}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def protect_server_logs() -> None:
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access"):
        stdlib_logger = logging.getLogger(name)
        if not any(isinstance(f, DropRequestContent) for f in stdlib_logger.filters):
            stdlib_logger.addFilter(DropRequestContent())


class _JsonLines:
    """The JSON-lines setup `configure` installed, kept so `log_info` can take its steps directly."""

    __slots__ = ("level", "logger_factory", "out", "processors", "renderer", "wrapper_class")

    def __init__(self, processors: list[Any], level: int, logger_factory: Any) -> None:
        self.processors = processors
        self.renderer = processors[-1]
        self.level = level
        self.logger_factory = logger_factory
        self.out = logger_factory()
        self.wrapper_class: Any = None

    def in_place(self) -> bool:
        """Whether structlog still runs this setup (a test may have swapped in its own since). Asked for every
        request line: read from structlog's live configuration object when it has the expected shape, which
        costs a fraction of `structlog.get_config()` (a new dict each call)."""
        live = _STRUCTLOG_CONFIG
        if live is not None:
            return (
                getattr(live, "default_processors", None) is self.processors
                and getattr(live, "logger_factory", None) is self.logger_factory
                and getattr(live, "default_wrapper_class", None) is self.wrapper_class
            )
        config = structlog.get_config()
        return (
            config["processors"] is self.processors
            and config["logger_factory"] is self.logger_factory
            and config["wrapper_class"] is self.wrapper_class
        )


# The object behind `structlog.get_config()` (structlog._config._CONFIG), if this structlog version has it.
_STRUCTLOG_CONFIG: Any = getattr(getattr(structlog, "_config", None), "_CONFIG", None)


_json_lines: _JsonLines | None = None


def configure(level: str = "INFO", fmt: str = "json") -> None:
    global _json_lines
    protect_server_logs()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_timestamp,
        summarize_exception,
        redact,
        renderer,
    ]
    min_level = logging.getLevelNamesMapping()[level]
    logger_factory = LineWriter(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    _json_lines = None
    if fmt == "json":
        _json_lines = _JsonLines(processors, min_level, logger_factory)
        _json_lines.wrapper_class = structlog.get_config()["wrapper_class"]


def log_info(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """`logger.info(event, **fields)` for a logger without bound values — the same line, for less work. While the
    JSON setup of `configure` is in place, the event takes that setup's steps in its order (context variables,
    level, time, `redact`, the renderer, the output) without structlog's per-call machinery, and a flat event
    with nothing to mask is rendered straight from its values (`_flat_line`): this is the request line, written
    for every request. Any other setup gets the call as it is."""
    lines = _json_lines
    if lines is None or not lines.in_place():
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


_escape = json.encoder.encode_basestring_ascii  # how the JSON renderer writes text (ensure_ascii)
_RESERVED = frozenset({"event", "level", "timestamp", "exc_info"})  # keys the processors write or read
_FLAT = frozenset({str, int, float, bool, type(None)})  # values with nothing inside that `redact` would mask
_LINE_STARTS: dict[tuple[str, ...], tuple[str, ...] | None] = {}  # per key tuple (from code: a small set)


def _line_starts(keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """What goes before each value in the line: `{"k0": `, `, "k1": `, …; None if a key is masked or written by a
    processor (such events take the general path)."""
    if any(type(key) is not str or key in _RESERVED or _secret_key(key) for key in keys):
        starts = None
    else:
        starts = tuple(("{" if i == 0 else ", ") + _escape(key) + ": " for i, key in enumerate(keys))
    if len(_LINE_STARTS) < _KEY_VERDICTS_MAX:
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
            parts += (start, _escape(value))
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
    if _needs_masking("\n".join(texts)) or structlog.contextvars.get_contextvars():
        return None
    parts += (', "event": ', _escape(event), ', "level": "info", "timestamp": "', _now_iso(), '"}')
    return "".join(parts)


_REQUEST_FIELDS = ("method", "path", "backend", "agent", "status", "outcome")  # between request_id and ms
_REQUEST_TAIL = ', "event": "request", "level": "info", "timestamp": "'
_MIDDLES_MAX = 1024  # (method, path, backend, agent, status, outcome) combinations remembered; paths vary


class RequestLine:
    """The request line, written once per request: `log_info(logger, "request", {"request_id": …, "method": …,
    "path": …, "backend": …, "agent": …, "status": …, "outcome": …, "ms": …})`, the same bytes for less work. Of
    its values only the request id and the time vary from one request to the next; the text of the others (with
    the verdict that nothing in it needs masking) is rendered once per combination and remembered, so a line is
    the id, that text, the time and the timestamp. Anything unusual — another setup, a bound context variable, a
    value that is not plain, text that `redact` might mask — takes `log_info`."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._middles: dict[tuple[Any, ...], str] = {}  # "" marks a combination that takes the general path

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        backend: str | None,
        agent: str | None,
        status: int,
        outcome: str,
        ms: float,
    ) -> None:
        lines = _json_lines
        if lines is not None and lines.level > logging.INFO and lines.in_place():
            return  # not logged at this level
        key = (method, path, backend, agent, status, outcome)
        middle = self._middles.get(key)
        if middle is None:
            middle = self._middle(key)
        if (
            middle
            and lines is not None
            and lines.in_place()
            and type(request_id) is str
            and type(ms) is float
            and ms - ms == 0.0
            and not _needs_masking(request_id)
            and not structlog.contextvars.get_contextvars()
        ):
            line = '{"request_id": ' + _escape(request_id) + middle + ', "ms": ' + float.__repr__(ms)
            lines.out.info(line + _REQUEST_TAIL + _now_iso() + '"}')
            return
        fields = {"request_id": request_id, **dict(zip(_REQUEST_FIELDS, key, strict=True)), "ms": ms}
        log_info(self._logger, "request", fields)

    def _middle(self, key: tuple[Any, ...]) -> str:
        middle = ""
        texts = "\n".join(value for value in key if type(value) is str)  # as `redact` sees them, not escaped
        if _encode is not None and _FLAT.issuperset(map(type, key)) and not _needs_masking(texts):
            middle = ", " + "".join(_encode(dict(zip(_REQUEST_FIELDS, key, strict=True)), 0))[1:-1]
        if len(self._middles) >= _MIDDLES_MAX:
            self._middles.clear()  # many distinct paths: start over, so the common ones are remembered again
        self._middles[key] = middle
        return middle


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
