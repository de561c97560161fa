"""The docs cannot drift: the Mermaid diagrams render, and the error table of docs/SEQUENCE.md is what the gateway
returns.

- Every ```mermaid block of `docs/*.md` is rendered to SVG by `@mermaid-js/mermaid-cli` (`mmdc`) with Debian's
  Chromium (`tests/support/mermaid.py`); a syntax error fails its test, named by file and line. Without Chromium,
  Node 22 or mermaid-cli the render tests skip with the reason — they fail under `OAP_REQUIRE_SERVICES=1`.
- Every row of the SEQUENCE.md error table is played against the real gateway and the embedded Okta emulator
  (`tests/support/error_scenarios.py`): status, `error`, `WWW-Authenticate`, the other headers listed, and the exact
  body must match; a row without a scenario, or a scenario without a row, fails too.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.error_scenarios import SCENARIOS, Answer
from tests.support.mermaid import MermaidBlock, RenderResult, mermaid_blocks, require_renderer
from tests.support.node_tools import REPO_ROOT

DOCS = REPO_ROOT / "docs"
REQUIRED_DOCS = ("ARCHITECTURE.md", "SEQUENCE.md", "OKTA_SETUP.md")
TABLE_HEADER = ("scenario", "status", "error", "WWW-Authenticate", "other headers", "body")
ABSENT = "—"
BASE = "{base}"


def all_blocks() -> list[MermaidBlock]:
    return [block for path in sorted(DOCS.glob("*.md")) for block in mermaid_blocks(path)]


BLOCKS = all_blocks()


# ---- Mermaid ---------------------------------------------------------------------------------------------------


def test_each_doc_exists_and_has_a_diagram() -> None:
    for name in REQUIRED_DOCS:
        path = DOCS / name
        assert path.is_file(), f"missing {path.relative_to(REPO_ROOT)}"
        assert mermaid_blocks(path), f"{name} has no ```mermaid diagram"


def test_fence_parser_finds_blocks_and_skips_other_code(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```bash\necho hi\n```\n\n```mermaid\nflowchart LR\n  A --> B\n```\n"
        "~~~~ mermaid\nsequenceDiagram\n  A->>B: ```not a fence end\n~~~~\n```Mermaid\npie\n```\n",
        encoding="utf-8",
    )
    blocks = mermaid_blocks(doc)
    assert [(b.line, b.source.splitlines()[0]) for b in blocks] == [
        (6, "flowchart LR"),
        (10, "sequenceDiagram"),
        (14, "pie"),
    ]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RenderResult]:
    """Every diagram rendered once, a few at a time (each mmdc run starts its own Chromium)."""
    renderer = require_renderer()
    directory = tmp_path_factory.mktemp("mermaid")
    config = renderer.write_puppeteer_config(directory)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda block: renderer.render(block, directory, config), BLOCKS))
    return {result.block.name: result for result in results}


@pytest.mark.node
@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_mermaid_diagram_renders(block: MermaidBlock, rendered: dict[str, RenderResult]) -> None:
    result = rendered[block.name]
    assert result.ok, f"{block.name}: the diagram does not render\n{result.output}"


@pytest.mark.node
@pytest.mark.slow
def test_the_renderer_rejects_a_syntax_error(tmp_path: Path) -> None:
    """The render test would pass vacuously if mmdc accepted anything."""
    renderer = require_renderer()
    config = renderer.write_puppeteer_config(tmp_path)
    broken = MermaidBlock(tmp_path / "broken.md", 1, "flowchart LR\n  A[unclosed --> B\n")
    result = renderer.render(broken, tmp_path, config)
    assert not result.ok
    assert "Parse error" in result.output or "rror" in result.output


# ---- the error table -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorRow:
    scenario: str
    status: int
    error: str
    www_authenticate: str | None
    other_headers: dict[str, str]
    body: str
    line: int


def _cell(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text.startswith("`") and text.endswith("`"):
        return text[1:-1]
    return text


def _split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; the table's code spans never contain a pipe."""
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), f"not a table row: {line!r}"
    return [_cell(cell) for cell in inner[1:-1].split("|")]


def error_table(path: Path = DOCS / "SEQUENCE.md") -> list[ErrorRow]:
    lines = path.read_text(encoding="utf-8").splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("|") and tuple(_split_row(line)) == TABLE_HEADER]
    assert len(headers) == 1, f"SEQUENCE.md must have exactly one table with columns {' | '.join(TABLE_HEADER)}"
    start = headers[0]
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[start + 1].strip()), "the header must be followed by |---|"
    rows = []
    for offset, line in enumerate(lines[start + 2 :], start=start + 3):
        if not line.startswith("|"):
            break
        cells = _split_row(line)
        assert len(cells) == len(TABLE_HEADER), f"SEQUENCE.md:{offset}: {len(cells)} cells, not {len(TABLE_HEADER)}"
        scenario, status, error, www, other, body = cells
        headers_listed = {}
        if other != ABSENT:
            for item in other.split(";"):
                name, sep, value = item.partition(":")
                assert sep, f"SEQUENCE.md:{offset}: other headers must read `Name: value` (`;` between)"
                headers_listed[name.strip()] = value.strip()
        rows.append(
            ErrorRow(scenario, int(status), error, None if www == ABSENT else www, headers_listed, body, offset)
        )
    assert rows, "the error table has no rows"
    return rows


ROWS = error_table() if (DOCS / "SEQUENCE.md").is_file() else []


def test_every_row_has_a_scenario_and_every_scenario_a_row() -> None:
    assert ROWS, "docs/SEQUENCE.md has no error table"
    documented = [row.scenario for row in ROWS]
    assert len(documented) == len(set(documented)), "a scenario appears twice in the error table"
    assert set(documented) == set(SCENARIOS), (
        f"rows without a scenario: {sorted(set(documented) - set(SCENARIOS))}; "
        f"scenarios without a row: {sorted(set(SCENARIOS) - set(documented))}"
    )


def test_the_task_s_scenarios_are_all_documented() -> None:
    """Issue 6 names these; each must stay in the table (their names may gain detail, not disappear)."""
    documented = " / ".join(row.scenario.lower() for row in ROWS)
    for required in (
        "bad signature",
        "expired token",
        "unknown agent",
        "backend not allowed",
        "exchange refused",
        "idp down",
        "backend 401 twice",
    ):
        assert required in documented, f"the error table lost the {required!r} scenario"


@pytest.mark.parametrize("row", ROWS, ids=[row.scenario for row in ROWS])
async def test_error_table_row_matches_the_gateway(row: ErrorRow) -> None:
    play = SCENARIOS.get(row.scenario)
    assert play is not None, f"SEQUENCE.md:{row.line}: no scenario plays {row.scenario!r}"
    answer: Answer = await play()
    where = f"SEQUENCE.md:{row.line} ({row.scenario})"

    def documented(text: str) -> str:
        return text.replace(BASE, answer.base_url)

    assert answer.status == row.status, f"{where}: status {answer.status}, documented {row.status}"
    assert answer.headers.get("content-type", "").startswith("application/json"), where
    assert answer.headers.get("x-request-id"), f"{where}: no X-Request-ID"
    body = json.loads(answer.body)
    assert body.get("error") == row.error, f"{where}: error {body.get('error')!r}, documented {row.error!r}"
    assert answer.body.decode() == documented(row.body), f"{where}: body {answer.body.decode()}"
    www = answer.headers.get("www-authenticate")
    expected_www = None if row.www_authenticate is None else documented(row.www_authenticate)
    assert www == expected_www, f"{where}: WWW-Authenticate {www!r}, documented {expected_www!r}"
    for name, value in row.other_headers.items():
        assert answer.headers.get(name.lower()) == documented(value), f"{where}: {name} {answer.headers.get(name)!r}"
    if "Retry-After" not in row.other_headers:
        assert "retry-after" not in answer.headers, f"{where}: undocumented Retry-After"
