"""When tracing is on (DESIGN.md §9: the standard OTEL_* variables, the .env file's included), and that off it does
nothing: no provider, no exporter thread, no header touched."""

from __future__ import annotations

import os
import threading

import pytest

from okta_agent_proxy.observability import tracing

OTEL_NAMES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_SERVICE_NAME")


@pytest.fixture(autouse=True)
def own_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """`start` writes the .env file's OTEL_* into os.environ (for the SDK, which reads the real one): each test
    starts without them, and whatever it (or `start`) sets is removed after it."""
    for name in {*OTEL_NAMES, *(k for k in os.environ if k.startswith("OTEL_"))}:
        monkeypatch.setenv(name, "")  # recorded as it was (most often: absent), restored at teardown
        monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),  # a name alone exports nothing
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_enabled(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled(environ) is on


def test_off_starts_nothing_and_touches_nothing() -> None:
    before = threading.active_count()
    assert tracing.start({"OTEL_SERVICE_NAME": "quiet"}) is None
    assert tracing.tracer() is None
    assert threading.active_count() == before
    headers = {"Accept": "application/json"}
    with tracing.client_span("token", "POST", "http://127.0.0.1:1/token", headers) as span:
        assert span is None
    assert headers == {"Accept": "application/json"}


def test_the_env_files_otel_variables_count_and_the_environment_wins() -> None:
    os.environ["OTEL_SERVICE_NAME"] = "from-the-environment"
    dotenv = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: the span is dropped at `stop`
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_SERVICE_NAME": "from-dotenv",
    }
    provider = tracing.start(dotenv)
    try:
        assert provider is not None and tracing.tracer() is not None
        assert provider.resource.attributes["service.name"] == "from-the-environment"
        headers: dict[str, str] = {}
        with tracing.client_span("token", "POST", "http://user:pw@127.0.0.1:9/token?x=1", headers) as span:
            assert span is not None
        assert headers["traceparent"].startswith("00-")
        attributes = getattr(span, "attributes", None)  # the SDK's span (the API's has no getter)
        assert attributes is not None and attributes["url.full"] == "http://127.0.0.1:9/token"
    finally:
        tracing.stop(provider)
    assert tracing.tracer() is None
