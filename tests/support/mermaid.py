"""Find the Mermaid diagrams in Markdown and render them with `@mermaid-js/mermaid-cli` (`mmdc`) and Chromium.

`scripts/install-mermaid` installs mermaid-cli and puppeteer, pinned by `tests/node/mermaid/package-lock.json`, into
`.cache/mermaid`, without downloading a browser: rendering drives Debian's `chromium` package (`/usr/bin/chromium`,
or `OAP_CHROMIUM`) through a puppeteer config file written here — with `--no-sandbox` when running as root, as CI
does, because Chromium refuses to start its sandbox as root. mermaid-cli 12 needs Node >= 22.13: the Node 22 that
`scripts/install-node-tools` puts in `.cache/node22`.

`require_renderer()` returns a `MermaidRenderer`, or skips the calling test with the missing piece and how to get
it — except under `OAP_REQUIRE_SERVICES=1` (CI), where a missing piece is a failure. `mmdc` exits non-zero on a
syntax error; `render` also refuses an SVG that is missing, empty, or Mermaid's "Syntax error" picture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from .node_tools import CACHE_DIR, NODE22_BIN_DIR, REPO_ROOT, services_required

__all__ = [
    "MERMAID_DIR",
    "MMDC",
    "MermaidBlock",
    "MermaidRenderer",
    "RenderResult",
    "chromium_path",
    "mermaid_blocks",
    "require_renderer",
]

MERMAID_DIR = CACHE_DIR / "mermaid"
MMDC = MERMAID_DIR / "node_modules" / ".bin" / "mmdc"
RENDER_TIMEOUT_SECONDS = 60.0
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)[^`]*$")


@dataclass(frozen=True)
class MermaidBlock:
    """One fenced ```mermaid block: where it is (1-based line of its opening fence) and its source."""

    path: Path
    line: int
    source: str

    @property
    def name(self) -> str:
        try:
            shown = self.path.relative_to(REPO_ROOT)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}"


@dataclass(frozen=True)
class RenderResult:
    block: MermaidBlock
    ok: bool
    output: str  # mmdc's stdout and stderr, or why the SVG was refused


def mermaid_blocks(path: Path) -> list[MermaidBlock]:
    """Every fenced code block whose info string is `mermaid` (CommonMark fences: ``` or ~~~, closed by a fence of
    the same character at least as long)."""
    blocks: list[MermaidBlock] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            stripped = lines[end].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(lines[end])
            end += 1
        if opening["info"].lower() == "mermaid":
            blocks.append(MermaidBlock(path, index + 1, "\n".join(body) + "\n"))
        index = end + 1
    return blocks


def chromium_path() -> Path | None:
    configured = os.environ.get("OAP_CHROMIUM")
    if configured:
        return Path(configured)
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return Path(found)
    default = Path("/usr/bin/chromium")
    return default if default.exists() else None


def _unavailable(reason: str) -> NoReturn:
    if services_required():
        pytest.fail(f"{reason} (OAP_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@dataclass(frozen=True)
class MermaidRenderer:
    mmdc: Path
    node_bin_dir: Path
    chromium: Path

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join(p for p in (str(self.node_bin_dir), env.get("PATH", "")) if p)
        env["PUPPETEER_SKIP_DOWNLOAD"] = "1"
        env["PUPPETEER_EXECUTABLE_PATH"] = str(self.chromium)
        return env

    def write_puppeteer_config(self, directory: Path) -> Path:
        args = ["--disable-gpu", "--disable-dev-shm-usage"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium will not run its sandbox as root (CI runs as root)
        path = directory / "puppeteer-config.json"
        path.write_text(json.dumps({"executablePath": str(self.chromium), "args": args}), encoding="utf-8")
        return path

    def render(self, block: MermaidBlock, directory: Path, config: Path) -> RenderResult:
        """Render `block` to an SVG in `directory` (one mmdc run); `config` from `write_puppeteer_config`."""
        stem = re.sub(r"[^A-Za-z0-9]+", "-", block.name).strip("-")
        source = directory / f"{stem}.mmd"
        target = directory / f"{stem}.svg"
        source.write_text(block.source, encoding="utf-8")
        command = [str(self.mmdc), "--quiet", "-p", str(config), "-i", str(source), "-o", str(target)]
        try:
            done = subprocess.run(
                command,
                env=self.environment(),
                capture_output=True,
                text=True,
                timeout=RENDER_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return RenderResult(block, False, f"mmdc did not finish within {RENDER_TIMEOUT_SECONDS:.0f} s")
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            return RenderResult(block, False, f"mmdc exited {done.returncode}:\n{output}")
        svg = target.read_text(encoding="utf-8") if target.exists() else ""
        if "<svg" not in svg:
            return RenderResult(block, False, f"mmdc wrote no SVG:\n{output}")
        if "Syntax error in text" in svg or 'aria-roledescription="error"' in svg:
            return RenderResult(block, False, "mmdc rendered Mermaid's syntax-error picture")
        return RenderResult(block, True, output)


def require_renderer() -> MermaidRenderer:
    """The renderer, or skip (fail under `OAP_REQUIRE_SERVICES=1`) naming what is missing."""
    chromium = chromium_path()
    if chromium is None or not _executable(chromium):
        _unavailable("Chromium is not installed (apt-get install -y chromium, or set OAP_CHROMIUM)")
    node = NODE22_BIN_DIR / "node"
    if not _executable(node):
        _unavailable("Node 22 is not installed in .cache/node22; run scripts/install-node-tools")
    if not _executable(MMDC):
        _unavailable("mermaid-cli is not installed in .cache/mermaid; run scripts/install-mermaid")
    return MermaidRenderer(MMDC, NODE22_BIN_DIR, chromium)
