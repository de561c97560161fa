"""config.yaml → GatewayConfig (okta_agent_proxy.config.models, config.loader): every problem names its YAML path.

The assertions are on paths and severities, never on wording. A base configuration that loads cleanly is mutated
one way per case; each case lists exactly the error paths it must produce (so knock-on noise is caught too).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from okta_agent_proxy.config.checks import Problem
from okta_agent_proxy.config.loader import ConfigError, format_loc, load
from okta_agent_proxy.config.models import CrossAppBackend, PreSharedKeyBackend, ServiceAccountBackend, config_schema
from tests.unit.helpers import (
    RFC7517_EC,
    SEED_CONFIG,
    ec_key,
    load_config,
    paths,
    pem,
    pem_body_chunks,
    problems_of,
    rsa_key,
    seed_with_generated_keys,
    write_yaml,
)

SECRET = "s3cr3t-Value-that-must-never-print-9f8e7d"

Doc = dict[str, Any]


def base_config() -> Doc:
    """Loads without errors (its only warning: okta-cross-app is not implemented in this build)."""
    return {
        "backends": {
            "employees": {
                "url": "http://localhost:9001/mcp",
                "paths": ["/employees", "/hr"],
                "auth_method": "pre-shared-key",
                "auth_config": {"key": "${PSK}"},
            },
            "reports": {
                "url": "http://localhost:9003/mcp",
                "paths": ["/reports"],
                "auth_method": "service-account",
                "auth_config": {"username": "svc", "password": "${PASSWORD}"},
            },
            "finance": {
                "url": "https://finance.internal/mcp",
                "paths": ["/finance"],
                "auth_method": "okta-cross-app",
                "auth_config": {
                    "id_jag_mode": "static",
                    "target_authorization_server": "https://example.okta.com/oauth2/aus1",
                    "target_token_endpoint": "https://example.okta.com/oauth2/aus1/v1/token",
                    "target_client_id": "0oa_finance",
                    "target_client_secret": "${FINANCE_SECRET}",
                },
            },
        },
        "agents": {
            "cursor": {
                "client_id": "0oa_cursor",
                "private_key": "${CURSOR_KEY}",
                "scopes": ["mcp:read", "mcp:write"],
                "backend_access": ["employees", "finance"],
            },
            "claude-code": {
                "client_id": "0oa_claude",
                "inbound_client_ids": ["0oa_claude", "wlp_claude"],
                "backend_access": ["employees", "reports"],
            },
        },
        "audit": {"record_arguments": False, "when_full": "drop"},
    }


ENVIRON = {
    "PSK": "partner-key",
    "PASSWORD": "reports-password",
    "FINANCE_SECRET": "finance-secret",
    "CURSOR_KEY": json.dumps(RFC7517_EC),
}


def yaml_warnings(problems: list[Problem]) -> set[str]:
    """Warnings about the YAML (the environment's, e.g. an unset OKTA_ISSUER, are tested on their own)."""
    return {p.path for p in problems if p.severity == "warning" and not p.path.startswith("env ")}


def test_base_config_loads(tmp_path: Path) -> None:
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    config = loaded.config
    assert paths(loaded.warnings, "error") == set()
    assert yaml_warnings(loaded.warnings) == set()
    assert isinstance(config.backends["employees"], PreSharedKeyBackend)
    assert isinstance(config.backends["reports"], ServiceAccountBackend)
    assert isinstance(config.backends["finance"], CrossAppBackend)
    employees = config.backends["employees"]
    assert isinstance(employees, PreSharedKeyBackend)
    assert employees.auth_config.key.get_secret_value() == "partner-key"
    assert employees.auth_config.header_name == "X-API-Key"
    assert employees.timeout_seconds > 0
    assert employees.enabled
    cursor = config.agents["cursor"]
    assert cursor.private_key is not None
    assert cursor.private_key.algorithm == "ES256"
    claude = config.agents["claude-code"]
    assert claude.private_key is None
    assert claude.scopes == ("mcp:read",)
    assert claude.caller_client_ids == ("0oa_claude", "wlp_claude")
    assert cursor.caller_client_ids == ("0oa_cursor",)
    assert config.audit.record_arguments is False


def test_models_are_frozen(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, base_config()), ENVIRON).config
    with pytest.raises(ValueError, match=r".+"):
        config.agents["cursor"].client_id = "other"  # type: ignore[misc]


# --- invalid configurations: each names its path ----------------------------------------------------------------------

Mutation = Callable[[Doc], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets `a.b[0].c` (creating nothing: the parents must exist)."""

    def apply(doc: Doc) -> None:
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path.replace("]", ""))]
        node: Any = doc
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value

    return apply


def _delete(path: str) -> Mutation:
    def apply(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[part]
        del node[last]

    return apply


def _both(*mutations: Mutation) -> Mutation:
    def apply(doc: Doc) -> None:
        for mutation in mutations:
            mutation(doc)

    return apply


INVALID: dict[str, tuple[Mutation, set[str]]] = {
    # paths
    "path-without-slash": (_set("backends.employees.paths", ["employees"]), {"backends.employees.paths[0]"}),
    "second-path-without-slash": (_set("backends.employees.paths", ["/e", "hr"]), {"backends.employees.paths[1]"}),
    "path-with-query": (_set("backends.employees.paths", ["/e?x=1"]), {"backends.employees.paths[0]"}),
    "path-with-double-slash": (_set("backends.employees.paths", ["/e//x"]), {"backends.employees.paths[0]"}),
    "no-paths": (_set("backends.employees.paths", []), {"backends.employees.paths"}),
    "paths-missing": (_delete("backends.employees.paths"), {"backends.employees.paths"}),
    # unknown keys at every level
    "unknown-root-key": (_set("frontends", {}), {"frontends"}),
    "unknown-backend-key": (_set("backends.employees.colour", "red"), {"backends.employees.colour"}),
    "unknown-psk-auth-key": (
        _set("backends.employees.auth_config.username", "u"),
        {"backends.employees.auth_config.username"},
    ),
    "unknown-service-account-auth-key": (
        _set("backends.reports.auth_config.token", "t"),
        {"backends.reports.auth_config.token"},
    ),
    "unknown-cross-app-auth-key": (
        _set("backends.finance.auth_config.audience", "x"),
        {"backends.finance.auth_config.audience"},
    ),
    "unknown-agent-key": (_set("agents.cursor.backends", ["employees"]), {"agents.cursor.backends"}),
    "unknown-audit-key": (_set("audit.retention", 3), {"audit.retention"}),
    # urls
    "url-without-scheme": (_set("backends.employees.url", "localhost:9001"), {"backends.employees.url"}),
    "url-ftp": (_set("backends.employees.url", "ftp://files.internal/mcp"), {"backends.employees.url"}),
    "url-with-query": (_set("backends.employees.url", "http://localhost:9001/mcp?a=1"), {"backends.employees.url"}),
    "url-not-a-string": (_set("backends.employees.url", 9001), {"backends.employees.url"}),
    "authority-url-plain-http": (
        _set("backends.finance.auth_config.target_token_endpoint", "http://example.okta.com/oauth2/aus1/v1/token"),
        {"backends.finance.auth_config.target_token_endpoint"},
    ),
    "resource-not-a-url": (
        _set("backends.finance.auth_config.resource", "finance"),
        {"backends.finance.auth_config.resource"},
    ),
    # auth_method
    "auth-method-wrong": (_set("backends.employees.auth_method", "basic"), {"backends.employees"}),
    "auth-method-missing": (_delete("backends.employees.auth_method"), {"backends.employees"}),
    "auth-config-missing": (_delete("backends.employees.auth_config"), {"backends.employees.auth_config"}),
    "auth-config-of-another-method": (
        _set("backends.employees.auth_config", {"username": "u", "password": "${PASSWORD}"}),
        {
            "backends.employees.auth_config.key",
            "backends.employees.auth_config.username",
            "backends.employees.auth_config.password",
        },
    ),
    # required auth_config fields and their values
    "psk-key-missing": (_delete("backends.employees.auth_config.key"), {"backends.employees.auth_config.key"}),
    "psk-key-empty": (_set("backends.employees.auth_config.key", ""), {"backends.employees.auth_config.key"}),
    "psk-bad-header-name": (
        _set("backends.employees.auth_config.header_name", "X API Key"),
        {"backends.employees.auth_config.header_name"},
    ),
    "sa-password-missing": (
        _delete("backends.reports.auth_config.password"),
        {"backends.reports.auth_config.password"},
    ),
    "sa-username-missing": (
        _delete("backends.reports.auth_config.username"),
        {"backends.reports.auth_config.username"},
    ),
    "sa-username-with-colon": (
        _set("backends.reports.auth_config.username", "svc:x"),
        {"backends.reports.auth_config.username"},
    ),
    "cross-app-static-without-targets": (
        _set("backends.finance.auth_config", {"id_jag_mode": "static"}),
        {"backends.finance.auth_config"},
    ),
    "cross-app-static-without-token-endpoint": (
        _delete("backends.finance.auth_config.target_token_endpoint"),
        {"backends.finance.auth_config"},
    ),
    "cross-app-default-mode-is-static": (
        _set("backends.finance.auth_config", {"scopes": ["finance:read"]}),
        {"backends.finance.auth_config"},
    ),
    "cross-app-secret-without-client-id": (
        _delete("backends.finance.auth_config.target_client_id"),
        {"backends.finance.auth_config"},
    ),
    "cross-app-id-token-without-header": (
        _set("backends.finance.auth_config.subject_token", "id_token"),
        {"backends.finance.auth_config"},
    ),
    "cross-app-bad-mode": (
        _set("backends.finance.auth_config.id_jag_mode", "automatic"),
        {"backends.finance.auth_config.id_jag_mode"},
    ),
    "cross-app-bad-assertion-audience": (
        _set("backends.finance.auth_config.client_assertion_audience", "resource"),
        {"backends.finance.auth_config.client_assertion_audience"},
    ),
    "cross-app-bad-scope": (
        _set("backends.finance.auth_config.scopes", ["finance read"]),
        {"backends.finance.auth_config.scopes[0]"},
    ),
    # other backend fields
    "timeout-zero": (_set("backends.employees.timeout_seconds", 0), {"backends.employees.timeout_seconds"}),
    "timeout-text": (_set("backends.employees.timeout_seconds", "soon"), {"backends.employees.timeout_seconds"}),
    "enabled-not-bool": (_set("backends.employees.enabled", "perhaps"), {"backends.employees.enabled"}),
    "forward-authorization": (
        _set("backends.employees.forward_headers", ["X-Tenant", "Authorization"]),
        {"backends.employees.forward_headers[1]"},
    ),
    "forward-cookie": (
        _set("backends.employees.forward_headers", ["cookie"]),
        {"backends.employees.forward_headers[0]"},
    ),
    "required-scope-with-space": (
        _set("backends.employees.required_scopes", ["mcp read"]),
        {"backends.employees.required_scopes[0]"},
    ),
    "method-scope-with-quote": (
        _set("backends.employees.method_scopes", {"tools/call": ['mcp"write']}),
        {"backends.employees.method_scopes.tools/call[0]"},
    ),
    "backends-not-a-mapping": (_set("backends", ["employees"]), {"backends"}),
    "backend-not-a-mapping": (_set("backends.employees", "http://localhost:9001"), {"backends.employees"}),
    # agents
    "agent-client-id-missing": (_delete("agents.cursor.client_id"), {"agents.cursor.client_id"}),
    "agent-client-id-empty": (_set("agents.cursor.client_id", ""), {"agents.cursor.client_id"}),
    "agent-scope-with-space": (_set("agents.cursor.scopes", ["mcp:read", "a b"]), {"agents.cursor.scopes[1]"}),
    "agent-key-unparsable": (_set("agents.cursor.private_key", "not a key"), {"agents.cursor.private_key"}),
    "agent-key-public-jwk": (
        _set("agents.cursor.private_key", {k: v for k, v in RFC7517_EC.items() if k != "d"}),
        {"agents.cursor.private_key"},
    ),
    "agent-key-not-text": (_set("agents.cursor.private_key", 12345), {"agents.cursor.private_key"}),
    "agent-key-id-empty": (_set("agents.cursor.key_id", ""), {"agents.cursor.key_id"}),
    "agent-backend-access-not-a-list": (_set("agents.cursor.backend_access", 7), {"agents.cursor.backend_access"}),
    # audit
    "audit-when-full": (_set("audit.when_full", "explode"), {"audit.when_full"}),
    "audit-queue-size-zero": (_set("audit.queue_size", 0), {"audit.queue_size"}),
    "audit-retention-negative": (_set("audit.retention_days", -1), {"audit.retention_days"}),
    # cross-references (checked after the models validate)
    "duplicate-path-across-backends": (
        _set("backends.reports.paths", ["/reports", "/hr"]),
        {"backends.reports.paths[1]"},
    ),
    "duplicate-path-trailing-slash": (_set("backends.reports.paths", ["/hr/"]), {"backends.reports.paths[0]"}),
    "duplicate-path-in-one-backend": (
        _set("backends.employees.paths", ["/employees", "/hr", "/employees"]),
        {"backends.employees.paths[2]"},
    ),
    "cross-app-agent-without-key": (_delete("agents.cursor.private_key"), {"agents.cursor.private_key"}),
    # several independent errors are all reported
    "many-at-once": (
        _both(
            _set("backends.employees.paths", ["employees"]),
            _set("backends.reports.url", "nowhere"),
            _set("agents.cursor.colour", "red"),
            _set("audit.when_full", "explode"),
        ),
        {"backends.employees.paths[0]", "backends.reports.url", "agents.cursor.colour", "audit.when_full"},
    ),
}


@pytest.mark.parametrize(("mutation", "expected"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_config_names_its_path(tmp_path: Path, mutation: Mutation, expected: set[str]) -> None:
    doc = base_config()
    mutation(doc)
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == expected, [str(p) for p in problems]
    for problem in problems:
        assert problem.message.strip()
        assert problem.severity in ("error", "warning")


def test_plain_http_to_a_dns_name_starting_with_127_is_rejected(tmp_path: Path) -> None:
    doc = base_config()
    doc["backends"]["finance"]["auth_config"]["target_authorization_server"] = "http://127.attacker.example/oauth2"
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == {"backends.finance.auth_config.target_authorization_server"}


def test_duplicate_inbound_client_id_across_agents(tmp_path: Path) -> None:
    doc = base_config()
    doc["agents"]["claude-code"]["inbound_client_ids"] = ["wlp_claude", "0oa_cursor"]
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1, [str(p) for p in problems]
    # The later agent is named (today `agents.claude-code`; `….inbound_client_ids[1]` would be more precise).
    assert errors[0].path.startswith("agents.claude-code")


def test_client_id_of_one_agent_clashes_with_the_default_inbound_id_of_another(tmp_path: Path) -> None:
    doc = base_config()
    doc["agents"]["claude-code"]["inbound_client_ids"] = None
    doc["agents"]["claude-code"]["client_id"] = "0oa_cursor"
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert next(p.path for p in problems if p.severity == "error").startswith("agents.claude-code")


def test_auth_method_problem_is_the_only_one_for_that_backend(tmp_path: Path) -> None:
    """A missing or unknown auth_method cannot pick an auth_config schema; it is one problem, not a cascade."""
    doc = base_config()
    del doc["backends"]["employees"]["auth_method"]
    doc["backends"]["employees"]["auth_config"] = {"anything": 1}
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert [p.path for p in problems if p.severity == "error"] == ["backends.employees"]


# --- secrets: ${ENV} and {file: …} ------------------------------------------------------------------------------------


def test_env_reference_resolves_anywhere_in_a_string(tmp_path: Path) -> None:
    doc = base_config()
    doc["backends"]["employees"]["url"] = "http://${BACKEND_HOST}:9001/mcp"
    loaded = load_config(write_yaml(tmp_path, doc), {**ENVIRON, "BACKEND_HOST": "hr.internal"})
    assert loaded.config.backends["employees"].url == "http://hr.internal:9001/mcp"


@pytest.mark.parametrize(
    ("where", "variable"),
    [
        ("backends.employees.auth_config.key", "PSK"),
        ("backends.reports.auth_config.password", "PASSWORD"),
        ("backends.finance.auth_config.target_client_secret", "FINANCE_SECRET"),
        ("agents.cursor.private_key", "CURSOR_KEY"),
    ],
)
def test_unset_env_reference_is_an_error_at_its_path(tmp_path: Path, where: str, variable: str) -> None:
    environ = {k: v for k, v in ENVIRON.items() if k != variable}
    problems = problems_of(write_yaml(tmp_path, base_config()), environ)
    assert paths(problems) == {where}, [str(p) for p in problems]


def test_unset_env_reference_in_a_list_item(tmp_path: Path) -> None:
    doc = base_config()
    doc["backends"]["employees"]["paths"] = ["/employees", "${HR_PATH}"]
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == {"backends.employees.paths[1]"}


def test_file_reference_resolves_relative_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "psk.txt").write_text("key-from-file\n")
    (tmp_path / "secrets" / "cursor.pem").write_text(pem(rsa_key()))
    doc = base_config()
    doc["backends"]["employees"]["auth_config"]["key"] = {"file": "secrets/psk.txt"}
    doc["agents"]["cursor"]["private_key"] = {"file": str(tmp_path / "secrets" / "cursor.pem")}
    loaded = load_config(write_yaml(tmp_path, doc), ENVIRON)
    employees = loaded.config.backends["employees"]
    assert isinstance(employees, PreSharedKeyBackend)
    assert employees.auth_config.key.get_secret_value() == "key-from-file"
    key = loaded.config.agents["cursor"].private_key
    assert key is not None
    assert key.algorithm == "RS256"
    assert not [p for p in loaded.warnings if "auth_config.key" in p.path or "private_key" in p.path]


@pytest.mark.parametrize(
    ("where", "reference"),
    [
        ("backends.employees.auth_config.key", {"file": "missing.txt"}),
        ("backends.reports.auth_config.password", {"file": "/nonexistent/dir/password"}),
        ("backends.finance.auth_config.target_client_secret", {"file": ""}),
        ("agents.cursor.private_key", {"file": "keys/cursor.pem"}),
    ],
)
def test_unreadable_file_reference_is_an_error_at_its_path(
    tmp_path: Path, where: str, reference: dict[str, str]
) -> None:
    doc = base_config()
    *parents, last = where.split(".")
    node: Any = doc
    for part in parents:
        node = node[part]
    node[last] = reference
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    errors = [p for p in problems if p.severity == "error"]
    assert errors, [str(p) for p in problems]
    assert {p.path for p in errors} == {where}, [str(p) for p in problems]


def test_literal_secrets_load_with_a_warning_each(tmp_path: Path) -> None:
    doc = base_config()
    doc["backends"]["employees"]["auth_config"]["key"] = "literal-key"
    doc["backends"]["reports"]["auth_config"]["password"] = "literal-password"
    doc["backends"]["finance"]["auth_config"]["target_client_secret"] = "literal-secret"
    doc["agents"]["cursor"]["private_key"] = pem(ec_key())
    loaded = load_config(write_yaml(tmp_path, doc), {})
    assert paths(loaded.warnings, "warning") >= {
        "backends.employees.auth_config.key",
        "backends.reports.auth_config.password",
        "backends.finance.auth_config.target_client_secret",
        "agents.cursor.private_key",
    }
    assert paths(loaded.warnings, "error") == set()


def test_cross_app_backend_without_okta_domain_warns(tmp_path: Path) -> None:
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    assert "env OKTA_DOMAIN" in paths(loaded.warnings, "warning")


def test_referenced_secrets_get_no_literal_warning(tmp_path: Path) -> None:
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    assert yaml_warnings(loaded.warnings) == set()


def test_literal_secret_warning_does_not_hide_the_error_at_the_same_path(tmp_path: Path) -> None:
    """Regression: a literal-secret warning at a path used to suppress the validation error at that path."""
    doc = base_config()
    doc["agents"]["cursor"]["private_key"] = "-----BEGIN PRIVATE KEY-----\nMIIEvQ...\n-----END PRIVATE KEY-----\n"
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert ("agents.cursor.private_key", "error") in {(p.path, p.severity) for p in problems}
    assert ("agents.cursor.private_key", "warning") in {(p.path, p.severity) for p in problems}


def test_inline_jwk_mapping_is_a_literal_secret(tmp_path: Path) -> None:
    doc = base_config()
    doc["agents"]["cursor"]["private_key"] = dict(RFC7517_EC)
    loaded = load_config(write_yaml(tmp_path, doc), ENVIRON)
    assert ("agents.cursor.private_key", "warning") in {(p.path, p.severity) for p in loaded.warnings}


def test_undefined_backend_in_backend_access_is_a_warning(tmp_path: Path) -> None:
    doc = base_config()
    doc["agents"]["claude-code"]["backend_access"] = ["employees", "payroll"]
    loaded = load_config(write_yaml(tmp_path, doc), ENVIRON)
    assert ("agents.claude-code.backend_access[1]", "warning") in {(p.path, p.severity) for p in loaded.warnings}


def test_published_example_key_is_a_warning(tmp_path: Path) -> None:
    env_template_key = (
        '{"kty":"EC","crv":"P-256","x":"4sqJ_kiZyeRUQTUmOx0B3agz27W95PIUcnXfyXChp98",'
        '"y":"fC6zCPyn7-JYK_T80HDF4hYkqPbXJTWJFeb-wHuR8PA","d":"sFxtHzxUcYdk7L5rcsRwihhl2z4Sis-s3lWxYg3PmuM"}'
    )
    loaded = load_config(write_yaml(tmp_path, base_config()), {**ENVIRON, "CURSOR_KEY": env_template_key})
    assert ("agents.cursor.private_key", "warning") in {(p.path, p.severity) for p in loaded.warnings}


# --- secret hygiene: no problem ever quotes a secret ------------------------------------------------------------------

SECRET_CASES: dict[str, Mutation] = {
    "psk-key-as-list": _set("backends.employees.auth_config.key", [SECRET]),
    "psk-key-as-mapping": _set("backends.employees.auth_config.key", {"value": SECRET}),
    "password-as-mapping": _set("backends.reports.auth_config.password", {"secret": SECRET}),
    "target-secret-as-list": _set("backends.finance.auth_config.target_client_secret", [SECRET]),
    "secret-in-bad-url": _set("backends.employees.url", f"http://user:{SECRET}@host/mcp?token={SECRET}"),
    "secret-in-bad-header-name": _set("backends.employees.auth_config.header_name", f"{SECRET} x"),
    "secret-as-username-with-colon": _set("backends.reports.auth_config.username", f"svc:{SECRET}"),
    "secret-pem-body": _set(
        "agents.cursor.private_key", f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n"
    ),
    "secret-bare-key": _set("agents.cursor.private_key", SECRET),
    "secret-jwk-members": _set("agents.cursor.private_key", {"kty": "RSA", "n": SECRET, "e": "AQAB", "d": SECRET}),
    "secret-jwk-kty": _set("agents.cursor.private_key", {"kty": SECRET, "d": SECRET}),
    "secret-jwk-curve": _set(
        "agents.cursor.private_key", {"kty": "EC", "crv": SECRET, "x": "A", "y": "A", "d": SECRET}
    ),
    "secret-broken-jwk-json": _set("agents.cursor.private_key", f'{{"kty": "EC", "d": "{SECRET}"'),
    "secret-as-scope": _set("agents.cursor.scopes", [f"{SECRET} x"]),
    "secret-as-mode": _set("backends.finance.auth_config.id_jag_mode", SECRET),
    "secret-as-enabled": _set("agents.cursor.enabled", SECRET),
    "secret-as-timeout": _set("backends.employees.timeout_seconds", SECRET),
    "secret-as-unknown-key-value": _set("backends.employees.auth_config.token", SECRET),
}


@pytest.mark.parametrize("mutation", list(SECRET_CASES.values()), ids=list(SECRET_CASES))
def test_no_problem_quotes_a_secret(tmp_path: Path, mutation: Mutation) -> None:
    doc = base_config()
    mutation(doc)
    try:
        load_config(write_yaml(tmp_path, doc), ENVIRON)
    except ConfigError as exc:
        problems = exc.problems
        text = str(exc)
    else:
        raise AssertionError("should not load")
    assert paths(problems), "an error was expected"
    for problem in problems:
        assert SECRET not in str(problem)
        assert SECRET not in repr(problem)
    assert SECRET not in text


def test_secret_from_env_in_a_bad_field_is_not_quoted(tmp_path: Path) -> None:
    doc = base_config()
    doc["agents"]["cursor"]["private_key"] = "${CURSOR_KEY}"
    environ = {**ENVIRON, "CURSOR_KEY": f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----"}
    problems = problems_of(write_yaml(tmp_path, doc), environ)
    assert paths(problems) == {"agents.cursor.private_key"}
    assert not [p for p in problems if SECRET in str(p)]


def test_secret_from_file_in_a_bad_field_is_not_quoted(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text(f"-----BEGIN EC PRIVATE KEY-----\n{SECRET}\n-----END EC PRIVATE KEY-----\n")
    doc = base_config()
    doc["agents"]["cursor"]["private_key"] = {"file": "key.pem"}
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == {"agents.cursor.private_key"}
    assert not [p for p in problems if SECRET in str(p)]


def test_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    text = f'backends:\n  employees:\n    auth_config:\n      key: "{SECRET}\\q"\n'
    problems = problems_of(write_yaml(tmp_path, text), ENVIRON)
    assert len(problems) == 1
    assert problems[0].severity == "error"
    assert problems[0].path.endswith("config.yaml:4")
    assert SECRET not in str(problems[0])


def test_loaded_config_repr_shows_no_secret(tmp_path: Path) -> None:
    environ = {**ENVIRON, "PSK": SECRET, "PASSWORD": SECRET, "FINANCE_SECRET": SECRET}
    pem_text = pem(rsa_key())
    environ["CURSOR_KEY"] = pem_text
    loaded = load_config(write_yaml(tmp_path, base_config()), environ)
    for text in (repr(loaded), str(loaded.config), repr(loaded.config.agents["cursor"])):
        assert SECRET not in text
        for chunk in pem_body_chunks(pem_text):
            assert chunk not in text


# --- the file as a whole ----------------------------------------------------------------------------------------------


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    loaded = load_config(write_yaml(tmp_path, ""))
    assert loaded.config.backends == {}
    assert loaded.config.agents == {}


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_root_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    problems = problems_of(write_yaml(tmp_path, text))
    assert paths(problems) == {"(root)"}


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "backends:\n  employees:\n    paths: [/a\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert re.fullmatch(re.escape(str(path)) + r":\d+", problems[0].path)


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    problems = problems_of(missing)
    assert paths(problems) == {str(missing)}


def test_config_path_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_yaml(tmp_path, base_config(), "chosen.yaml")
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "chosen.yaml"))
    loaded = load(environ=ENVIRON, env_file=None)
    assert set(loaded.config.backends) == {"employees", "reports", "finance"}


# --- duplicate keys: an error naming the key's path and both lines ---------------------------------------------------

DUPLICATED_PARTNERS = f"""\
backends:
  partners:
    url: http://partners.internal/mcp
    paths: [/partners]
    auth_method: pre-shared-key
    auth_config:
      key: ${{PSK}}
  reports:
    url: http://reports.internal/mcp
    paths: [/reports]
    auth_method: pre-shared-key
    auth_config: {{key: "${{PSK}}"}}
  partners:
    url: http://elsewhere.example/mcp
    paths: [/partners]
    auth_method: pre-shared-key
    auth_config:
      key: {SECRET}
      key: ${{PSK}}
agents:
  cursor: {{client_id: 0oa_cursor, backend_access: [partners], scopes: [mcp:read], scopes: [mcp:write]}}
"""


def duplicate_lines(problems: list[Problem]) -> dict[str, tuple[int, ...]]:
    """{path: the line numbers its duplicate-key error names} (the lines are the assertion, not the wording)."""
    return {
        p.path: tuple(int(n) for n in re.findall(r"\d+", p.message))
        for p in problems
        if p.severity == "error" and "duplicate" in p.message
    }


def test_duplicate_keys_are_errors_naming_the_path_and_both_lines(tmp_path: Path) -> None:
    problems = problems_of(write_yaml(tmp_path, DUPLICATED_PARTNERS), ENVIRON)
    assert duplicate_lines(problems) == {
        "backends.partners": (2, 13),
        "backends.partners.auth_config.key": (18, 19),
        "agents.cursor.scopes": (21, 21),  # a flow mapping: both on one line
    }
    assert "error: backends.partners: duplicate key (lines 2 and 13)" in [str(p) for p in problems]
    assert not [p for p in problems if SECRET in str(p)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backends: {}\nagents: {}\nbackends: {}\n", {"backends": (1, 3)}),
        ("agents:\n  a: {client_id: c}\n  'a': {client_id: d}\n", {"agents.a": (2, 3)}),
        ("backends:\n  x:\n    paths: [/x]\n    forward_headers: [a]\n    paths: [/y]\n", {"backends.x.paths": (3, 5)}),
        ("agents:\n  a:\n    backend_access:\n      - {k: 1, k: 2}\n", {"agents.a.backend_access[0].k": (4, 4)}),
    ],
    ids=["root", "quoted-and-plain", "nested", "in-a-list"],
)
def test_duplicate_key_anywhere_is_found(tmp_path: Path, text: str, expected: dict[str, tuple[int, ...]]) -> None:
    assert duplicate_lines(problems_of(write_yaml(tmp_path, text), ENVIRON)) == expected


def test_a_merge_key_overridden_is_not_a_duplicate(tmp_path: Path) -> None:
    text = """\
x-partners: &partners
  url: http://partners.internal/mcp
  paths: [/partners]
  auth_method: pre-shared-key
  auth_config: {key: "${PSK}"}
backends:
  partners: *partners
  partners-eu:
    <<: *partners
    paths: [/partners-eu]
"""
    problems = problems_of(write_yaml(tmp_path, text), ENVIRON)
    assert duplicate_lines(problems) == {}
    assert paths(problems) == {"x-partners"}  # only the unknown top-level key


def test_duplicates_are_reported_with_every_other_problem(tmp_path: Path) -> None:
    text = DUPLICATED_PARTNERS.replace("http://reports.internal/mcp", "reports.internal")
    problems = problems_of(write_yaml(tmp_path, text), ENVIRON)
    assert paths(problems) == {
        "backends.partners",
        "backends.partners.auth_config.key",
        "agents.cursor.scopes",
        "backends.reports.url",
    }


# --- what a load read, and its fingerprint ----------------------------------------------------------------------------


def test_a_load_names_the_files_it_read(tmp_path: Path) -> None:
    (tmp_path / "psk.txt").write_text("key-from-file\n")
    doc = base_config()
    doc["backends"]["employees"]["auth_config"]["key"] = {"file": "psk.txt"}
    config = write_yaml(tmp_path, doc)
    env_file = tmp_path / "gateway.env"
    env_file.write_text("LOG_LEVEL=INFO\n")
    loaded = load(config, environ=ENVIRON, env_file=str(env_file))
    assert loaded.sources.yaml == str(config)
    assert loaded.sources.env_file == str(env_file)
    assert loaded.sources.secret_files == (str(tmp_path / "psk.txt"),)
    assert load(config, environ=ENVIRON, env_file=str(tmp_path / "absent.env")).sources.env_file is None


def test_the_fingerprint_follows_the_secret_files_and_the_yaml_hash_does_not(tmp_path: Path) -> None:
    psk = tmp_path / "psk.txt"
    psk.write_text("first-key")
    doc = base_config()
    doc["backends"]["employees"]["auth_config"]["key"] = {"file": "psk.txt"}
    config = write_yaml(tmp_path, doc)
    first = load_config(config, ENVIRON)
    assert load_config(config, ENVIRON).fingerprint == first.fingerprint
    psk.write_text("second-key")
    second = load_config(config, ENVIRON)
    assert second.fingerprint != first.fingerprint
    assert second.source_hash == first.source_hash  # config_history's file_hash: the YAML's bytes only
    assert "second-key" not in repr(second) and "first-key" not in repr(first)


def test_the_environment_used_is_kept_for_a_reload_and_never_shown(tmp_path: Path) -> None:
    environ = {**ENVIRON, "PSK": SECRET}
    loaded = load_config(write_yaml(tmp_path, base_config()), environ)
    environ["PSK"] = "changed later"
    assert loaded.environ["PSK"] == SECRET  # a snapshot
    assert SECRET not in repr(loaded)


def test_a_secret_file_that_is_not_utf8_is_an_error_at_its_path(tmp_path: Path) -> None:
    (tmp_path / "psk.bin").write_bytes(b"\xff\xfe\x00key")
    doc = base_config()
    doc["backends"]["employees"]["auth_config"]["key"] = {"file": "psk.bin"}
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == {"backends.employees.auth_config.key"}


# --- environment problems ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_PORT", "eighty"),
        ("GATEWAY_PORT", "70000"),
        ("MAX_BODY_BYTES", "0"),
        ("AGENT_IDENTIFICATION", "cookie"),
        ("LOG_FORMAT", "xml"),
        ("GATEWAY_BASE_URL", "gateway.example.com"),
        ("GATEWAY_BASE_URL", "https://gateway.example.com/?q=1"),
        ("JWT_LEEWAY_SECONDS", "-1"),
    ],
)
def test_bad_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    problems = problems_of(write_yaml(tmp_path, base_config()), ENVIRON)
    assert paths(problems) == {f"env {variable}"}


def test_several_bad_variables_are_all_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "x")
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    problems = problems_of(write_yaml(tmp_path, base_config()), ENVIRON)
    assert paths(problems) == {"env GATEWAY_PORT", "env LOG_LEVEL"}


@pytest.mark.parametrize("variable", ["OKTA_DOMAIN", "OKTA_ISSUER", "OKTA_JWKS_URI"])
def test_plain_http_okta_urls_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "http://dev-1.okta.com/oauth2/aus1")
    problems = problems_of(write_yaml(tmp_path, base_config()), ENVIRON)
    assert paths(problems) == {f"env {variable}"}


def test_okta_urls_on_loopback_may_be_plain_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKTA_DOMAIN", "http://127.0.0.1:9999")
    monkeypatch.setenv("OKTA_ISSUER", "http://localhost:9999/oauth2/default")
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    assert not [p for p in loaded.warnings if p.path.startswith("env ")]


def test_okta_domain_without_scheme_is_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKTA_DOMAIN", "dev-12345.okta.com")
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    assert not [p for p in loaded.warnings if p.path.startswith("env ")]


def test_unset_issuer_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OKTA_ISSUER")
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    assert ("env OKTA_ISSUER", "warning") in {(p.path, p.severity) for p in loaded.warnings}


def test_org_authorization_server_issuer_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKTA_ISSUER", "https://dev-12345.okta.com")
    loaded = load_config(write_yaml(tmp_path, base_config()), ENVIRON)
    assert ("env OKTA_ISSUER", "warning") in {(p.path, p.severity) for p in loaded.warnings}


def test_env_problems_and_yaml_problems_are_reported_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKTA_DOMAIN", "http://dev-1.okta.com")
    doc = base_config()
    doc["backends"]["employees"]["paths"] = ["hr"]
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == {"env OKTA_DOMAIN", "backends.employees.paths[0]"}


# --- the seed README's example ----------------------------------------------------------------------------------------


def test_seed_example_with_generated_keys_loads(tmp_path: Path) -> None:
    loaded = load_config(write_yaml(tmp_path, seed_with_generated_keys()))
    config = loaded.config
    assert set(config.backends) == {"employees", "partners"}
    assert set(config.agents) == {"cursor", "claude-code"}
    assert config.backends["employees"].paths == ["/employees", "/hr"]
    assert isinstance(config.backends["employees"], CrossAppBackend)
    assert isinstance(config.backends["partners"], PreSharedKeyBackend)
    cursor, claude = config.agents["cursor"], config.agents["claude-code"]
    assert cursor.private_key is not None
    assert cursor.private_key.algorithm == "RS256"
    assert claude.private_key is not None
    assert claude.private_key.algorithm == "ES256"
    assert cursor.backend_access == ("employees", "finance")
    assert cursor.scopes == ("mcp:read", "mcp:write")
    severities = {(p.path, p.severity) for p in loaded.warnings}
    assert ("agents.cursor.backend_access[1]", "warning") in severities
    assert all(p.severity == "warning" for p in loaded.warnings)
    # The seed writes its secrets literally; each is flagged.
    assert {
        "backends.employees.auth_config.target_client_secret",
        "backends.partners.auth_config.key",
        "agents.cursor.private_key",
        "agents.claude-code.private_key",
    } <= paths(loaded.warnings, "warning")


def test_seed_example_as_printed_fails_naming_both_keys(tmp_path: Path) -> None:
    problems = problems_of(write_yaml(tmp_path, SEED_CONFIG.read_text()))
    assert paths(problems) == {"agents.cursor.private_key", "agents.claude-code.private_key"}


# --- path formatting and the schema -----------------------------------------------------------------------------------


def test_format_loc() -> None:
    assert format_loc(("backends", "employees", "pre-shared-key", "paths", 0)) == "backends.employees.paths[0]"
    assert format_loc(("agents", "cursor", "scopes", 1)) == "agents.cursor.scopes[1]"
    assert format_loc(()) == ""


@pytest.mark.parametrize("name", ["pre-shared-key", "function-tools"])
def test_backend_named_like_a_union_tag_keeps_its_name_in_paths(tmp_path: Path, name: str) -> None:
    doc = base_config()
    doc["backends"][name] = doc["backends"].pop("employees")
    doc["backends"][name]["paths"] = ["no-slash"]
    for agent in doc["agents"].values():
        agent["backend_access"] = [name if b == "employees" else b for b in agent["backend_access"]]
    problems = problems_of(write_yaml(tmp_path, doc), ENVIRON)
    assert paths(problems) == {f"backends.{name}.paths[0]"}


def test_config_schema_is_strict_and_covers_every_auth_method() -> None:
    schema = config_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"backends", "agents", "audit", "rate_limits", "front_door"}
    text = json.dumps(schema)
    for method in ("okta-cross-app", "pre-shared-key", "service-account"):
        assert f'"{method}"' in text
    for definition in schema["$defs"].values():
        if definition.get("type") == "object" and "properties" in definition:
            assert definition.get("additionalProperties") is False, definition.get("title")


def test_problem_str_carries_severity_and_path() -> None:
    problem = Problem("backends.x.url", "bad", "warning")
    assert str(problem).startswith("warning: backends.x.url")


def test_config_error_lists_all_problems() -> None:
    problems = [Problem("a", "x"), Problem("b", "y", "warning"), Problem("c", "z")]
    error = ConfigError(problems)
    assert error.problems == problems


def test_yaml_round_trip_of_base_config_is_what_the_tests_use() -> None:
    """Guard for the helpers: the base document survives yaml.safe_dump/safe_load unchanged."""
    doc = base_config()
    assert yaml.safe_load(yaml.safe_dump(doc)) == copy.deepcopy(doc)
