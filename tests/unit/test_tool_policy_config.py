"""The per-tool policy's configuration (DESIGN.md §7): its YAML, what the schema refuses, and what `check` warns of.

Only the configuration: which names pass a rule is `policy/`'s to decide and test. Assertions are on YAML paths and
severities, never on wording. A base configuration that loads without warnings is changed one way per case, and each
case lists exactly the paths it must produce, so knock-on noise is caught too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from okta_agent_proxy.config.checks import Problem
from okta_agent_proxy.config.loader import format_loc
from okta_agent_proxy.config.models import AccessRule, Agent, GatewayConfig
from okta_agent_proxy.config.reference import reference_markdown
from tests.unit.helpers import load_config, paths, printed, problems_of, run_check, write_yaml

Doc = dict[str, Any]

# DESIGN.md §7's example, verbatim.
DESIGN_EXAMPLE = """\
agents:
  claude-code:
    tool_access:                 # per backend; a backend not listed here: every tool (backend_access still applies)
      employees:
        allow: ["get_*", "search_employees"]   # fnmatch globs, case-sensitive; absent = all
        deny:  ["*_salary"]                    # deny wins over allow
    resource_access: {employees: {allow: ["employees://public/*"]}}   # resource URIs, same shape
    prompt_access:   {employees: {deny: ["*"]}}                       # prompt names, same shape
backends:
  employees:
    tool_scopes:                 # a caller's token needs these scopes to call a matching tool (step-up)
      "update_*": [employees:write]
"""

ENVIRON = {"PSK": "k"}


def base_config() -> Doc:
    """Two backends and an agent that reaches one of them; loads with no warning."""
    backend = {"auth_method": "pre-shared-key", "auth_config": {"key": "${PSK}"}}
    return {
        "backends": {
            "employees": {"url": "http://localhost:9001/mcp", "paths": ["/employees"], **backend},
            "reports": {"url": "http://localhost:9003/mcp", "paths": ["/reports"], **copy.deepcopy(backend)},
        },
        "agents": {"claude-code": {"client_id": "0oa_claude", "backend_access": ["employees"]}},
    }


def merged(base: Doc, extra: Doc) -> Doc:
    """`base` with `extra`'s keys added, mapping into mapping."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def with_agent(**keys: Any) -> Doc:
    return merged(base_config(), {"agents": {"claude-code": keys}})


def with_backend(**keys: Any) -> Doc:
    return merged(base_config(), {"backends": {"employees": keys}})


def warnings_of(tmp_path: Path, doc: Doc) -> list[Problem]:
    return load_config(write_yaml(tmp_path, doc), ENVIRON).warnings


def test_the_base_config_loads_without_warnings(tmp_path: Path) -> None:
    assert warnings_of(tmp_path, base_config()) == []


# --- DESIGN.md §7's example -------------------------------------------------------------------------------------------


def test_design_example_loads_into_the_models(tmp_path: Path) -> None:
    loaded = load_config(write_yaml(tmp_path, merged(base_config(), yaml.safe_load(DESIGN_EXAMPLE))), ENVIRON)
    assert loaded.warnings == []
    agent = loaded.config.agents["claude-code"]
    assert agent.tool_access == {"employees": AccessRule(allow=("get_*", "search_employees"), deny=("*_salary",))}
    assert agent.resource_access == {"employees": AccessRule(allow=("employees://public/*",), deny=())}
    assert agent.prompt_access == {"employees": AccessRule(allow=None, deny=("*",))}
    assert loaded.config.backends["employees"].tool_scopes == {"update_*": ("employees:write",)}
    assert loaded.config.backends["reports"].tool_scopes == {}
    assert agent.has_access_rules("employees")
    assert not agent.has_access_rules("reports")


def test_without_rules_an_agent_has_none_anywhere() -> None:
    agent = Agent(client_id="0oa_claude", backend_access=("employees",))
    assert (agent.tool_access, agent.resource_access, agent.prompt_access) == ({}, {}, {})
    assert not agent.has_access_rules("employees")


@pytest.mark.parametrize("section", ["tool_access", "resource_access", "prompt_access"])
def test_a_rule_in_any_one_map_is_a_rule_for_that_backend_only(section: str) -> None:
    agent = Agent.model_validate({"client_id": "0oa_claude", section: {"employees": {}}})
    assert agent.has_access_rules("employees")
    assert not agent.has_access_rules("reports")
    assert not agent.has_access_rules("Employees")


def test_absent_allow_and_empty_allow_differ() -> None:
    """Absent: every name passes; `[]`: none does. The model keeps the difference for `policy/`."""
    assert AccessRule.model_validate({}).allow is None
    assert AccessRule.model_validate({"allow": None}).allow is None
    assert AccessRule.model_validate({"allow": []}).allow == ()
    assert AccessRule.model_validate({}).deny == ()


def test_globs_are_kept_as_written() -> None:
    """Case, spaces, unicode and fnmatch's `[…]` are the glob's own: nothing is normalized."""
    globs = ["Get_*", " search ", "résumé_?", "[!x]*", "a" * 512]
    assert AccessRule.model_validate({"deny": globs}).deny == tuple(globs)


def test_a_rule_is_frozen() -> None:
    rule = AccessRule(deny=("*",))
    with pytest.raises(ValidationError):
        rule.deny = ()  # type: ignore[misc]


# --- refusals: each names its YAML path -------------------------------------------------------------------------------

RULE = "agents.claude-code.tool_access.employees"

REFUSED: list[tuple[str, Doc, set[str]]] = [
    ("unknown key in a rule", with_agent(tool_access={"employees": {"hide": ["x"]}}), {f"{RULE}.hide"}),
    ("keys are case-sensitive", with_agent(tool_access={"employees": {"Allow": ["x"]}}), {f"{RULE}.Allow"}),
    ("misspelt map", with_agent(tools_access={"employees": {"deny": ["x"]}}), {"agents.claude-code.tools_access"}),
    ("empty allow glob", with_agent(tool_access={"employees": {"allow": ["get_*", ""]}}), {f"{RULE}.allow[1]"}),
    ("empty deny glob", with_agent(tool_access={"employees": {"deny": [""]}}), {f"{RULE}.deny[0]"}),
    ("NUL", with_agent(tool_access={"employees": {"deny": ["get_\x00"]}}), {f"{RULE}.deny[0]"}),
    ("tab", with_agent(tool_access={"employees": {"allow": ["\tget_*"]}}), {f"{RULE}.allow[0]"}),
    ("newline", with_agent(tool_access={"employees": {"allow": ["get_*\n"]}}), {f"{RULE}.allow[0]"}),
    ("escape", with_agent(tool_access={"employees": {"allow": ["\x1b[31m*"]}}), {f"{RULE}.allow[0]"}),
    ("DEL", with_agent(tool_access={"employees": {"deny": ["a\x7f"]}}), {f"{RULE}.deny[0]"}),
    ("C1 control", with_agent(tool_access={"employees": {"deny": ["a\x85"]}}), {f"{RULE}.deny[0]"}),
    ("glob over 512", with_agent(tool_access={"employees": {"deny": ["a" * 513]}}), {f"{RULE}.deny[0]"}),
    ("allow as a string", with_agent(tool_access={"employees": {"allow": "get_*"}}), {f"{RULE}.allow"}),
    ("deny as null", with_agent(tool_access={"employees": {"deny": None}}), {f"{RULE}.deny"}),
    ("a number glob", with_agent(tool_access={"employees": {"deny": [1]}}), {f"{RULE}.deny[0]"}),
    ("a rule as a list", with_agent(tool_access={"employees": ["get_*"]}), {RULE}),
    ("a map as a list", with_agent(tool_access=["employees"]), {"agents.claude-code.tool_access"}),
    (
        "resource_access is checked alike",
        with_agent(resource_access={"employees": {"allow": [""], "extra": 1}}),
        {"agents.claude-code.resource_access.employees.allow[0]", "agents.claude-code.resource_access.employees.extra"},
    ),
    (
        "prompt_access is checked alike",
        with_agent(prompt_access={"employees": {"deny": "*"}}),
        {"agents.claude-code.prompt_access.employees.deny"},
    ),
    ("misspelt tool_scopes", with_backend(tool_scope={"x": ["a"]}), {"backends.employees.tool_scope"}),
    ("tool_scopes as a list", with_backend(tool_scopes=["update_*"]), {"backends.employees.tool_scopes"}),
    (
        "tool_scopes value as a string",
        with_backend(tool_scopes={"update_*": "employees:write"}),
        {"backends.employees.tool_scopes.update_*"},
    ),
    (
        "tool_scopes scope with a space",
        with_backend(tool_scopes={"update_*": ["employees:write", "a b"]}),
        {"backends.employees.tool_scopes.update_*[1]"},
    ),
    ("tool_scopes empty glob", with_backend(tool_scopes={"": ["a"]}), {'backends.employees.tool_scopes.""'}),
    (
        "tool_scopes glob with a tab",
        with_backend(tool_scopes={"up\tdate": ["a"]}),
        {r"backends.employees.tool_scopes.up\tdate"},
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"), [(doc, expected) for _, doc, expected in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused_with_the_yaml_path(tmp_path: Path, doc: Doc, expected: set[str]) -> None:
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == expected


def test_a_path_never_carries_a_raw_control_character() -> None:
    """A bad mapping key is named by its path, escaped: a terminal reading `check`'s output sees no escape code."""
    assert format_loc(("backends", "e", "pre-shared-key", "tool_scopes", "\x1b[2J", "[key]")) == (
        r"backends.e.tool_scopes.\x1b[2J"
    )
    assert format_loc(("backends", "e", "pre-shared-key", "tool_scopes", "", "[key]")) == 'backends.e.tool_scopes.""'


def test_a_control_character_is_refused_even_in_the_models() -> None:
    with pytest.raises(ValidationError):
        AccessRule(deny=("\x00",))
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate(
            {"agents": {"a": {"client_id": "c", "prompt_access": {"b": {"allow": ["\u009b"]}}}}}
        )


# --- warnings from `check`: rules that cannot do what they seem to ----------------------------------------------------


def warning_paths(tmp_path: Path, doc: Doc) -> set[str]:
    return paths(warnings_of(tmp_path, doc), "warning")


def test_a_rule_for_an_undefined_backend_is_a_warning(tmp_path: Path) -> None:
    doc = with_agent(tool_access={"payroll": {"deny": ["*"]}}, backend_access=["employees", "payroll"])
    found = warning_paths(tmp_path, doc)
    assert found == {"agents.claude-code.tool_access.payroll", "agents.claude-code.backend_access[1]"}


def test_a_rule_for_an_undefined_backend_not_in_backend_access_is_one_warning(tmp_path: Path) -> None:
    doc = with_agent(prompt_access={"payroll": {"deny": ["*"]}})
    assert warning_paths(tmp_path, doc) == {"agents.claude-code.prompt_access.payroll"}


@pytest.mark.parametrize("section", ["tool_access", "resource_access", "prompt_access"])
def test_a_rule_for_a_backend_the_agent_cannot_reach_is_a_warning(tmp_path: Path, section: str) -> None:
    doc = with_agent(**{section: {"reports": {"deny": ["*"]}, "employees": {"deny": ["*"]}}})
    assert warning_paths(tmp_path, doc) == {f"agents.claude-code.{section}.reports"}


@pytest.mark.parametrize("section", ["tool_access", "resource_access", "prompt_access"])
def test_an_empty_allow_is_a_warning(tmp_path: Path, section: str) -> None:
    doc = with_agent(**{section: {"employees": {"allow": []}}})
    problems = warnings_of(tmp_path, doc)
    assert paths(problems, "warning") == {f"agents.claude-code.{section}.employees.allow"}
    assert all(p.severity == "warning" for p in problems)


def test_an_allow_glob_also_denied_verbatim_is_a_warning_at_that_allow_entry(tmp_path: Path) -> None:
    doc = with_agent(tool_access={"employees": {"allow": ["get_*", "search_*", "list_*"], "deny": ["list_*", "x"]}})
    assert warning_paths(tmp_path, doc) == {f"{RULE}.allow[2]"}


@pytest.mark.parametrize(
    "rule",
    [
        {"allow": ["get_*"], "deny": ["get_salary"]},  # overlapping, not verbatim: deny narrows allow
        {"allow": ["get_*"], "deny": ["GET_*"]},  # case-sensitive: a different glob
        {"deny": ["*"]},  # the way to hide everything
        {"allow": None, "deny": []},
        {},
    ],
)
def test_rules_that_do_something_are_not_warned_of(tmp_path: Path, rule: Doc) -> None:
    assert warning_paths(tmp_path, with_agent(tool_access={"employees": rule})) == set()


def test_every_warning_of_one_rule_is_reported(tmp_path: Path) -> None:
    doc = with_agent(
        resource_access={"reports": {"allow": [], "deny": ["*"]}, "nowhere": {"allow": ["a"], "deny": ["a"]}}
    )
    where = "agents.claude-code.resource_access"
    assert warning_paths(tmp_path, doc) == {
        f"{where}.reports",
        f"{where}.reports.allow",
        f"{where}.nowhere",
        f"{where}.nowhere.allow[0]",
    }


def test_tool_scopes_are_not_warned_of(tmp_path: Path) -> None:
    doc = with_backend(tool_scopes={"update_*": ["employees:write"], "*": []})
    assert warning_paths(tmp_path, doc) == set()


# --- the check command, as a user runs it -----------------------------------------------------------------------------


ISSUER_LINE = "OKTA_ISSUER=https://example.okta.com/oauth2/aus1"


def test_check_prints_each_policy_warning_and_passes(tmp_path: Path) -> None:
    doc = merged(
        with_agent(
            tool_access={"employees": {"allow": ["get_*"], "deny": ["get_*"]}, "payroll": {"deny": ["*"]}},
            resource_access={"reports": {"deny": ["*"]}},
            prompt_access={"employees": {"allow": []}},
        ),
        {"backends": yaml.safe_load(DESIGN_EXAMPLE)["backends"]},
    )
    result = run_check(tmp_path, doc, [ISSUER_LINE])
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stderr, "error") == set()
    assert printed(result.stderr, "warning") == {
        f"{RULE}.allow[0]",
        "agents.claude-code.tool_access.payroll",
        "agents.claude-code.resource_access.reports",
        "agents.claude-code.prompt_access.employees.allow",
    }


def test_check_refuses_a_bad_glob_and_exits_2(tmp_path: Path) -> None:
    result = run_check(tmp_path, with_agent(tool_access={"employees": {"deny": ["ok", ""]}}), [ISSUER_LINE])
    assert result.returncode == 2, result.stdout + result.stderr
    assert printed(result.stderr, "error") == {f"{RULE}.deny[1]"}


# --- the README reference ---------------------------------------------------------------------------------------------


def test_the_reference_lists_every_policy_key() -> None:
    reference = reference_markdown()
    for name in ("tool_access", "resource_access", "prompt_access", "allow", "deny", "tool_scopes"):
        assert f"| `{name}` |" in reference
    for model in (Agent, AccessRule):
        for name in model.model_fields:
            assert f"| `{name}` |" in reference
