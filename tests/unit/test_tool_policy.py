"""The per-tool policy's pure parts (DESIGN.md §7): the decision (`policy/tools.py`) and the list filters
(`mcp/list_filter.py`), without a network.

The property the whole feature rests on is tested with hypothesis: for random allow/deny globs and random names —
`*`, `?`, `[`, `]`, `!`, `/`, look-alike letters — what a list answer keeps after `filter_result` is exactly what
`Visibility.permits` lets a call through for, and that is what "deny wins, allow absent = everything" says. The SSE
filter must give the same bytes however the stream is cut into chunks, pass every non-list event byte for byte as
soon as its blank line has arrived, and rewrite only the list answer. Gaps found are pinned as strict xfails.
"""

from __future__ import annotations

import itertools
import json
import re
from fnmatch import translate
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.config.models import AccessRule, Agent
from okta_agent_proxy.errors import BadBackendResponse
from okta_agent_proxy.mcp.list_filter import MAX_LIST_BYTES, SseListFilter, filtered_json
from okta_agent_proxy.policy import tools as policy
from okta_agent_proxy.policy.tools import (
    CALLS,
    Kind,
    MalformedList,
    Policies,
    Rule,
    Visibility,
    call_kind,
    filter_result,
    step_up_scopes,
    unknown_message,
    visibility,
)

EMPLOYEES = Rule(allow=("get_*", "search_employees"), deny=("*_salary",))  # DESIGN.md §7's example
SETTINGS = settings(max_examples=300, deadline=None, database=None)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("rule", "name", "permitted"),
    [
        (EMPLOYEES, "get_employee", True),
        (EMPLOYEES, "search_employees", True),
        (EMPLOYEES, "get_salary", False),  # deny wins over allow
        (EMPLOYEES, "delete_employee", False),  # not allowed
        (EMPLOYEES, "GET_EMPLOYEE", False),  # case-sensitive
        (EMPLOYEES, "search_employees_fast", False),  # a glob matches the whole name
        (EMPLOYEES, "xget_employee", False),
        (Rule(), "anything", True),  # allow absent: everything not denied
        (Rule(allow=()), "anything", False),  # allow empty: nothing
        (Rule(deny=("*",)), "", False),
        (Rule(allow=("get_?",)), "get_a", True),
        (Rule(allow=("get_?",)), "get_ab", False),
        (Rule(allow=("get_[ab]",)), "get_b", True),
        (Rule(allow=("get_[!ab]",)), "get_b", False),
        (Rule(allow=("get_[!ab]",)), "get_c", True),
        (Rule(allow=("get_[",)), "get_[", True),  # an unclosed [ is a literal character
        (Rule(allow=("get_[*]",)), "get_*", True),  # a bracketed * is a literal star…
        (Rule(allow=("get_[*]",)), "get_x", False),  # …and matches nothing else
        (Rule(allow=("get_*",)), "get_*", True),  # a star in a name is just a character
        (Rule(allow=("employees://public/*",)), "employees://public/a/b", True),  # * crosses "/"
        (Rule(allow=("employees://public/*",)), "employees://private/a", False),
        (Rule(deny=("*salary*",)), "get_sаlary", True),  # Cyrillic а: another name, not normalised
        (Rule(deny=("*salary*",)), "get_salary\u200b", False),
        (Rule(allow=("get_*",)), "ｇet_employee", False),  # fullwidth ｇ
        (Rule(allow=("get_*",)), "get_\x00", True),
    ],
)
def test_rule(rule: Rule, name: str, permitted: bool) -> None:
    assert rule.permits(name) is permitted


def test_a_kind_without_rules_is_all_visible_and_kinds_do_not_mix() -> None:
    rules = Visibility(tools=Rule(deny=("secret",)))
    assert rules.permits(Kind.TOOL, "secret") is False
    assert rules.permits(Kind.PROMPT, "secret") is True  # the tool's rule is not the prompt's
    assert rules.permits(Kind.RESOURCE, "secret") is True
    both = Visibility(tools=Rule(allow=("a",)), prompts=Rule(allow=("b",)))
    assert [both.permits(kind, name) for kind in Kind for name in "ab"] == [True, False, True, True, False, True]


def test_the_memo_is_bounded_and_never_changes_a_decision() -> None:
    rules = Visibility(tools=Rule(deny=("*7",)))
    for round_ in range(2):
        for index in range(policy._MEMO_MAX * 2 + 3):
            name = f"tool_{index}"
            assert rules.permits(Kind.TOOL, name) is (not name.endswith("7")), (round_, name)
            assert len(rules._memo) <= policy._MEMO_MAX


def agent(**access: Any) -> Agent:
    return Agent(client_id="0oa_agent", backend_access=("employees", "reports"), **access)


def test_visibility_of_an_agent_on_a_backend() -> None:
    rule = AccessRule(allow=("get_*",), deny=("*_salary",))
    with_rules = agent(tool_access={"employees": rule}, prompt_access={"reports": AccessRule(deny=("*",))})
    assert visibility(agent(), "employees") is None  # no rules: its answers are never parsed
    assert visibility(with_rules, "other") is None
    employees = visibility(with_rules, "employees")
    assert employees == Visibility(tools=Rule(("get_*",), ("*_salary",)))
    reports = visibility(with_rules, "reports")
    assert reports == Visibility(prompts=Rule(None, ("*",)))
    assert reports is not None and reports.permits(Kind.TOOL, "anything")
    resources_only = agent(resource_access={"employees": AccessRule(allow=("employees://public/*",))})
    assert visibility(resources_only, "employees") == Visibility(resources=Rule(("employees://public/*",), ()))


def test_policies_are_made_once_per_agent_and_backend() -> None:
    policies = Policies()
    claude = agent(tool_access={"employees": AccessRule(deny=("x",))})
    first = policies.of("claude", claude, "employees")
    assert first is not None
    assert policies.of("claude", claude, "employees") is first  # memo is kept with it
    assert policies.of("claude", claude, "reports") is None
    assert policies.of("cursor", agent(), "employees") is None


def test_what_is_called_and_the_unknown_answers() -> None:
    assert dict(CALLS) == {
        "tools/call": Kind.TOOL,
        "resources/read": Kind.RESOURCE,
        "resources/subscribe": Kind.RESOURCE,
        "resources/unsubscribe": Kind.RESOURCE,
        "prompts/get": Kind.PROMPT,
    }
    assert call_kind("completion/complete", "ref/prompt") is Kind.PROMPT
    assert call_kind("completion/complete", "ref/resource") is Kind.RESOURCE
    assert call_kind("completion/complete", "ref/other") is None
    assert unknown_message(Kind.TOOL, "get_salary") == "Unknown tool: get_salary"
    assert unknown_message(Kind.RESOURCE, "employees://x") == "Unknown resource: employees://x"
    assert unknown_message(Kind.PROMPT, "p") == "Unknown prompt: p"


def test_step_up_scopes_are_every_matching_globs_in_order_without_repeats() -> None:
    tool_scopes = {"update_*": ("employees:write",), "*_salary": ("hr:read", "employees:write"), "x": ("other",)}
    assert step_up_scopes(tool_scopes, "update_salary") == ("employees:write", "hr:read")
    assert step_up_scopes(tool_scopes, "update_employee") == ("employees:write",)
    assert step_up_scopes(tool_scopes, "get_employee") == ()
    assert step_up_scopes(tool_scopes, "UPDATE_employee") == ()
    assert step_up_scopes({}, "anything") == ()


# ---------------------------------------------------------------- filtering a list result


def test_filter_result_keeps_the_visible_entries_in_order_and_everything_else() -> None:
    rules = Visibility(
        tools=EMPLOYEES, resources=Rule(allow=("employees://public/*",)), prompts=Rule(deny=("salary_*",))
    )
    result = {
        "tools": [{"name": "get_employee"}, {"name": "get_salary"}, {"name": "search_employees", "x": [1]}],
        "resources": [{"uri": "employees://public/a"}, {"uri": "employees://private/b", "name": "b"}],
        "resourceTemplates": [{"uriTemplate": "employees://private/{id}"}, {"uriTemplate": "employees://public/{id}"}],
        "prompts": [{"name": "salary_review"}, {"name": "introduce"}],
        "nextCursor": "opaque/cursor==",
        "_meta": {"tools": [{"name": "get_salary"}]},  # not a list answer's list: left alone
    }
    assert filter_result(result, rules) is True
    assert result == {
        "tools": [{"name": "get_employee"}, {"name": "search_employees", "x": [1]}],
        "resources": [{"uri": "employees://public/a"}],
        "resourceTemplates": [{"uriTemplate": "employees://public/{id}"}],
        "prompts": [{"name": "introduce"}],
        "nextCursor": "opaque/cursor==",
        "_meta": {"tools": [{"name": "get_salary"}]},
    }


def test_a_result_that_is_not_a_list_is_not_touched() -> None:
    result = {"content": [{"type": "text", "text": "get_salary"}], "tools": None}
    assert filter_result(result, Visibility(tools=Rule(allow=()))) is False
    assert result == {"content": [{"type": "text", "text": "get_salary"}], "tools": None}


@pytest.mark.parametrize(
    "result",
    [
        {"tools": {"name": "x"}},
        {"tools": "x"},
        {"tools": ["get_salary"]},
        {"tools": [{"title": "get_salary"}]},
        {"tools": [{"name": 7}]},
        {"resources": [{"name": "no uri"}]},
        {"resourceTemplates": [{"uri": "a template needs uriTemplate"}]},
        {"prompts": [None]},
    ],
)
def test_a_list_without_named_entries_is_malformed(result: dict[str, Any]) -> None:
    with pytest.raises(MalformedList):
        filter_result(result, Visibility(tools=Rule(), resources=Rule(), prompts=Rule()))


# ---------------------------------------------------------------- the property: visible in the list ⇔ call allowed

GLOB_ALPHABET = "ab*?[]!-/аａ"  # glob characters, a range dash, "/", a Cyrillic а and a fullwidth ａ
NAME_ALPHABET = "ab*?[]!-/аａ_\u200b"
globs = st.text(alphabet=GLOB_ALPHABET, min_size=1, max_size=6)
names = st.text(alphabet=NAME_ALPHABET, max_size=8)
rules = st.builds(
    Rule,
    allow=st.none() | st.lists(globs, max_size=3).map(tuple),
    deny=st.lists(globs, max_size=3).map(tuple),
)


def oracle(rule: Rule | None, name: str) -> bool:
    """DESIGN.md §7 said again: no deny glob matches, and allow is absent or one of its globs matches (globs as
    fnmatch's patterns, over the whole name, case-sensitive)."""
    if rule is None:
        return True

    def matches(glob: str) -> bool:
        return re.fullmatch(translate(glob), name, re.DOTALL) is not None

    return not any(matches(glob) for glob in rule.deny) and (rule.allow is None or any(map(matches, rule.allow)))


@SETTINGS
@given(
    tools=st.none() | rules,
    prompts=st.none() | rules,
    tool_names=st.lists(names, max_size=12),
    prompt_names=st.lists(names, max_size=6),
)
def test_visible_in_the_list_iff_the_call_is_allowed(
    tools: Rule | None, prompts: Rule | None, tool_names: list[str], prompt_names: list[str]
) -> None:
    visible = Visibility(tools=tools, prompts=prompts)
    answer = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "tools": [{"name": name, "inputSchema": {"type": "object"}} for name in tool_names],
            "prompts": [{"name": name} for name in prompt_names],
            "nextCursor": "c",
        },
    }
    body = json.dumps(answer, ensure_ascii=False).encode()
    listed = json.loads(filtered_json(body, visible))["result"]
    kept_tools = [tool["name"] for tool in listed["tools"]]
    kept_prompts = [prompt["name"] for prompt in listed["prompts"]]
    # Ask for the calls in another order than the list, so a memo keyed wrongly would show.
    called_tools = {name: visible.permits(Kind.TOOL, name) for name in reversed(tool_names)}
    called_prompts = {name: visible.permits(Kind.PROMPT, name) for name in reversed(prompt_names)}
    assert kept_tools == [name for name in tool_names if called_tools[name]]
    assert kept_prompts == [name for name in prompt_names if called_prompts[name]]
    assert called_tools == {name: oracle(tools, name) for name in tool_names}
    assert called_prompts == {name: oracle(prompts, name) for name in prompt_names}
    assert listed["nextCursor"] == "c"


# ---------------------------------------------------------------- whole JSON answers

RULES = Visibility(tools=EMPLOYEES)


def tools_answer(*names: str, **extra: Any) -> bytes:
    message = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": name} for name in names], **extra}}
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def test_filtered_json() -> None:
    filtered = filtered_json(tools_answer("get_employee", "get_salary", "ｇet_x", nextCursor="n"), RULES)
    assert json.loads(filtered) == json.loads(tools_answer("get_employee", nextCursor="n"))


@pytest.mark.parametrize(
    "body",
    [
        b"",  # a 202
        b'{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"Unknown tool: get_salary"}}',
        b'{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"get_salary"}]}}',
        b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}',
        b'{"jsonrpc": "2.0", "id": 3, "result": {}}',
    ],
)
def test_an_answer_that_is_not_a_list_passes_as_the_same_bytes(body: bytes) -> None:
    assert filtered_json(body, RULES) is body


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":"nope"}}',
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":null}]}}',
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[',
        b'{"result": not json}',
        b'{"result":' * 50_000 + b"{}" + b"}" * 50_000,
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"\xff"}]}}',
    ],
)
def test_a_list_answer_that_cannot_be_read_is_the_backends_error(body: bytes) -> None:
    with pytest.raises(BadBackendResponse) as raised:
        filtered_json(body, RULES)
    assert raised.value.status == 502 and raised.value.code == "bad_backend_response"


def test_an_escaped_result_key_is_filtered() -> None:
    body = tools_answer("get_employee", "get_salary").replace(b'"result"', b'"\\u0072esult"')
    assert json.loads(filtered_json(body, RULES))["result"]["tools"] == [{"name": "get_employee"}]


# ---------------------------------------------------------------- SSE answers

PROGRESS = [
    b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}\r\n\r\n',
    b": a keep-alive comment\n\n",
    b'id: 7\nretry: 250\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"data":"result"}}\n\n',
    b'data: {"jsonrpc":"2.0","id":9,"result":{"content":[]}}\n\n',  # a result, not of list shape
    b"data: not json at all\n\n",
    b"id: 8\n\n",
]
LIST_EVENT = (
    b"id: 12\r\n"
    b"event: message\r\n"
    b'data: {"jsonrpc":"2.0","id":3,\r\n'
    b'data: "result":{"tools":[{"name":"get_employee"},{"name":"get_salary"},{"name":"search_employees"}],'
    b'"nextCursor":"p2"}}\r\n'
    b"\r\n"
)
STREAM = b"".join(PROGRESS[:3]) + LIST_EVENT + b"".join(PROGRESS[3:])


def feed_in(chunks: list[bytes], rules: Visibility = RULES, **options: Any) -> tuple[list[bytes], bytes]:
    """What the filter sends after each chunk, and at the end."""
    stream = SseListFilter(rules, **options)
    return [stream.feed(chunk) for chunk in chunks], stream.end()


def joined(chunks: list[bytes], rules: Visibility = RULES, **options: Any) -> bytes:
    sent, rest = feed_in(chunks, rules, **options)
    return b"".join(sent) + rest


def the_list(output: bytes) -> dict[str, Any]:
    event = output[output.index(b"id: 12") :]
    event = event[: event.index(b"\n\n") + 2]
    data = b"".join(line[6:] for line in event.splitlines() if line.startswith(b"data: "))
    result: dict[str, Any] = json.loads(data)
    return result


def test_only_the_list_event_is_rewritten() -> None:
    output = joined([STREAM])
    assert output.startswith(b"".join(PROGRESS[:3]))  # byte for byte
    assert output.endswith(b"".join(PROGRESS[3:]))
    assert the_list(output) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": {"tools": [{"name": "get_employee"}, {"name": "search_employees"}], "nextCursor": "p2"},
    }
    event = output[len(b"".join(PROGRESS[:3])) : -len(b"".join(PROGRESS[3:]))]
    assert event.startswith(b"id: 12\r\nevent: message\r\n")  # its id and type kept


def test_each_event_is_sent_as_soon_as_it_is_complete() -> None:
    chunks = [PROGRESS[0][:-2], PROGRESS[0][-2:], PROGRESS[1], LIST_EVENT[:-2], LIST_EVENT[-2:]]
    sent, rest = feed_in(chunks)
    assert sent[0] == b""  # not complete yet: held
    assert sent[1] == PROGRESS[0]  # its blank line arrived: out at once
    assert sent[2] == PROGRESS[1]
    assert sent[3] == b""  # a list event can only be judged whole
    assert the_list(sent[4])["result"]["tools"] == [{"name": "get_employee"}, {"name": "search_employees"}]
    assert rest == b""


def test_without_a_list_the_stream_passes_byte_for_byte() -> None:
    stream = b"".join(PROGRESS) + b"data: an unterminated last event"
    assert joined([stream]) == stream
    assert joined([stream[:7], stream[7:30], stream[30:]]) == stream


@SETTINGS
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_output(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[start:end] for start, end in itertools.pairwise(points)]
    assert joined(chunks) == joined([STREAM])
    # Every non-list event is out by the time the chunk holding its last byte has been fed.
    sent, _ = feed_in(chunks)
    for event in PROGRESS:
        end = STREAM.index(event) + len(event)
        fed = next(index for index, point in enumerate(points[1:]) if point >= end)
        assert event in b"".join(sent[: fed + 1])


@SETTINGS
@given(
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    names=st.lists(st.text(alphabet=NAME_ALPHABET, max_size=6), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_any_line_ending_and_chunking_filters_the_same(line_end: bytes, names: list[str], cuts: list[int]) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": name} for name in names]}}
    data = json.dumps(message, ensure_ascii=False).encode()
    stream = line_end.join([b"event: message", b"data: " + data, b"", b"data: {}", b"", b""])
    points = [0, *sorted(cut % (len(stream) + 1) for cut in cuts), len(stream)]
    output = joined([stream[start:end] for start, end in itertools.pairwise(points)])
    assert output.endswith(line_end.join([b"data: {}", b"", b""]))  # the next event, untouched
    first = output.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n", 1)[0]
    sent = json.loads(first.rsplit(b"data: ", 1)[1])
    assert [tool["name"] for tool in sent["result"]["tools"]] == [
        name for name in names if RULES.permits(Kind.TOOL, name)
    ]


def test_an_event_past_the_limit_ends_the_stream_with_an_error_event() -> None:
    sent, rest = feed_in([PROGRESS[0], b"data: " + b"x" * 200, b"more\n\n", PROGRESS[1]], max_event_bytes=100)
    assert sent[0] == PROGRESS[0]
    assert sent[1].startswith(b"event: error\n")
    assert json.loads(sent[1].split(b"data: ", 1)[1])["error"] == "bad_backend_response"
    assert sent[2:] == [b"", b""] and rest == b""  # nothing after it
    assert MAX_LIST_BYTES == 8 * 1024 * 1024  # the documented limit (DESIGN.md §7 / README)


def test_an_unterminated_last_event_passes_as_it_came() -> None:
    sent, rest = feed_in([PROGRESS[0], b"data: {}\n"])
    assert sent == [PROGRESS[0], b""]
    assert rest == b"data: {}\n"


def test_a_malformed_list_event_becomes_the_error_event() -> None:
    event = b'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_salary"}],"prompts":5}}\n\n'
    output = joined([event])
    assert output.startswith(b"event: error\n")
    assert b"get_salary" not in output


def test_a_list_event_that_is_not_utf8_does_not_pass_unfiltered() -> None:
    event = b'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_salary","title":"\xff"}]}}\n\n'
    assert b"get_salary" not in joined([event])


def test_a_list_event_ended_by_a_cr_at_the_end_of_the_stream_is_filtered() -> None:
    event = b'event: message\rdata: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_salary"}]}}\r\r'
    assert b"get_salary" not in joined([event])


def test_an_event_that_may_hold_a_list_and_is_not_json_to_python_ends_the_stream() -> None:
    """A number of more than 4 300 digits (or nesting past the recursion limit) is not JSON to Python's reader but is
    to a JavaScript client's: such an event is refused, never passed."""
    rules = Visibility(tools=Rule(deny=("get_salary",)))
    long_number = b"1" * 5000
    event = b'data: {"jsonrpc":"2.0","id":1,"result":{"n":' + long_number + b',"tools":[{"name":"get_salary"}]}}\n\n'
    stream = SseListFilter(rules, 1)
    out = stream.feed(event) + stream.end()
    assert b"get_salary" not in out and b"bad_backend_response" in out and stream.failure == "bad_backend_response"


def test_a_bom_before_the_first_event_does_not_hide_it_from_the_filter() -> None:
    rules = Visibility(tools=Rule(deny=("get_salary",)))
    event = b'\xef\xbb\xbfdata: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_salary"},{"name":"a"}]}}\n\n'
    for split in range(1, 6):
        stream = SseListFilter(rules, 1)
        out = stream.feed(event[:split]) + stream.feed(event[split:]) + stream.end()
        assert b"get_salary" not in out and b'"name":"a"' in out, (split, out)


def test_resource_uris_not_in_canonical_form_are_hidden() -> None:
    rules = Visibility(resources=Rule(deny=("employees://private/*",)))
    assert rules.permits(Kind.RESOURCE, "employees://public/1")
    for uri in (
        "EMPLOYEES://private/7",
        "employees://private/x/../7",
        "employees://public/../private/7",
        "employees://private/%2e/7",
        "employees://%70rivate/7",
        "employees://Private/7",
    ):
        assert not rules.permits(Kind.RESOURCE, uri), uri
