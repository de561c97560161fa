"""What an agent may see and call on a backend: tools, resources, prompts (DESIGN.md §7) — one pure decision.

`Visibility.permits(kind, name)` is the only rule: list answers are filtered with it and calls are refused with
it, so a tool hidden from `tools/list` can never be called and a callable tool is never hidden. A name is permitted
when no `deny` glob matches it and `allow` is absent or one of its globs matches (deny wins). Globs are fnmatch's,
case-sensitive (`fnmatchcase`: `*`, `?`, `[…]`), over the whole name — a tool's `name`, a prompt's `name`, a
resource's `uri`, a resource template's `uriTemplate` string in lists and the concrete URI on `resources/read`.

A backend without rules for the agent has no `Visibility` (`visibility` returns None): nothing of its answers is
parsed, and it streams at today's speed. Decisions are remembered per name (bounded), since the same few names come
back on every list and call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

from okta_agent_proxy.config.models import AccessRule, Agent

_MEMO_MAX = 4096


class Kind(StrEnum):
    TOOL = "tool"
    RESOURCE = "resource"
    PROMPT = "prompt"


# The methods that name one thing, and what they name (completion/complete: by its `ref`, `call_kind`).
CALLS: Mapping[str, Kind] = {
    "tools/call": Kind.TOOL,
    "resources/read": Kind.RESOURCE,
    "resources/subscribe": Kind.RESOURCE,
    "resources/unsubscribe": Kind.RESOURCE,
    "prompts/get": Kind.PROMPT,
}
_URI_ESCAPED_UNRESERVED = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee])")


def call_kind(method: str | None, ref_type: str | None = None) -> Kind | None:
    """What a request names: CALLS, or for completion/complete the kind of its `ref` (`ref/prompt`…)."""
    if method == "completion/complete":
        return {"ref/prompt": Kind.PROMPT, "ref/resource": Kind.RESOURCE}.get(ref_type or "")
    return CALLS.get(method or "")


def canonical_uri(uri: str) -> bool:
    """Whether a resource URI is written as servers compare it (RFC 3986 §6.2.2): scheme and authority in lower
    case, no `.`/`..` segments, no escaped unreserved character. A server may normalise `EMPLOYEES://private/%2e/7`
    into a URI a glob hides: such a URI is judged hidden rather than guessed at."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme != scheme.lower() or _URI_ESCAPED_UNRESERVED.search(uri):
        return False
    if rest.startswith("//"):
        authority = rest[2:].split("/", 1)[0]
        if authority != authority.lower():
            return False
    path = rest.split("?", 1)[0].split("#", 1)[0]
    return not any(segment in (".", "..") for segment in path.split("/"))


@dataclass(frozen=True)
class Rule:
    """`allow` None: everything not denied."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()

    def permits(self, name: str) -> bool:
        if any(fnmatchcase(name, glob) for glob in self.deny):
            return False
        return self.allow is None or any(fnmatchcase(name, glob) for glob in self.allow)


@dataclass
class Visibility:
    """One agent's rules on one backend (None for a kind without rules: all of it visible)."""

    tools: Rule | None = None
    resources: Rule | None = None
    prompts: Rule | None = None
    _memo: dict[tuple[Kind, str], bool] = field(default_factory=dict, repr=False, compare=False)
    # For the stream side (`mcp/list_filter.py`): a backend's list result, as sent → as filtered for these rules.
    answers: dict[bytes, bytes] = field(default_factory=dict, repr=False, compare=False)

    def rule(self, kind: Kind) -> Rule | None:
        return self.tools if kind is Kind.TOOL else self.resources if kind is Kind.RESOURCE else self.prompts

    def permits(self, kind: Kind, name: str) -> bool:
        key = (kind, name)
        known = self._memo.get(key)
        if known is not None:
            return known
        rule = self.rule(kind)
        allowed = rule is None or (rule.permits(name) and (kind is not Kind.RESOURCE or canonical_uri(name)))
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = allowed
        return allowed


def _rule(access: Mapping[str, AccessRule], backend: str) -> Rule | None:
    entry = access.get(backend)
    return Rule(entry.allow, entry.deny) if entry is not None else None


def visibility(agent: Agent, backend: str) -> Visibility | None:
    """The agent's rules on `backend`, or None when it has none (then nothing is filtered or refused)."""
    if not agent.has_access_rules(backend):
        return None
    return Visibility(
        _rule(agent.tool_access, backend), _rule(agent.resource_access, backend), _rule(agent.prompt_access, backend)
    )


class Policies:
    """`visibility` per (agent, backend), made once per config generation (its agents do not change within one)."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], Visibility | None] = {}

    def of(self, agent_name: str, agent: Agent, backend: str) -> Visibility | None:
        key = (agent_name, backend)
        try:
            return self._made[key]
        except KeyError:
            made = self._made[key] = visibility(agent, backend)
            return made


def unknown_message(kind: Kind, name: str) -> str:
    """The MCP specification's message for a name the server does not have: what a hidden one gets too."""
    return f"Unknown {kind}: {name}"


def step_up_scopes(tool_scopes: Mapping[str, tuple[str, ...]], tool: str) -> tuple[str, ...]:
    """The scopes a call of `tool` needs beyond the method's (`backends.<name>.tool_scopes`, every matching glob)."""
    needed: dict[str, None] = {}
    for glob, scopes in tool_scopes.items():
        if fnmatchcase(tool, glob):
            needed.update(dict.fromkeys(scopes))
    return tuple(needed)


# The requests whose answers are lists (a POST of any other method has no list in its answer to filter).
LIST_METHODS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list"})

# The list answers a visibility filters: result key → (kind, the key of each entry's name).
LISTS: Mapping[str, tuple[Kind, str]] = {
    "tools": (Kind.TOOL, "name"),
    "resources": (Kind.RESOURCE, "uri"),
    "resourceTemplates": (Kind.RESOURCE, "uriTemplate"),
    "prompts": (Kind.PROMPT, "name"),
}


class MalformedList(Exception):
    """A list answer whose entries are not objects with a string name: the backend's fault (502)."""


def filter_result(result: dict[str, Any], rules: Visibility) -> bool:
    """Drop the entries `rules` hide from a JSON-RPC result of list shape, in place; whether anything was a list
    (other keys — `nextCursor`, `_meta` — are left as they are: pagination passes through)."""
    found = False
    for key, (kind, name_key) in LISTS.items():
        entries = result.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise MalformedList(f"result.{key} is not a list")
        kept = []
        for entry in entries:
            name = entry.get(name_key) if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise MalformedList(f"an entry of result.{key} has no string {name_key}")
            if rules.permits(kind, name):
                kept.append(entry)
        result[key] = kept
        found = True
    return found
