"""parse_message (okta_agent_proxy.mcp.messages): the JSON-RPC envelope as policy and audit see it, without I/O."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.errors import BadRequest, MalformedJson
from okta_agent_proxy.mcp.messages import MODERN_VERSION_KEY, parse_message


def _parse(document: Any) -> Any:
    return parse_message(json.dumps(document).encode())


def test_request() -> None:
    message = _parse({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}})
    assert (message.kind, message.method, message.id) == ("request", "tools/list", 7)
    assert message.name is None
    assert message.protocol_version is None


def test_request_with_string_id() -> None:
    message = _parse({"jsonrpc": "2.0", "id": "abc", "method": "ping"})
    assert (message.kind, message.id) == ("request", "abc")


@pytest.mark.parametrize("raw_id", [None, True, 1.5, [1], {"a": 1}])
def test_request_with_unusual_id_is_still_a_request(raw_id: Any) -> None:
    message = _parse({"jsonrpc": "2.0", "id": raw_id, "method": "ping"})
    assert message.kind == "request"
    assert message.id is None


def test_notification() -> None:
    message = _parse({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (message.kind, message.method, message.id) == ("notification", "notifications/initialized", None)


@pytest.mark.parametrize("member", ["result", "error"])
def test_response(member: str) -> None:
    message = _parse({"jsonrpc": "2.0", "id": 3, member: {}})
    assert (message.kind, message.id, message.method) == ("response", 3, None)


@pytest.mark.parametrize(
    "document",
    [[{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}], [], [1], [[]]],
)
def test_a_batch_is_refused(document: Any) -> None:
    with pytest.raises(BadRequest) as refused:
        _parse(document)
    assert (refused.value.status, refused.value.code) == (400, "bad_request")


@pytest.mark.parametrize("document", [1, "text", None, True, {"jsonrpc": "2.0"}, {"method": 5, "id": 1}])
def test_other_json(document: Any) -> None:
    assert _parse(document).kind == "other"


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("tools/call", {"name": "get_employee", "arguments": {"id": 1}}, "get_employee"),
        ("prompts/get", {"name": "summary", "arguments": {"topic": "x"}}, "summary"),
        ("resources/read", {"uri": "file:///hr/handbook.md"}, "file:///hr/handbook.md"),
        ("resources/read", {"name": "not-the-uri"}, None),
        ("tools/call", {"name": 42}, None),
        ("tools/list", {"name": "ignored"}, None),
        ("tools/call", ["name", "x"], None),
    ],
)
def test_name_of_named_methods(method: str, params: Any, name: str | None) -> None:
    message = _parse({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    assert message.name == name


def test_tool_call_arguments() -> None:
    message = _parse(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": {"a": [1, 2]}}}
    )
    assert message.arguments == {"a": [1, 2]}


def test_protocol_version_from_meta() -> None:
    params = {"name": "t", "_meta": {MODERN_VERSION_KEY: "2026-07-28", "progressToken": 1}}
    message = _parse({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})
    assert message.protocol_version == "2026-07-28"
    assert message.name == "t"


@pytest.mark.parametrize("meta", [None, "2026-07-28", {MODERN_VERSION_KEY: 20260728}, {"protocolVersion": "x"}])
def test_protocol_version_absent_or_malformed(meta: Any) -> None:
    message = _parse({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}})
    assert message.protocol_version is None


@pytest.mark.parametrize(
    "body",
    [b"", b" ", b"{", b"{'a': 1}", b'{"a": }', b"[1,]", b"nul", b'{"id": 1} trailing', b"\xff\xfe\xfa", b"\x80abc"],
)
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(MalformedJson) as caught:
        parse_message(body)
    error = caught.value
    assert error.status == 400
    body_json = error.body()
    assert body_json["error"]["code"] == -32700
    assert body_json["id"] is None


def test_deeply_nested_json_is_a_parse_error_not_a_crash() -> None:
    """Regression: json.loads raised RecursionError on deep nesting, which became a 500."""
    depth = 200_000
    with pytest.raises(MalformedJson):
        parse_message(b"[" * depth + b"]" * depth)
    with pytest.raises(MalformedJson):
        parse_message(b'{"a":' * depth + b"1" + b"}" * depth)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_unicode_encodings_json_allows(encoding: str) -> None:
    text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "é"}}, ensure_ascii=False)
    assert parse_message(text.encode(encoding)).name == "é"


# --- properties -------------------------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
_ENVELOPE = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0")},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=10), st.none()),
        "method": st.sampled_from(["tools/call", "prompts/get", "resources/read", "ping"]) | st.text(max_size=10),
        "params": _JSON,
        "result": _JSON,
    },
)


@settings(max_examples=100, deadline=None, database=None)
@given(st.one_of(_JSON, _ENVELOPE))
def test_property_any_json_value_parses(value: Any) -> None:
    if isinstance(value, list):
        with pytest.raises(BadRequest):
            parse_message(json.dumps(value).encode())
        return
    message = parse_message(json.dumps(value).encode())
    assert message.kind in ("request", "notification", "response", "other")
    if isinstance(value, dict) and isinstance(value.get("method"), str):
        assert message.method == value["method"]
        assert message.kind == ("request" if "id" in value else "notification")


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.one_of(st.lists(_JSON, min_size=0, max_size=4), st.dictionaries(st.text(max_size=8), _JSON, max_size=4)),
    st.data(),
)
def test_property_truncated_json_is_malformed(container: Any, data: st.DataObject) -> None:
    text = json.dumps(container)
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    with pytest.raises(MalformedJson):
        parse_message(text[:cut].encode())


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=64))
def test_property_invalid_utf8_is_malformed(tail: bytes) -> None:
    # 0xFF 0xFF is neither a BOM nor valid UTF-8, so the body cannot be JSON whatever follows.
    with pytest.raises(MalformedJson):
        parse_message(b"\xff\xff" + tail)


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=64))
def test_property_any_bytes_parse_or_raise_malformed_json(body: bytes) -> None:
    with contextlib.suppress(MalformedJson):
        parse_message(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","\\u006dethod":"tools/list"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"x":1,"x":2}}}',
        '{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}'.encode("utf-16"),
    ],
    ids=["method", "escaped-method", "tool-name", "argument", "utf-16"],
)
def test_a_repeated_key_is_refused(body: bytes) -> None:
    # Parsers disagree on which copy wins: the gateway could authorise one method and the backend run another.
    with pytest.raises(BadRequest) as refused:
        parse_message(body)
    assert (refused.value.status, refused.value.code) == (400, "bad_request")


def test_a_key_name_repeated_at_different_levels_is_fine() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"n","arguments":{"name":"\\u00e9","id":2}}}'
    message = parse_message(body)
    assert (message.method, message.name, message.arguments) == ("tools/call", "n", {"name": "é", "id": 2})
