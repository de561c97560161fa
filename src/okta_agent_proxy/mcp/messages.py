"""Inspect a POSTed MCP message without I/O (DESIGN.md §2, step 4).

The gateway reads the JSON-RPC envelope itself rather than trusting mirrored headers (`Mcp-Method`, `Mcp-Name`),
as the 2026-07-28 transport asks of intermediaries that authorise. It forwards the original bytes untouched; the
parsed view only feeds policy and the audit log. Anything valid JSON is forwarded — judging JSON-RPC validity is
the backend's job — but a body that is not JSON gets the JSON-RPC parse error here (JSON-RPC 2.0 §5.1), and a
JSON-RPC batch (an array; removed from MCP in 2025-06-18) gets 400 `bad_request`: a batch would carry calls past
the per-method rules, which judge one message — and so does an object with a repeated key anywhere in the body,
which parsers read differently.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal

from okta_agent_proxy.errors import BadRequest, MalformedJson

MODERN_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
_NAMED_METHODS = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}
_COMPLETION_REFS = {"ref/prompt": "name", "ref/resource": "uri"}  # completion/complete's `params.ref`
_ID_TYPES = (str, int)  # a tuple made once: `str | int` in the check would build a union on every message


@dataclass(frozen=True, slots=True)
class McpMessage:
    kind: Literal["request", "notification", "response", "other"]
    method: str | None = None
    id: str | int | None = None
    name: str | None = None  # tool or prompt name, or resource URI (for completion/complete: its ref's)
    protocol_version: str | None = None  # from params._meta (2026-07-28 and later)
    arguments: Any = None
    ref_type: str | None = None  # completion/complete: `params.ref.type` (ref/prompt or ref/resource)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Each JSON object, refused if it names a key twice: parsers disagree on which copy wins (Python's keeps the last,
    some keep the first), so the gateway could authorise one method while the backend runs another (I-JSON, RFC 7493
    §2.3, forbids repeated names). Checking as the objects are built costs less than any pre-scan of the bytes."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise BadRequest("a JSON object in the request has the same key twice")
    return document


_decode = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


def _load(body: bytes) -> Any:
    try:
        return _decode(body.decode("utf-8"))  # the common case, without json's encoding detection
    except (ValueError, RecursionError):
        # A BOM, UTF-16 or UTF-32 (RFC 8259 §8.1 lets parsers accept them), or not JSON at all.
        return json.loads(body, object_pairs_hook=_unique_keys)


def parse_message(body: bytes) -> McpMessage:
    try:
        document = _load(body)
    except (ValueError, RecursionError):
        raise MalformedJson("Parse error: the request body is not valid JSON") from None
    if isinstance(document, list):
        raise BadRequest("JSON-RPC batches are not accepted (removed from MCP in 2025-06-18): one message per POST")
    if not isinstance(document, dict):
        return McpMessage("other")
    method = document.get("method")
    raw_id = document.get("id")
    message_id = raw_id if isinstance(raw_id, _ID_TYPES) and not isinstance(raw_id, bool) else None
    if not isinstance(method, str):
        kind: Literal["response", "other"] = "response" if "result" in document or "error" in document else "other"
        return McpMessage(kind, id=message_id)
    params = document.get("params")
    name = arguments = version = ref_type = None
    if isinstance(params, dict):
        key = _NAMED_METHODS.get(method)
        value = params.get(key) if key else None
        ref = params.get("ref") if method == "completion/complete" else None
        if isinstance(ref, dict) and isinstance(ref.get("type"), str):
            ref_type = ref["type"]
            value = ref.get(_COMPLETION_REFS.get(ref_type, ""))
        name = value if isinstance(value, str) else None
        arguments = params.get("arguments")
        meta = params.get("_meta")
        if isinstance(meta, dict) and isinstance(meta.get(MODERN_VERSION_KEY), str):
            version = meta[MODERN_VERSION_KEY]
    kind_: Literal["request", "notification"] = "request" if "id" in document else "notification"
    return McpMessage(kind_, method, message_id, name, version, arguments, ref_type)


STATELESS_VERSION = "2026-07-28"  # the first protocol version without sessions


def is_stateless(version_header: str | None, message: McpMessage | None) -> bool:
    """A request of the stateless era (2026-07-28 on): its version is in the body's `_meta`, or in the header."""
    if message is not None and message.protocol_version is not None:
        return message.protocol_version >= STATELESS_VERSION
    return version_header is not None and version_header >= STATELESS_VERSION


def header_value(value: str) -> str:
    """An `Mcp-*` header's value: non-ASCII values travel as `=?base64?…?=` (PROTOCOL §4)."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return value
    return value


def routing_header_mismatch(method: str | None, name: str | None, message: McpMessage) -> str | None:
    """2026-07-28: why `Mcp-Method` / `Mcp-Name` (the headers' values, None if not sent) disagree with the body, or
    None. Intermediaries route and authorise on these headers, so one that says another thing than the body is
    refused (PROTOCOL §4: 400, -32020) rather than passed to a backend that might act on either."""
    if method is not None and header_value(method) != message.method:
        return "the Mcp-Method header does not match the method in the body"
    if name is not None and message.method in _NAMED_METHODS and header_value(name) != message.name:
        return "the Mcp-Name header does not match the name in the body"
    return None
