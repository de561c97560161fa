"""The OAuth front door's configuration (DESIGN.md §8): its settings, its YAML section, and what `check` refuses.

Assertions are on variable names, YAML paths and severities, never on wording. Keys are generated here (EC P-256
for the front door's signing key, as the design requires; RSA and other curves to show what is refused).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from okta_agent_proxy.config.checks import Problem
from okta_agent_proxy.config.loader import ConfigError, LoadedConfig, load
from okta_agent_proxy.config.models import FrontDoorConfig
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.frontdoor.redirects import DEFAULT_REDIRECT_GLOBS
from tests.unit.helpers import ec_key, paths, pem, pem_body_chunks, printed, private_jwk, rsa_key, run_check, write_yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET = "front-door-s3cr3t-that-must-never-print-7a6b"

# Everything the front door needs, set: no refusal.
COMPLETE: dict[str, Any] = {
    "FRONT_DOOR": "on",
    "OKTA_DOMAIN": "https://example.okta.com",
    "OKTA_CLIENT_ID": "0oa_gateway",
    "OKTA_CLIENT_SECRET": SECRET,
    "GATEWAY_BASE_URL": "https://gateway.example.com",
}


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def loc_of(caught: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {str(error["loc"][0]) for error in caught.value.errors()}


def env_problems(tmp_path: Path, **values: Any) -> list[Problem]:
    """The problems `load` reports for these settings (what `check` and `serve` print): never a value."""
    with pytest.raises(ConfigError) as caught:
        load(write_yaml(tmp_path, ""), environ={}, env_file=None, overrides=values)
    return caught.value.problems


def refused(values: dict[str, Any]) -> list[str]:
    """The variables `front_door_refusals` names, in order."""
    return [variable for variable, _ in settings(**values).front_door_refusals()]


# --- defaults ---------------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = settings()
    assert s.FRONT_DOOR == "off"
    assert not s.front_door
    assert s.FRONT_DOOR_CIMD == "on"
    assert s.front_door_cimd
    assert (s.FRONT_DOOR_TOKEN_TTL_SECONDS, s.FRONT_DOOR_REFRESH_TTL_DAYS, s.FRONT_DOOR_REFRESH_GRACE_SECONDS) == (
        3600,
        30,
        30,
    )
    assert s.FRONT_DOOR_REDIRECT_URIS is None
    assert s.redirect_policy.globs == tuple(DEFAULT_REDIRECT_GLOBS.split(","))
    assert s.STATE_ENCRYPTION_KEY is None
    assert s.FRONT_DOOR_SIGNING_KEY is None
    assert s.FRONT_DOOR_SIGNING_KEY_PREVIOUS is None
    assert s.OKTA_CLIENT_PRIVATE_KEY is None
    assert (s.FRONT_DOOR_AGENT_CLIENT_ID, s.FRONT_DOOR_AGENT_PRIVATE_KEY) == (None, None)
    assert s.trusted_proxies == ()


def test_off_refuses_nothing_whatever_is_missing() -> None:
    assert settings().front_door_refusals() == []
    assert settings(FRONT_DOOR="off", GATEWAY_BASE_URL="http://gateway.example.com/x").front_door_problems() == []


# --- on/off -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[("on", "on"), ("ON", "on"), (" On ", "on"), ("true", "on"), ("True", "on"), ("1", "on")],
        *[("off", "off"), ("OFF", "off"), ("false", "off"), ("FALSE", "off"), ("0", "off")],
    ],
)
@pytest.mark.parametrize("name", ["FRONT_DOOR", "FRONT_DOOR_CIMD"])
def test_switches_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    s = settings()
    assert getattr(s, name) == expected
    assert (s.front_door if name == "FRONT_DOOR" else s.front_door_cimd) is (expected == "on")


@pytest.mark.parametrize("value", [True, False])
def test_switch_accepts_a_boolean(value: bool) -> None:
    assert settings(FRONT_DOOR=value).front_door is value


@pytest.mark.parametrize("value", ["yes", "enabled", "2", "onn", ""])
@pytest.mark.parametrize("name", ["FRONT_DOOR", "FRONT_DOOR_CIMD"])
def test_switch_refuses_other_words(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(**{name: value})
    assert loc_of(caught) == {name}


# --- authenticates ----------------------------------------------------------------------------------------------------


def test_authenticates_with_an_issuer_or_the_front_door(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings().authenticates  # the conftest sets OKTA_ISSUER
    monkeypatch.delenv("OKTA_ISSUER")
    assert not settings().authenticates
    assert settings(FRONT_DOOR="on").authenticates
    assert settings(OKTA_ISSUER="https://example.okta.com/oauth2/aus1").authenticates


# --- bounds -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("FRONT_DOOR_TOKEN_TTL_SECONDS", 60, 86400),
        ("FRONT_DOOR_REFRESH_TTL_DAYS", 1, 365),
        ("FRONT_DOOR_REFRESH_GRACE_SECONDS", 0, 300),
    ],
)
def test_durations_have_bounds(name: str, low: int, high: int) -> None:
    assert getattr(settings(**{name: low}), name) == low
    assert getattr(settings(**{name: high}), name) == high
    for bad in (low - 1, high + 1, "soon"):
        with pytest.raises(ValidationError) as caught:
            settings(**{name: bad})
        assert loc_of(caught) == {name}


def test_state_encryption_key_needs_32_bytes(tmp_path: Path) -> None:
    assert settings(STATE_ENCRYPTION_KEY="k" * 32).STATE_ENCRYPTION_KEY is not None
    short = "s3cr3t-but-only-31-bytes-long-x"
    assert len(short) == 31
    problems = env_problems(tmp_path, STATE_ENCRYPTION_KEY=short)
    assert paths(problems) == {"env STATE_ENCRYPTION_KEY"}
    assert all(short not in str(problem) for problem in problems)


# --- redirect URI globs -----------------------------------------------------------------------------------------------


def test_redirect_globs_are_compiled_at_load() -> None:
    s = settings(FRONT_DOOR_REDIRECT_URIS="https://*.example.com/*, cursor://*")
    assert s.redirect_policy.globs == ("https://*.example.com/*", "cursor://*")
    assert s.redirect_policy.allows("https://app.example.com/cb")
    assert not s.redirect_policy.allows("https://evil.test/cb")


@pytest.mark.parametrize("value", ["*://anything", "no-scheme-here", "https://a b/", ", ,"])
def test_bad_redirect_globs_are_refused(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(FRONT_DOOR_REDIRECT_URIS=value)
    assert loc_of(caught) == {"FRONT_DOOR_REDIRECT_URIS"}


def test_an_empty_redirect_setting_is_the_default_not_nothing(tmp_path: Path) -> None:
    env_file = tmp_path / "blank.env"
    env_file.write_text("FRONT_DOOR_REDIRECT_URIS=\n")
    s = Settings(_env_file=str(env_file))
    assert s.FRONT_DOOR_REDIRECT_URIS is None
    assert s.redirect_policy.allows("http://127.0.0.1:33418/callback")


# --- keys -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FRONT_DOOR_SIGNING_KEY", "FRONT_DOOR_SIGNING_KEY_PREVIOUS"])
@pytest.mark.parametrize("encoding", ["pem", "pkcs1-pem", "jwk"])
def test_signing_key_p256_loads(name: str, encoding: str) -> None:
    key = ec_key("secp256r1")
    text = {
        "pem": pem(key),
        "pkcs1-pem": pem(key, pkcs8=False),
        "jwk": json.dumps(private_jwk(key)),
    }[encoding]
    assert getattr(settings(**{name: text}), name).get_secret_value() == text


@pytest.mark.parametrize("name", ["FRONT_DOOR_SIGNING_KEY", "FRONT_DOOR_SIGNING_KEY_PREVIOUS"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: pem(rsa_key()),
        lambda: json.dumps(private_jwk(rsa_key())),
        lambda: pem(ec_key("secp384r1")),
        lambda: "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        lambda: "not a key at all",
    ],
    ids=["rsa-pem", "rsa-jwk", "p384", "garbage-pem", "garbage"],
)
def test_signing_key_must_be_es256(tmp_path: Path, name: str, make: Any) -> None:
    text = make()
    problems = env_problems(tmp_path, **{name: text})
    assert paths(problems) == {f"env {name}"}
    shown = "\n".join(str(problem) for problem in problems)
    assert all(chunk not in shown for chunk in pem_body_chunks(text))
    assert text not in shown


def test_signing_key_public_jwk_is_refused() -> None:
    public = {k: v for k, v in private_jwk(ec_key()).items() if k != "d"}
    with pytest.raises(ValidationError) as caught:
        settings(FRONT_DOOR_SIGNING_KEY=json.dumps(public))
    assert loc_of(caught) == {"FRONT_DOOR_SIGNING_KEY"}


@pytest.mark.parametrize("name", ["OKTA_CLIENT_PRIVATE_KEY", "FRONT_DOOR_AGENT_PRIVATE_KEY"])
def test_client_keys_may_be_rsa_or_ec_and_must_load(tmp_path: Path, name: str) -> None:
    for text in (pem(rsa_key()), json.dumps(private_jwk(ec_key()))):
        assert getattr(settings(**{name: text}), name).get_secret_value() == text
    bad = f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n"
    problems = env_problems(tmp_path, **{name: bad})
    assert paths(problems) == {f"env {name}"}
    assert all(SECRET not in str(problem) for problem in problems)


def test_secrets_never_print() -> None:
    key = pem(ec_key())
    s = settings(
        **COMPLETE,
        STATE_ENCRYPTION_KEY=SECRET,
        FRONT_DOOR_SIGNING_KEY=key,
        OKTA_CLIENT_PRIVATE_KEY=key,
        FRONT_DOOR_AGENT_CLIENT_ID="wlp_agent",
        FRONT_DOOR_AGENT_PRIVATE_KEY=key,
    )
    shown = repr(s) + str(s)
    assert SECRET not in shown
    assert all(chunk not in shown for chunk in pem_body_chunks(key))


# --- trusted proxies --------------------------------------------------------------------------------------------------


def test_trusted_proxies_are_networks() -> None:
    s = settings(TRUSTED_PROXIES=" 10.0.0.5, 10.1.0.0/16 ,fd00::/8,::1")
    assert s.trusted_proxies == (
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert ipaddress.ip_address("10.1.200.3") in s.trusted_proxies[1]


@pytest.mark.parametrize("value", ["gateway.example.com", "10.0.0.5/8", "10.0.0.0/33", "10.0.0.256", "10.0.0.0/8;"])
def test_bad_trusted_proxies_are_refused(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(TRUSTED_PROXIES=value)
    assert loc_of(caught) == {"TRUSTED_PROXIES"}


def test_blank_trusted_proxies_are_none() -> None:
    assert settings(TRUSTED_PROXIES="").trusted_proxies == ()
    assert settings(TRUSTED_PROXIES="").TRUSTED_PROXIES is None


# --- refusals when the front door is on -------------------------------------------------------------------------------


def test_complete_settings_are_not_refused() -> None:
    assert refused(COMPLETE) == []


def test_nothing_set_is_refused_by_name() -> None:
    assert refused({"FRONT_DOOR": "on"}) == ["OKTA_DOMAIN", "OKTA_CLIENT_ID", "OKTA_CLIENT_SECRET"]
    problems = settings(FRONT_DOOR="on").front_door_problems()
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        "OKTA_DOMAIN",
        "OKTA_CLIENT_ID",
        "OKTA_CLIENT_SECRET",
    ]


@pytest.mark.parametrize("name", ["OKTA_DOMAIN", "OKTA_CLIENT_ID", "OKTA_CLIENT_SECRET"])
def test_each_required_setting(name: str) -> None:
    assert refused({k: v for k, v in COMPLETE.items() if k != name}) == [name]


def test_a_private_key_replaces_the_secret() -> None:
    values = {k: v for k, v in COMPLETE.items() if k != "OKTA_CLIENT_SECRET"}
    assert refused({**values, "OKTA_CLIENT_PRIVATE_KEY": pem(rsa_key())}) == []


def test_a_blank_secret_in_the_env_file_is_unset(tmp_path: Path) -> None:
    env_file = tmp_path / "blank.env"
    env_file.write_text("FRONT_DOOR=on\nOKTA_CLIENT_ID=\nOKTA_CLIENT_SECRET=\nOKTA_CLIENT_PRIVATE_KEY=\n")
    s = Settings(_env_file=str(env_file), OKTA_DOMAIN="https://example.okta.com")
    assert [variable for variable, _ in s.front_door_refusals()] == ["OKTA_CLIENT_ID", "OKTA_CLIENT_SECRET"]


@pytest.mark.parametrize(
    "base_url",
    [
        None,
        "https://gateway.example.com",
        "https://gateway.example.com:8443/",
        "http://localhost:8000",
        "http://127.0.0.1:8000",
        "http://[::1]:8000",
    ],
)
def test_base_urls_the_front_door_accepts(base_url: str | None) -> None:
    values = {k: v for k, v in COMPLETE.items() if k != "GATEWAY_BASE_URL"}
    if base_url is not None:
        values["GATEWAY_BASE_URL"] = base_url
    assert refused(values) == []


@pytest.mark.parametrize(
    ("base_url", "count"),
    [
        ("http://gateway.example.com", 1),
        ("http://10.0.0.7:8000", 1),
        ("http://127.0.0.1.nip.io", 1),
        ("https://gateway.example.com/mcp", 1),
        ("http://localhost:8000/prefix", 1),
        ("http://gateway.example.com/prefix", 2),
    ],
)
def test_base_urls_the_front_door_refuses(base_url: str, count: int) -> None:
    assert refused({**COMPLETE, "GATEWAY_BASE_URL": base_url}) == ["GATEWAY_BASE_URL"] * count


def test_base_url_path_is_no_problem_with_the_front_door_off() -> None:
    assert settings(GATEWAY_BASE_URL="http://gateway.example.com/prefix").front_door_refusals() == []


def test_the_ai_agent_comes_with_its_key() -> None:
    key = json.dumps(private_jwk(ec_key()))
    assert refused({**COMPLETE, "FRONT_DOOR_AGENT_CLIENT_ID": "wlp_agent"}) == ["FRONT_DOOR_AGENT_PRIVATE_KEY"]
    assert refused({**COMPLETE, "FRONT_DOOR_AGENT_PRIVATE_KEY": key}) == ["FRONT_DOOR_AGENT_CLIENT_ID"]
    assert refused({**COMPLETE, "FRONT_DOOR_AGENT_CLIENT_ID": "wlp_agent", "FRONT_DOOR_AGENT_PRIVATE_KEY": key}) == []


def test_refusals_never_quote_a_secret() -> None:
    key = pem(ec_key())
    s = settings(
        FRONT_DOOR="on",
        OKTA_CLIENT_SECRET=SECRET,
        GATEWAY_BASE_URL=f"http://gateway.example.com/{SECRET}",
        FRONT_DOOR_AGENT_PRIVATE_KEY=key,
    )
    text = "\n".join(s.front_door_problems())
    assert SECRET not in text
    assert all(chunk not in text for chunk in pem_body_chunks(key))


# --- YAML: front_door and agents.<name>.client_names ------------------------------------------------------------------


def yaml_config(**front_door: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "backends": {
            "docs": {
                "url": "http://localhost:9001/mcp",
                "paths": ["/docs"],
                "auth_method": "pre-shared-key",
                "auth_config": {"key": "${PSK}"},
            }
        },
        "agents": {"claude-code": {"client_id": "0oa_claude", "backend_access": ["docs"]}},
    }
    if front_door:
        document["front_door"] = front_door
    return document


def load_yaml(tmp_path: Path, document: dict[str, Any], **overrides: Any) -> LoadedConfig:
    return load(write_yaml(tmp_path, document), environ={"PSK": "k"}, env_file=None, overrides=overrides)


def problems_loading(tmp_path: Path, document: dict[str, Any], **overrides: Any) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load_yaml(tmp_path, document, **overrides)
    return caught.value.problems


def test_front_door_section_defaults(tmp_path: Path) -> None:
    loaded = load_yaml(tmp_path, yaml_config())
    assert loaded.config.front_door == FrontDoorConfig()
    assert loaded.config.front_door.default_agent is None
    assert loaded.config.front_door.default_scopes == ("mcp:read",)
    assert loaded.config.front_door.scopes_by_group == {}
    assert loaded.config.agents["claude-code"].client_names == ()


def test_front_door_section_loads(tmp_path: Path) -> None:
    document = yaml_config(
        default_agent="claude-code",
        default_scopes=["mcp:read", "docs:search"],
        scopes_by_group={"MCP Writers": ["mcp:write"], "admins": ["mcp:write", "mcp:admin"]},
    )
    document["agents"]["claude-code"]["client_names"] = ["Claude Code (*)", "claude-*"]
    config = load_yaml(tmp_path, document).config
    assert config.front_door.default_agent == "claude-code"
    assert config.front_door.default_scopes == ("mcp:read", "docs:search")
    assert config.front_door.scopes_by_group == {"MCP Writers": ("mcp:write",), "admins": ("mcp:write", "mcp:admin")}
    assert config.agents["claude-code"].client_names == ("Claude Code (*)", "claude-*")


def test_unknown_default_agent_is_an_error(tmp_path: Path) -> None:
    problems = problems_loading(tmp_path, yaml_config(default_agent="cursor"))
    assert paths(problems) == {"front_door.default_agent"}


@pytest.mark.parametrize(
    ("front_door", "error"),
    [
        ({"default_scopes": ["mcp read"]}, "front_door.default_scopes[0]"),
        ({"default_scopes": [""]}, "front_door.default_scopes[0]"),
        ({"scopes_by_group": {"admins": ["mcp\\write"]}}, "front_door.scopes_by_group.admins[0]"),
        ({"scopes_by_group": {"admins": "mcp:write"}}, "front_door.scopes_by_group.admins"),
        ({"default_agnet": "claude-code"}, "front_door.default_agnet"),
        ({"default_agent": ""}, "front_door.default_agent"),
    ],
)
def test_bad_front_door_values_name_their_path(tmp_path: Path, front_door: dict[str, Any], error: str) -> None:
    assert paths(problems_loading(tmp_path, yaml_config(**front_door))) == {error}


def test_empty_group_name_is_refused(tmp_path: Path) -> None:
    problems = problems_loading(tmp_path, yaml_config(scopes_by_group={"": ["mcp:write"]}))
    errors = [p.path for p in problems if p.severity == "error"]
    assert len(errors) == 1
    assert errors[0].startswith("front_door.scopes_by_group.")


@pytest.mark.parametrize(("names", "error"), [([""], "agents.claude-code.client_names[0]"), ("x", None)])
def test_client_names_are_a_list_of_non_empty_globs(tmp_path: Path, names: Any, error: str | None) -> None:
    document = yaml_config()
    document["agents"]["claude-code"]["client_names"] = names
    found = paths(problems_loading(tmp_path, document))
    assert found == {error or "agents.claude-code.client_names"}


# --- loading with the front door on -----------------------------------------------------------------------------------


def test_front_door_refusals_stop_the_load(tmp_path: Path) -> None:
    problems = problems_loading(tmp_path, yaml_config(), FRONT_DOOR="on", OKTA_CLIENT_SECRET=SECRET)
    assert paths(problems) == {"env OKTA_DOMAIN", "env OKTA_CLIENT_ID"}
    assert all(SECRET not in str(p) for p in problems)


def test_front_door_refusals_show_even_when_the_yaml_is_broken(tmp_path: Path) -> None:
    document = yaml_config(default_agent="nobody")
    problems = problems_loading(tmp_path, document, FRONT_DOOR="on")
    assert paths(problems) == {
        "env OKTA_DOMAIN",
        "env OKTA_CLIENT_ID",
        "env OKTA_CLIENT_SECRET",
        "front_door.default_agent",
    }
    broken = write_yaml(tmp_path, "backends: [", name="broken.yaml")
    with pytest.raises(ConfigError) as caught:
        load(broken, environ={}, env_file=None, overrides={"FRONT_DOOR": "on"})
    assert {"env OKTA_DOMAIN", "env OKTA_CLIENT_ID", "env OKTA_CLIENT_SECRET"} <= paths(caught.value.problems)


def test_no_default_agent_and_no_client_names_is_a_warning(tmp_path: Path) -> None:
    loaded = load_yaml(tmp_path, yaml_config(), **COMPLETE)
    assert paths(loaded.warnings, "warning") == {"front_door.default_agent"}
    assert load_yaml(tmp_path, yaml_config(default_agent="claude-code"), **COMPLETE).warnings == []
    with_names = yaml_config()
    with_names["agents"]["claude-code"]["client_names"] = ["Claude Code (*)"]
    assert load_yaml(tmp_path, with_names, **COMPLETE).warnings == []
    # The front door off: its YAML section is not read, so nothing to warn about.
    assert load_yaml(tmp_path, yaml_config()).warnings == []


def test_front_door_alone_authenticates_so_no_issuer_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OKTA_ISSUER")
    assert "env OKTA_ISSUER" in paths(load_yaml(tmp_path, yaml_config()).warnings, "warning")
    loaded = load_yaml(tmp_path, yaml_config(default_agent="claude-code"), **COMPLETE)
    assert loaded.warnings == []


def test_cross_app_backends_need_no_issuer_behind_the_front_door(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OKTA_ISSUER")
    document = yaml_config(default_agent="claude-code")
    document["backends"]["finance"] = {
        "url": "https://finance.internal/mcp",
        "paths": ["/finance"],
        "auth_method": "okta-cross-app",
        "auth_config": {
            "target_authorization_server": "https://example.okta.com/oauth2/aus1",
            "target_token_endpoint": "https://example.okta.com/oauth2/aus1/v1/token",
        },
    }
    without = paths(load_yaml(tmp_path, document, OKTA_DOMAIN="https://example.okta.com").warnings, "warning")
    assert "env OKTA_ISSUER" in without
    assert paths(load_yaml(tmp_path, document, **COMPLETE).warnings, "warning") == set()


def test_the_example_config_front_door_block_loads_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config" / "config.example.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("# front_door:")
    block = []
    for line in lines[start:]:
        if not line.startswith("# ") and line != "#":
            break
        block.append(line[2:])
    section = yaml.safe_load("\n".join(block))["front_door"]
    document = yaml_config(**section)
    config = load_yaml(tmp_path, document, **COMPLETE).config
    assert config.front_door.default_agent == "claude-code"
    assert config.front_door.scopes_by_group


# --- the check command ------------------------------------------------------------------------------------------------


def test_check_prints_each_front_door_refusal_and_exits_2(tmp_path: Path) -> None:
    result = run_check(
        tmp_path,
        yaml_config(),
        [
            "FRONT_DOOR=on",
            "OKTA_ISSUER=https://example.okta.com/oauth2/aus1",
            f"OKTA_CLIENT_SECRET={SECRET}",
            f"GATEWAY_BASE_URL=http://gateway.example.com/{SECRET}",
            "FRONT_DOOR_AGENT_CLIENT_ID=wlp_agent",
        ],
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert printed(result.stderr, "error") == {
        "env OKTA_DOMAIN",
        "env OKTA_CLIENT_ID",
        "env GATEWAY_BASE_URL",
        "env FRONT_DOOR_AGENT_PRIVATE_KEY",
    }
    assert SECRET not in result.stdout + result.stderr


def test_check_passes_a_complete_front_door_and_warns_without_a_default_agent(tmp_path: Path) -> None:
    env_lines = [f"{name}={value}" for name, value in COMPLETE.items()]
    result = run_check(tmp_path, yaml_config(), env_lines)
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stderr, "error") == set()
    assert printed(result.stderr, "warning") == {"front_door.default_agent"}
    assert SECRET not in result.stdout + result.stderr
