"""The `okta-agent-proxy` command as a user runs it: a subprocess, from the repository root, with a clean environment.
Where a test runs `check` a second time on changed input, that run is the same `cli` in this process (click's
runner, the same clean environment), as each subprocess costs seconds of imports and other tests run `check` as a
subprocess.

Assertions are on exit codes and on the YAML paths printed, never on wording. Problems are printed one a line as
`<severity>: <path>: <message>` on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from dotenv import dotenv_values

import okta_agent_proxy
from okta_agent_proxy.cli import cli
from okta_agent_proxy.config.loader import resolve_references
from okta_agent_proxy.config.settings import Settings
from tests.support.processes import free_port
from tests.unit.helpers import SEED_CONFIG, seed_with_generated_keys

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = ROOT / "config" / "config.example.yaml"
ENV_TEMPLATE = ROOT / "env.template"
CONSOLE_SCRIPT = Path(sys.executable).parent / "okta-agent-proxy"
SECRET = "s3cr3t-Value-that-must-never-print-4c3b2a"
TIMEOUT = 60


UNSET = (
    *Settings.model_fields,
    "PARTNERS_API_KEY",
    "REPORTS_PASSWORD",
    "EMPLOYEES_AS_CLIENT_SECRET",
    "CURSOR_PRIVATE_KEY",
)


def _environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any of the gateway's variables (they would win over --env-file)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["PYTHONUNBUFFERED"] = "1"
    return env | dict(extra or {})


def run(
    args: Sequence[str],
    *,
    module: str = "okta_agent_proxy",
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def run_in_process(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`run` without the subprocess: the `cli` group the console script calls, in this process (click's runner), in
    `cwd`, with the variables `_environment` drops unset and `env` set."""
    runner = CliRunner(env=dict.fromkeys(UNSET) | dict(env or {}))  # None: unset
    with contextlib.chdir(cwd):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def problems(stderr: str) -> set[tuple[str, str]]:
    """(severity, path) of every problem line on stderr."""
    found = set()
    for line in stderr.splitlines():
        severity, sep, rest = line.partition(": ")
        if sep and severity in ("error", "warning"):
            found.add((severity, rest.split(": ", 1)[0]))
    return found


def errors(stderr: str) -> set[str]:
    return {path for severity, path in problems(stderr) if severity == "error"}


def warnings(stderr: str) -> set[str]:
    return {path for severity, path in problems(stderr) if severity == "warning"}


def files_read(stdout: str) -> dict[str, list[str]]:
    """`check`'s `read: <kind>: <path>` lines: {kind: [path, …]}."""
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("read: "):
            kind, _, path = line.removeprefix("read: ").partition(": ")
            found.setdefault(kind, []).append(path)
    return found


def _env_file(directory: Path, drop: Sequence[str] = (), **values: str) -> Path:
    """env.template, minus `drop`, plus `values`."""
    lines = [
        line
        for line in ENV_TEMPLATE.read_text().splitlines()
        if not any(line.startswith(f"{name}=") for name in (*drop, *values))
    ]
    lines += [f"{name}={value}" for name, value in values.items()]
    path = directory / "test.env"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- version and help -------------------------------------------------------------------------------------------------


def test_console_script_version() -> None:
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: is the project installed (pip install -e .)?"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "--version"],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert version("okta-agent-proxy") in result.stdout
    assert okta_agent_proxy.__version__ == version("okta-agent-proxy")


def test_module_version() -> None:
    result = run(["--version"])
    assert result.returncode == 0, result.stderr
    assert version("okta-agent-proxy") in result.stdout


def _options(help_text: str) -> set[str]:
    return {word.rstrip(",") for line in help_text.splitlines() for word in line.split() if word.startswith("--")}


def test_serve_help_is_the_same_from_every_entry_point() -> None:
    seed_entry = run(["http", "--help"], module="okta_agent_proxy.main")
    module_entry = run(["serve", "--help"])
    assert seed_entry.returncode == 0, seed_entry.stderr
    assert module_entry.returncode == 0, module_entry.stderr
    expected = {"--config", "--env-file", "--host", "--port", "--workers"}
    assert expected <= _options(seed_entry.stdout)
    assert _options(seed_entry.stdout) == _options(module_entry.stdout)


def test_unknown_command_is_a_usage_error() -> None:
    assert run(["no-such-command"]).returncode == 2


# --- check ------------------------------------------------------------------------------------------------------------


def test_check_example_config_with_env_template_passes() -> None:
    result = run(["check", "--config", "config/config.example.yaml", "--env-file", "env.template"])
    assert result.returncode == 0, result.stderr
    assert errors(result.stderr) == set()
    # The example key in env.template is public: check says so.
    assert "agents.cursor.private_key" in warnings(result.stderr)


def test_check_reads_config_path_from_the_env_file(tmp_path: Path) -> None:
    config = tmp_path / "chosen.yaml"
    config.write_text(EXAMPLE_CONFIG.read_text())
    result = run(["check", "--env-file", str(_env_file(tmp_path, CONFIG_PATH=str(config)))])
    assert result.returncode == 0, result.stderr
    assert files_read(result.stdout)["config"] == [str(config)]


def test_check_after_the_readme_steps_reads_config_yaml_and_says_so(tmp_path: Path) -> None:
    """README "Running it": `cp env.template .env`, `cp config/config.example.yaml config/config.yaml`, `check`."""
    (tmp_path / "config").mkdir()
    (tmp_path / ".env").write_text(ENV_TEMPLATE.read_text())
    config = tmp_path / "config" / "config.yaml"
    config.write_text(EXAMPLE_CONFIG.read_text())
    result = run(["check"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_read(result.stdout) == {"env file": [str(tmp_path / ".env")], "config": [str(config)]}
    # The file the user edits is the one in use: break it, and check says so.
    config.write_text(EXAMPLE_CONFIG.read_text().replace("paths: [/partners]", "paths: [partners]"))
    result = run_in_process(["check"], cwd=tmp_path)
    assert result.returncode == 2
    assert "backends.partners.paths[0]" in errors(result.stderr)


def test_check_names_each_secret_file_never_its_content_and_says_when_there_is_no_env_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "psk.txt").write_text(SECRET)
    config = tmp_path / "config.yaml"
    config.write_text(
        "backends:\n  a: {url: 'http://a', paths: [/a], auth_method: pre-shared-key,"
        " auth_config: {key: {file: secrets/psk.txt}}}\n"
    )
    result = run(["check", "--config", str(config), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 0, result.stderr
    read = files_read(result.stdout)
    assert read["secret file"] == [str(tmp_path / "secrets" / "psk.txt")]
    assert read["env file"][0].startswith("none")  # there was no .env file to read
    assert SECRET not in result.stdout + result.stderr
    # The files read are printed when the config has errors too.
    config.write_text(config.read_text().replace("http://a", "a"))
    result = run_in_process(["check", "--config", str(config), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 2
    assert files_read(result.stdout)["secret file"] == [str(tmp_path / "secrets" / "psk.txt")]
    assert SECRET not in result.stdout + result.stderr


def test_check_duplicate_key_exits_2_and_prints_both_lines(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "backends:\n"
        "  partners: {url: 'http://partners.internal/mcp', paths: [/partners], auth_method: pre-shared-key,"
        " auth_config: {key: k1}}\n"
        "  reports: {url: 'http://reports.internal/mcp', paths: [/reports], auth_method: pre-shared-key,"
        " auth_config: {key: k2}}\n"
        "  partners: {url: 'http://elsewhere.example/mcp', paths: [/p2], auth_method: pre-shared-key,"
        " auth_config: {key: k3}}\n"
        "audit:\n  when_full: explode\n"
    )
    result = run(["check", "--config", str(config), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 2, result.stdout + result.stderr
    assert errors(result.stderr) == {"backends.partners", "audit.when_full"}
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: backends.partners: "))
    assert re.findall(r"\d+", line) == ["2", "4"]


def test_check_prints_every_problem_with_its_path(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(
        f"""
backends:
  employees:
    url: localhost:9001
    paths: [employees, /hr]
    auth_method: pre-shared-key
    auth_config:
      key: ${{UNSET_PSK_VARIABLE}}
      colour: blue
  partners:
    url: http://localhost:9002/mcp
    paths: [/partners]
    auth_method: basic-auth
  reports:
    url: http://localhost:9003/mcp
    paths: [/reports]
    auth_method: service-account
    auth_config:
      username: svc
      password: [{SECRET}]
agents:
  cursor:
    client_id: 0oa_cursor
    private_key: "-----BEGIN PRIVATE KEY-----\\n{SECRET}\\n-----END PRIVATE KEY-----\\n"
    scopes: ["mcp read"]
    backend_access: [employees]
    favourite: yes
audit:
  when_full: explode
unknown_section: {{}}
"""
    )
    result = run(["check", "--config", str(config), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 2, result.stdout + result.stderr
    assert errors(result.stderr) == {
        "backends.employees.url",
        "backends.employees.paths[0]",
        "backends.employees.auth_config.key",
        "backends.employees.auth_config.colour",
        "backends.partners",
        "backends.reports.auth_config.password",
        "agents.cursor.private_key",
        "agents.cursor.scopes[0]",
        "agents.cursor.favourite",
        "audit.when_full",
        "unknown_section",
    }
    assert "agents.cursor.private_key" in warnings(result.stderr)  # a literal secret
    assert SECRET not in result.stderr
    assert SECRET not in result.stdout


def test_check_reports_cross_reference_errors(tmp_path: Path) -> None:
    config = tmp_path / "clash.yaml"
    config.write_text(
        """
backends:
  a: {url: "http://a", paths: [/x], auth_method: pre-shared-key, auth_config: {key: "${K}"}}
  b: {url: "http://b", paths: [/y, /x/], auth_method: pre-shared-key, auth_config: {key: "${K}"}}
agents:
  one: {client_id: c1, backend_access: [a, payroll]}
  two: {client_id: c2, inbound_client_ids: [c1]}
"""
    )
    result = run(["check", "--config", str(config), "--env-file", str(tmp_path / "absent.env")], env={"K": "v"})
    assert result.returncode == 2, result.stderr
    found = errors(result.stderr)
    assert "backends.b.paths[1]" in found
    assert any(path.startswith("agents.two") for path in found)
    assert "agents.one.backend_access[1]" in warnings(result.stderr)


def test_check_bad_environment_names_the_variable(tmp_path: Path) -> None:
    result = run(
        ["check", "--config", str(EXAMPLE_CONFIG), "--env-file", "env.template"],
        env={"GATEWAY_PORT": "eighty"},
    )
    assert result.returncode == 2
    assert errors(result.stderr) == {"env GATEWAY_PORT"}


def test_check_real_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path, GATEWAY_PORT="eighty", CONFIG_PATH=str(EXAMPLE_CONFIG))
    result = run(["check", "--env-file", str(env_file)], env={"GATEWAY_PORT": "8123"})
    assert result.returncode == 0, result.stderr


def test_check_seed_example_as_printed_names_both_keys(tmp_path: Path) -> None:
    result = run(["check", "--config", str(SEED_CONFIG), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 2, result.stderr
    assert errors(result.stderr) == {"agents.cursor.private_key", "agents.claude-code.private_key"}


def test_check_seed_example_with_generated_keys_passes_warning_about_finance(tmp_path: Path) -> None:
    config = tmp_path / "seed.yaml"
    config.write_text(seed_with_generated_keys())
    result = run(["check", "--config", str(config), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 0, result.stderr
    assert errors(result.stderr) == set()
    assert "agents.cursor.backend_access[1]" in warnings(result.stderr)


def test_check_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run(["check", "--config", str(missing), "--env-file", str(tmp_path / "absent.env")])
    assert result.returncode == 2
    assert errors(result.stderr) == {str(missing)}


# --- config-schema ----------------------------------------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    result = run(["config-schema"])
    assert result.returncode == 0, result.stderr
    schema: dict[str, Any] = json.loads(result.stdout)
    return schema


def _resolved(path: Path, environ: Mapping[str, str]) -> Any:
    resolved, reference_problems = resolve_references(yaml.safe_load(path.read_text()), environ, path.parent)
    assert not [p for p in reference_problems if p.severity == "error"]
    return resolved


def test_config_schema_validates_the_example_and_rejects_mistakes(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)

    environ = {k: v for k, v in dotenv_values(ENV_TEMPLATE).items() if v is not None}
    example = _resolved(EXAMPLE_CONFIG, environ)
    assert list(validator.iter_errors(example)) == []

    seed = tmp_path / "seed.yaml"
    seed.write_text(seed_with_generated_keys())
    assert list(validator.iter_errors(_resolved(seed, {}))) == []

    mistakes: list[dict[str, Any]] = [
        {"frontends": {}},
        {"backends": {"x": {**example["backends"]["partners"], "colour": "red"}}},
        {"backends": {"x": {**example["backends"]["partners"], "auth_method": "basic"}}},
        {"backends": {"x": {k: v for k, v in example["backends"]["partners"].items() if k != "url"}}},
        {"agents": {"a": {"client_id": "c", "favourite": True}}},
        {"audit": {"when_full": "explode"}},
    ]
    for mistake in mistakes:
        assert list(validator.iter_errors(mistake)), mistake


# --- serve ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["environment", "flag"])
def test_serve_refuses_a_non_loopback_host_without_an_issuer(tmp_path: Path, how: str) -> None:
    env_file = _env_file(tmp_path, drop=["OKTA_ISSUER"], GATEWAY_PORT=str(free_port()))
    args = ["serve", "--config", str(EXAMPLE_CONFIG), "--env-file", str(env_file)]
    if how == "flag":
        args += ["--host", "0.0.0.0"]
        env = {}
    else:
        env = {"GATEWAY_HOST": "0.0.0.0"}
    result = run(args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "0.0.0.0" in result.stderr  # the refused address is named (not a usage error)


def test_serve_with_a_broken_config_exits_2_before_listening(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("backends:\n  a:\n    url: http://a\n    paths: [nope]\n    auth_method: pre-shared-key\n")
    result = run(
        ["serve", "--config", str(config), "--env-file", str(tmp_path / "absent.env"), "--port", str(free_port())]
    )
    assert result.returncode == 2
    assert "backends.a.paths[0]" in errors(result.stderr)


def test_seed_entry_point_refuses_a_non_loopback_host_too(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path, drop=["OKTA_ISSUER"], GATEWAY_PORT=str(free_port()))
    result = run(
        ["http", "--config", str(EXAMPLE_CONFIG), "--env-file", str(env_file), "--host", "0.0.0.0"],
        module="okta_agent_proxy.main",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "0.0.0.0" in result.stderr


@pytest.mark.parametrize(
    "shared", [{"REDIS_URL": "redis://127.0.0.1:6379/0"}, {"DATABASE_URL": "postgresql://127.0.0.1:5432/test"}]
)
def test_serve_refuses_replica_settings_without_a_session_secret_and_check_warns(
    tmp_path: Path, shared: dict[str, str]
) -> None:
    """Issue 13: replicas sharing Redis or PostgreSQL must share SESSION_SECRET, or each would seal session ids with
    a key of its own; `check` says so, and `serve` exits 2 before it listens."""
    env_file = _env_file(tmp_path, GATEWAY_PORT=str(free_port()), **shared)
    args = ["--config", str(EXAMPLE_CONFIG), "--env-file", str(env_file)]
    refused = run(["serve", *args])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "error: SESSION_SECRET is not set" in refused.stderr
    checked = run_in_process(["check", *args])
    assert ("warning", "env SESSION_SECRET") in problems(checked.stderr)
    with_secret = run_in_process(["check", *args], env={"SESSION_SECRET": "a-session-secret-of-at-least-32-bytes!"})
    assert ("warning", "env SESSION_SECRET") not in problems(with_secret.stderr)
