"""Structured logs (structlog): JSON lines by default, `LOG_FORMAT=console` for people.

Every event passes through `redact`, the one redaction step: values under secret-looking keys are replaced, and
bearer tokens or JWT-shaped strings anywhere in a value are masked, so a secret handed to a log call by mistake
still never reaches the output.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEY = re.compile(r"(authorization|password|secret|token|assertion|private_key|^key$|api_key|cookie)", re.I)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
MASK = "[redacted]"


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _BEARER.sub(r"\1 " + MASK, _JWT.sub(MASK, value))
    if isinstance(value, dict):
        return {k: MASK if _SECRET_KEY.search(str(k)) else redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        event[key] = MASK if _SECRET_KEY.search(key) else redact_value(value)
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


def configure(level: str = "INFO", fmt: str = "json") -> None:
    protect_server_logs()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
