"""HTTP/1.1 on a bare socket, for requests no well-behaved client library sends: a header twice, a second `Host`,
control characters in the path, half a request.

`raw_request(port, head, body)` sends `head` (the request line and headers, without the blank line; `Connection:
close` is added) and reads the whole answer; `RawAnswer` has the status, the headers (a multidict) and the body.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from .processes import LOOPBACK

__all__ = ["RawAnswer", "raw_request"]


@dataclass
class RawAnswer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        document = self.json if self.body.startswith(b"{") else None
        return document.get("error") if isinstance(document, dict) else None


async def raw_request(port: int, head: str, body: bytes = b"", *, timeout: float = 10.0) -> RawAnswer:
    lines = head.strip("\r\n").replace("\r\n", "\n").split("\n")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(wire)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
    if not data:
        raise ConnectionResetError("the server closed the connection without an answer")
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    return RawAnswer(int(status_line.split(" ")[1]), headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
