"""Structured logs (structlog): JSON lines by default, `LOG_FORMAT=console` for people.

Every event passes through `redact`, the one redaction step: values under secret-looking keys are replaced, and
bearer tokens or JWT-shaped strings anywhere in a value are masked, so a secret handed to a log call by mistake
still never reaches the output. The line written for every request takes a shorter path to the same bytes
(`request_line.py`); `json_lines` tells it whether the JSON setup of `configure` is still the one in force.
"""

from __future__ import annotations

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


def is_secret_key(key: str) -> bool:
    verdict = _KEY_VERDICTS.get(key) if type(key) is str else None
    if verdict is None:
        verdict = _SECRET_KEY.search(key) is not None
        if type(key) is str and len(_KEY_VERDICTS) < _KEY_VERDICTS_MAX:
            _KEY_VERDICTS[key] = verdict
    return verdict


def needs_masking(value: str) -> bool:
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
        if type(value) is str and not needs_masking(value):
            return value
        return _BEARER.sub(_BEARER_MASK, _JWT.sub(MASK, value))
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(str(k)) else redact_value(v) for k, v in value.items()}
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
            secret = is_secret_key(key)
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
    if texts and needs_masking("\n".join(texts)):
        for key, value in event.items():
            if type(value) is str and key not in changed:
                redacted = redact_value(value)
                if redacted is not value:
                    changed[key] = redacted
    if changed:
        event.update(changed)
    return event


_second = -1  # the last whole second stamped, and its text
_second_text = ""


def now_iso() -> str:
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
    event["timestamp"] = now_iso()
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


class JsonLines:
    """The JSON-lines setup `configure` installed: its steps, in order, for `request_line.py` to take directly."""

    __slots__ = ("level", "logger_factory", "out", "processors", "renderer", "steps", "wrapper_class")

    def __init__(self, processors: list[Any], level: int, logger_factory: Any, wrapper_class: Any) -> None:
        self.processors = processors
        self.steps = list(processors)  # what the list held: structlog's `capture_logs` changes it in place
        self.renderer = processors[-1]
        self.level = level
        self.logger_factory = logger_factory
        self.out = logger_factory()
        self.wrapper_class = wrapper_class


_json_lines: JsonLines | None = None


def json_lines() -> JsonLines | None:
    """The JSON setup of `configure`, if structlog still runs it (a test may have configured its own since)."""
    lines = _json_lines
    if lines is None:
        return None
    config = structlog.get_config()
    processors = config["processors"]
    if (
        processors is lines.processors
        and processors == lines.steps
        and config["logger_factory"] is lines.logger_factory
        and config["wrapper_class"] is lines.wrapper_class
    ):
        return lines
    return None


def configure(level: str = "INFO", fmt: str = "json") -> None:
    global _json_lines
    protect_server_logs()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
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
        _json_lines = JsonLines(processors, min_level, logger_factory, structlog.get_config()["wrapper_class"])


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
