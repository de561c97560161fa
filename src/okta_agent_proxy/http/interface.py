"""The HTTP server seam: a request and its answer as every step sees them.

Steps — the edge, the pipeline, the relay, the gateway's own endpoints — see a request only through `HttpRequest`
and answer only through it: with an `Answer` (the gateway's own responses, whole) or by starting a `ResponseStream`
(a backend's answer, relayed as it arrives). `http/aiohttp_binding.py` is the one module that makes these from
aiohttp's server; another server core would need another binding and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole response the gateway makes itself."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = "application/json"


class ResponseStream(Protocol):
    """A response whose status and headers have gone to the client; its body follows as it is written."""

    async def write(self, chunk: bytes) -> None: ...

    async def end(self, tail: bytes = b"") -> None:
        """The body is complete (after `tail`)."""
        ...


class HttpRequest(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str:
        """Percent-decoded, without the query string."""
        ...

    @property
    def raw_path(self) -> str:
        """As sent: percent-encoded, with the query string."""
        ...

    @property
    def query_string(self) -> str:
        """As sent (percent-encoded); "" for none."""
        ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def remote(self) -> str | None:
        """The peer's address (a proxy's, behind one)."""
        ...

    def query_names(self) -> Iterable[str]:
        """The names of the query's parameters, decoded."""
        ...

    async def read_body(self, limit: int, gap: float) -> bytes:
        """The whole body: PayloadTooLarge past `limit` bytes, RequestTimeout when a pause in it lasts `gap`."""
        ...

    async def start_response(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> ResponseStream:
        """Send the status and headers; the body follows through the stream."""
        ...

    def client_gone(self) -> bool:
        """The client's connection is closed or closing."""
        ...

    def abort(self) -> None:
        """Cut the client's connection (an answer that cannot be completed must not look complete)."""
        ...


Endpoint = Callable[[HttpRequest], Awaitable[Answer | None]]  # None: answered through a ResponseStream
