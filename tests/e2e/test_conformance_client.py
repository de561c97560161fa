"""The official MCP conformance suite's client auth scenarios, driven by the project's own OAuth code.

`conformance client --scenario NAME --command "python -m tests.support.conformance_client"` (conformance 0.1.16)
plays the authorization server and MCP server (and, for Cross App Access, the IdP) and judges every request the
harness makes with the project's `TokenEndpointClient`, `ClientAuth`, `exchange_for_id_jag` and `redeem_id_jag`:
- `auth/client-credentials-jwt`: `client_credentials` with a private_key_jwt assertion signed ES256 by the context's
  key; `iss` = `sub` = client id, `aud` = the AS issuer (with or without a trailing slash; the token endpoint URL
  is refused — the negative control below);
- `auth/client-credentials-basic`: `client_credentials` with `Authorization: Basic` of the context's credentials;
- `auth/cross-app-access-complete-flow`: RFC 8693 at the IdP (`subject_token_type` id_token, `requested_token_type`
  id-jag, `audience`, `resource` required; the ID token verified), then the RFC 7523 jwt-bearer grant at the AS with
  client_secret_basic (ID-JAG `typ`, signature, `aud` = AS issuer, `client_id` and `resource` bound).
Each scenario then checks that the MCP requests carry the issued Bearer token. The suite's verdict is a failed or
warning check, a client that exits non-zero or times out; its per-scenario `checks.json` is read and must agree with
its printed summary. Each scenario runs twice (stability). About 2.5 s a run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import ConformanceRunError
from tests.support.conformance_client import CLIENT_CREDENTIALS_JWT, SCENARIOS
from tests.support.node_tools import REPO_ROOT, env_with_node22, require_node_tool

pytestmark = [pytest.mark.node, pytest.mark.slow]

HARNESS = f"{sys.executable} -m tests.support.conformance_client"
RUNS = 2
CLIENT_TIMEOUT_MS = 30_000

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RESULTS = re.compile(r"^Passed: (?P<passed>\d+)/(?P<total>\d+), (?P<failed>\d+) failed, (?P<warnings>\d+) warnings$")
_CONTEXT = "With context: "

# The SUCCESS checks each scenario must record: discovery, the token request(s), and the Bearer token in use.
_COMMON = {"prm-pathbased-requested", "authorization-server-metadata", "token-request", "valid-bearer-token"}
EXPECTED_CHECKS = {
    "auth/client-credentials-jwt": _COMMON | {"client-credentials-jwt-verified"},
    "auth/client-credentials-basic": _COMMON | {"client-credentials-basic-auth"},
    "auth/cross-app-access-complete-flow": _COMMON | {"complete-flow-token-exchange", "complete-flow-jwt-bearer"},
}


@dataclass(frozen=True)
class ClientRun:
    """One `conformance client` run: its exit code, output, the scenario's checks and the harness's own output."""

    scenario: str
    exit_code: int
    output: str
    context: dict[str, Any]
    checks: list[dict[str, Any]]
    client_stdout: str
    client_stderr: str

    def with_status(self, status: str) -> list[dict[str, Any]]:
        return [check for check in self.checks if check.get("status") == status]

    def ids(self, status: str) -> set[str]:
        return {str(check.get("id")) for check in self.with_status(status)}

    def responses(self, check_id: str) -> list[dict[str, Any]]:
        """The `details` of the suite's logged responses (`outgoing-response`, `outgoing-auth-response`)."""
        return [check.get("details") or {} for check in self.checks if check.get("id") == check_id]

    def describe(self) -> str:
        lines = [f"{self.scenario}: exit code {self.exit_code}"]
        lines += [f"  {c.get('status')} {c.get('id')}: {c.get('description')}" for c in self.checks]
        lines += [f"  client stderr: {self.client_stderr.strip()}", self.output[-3000:]]
        return "\n".join(lines)


def run_client_scenario(scenario: str, command: str = HARNESS, *, timeout: float = 90.0) -> ClientRun:
    conformance = require_node_tool("conformance")
    with tempfile.TemporaryDirectory(prefix="oap-conformance-client-") as out_dir:
        argv = [str(conformance), "client", "--command", command, "--scenario", scenario]
        argv += ["--timeout", str(CLIENT_TIMEOUT_MS), "-o", out_dir]
        try:
            completed = subprocess.run(
                argv,
                cwd=REPO_ROOT,  # the harness is `python -m tests.support.conformance_client`
                capture_output=True,
                text=True,
                errors="replace",
                env=env_with_node22(),
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ConformanceRunError(f"conformance client timed out after {timeout:.0f}s: {scenario}") from exc
        output = _ANSI.sub("", completed.stdout + completed.stderr)
        result_dirs = sorted(Path(out_dir).glob(f"{scenario}-*"))
        if len(result_dirs) != 1:
            raise ConformanceRunError(f"expected one result directory for {scenario}, found {result_dirs}:\n{output}")
        result_dir = result_dirs[0]
        try:
            checks: list[dict[str, Any]] = json.loads((result_dir / "checks.json").read_text())
            client_stdout = (result_dir / "stdout.txt").read_text()
            client_stderr = (result_dir / "stderr.txt").read_text()
        except (OSError, ValueError) as exc:
            raise ConformanceRunError(f"unreadable results for {scenario}: {exc}\n{output}") from exc
    run = ClientRun(scenario, completed.returncode, output, _context(output), checks, client_stdout, client_stderr)
    _check_against_summary(run)
    return run


def _context(output: str) -> dict[str, Any]:
    """The credentials the suite handed the client (it prints them; the harness must not)."""
    for line in output.splitlines():
        if line.startswith(_CONTEXT):
            context: dict[str, Any] = json.loads(line.removeprefix(_CONTEXT))
            return context
    return {}


def _check_against_summary(run: ClientRun) -> None:
    """The suite's printed `Passed: p/t, f failed, w warnings` must match its checks.json."""
    matches = [m for m in (_RESULTS.match(line.strip()) for line in run.output.splitlines()) if m is not None]
    if len(matches) != 1:
        raise ConformanceRunError(f"no single result line in the suite's output:\n{run.output}")
    counts = Counter(check.get("status") for check in run.checks)
    printed = {k: int(v) for k, v in matches[0].groupdict().items()}
    files = {
        "passed": counts["SUCCESS"],
        "total": counts["SUCCESS"] + counts["FAILURE"],
        "failed": counts["FAILURE"],
        "warnings": counts["WARNING"],
    }
    if printed != files:
        raise ConformanceRunError(f"the suite's summary {printed} and its checks.json {files} disagree:\n{run.output}")


def _secrets(run: ClientRun) -> list[str]:
    """Every credential of the run: the context's secrets and the access tokens the AS issued."""
    values = [run.context.get(name) for name in ("client_secret", "idp_id_token")]
    pem = run.context.get("private_key_pem")
    if isinstance(pem, str):
        values += [line for line in pem.splitlines() if line and not line.startswith("-----")]
    for response in run.responses("outgoing-auth-response"):
        body = response.get("body")
        if response.get("path") == "/token" and isinstance(body, dict):
            values.append(body.get("access_token"))
    return [v for v in values if isinstance(v, str) and v]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_passes_with_the_projects_oauth_client(scenario: str) -> None:
    for attempt in range(RUNS):
        run = run_client_scenario(scenario)
        context = f"run {attempt + 1}/{RUNS}\n{run.describe()}"
        assert run.exit_code == 0, context
        assert run.with_status("FAILURE") == [], context
        assert run.with_status("WARNING") == [], context
        assert EXPECTED_CHECKS[scenario] <= run.ids("SUCCESS"), context

        # Discovery started from the MCP server's 401; then initialize, tools/list and tools/call succeeded.
        responses = run.responses("outgoing-response")
        mcp = [(r.get("mcpMethod"), r.get("statusCode")) for r in responses if r.get("path") == "/mcp"]
        assert mcp[0] == ("initialize", 401), context
        for method in ("initialize", "tools/list", "tools/call"):
            assert (method, 200) in mcp, context
        tokens = [r for r in run.responses("outgoing-auth-response") if r.get("path") == "/token"]
        assert [r.get("statusCode") for r in tokens] == [200], context  # one token request, granted

        secrets = _secrets(run)
        assert secrets, context
        for secret in secrets:
            assert secret not in run.client_stdout and secret not in run.client_stderr, "the harness printed a secret"


def test_the_suite_refuses_an_assertion_addressed_to_the_token_endpoint() -> None:
    """Negative control: the project's default `aud` (the token endpoint URL, Okta's rule) is not what this suite
    accepts (the AS issuer, rfc7523bis), so the same harness fails — the scenario does check the assertion."""
    run = run_client_scenario(CLIENT_CREDENTIALS_JWT, f"{HARNESS} --assertion-audience token_endpoint")
    assert run.exit_code != 0, run.describe()
    assert "client-credentials-jwt-verified" in run.ids("FAILURE"), run.describe()
    tokens = [r for r in run.responses("outgoing-auth-response") if r.get("path") == "/token"]
    assert [(r.get("statusCode"), (r.get("body") or {}).get("error")) for r in tokens] == [(401, "invalid_client")]
    assert "valid-bearer-token" not in run.ids("SUCCESS"), run.describe()
    assert run.client_stderr.strip(), run.describe()  # the harness said why it failed
