"""`mcp/sse.SseEvents`: the events of a stream, however the bytes are cut into chunks (WHATWG HTML §9.2.6)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.mcp.sse import SseEvents, is_response_to

STREAM = (
    b": a comment\n"
    b'event: message\nid: 1\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
    b"data: first line\r\ndata:second line\r\n\r\n"
    b'retry: 100\rdata: {"jsonrpc":"2.0","id":7,"result":{}}\r\r'
    b"data: \n\n"
    b"id: only an id\n\n"
)
EXPECTED = [
    b'{"jsonrpc":"2.0","method":"notifications/progress"}',
    b"first line\nsecond line",
    b'{"jsonrpc":"2.0","id":7,"result":{}}',
    b"",
]


def feed_in(chunks: list[bytes], watcher: SseEvents | None = None) -> list[bytes]:
    watcher = watcher or SseEvents()
    events = []
    for chunk in chunks:
        events += watcher.feed(chunk)
    return events


def test_whole_stream() -> None:
    assert feed_in([STREAM]) == EXPECTED


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert feed_in(chunks) == EXPECTED


def test_a_cr_lf_split_across_chunks_is_one_line_end() -> None:
    assert feed_in([b"data: a\r", b"\n\r", b"\n"]) == [b"a"]


def test_an_event_over_the_limit_is_let_pass_unwatched_and_the_next_one_is_seen() -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    after = b'data: {"id":1,"result":{}}\n\n'
    chunks = [big[i : i + 700] for i in range(0, len(big), 700)] + [after]
    assert feed_in(chunks, SseEvents(max_event_bytes=1000)) == [b'{"id":1,"result":{}}']


def test_a_long_event_in_small_chunks() -> None:
    data = json.dumps({"jsonrpc": "2.0", "id": "a", "result": {"text": "y" * 200_000}}).encode()
    stream = b"data: " + data + b"\n\n"
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert feed_in(chunks) == [data]


def test_is_response_to_matches_the_id_and_its_type() -> None:
    assert is_response_to(b'{"jsonrpc":"2.0","id":7,"result":{}}', 7)
    assert is_response_to(b'{"jsonrpc":"2.0","id":"7","error":{"code":1}}', "7")
    assert not is_response_to(b'{"jsonrpc":"2.0","id":"7","result":{}}', 7)
    assert not is_response_to(b'{"jsonrpc":"2.0","id":8,"result":{}}', 7)
    assert not is_response_to(b'{"jsonrpc":"2.0","method":"x","id":7}', 7)  # a request, not a response
    assert not is_response_to(b"not json", 7)
