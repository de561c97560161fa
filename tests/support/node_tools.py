"""Where the Node-based test peers live, and how a test asks for one.

`scripts/install-node-tools` (run by `./run test`) installs Node 22 into `.cache/node22` and the npm packages
pinned by `tests/node/package-lock.json` (conformance suite, server-everything, Inspector) into `.cache/npm`.
A test that needs one calls `require_node_tool(name)`: when the tool is missing the test is skipped with a
one-line reason, except under `OAP_REQUIRE_SERVICES=1` (CI), where a missing tool is a failure. The npm tools
are `#!/usr/bin/env node` scripts that need Node 22, so run them with `env=env_with_node22()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from .processes import ServerProcess, start_server

__all__ = [
    "CACHE_DIR",
    "NODE22_BIN_DIR",
    "NPM_BIN_DIR",
    "REPO_ROOT",
    "env_with_node22",
    "require_node_tool",
    "services_required",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
NODE22_BIN_DIR = CACHE_DIR / "node22" / "node_modules" / "node" / "bin"
NPM_BIN_DIR = CACHE_DIR / "npm" / "node_modules" / ".bin"

_INSTALL_HINT = "run scripts/install-node-tools"


def services_required() -> bool:
    """True when a missing service or tool must fail the test instead of skipping it (`.ci/run` sets this)."""
    return os.environ.get("OAP_REQUIRE_SERVICES") == "1"


def _unavailable(reason: str) -> None:
    if services_required():
        pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def require_node_tool(name: str) -> Path:
    """The path of `name` — `node` (Node 22 itself) or a bin of the pinned npm packages, e.g. `conformance`.

    Skips the calling test when it is not installed (fails under `OAP_REQUIRE_SERVICES=1`). An npm tool also
    needs Node 22, so its absence is reported the same way.
    """
    node = NODE22_BIN_DIR / "node"
    if not _executable(node):
        _unavailable(f"Node 22 is not installed in {node.parent.relative_to(REPO_ROOT)}; {_INSTALL_HINT}")
    if name == "node":
        return node
    tool = NPM_BIN_DIR / name
    if not _executable(tool):
        _unavailable(f"npm tool {name!r} is not installed in {NPM_BIN_DIR.relative_to(REPO_ROOT)}; {_INSTALL_HINT}")
    return tool


def env_with_node22(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default `os.environ`) with Node 22 and the npm bins first on `PATH`."""
    env = dict(os.environ if base is None else base)
    path = env.get("PATH", "")
    env["PATH"] = os.pathsep.join(p for p in (str(NODE22_BIN_DIR), str(NPM_BIN_DIR), path) if p)
    return env


@contextmanager
def server_everything() -> Iterator[ServerProcess]:
    """`@modelcontextprotocol/server-everything streamableHttp`: the reference stateful backend (sessions, GET streams,
    resumable streams, DELETE). It takes its port from $PORT; env(1) sets it per attempt, as the port is chosen per
    attempt."""
    tool = require_node_tool("mcp-server-everything")
    with start_server(
        lambda port: ["env", f"PORT={port}", str(tool), "streamableHttp"],
        http_path="/mcp",
        env=env_with_node22(),
        name="server-everything",
    ) as server:
        yield server
