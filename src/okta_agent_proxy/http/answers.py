"""The one renderer of the gateway's own answers: a `GatewayError` as status, JSON body and headers."""

from __future__ import annotations

from okta_agent_proxy.errors import GatewayError
from okta_agent_proxy.http.interface import Answer


def error_answer(error: GatewayError, request_id: str) -> Answer:
    return Answer(error.status, error.body_bytes(), {**error.headers, "X-Request-ID": request_id}, error.content_type)
