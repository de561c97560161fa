"""The `okta-agent-proxy` command without the subprocess: the `cli` group the console script calls, run in this
process by click's runner, for tests where a subprocess would cost seconds of imports per run.

The result has a subprocess's shape (`subprocess.CompletedProcess`: exit code, stdout, stderr), so a test can run
one command either way. Keep at least one run of each command as a real subprocess (the console script, its
stderr): this runner proves neither.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import structlog
from click.testing import CliRunner

from okta_agent_proxy.cli import cli
from okta_agent_proxy.config.settings import Settings

# The runner swaps `sys.stdout`/`sys.stderr` and `os.environ` (and here the working directory) for the whole
# process: two runs at once would mix their output.
_ONE_AT_A_TIME = threading.Lock()


def run_cli_in_process(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    unset: Iterable[str] = Settings.model_fields,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`okta-agent-proxy ARGS` in this process, in `cwd`, with the variables `unset` (by default the gateway's
    settings, which would win over `--env-file`) removed from the environment and `env` set, as a clean
    subprocess environment would have them. Exceptions propagate (a traceback fails the test).

    Blocking: from async code call it with `asyncio.to_thread`, so the test's event loop keeps serving whatever the
    command talks to (the command may run its own event loop)."""
    runner = CliRunner(env=dict.fromkeys(unset) | dict(env or {}))  # None: unset
    with _ONE_AT_A_TIME, contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        result = runner.invoke(cli, list(args), prog_name="okta-agent-proxy", catch_exceptions=False)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def logs_apart() -> Iterator[None]:
    """While it lasts, this process's structlog lines go to the current `sys.stderr` (pytest's capture), not to
    whatever stream is `sys.stdout` when they are written. Wrap an in-process run in it when servers of the test log
    in this process meanwhile (an emulator in the test's loop): the runner's swapped `sys.stdout` would otherwise
    take their lines into the command's output, where a subprocess's would never see them."""
    configured, previous = structlog.is_configured(), structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        yield
    finally:
        if configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()
