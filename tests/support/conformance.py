"""Run the official MCP conformance suite's server scenarios against a URL and return comparable counts.

`conformance server --url URL --suite all -o DIR` (`@modelcontextprotocol/conformance` 0.1.16, 32 scenarios)
prints a summary line per scenario (`✓ name: 4 passed, 0 failed`) and writes each scenario's checks to
`DIR/server-<scenario>-<timestamp>/checks.json` (check `status`: SUCCESS, FAILURE, WARNING or INFO). A
scenario passes when none of its checks failed — the suite's own verdict. Both outputs are read and must
agree, so a change in the suite's output format fails loudly instead of silently counting zero.

The same function serves the direct run against the fixture backend and the run through the gateway; a correct
pass-through gateway must produce the same `check_counts()`: per scenario, the same numbers of passed, failed and
warning checks (`compare()` names the scenarios that differ).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .node_tools import env_with_node22, require_node_tool
from .processes import ServerProcess, start_server

__all__ = [
    "BACKEND_SCRIPT",
    "SERVER_SCENARIO_COUNT",
    "ConformanceResult",
    "ConformanceRunError",
    "ScenarioResult",
    "run_conformance",
    "running_conformance_backend",
]

BACKEND_SCRIPT = Path(__file__).with_name("conformance_backend.py")
SERVER_SCENARIO_COUNT = 32  # `conformance list --server` for 0.1.16 (`--suite all`)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY_LINE = re.compile(r"^[✓✗] (?P<name>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed$")
_RESULT_DIR = re.compile(r"^server-(?P<name>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")


class ConformanceRunError(RuntimeError):
    """The suite did not run to a result that could be read (crash, timeout, unexpected output)."""


@dataclass(frozen=True)
class ScenarioResult:
    """One scenario's checks, counted the way the suite counts them."""

    name: str
    checks_passed: int
    checks_failed: int
    warnings: int
    failures: tuple[str, ...]  # "CheckName: error message" for each failed check

    @property
    def passed(self) -> bool:
        return self.checks_failed == 0


@dataclass(frozen=True)
class ConformanceResult:
    """Scenario-level pass/fail counts plus the per-scenario detail and the raw output for messages."""

    passed: int
    failed: int
    failing_names: tuple[str, ...]
    scenarios: tuple[ScenarioResult, ...]
    exit_code: int
    output: str

    @classmethod
    def from_scenarios(cls, scenarios: list[ScenarioResult], exit_code: int, output: str) -> ConformanceResult:
        ordered = tuple(sorted(scenarios, key=lambda s: s.name))
        failing = tuple(s.name for s in ordered if not s.passed)
        return cls(len(ordered) - len(failing), len(failing), failing, ordered, exit_code, output)

    @property
    def total(self) -> int:
        return self.passed + self.failed

    @property
    def checks_passed(self) -> int:
        return sum(s.checks_passed for s in self.scenarios)

    @property
    def checks_failed(self) -> int:
        return sum(s.checks_failed for s in self.scenarios)

    @property
    def warnings(self) -> int:
        return sum(s.warnings for s in self.scenarios)

    def check_counts(self) -> dict[str, tuple[int, int, int]]:
        """Per scenario: (checks passed, checks failed, warnings) — what two faithful runs agree on exactly."""
        return {s.name: (s.checks_passed, s.checks_failed, s.warnings) for s in self.scenarios}

    def compare(self, baseline: ConformanceResult) -> str:
        """The scenarios whose check counts differ from `baseline`'s, then this run's own account."""
        mine, theirs = self.check_counts(), baseline.check_counts()
        lines = ["scenario: (passed, failed, warnings) baseline -> this run"]
        for name in sorted(mine.keys() | theirs.keys()):
            if mine.get(name) != theirs.get(name):
                lines.append(f"  {name}: {theirs.get(name)} -> {mine.get(name)}")
        return "\n".join([*lines, self.describe()])

    def describe(self) -> str:
        """A readable account of failures and warnings, for assertion messages."""
        lines = [
            f"{self.passed}/{self.total} scenarios passed ({self.checks_passed} checks passed, "
            f"{self.checks_failed} failed, {self.warnings} warnings; exit code {self.exit_code})"
        ]
        for scenario in self.scenarios:
            if not scenario.passed:
                lines.append(f"  FAILED {scenario.name}")
                lines.extend(f"    - {failure}" for failure in scenario.failures)
        return "\n".join(lines)


def run_conformance(
    url: str,
    *,
    scenario: str | None = None,
    suite: str = "all",
    expected_failures: Path | None = None,
    timeout: float = 90.0,
) -> ConformanceResult:
    """Run the suite's server scenarios against `url` (one `scenario`, or the whole `suite`).

    Skips the calling test when the suite is not installed (see `require_node_tool`). Raises
    `ConformanceRunError` when the suite crashes, times out or prints something this parser does not know.
    """
    conformance = require_node_tool("conformance")
    with tempfile.TemporaryDirectory(prefix="oap-conformance-") as out_dir:
        argv = [str(conformance), "server", "--url", url, "-o", out_dir]
        argv += ["--scenario", scenario] if scenario else ["--suite", suite]
        if expected_failures is not None:
            argv += ["--expected-failures", str(expected_failures)]
        try:
            completed = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                errors="replace",
                env=env_with_node22(),
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ConformanceRunError(f"conformance suite timed out after {timeout:.0f}s: {argv}") from exc
        output = _ANSI.sub("", completed.stdout + completed.stderr)
        scenarios = _read_result_dirs(Path(out_dir), output)
    _check_against_summary(scenarios, output)
    if not scenarios:
        raise ConformanceRunError(f"conformance suite wrote no results (exit {completed.returncode}):\n{output}")
    return ConformanceResult.from_scenarios(scenarios, completed.returncode, output)


def _read_result_dirs(out_dir: Path, output: str) -> list[ScenarioResult]:
    scenarios: list[ScenarioResult] = []
    for result_dir in sorted(out_dir.iterdir()):
        match = _RESULT_DIR.match(result_dir.name)
        if match is None:
            raise ConformanceRunError(f"unexpected entry {result_dir.name!r} in the suite's output directory")
        try:
            checks: list[dict[str, Any]] = json.loads((result_dir / "checks.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConformanceRunError(f"unreadable checks for {match['name']}: {exc}\n{output}") from exc
        statuses = [check.get("status") for check in checks]
        failures = tuple(
            f"{check.get('name')}: {check.get('errorMessage') or check.get('description')}"
            for check in checks
            if check.get("status") == "FAILURE"
        )
        scenarios.append(
            ScenarioResult(
                name=match["name"],
                checks_passed=statuses.count("SUCCESS"),
                checks_failed=statuses.count("FAILURE"),
                warnings=statuses.count("WARNING"),
                failures=failures,
            )
        )
    return scenarios


def _check_against_summary(scenarios: list[ScenarioResult], output: str) -> None:
    """When the suite printed its multi-scenario summary, it must match the per-scenario files exactly."""
    summary = {
        m["name"]: (int(m["passed"]), int(m["failed"]))
        for m in (_SUMMARY_LINE.match(line.strip()) for line in output.splitlines())
        if m is not None
    }
    if "=== SUMMARY ===" not in output:
        return
    files = {s.name: (s.checks_passed, s.checks_failed) for s in scenarios}
    if summary != files:
        raise ConformanceRunError(
            f"the suite's summary and its result files disagree:\nsummary={summary}\nfiles={files}\n{output}"
        )


@contextmanager
def running_conformance_backend(*, timeout: float = 30.0) -> Iterator[ServerProcess]:
    """The fixture backend (`conformance_backend.py`) on a free port, Streamable HTTP at `/mcp`."""

    def command(port: int) -> list[str]:
        return [sys.executable, str(BACKEND_SCRIPT), "--host", "127.0.0.1", "--port", str(port)]

    with start_server(command, http_path="/mcp", timeout=timeout, name="conformance-backend") as server:
        yield server
