"""The two lock files agree: what `./run demo` installs (requirements.lock) is pinned identically in what `./run test`
installs (requirements-dev.lock), and the run lock carries no development tool."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", re.MULTILINE)


def pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text(encoding="utf-8")
    return {package.lower().replace("_", "-"): version for package, version in _PIN.findall(text)}


def test_every_run_pin_is_the_same_in_the_dev_lock() -> None:
    run, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert run, "requirements.lock pins nothing"
    assert {name: dev.get(name) for name in run} == run


def test_the_run_lock_holds_no_development_tool() -> None:
    run = pins("requirements.lock")
    assert not {"pytest", "ruff", "mypy", "hypothesis", "pytest-asyncio"} & run.keys()
    assert {"aiohttp", "mcp", "sqlalchemy", "pyjwt"} <= run.keys()
