"""`okta-agent-proxy audit --events`: the front door's security events, as an operator reads them — the command run
with a clean environment and `--database-url` against a store the real `FrontDoorStore` wrote, on a SQLite file and
on the PostgreSQL server (skipped when unreachable unless `OAP_REQUIRE_SERVICES=1`). Each database's JSON lines and
its pre-front-door error (the table's) come from the command run as a subprocess (`python -m okta_agent_proxy`);
the rest run the same `cli` in this process (click's runner), as each subprocess costs seconds of imports. The
seven events are written once per database for the tests that only read them.

Covered: JSON lines carry every field of every event, oldest first; the table has one line per event with the
columns the header names; each filter (`--kind`, `--client`, `--user`, `--since`, `--until`, `--last`, and their
combinations) selects exactly the events it should; 50 events by default; a hostile client id or detail cannot
write control characters to the terminal (nor can a tool name in the request log's table); options of the other
mode are usage errors, not silently ignored; a database migrated before the front door is one `error:` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner

from okta_agent_proxy.cli import cli
from okta_agent_proxy.config.models import AuditConfig
from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.store.db import migrate, open_store
from okta_agent_proxy.store.events import AuditEvent
from okta_agent_proxy.store.frontdoor import EventKind, FrontDoorStore, SecurityEvent
from tests.support.stacks import DATABASES, database_url

TIMEOUT = 60
EXIT_USAGE = EXIT_UNAVAILABLE = 2
CURSOR = "q7F2-registered-cursor"
CLAUDE = "https://claude.ai/oauth/claude-code-client-metadata"
# A refused client id and a declared name, as an attacker could send them: an escape sequence that clears the
# screen, a right-to-left override, and a Cyrillic look-alike.
HOSTILE_CLIENT = "evil\x1b[2J\u202eclient"
HOSTILE_NAME = "\u0421laude Code\x1b]0;pwned\x07"
ESCAPES = ("\x1b", "\x07", "\u202e")


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Written:
    """The store a test reads, and the events written there by kind (in the order written)."""

    url: str
    start: datetime
    ids: dict[str, int]


def _environment() -> dict[str, str]:
    """The caller's environment without the gateway's variables (a DATABASE_URL there would win)."""
    return {k: v for k, v in os.environ.items() if k not in Settings.model_fields} | {"PYTHONUNBUFFERED": "1"}


def run_audit(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "okta_agent_proxy", "audit", "--env-file", os.devnull, *args]
    return subprocess.run(argv, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT)


def run_audit_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`audit ARGS` through the `cli` group the console script calls, in this process (click's runner) with the
    gateway's variables unset, as `_environment` does; the database named by `--database-url`. Call it on a thread
    (the command runs its own event loop) and one at a time (the runner swaps `sys.stdout` for the process)."""
    runner = CliRunner(env=dict.fromkeys(Settings.model_fields))  # None: unset
    result = runner.invoke(cli, ["audit", "--env-file", os.devnull, *args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result


async def events_cli(written: Written, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a subprocess."""
    return succeeded(await asyncio.to_thread(run_audit, cwd, "--events", "--database-url", written.url, *args))


async def events_in_process(written: Written, *args: str) -> subprocess.CompletedProcess[str]:
    return succeeded(await asyncio.to_thread(run_audit_in_process, "--events", "--database-url", written.url, *args))


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def iso(value: datetime) -> str:
    return value.isoformat()


async def write_front_door_events(url: str) -> Written:
    """A login through Cursor (registered) on replica-a and -b, a refused client, and a Claude (CIMD) grant revoked
    after refresh-token reuse: seven events over two hours, ending three-quarters of an hour ago."""
    start = datetime.now(UTC).replace(microsecond=123_456) - timedelta(hours=3)
    clock = Clock(start)
    store = await open_store(url)
    try:
        a = FrontDoorStore(store.engine, replica="replica-a", clock=clock)
        b = FrontDoorStore(store.engine, replica="replica-b", clock=clock)
        ids: dict[str, int] = {}

        async def at(minutes: float, name: str, writer: FrontDoorStore, kind: str, **fields: Any) -> None:
            clock.now = start + timedelta(minutes=minutes)
            ids[name] = await writer.record_event(kind, **fields)

        ada = {"client_id": CURSOR, "user_sub": "00u-ada", "grant_id": "g-ada"}
        bob = {"client_id": CLAUDE, "user_sub": "00u-bob", "grant_id": "g-bob"}
        await at(0, "registration", a, EventKind.REGISTRATION, client_id=CURSOR, detail={"client_name": "Cursor"})
        await at(10, "login", a, EventKind.LOGIN, **ada)
        await at(20, "consent", b, EventKind.CONSENT, **ada, detail={"backend": "employees", "scopes": ["mcp:read"]})
        await at(30, "token_issued", b, EventKind.TOKEN_ISSUED, **ada, detail={"scope": "mcp:read"})
        await at(
            60,
            "refusal",
            a,
            EventKind.REFUSAL,
            client_id=HOSTILE_CLIENT,
            detail={"reason": "unknown_client", "client_name": HOSTILE_NAME},
        )
        await at(120, "refresh_reuse", a, EventKind.REFRESH_REUSE, **bob)
        await at(135, "revocation", b, EventKind.REVOCATION, **bob, detail={"reason": "refresh_token_reuse"})
    finally:
        await store.close()
    return Written(url, start, ids)


@pytest_asyncio.fixture(params=DATABASES, scope="module", loop_scope="module")
async def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Written]:
    """One store per database for the module: the tests that use it only read (`audit` opens it read-only)."""
    async with database_url(request.param, tmp_path_factory.mktemp(request.param)) as url:
        await migrate(url)
        yield await write_front_door_events(url)


async def stored_events(url: str) -> list[SecurityEvent]:
    store = await open_store(url)
    try:
        return await FrontDoorStore(store.engine).list_events()
    finally:
        await store.close()


# ---------------------------------------------------------------- formats


async def test_json_lines_carry_every_field_oldest_first(written: Written, tmp_path: Path) -> None:
    result = await events_cli(written, tmp_path, "--json")
    lines = json_lines(result)
    events = await stored_events(written.url)
    assert [line["id"] for line in lines] == list(written.ids.values())
    assert len(lines) == len(events) == 7
    for line, event in zip(lines, events, strict=True):
        assert set(line) == {"id", "time", "kind", "replica", "client_id", "user_sub", "grant_id", "detail"}
        assert datetime.fromisoformat(line["time"]) == event.time
        assert (line["kind"], line["replica"], line["client_id"], line["user_sub"], line["grant_id"]) == (
            event.kind,
            event.replica,
            event.client_id,
            event.user_sub,
            event.grant_id,
        )
        assert line["detail"] == event.detail
    consent = lines[2]
    assert consent["kind"] == "consent" and consent["replica"] == "replica-b"
    assert consent["detail"] == {"backend": "employees", "scopes": ["mcp:read"]}
    assert datetime.fromisoformat(consent["time"]) == written.start + timedelta(minutes=20)


async def test_table_has_one_line_per_event_under_its_header(written: Written) -> None:
    result = await events_in_process(written)
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["time", "kind", "replica", "client", "user", "grant", "detail"]
    assert len(rows) == 7
    parsed = [row.split("  ", 6) for row in rows]
    assert [cells[1] for cells in parsed] == list(written.ids)
    registration, login, consent = parsed[:3]
    assert registration[0] == written.start.strftime("%Y-%m-%d %H:%M:%S")
    assert registration[2:6] == ["replica-a", CURSOR, "-", "-"]
    assert json.loads(registration[6]) == {"client_name": "Cursor"}
    assert login[2:] == ["replica-a", CURSOR, "00u-ada", "g-ada", "{}"]
    assert consent[2] == "replica-b"
    assert json.loads(consent[6]) == {"backend": "employees", "scopes": ["mcp:read"]}


async def test_hostile_client_id_and_detail_cannot_reach_the_terminal(written: Written) -> None:
    table = await events_in_process(written, "--kind", "refusal")
    as_json = await events_in_process(written, "--kind", "refusal", "--json")
    for output in (table.stdout, as_json.stdout):
        assert not any(escape in output for escape in ESCAPES), output
    (row,) = table.stdout.splitlines()[1:]
    cells = row.split("  ", 6)
    assert cells[3] == "evil\\x1b[2J\\u202eclient"
    assert json.loads(cells[6]) == {"reason": "unknown_client", "client_name": HOSTILE_NAME}
    (line,) = json_lines(as_json)
    assert line["client_id"] == HOSTILE_CLIENT
    assert line["detail"]["client_name"] == HOSTILE_NAME


# ---------------------------------------------------------------- filters


FILTERS: list[tuple[tuple[str, ...], list[str]]] = [
    ((), ["registration", "login", "consent", "token_issued", "refusal", "refresh_reuse", "revocation"]),
    (("--kind", "login"), ["login"]),
    (("--kind", "no_such_kind"), []),
    (("--client", CURSOR), ["registration", "login", "consent", "token_issued"]),
    (("--client", CLAUDE), ["refresh_reuse", "revocation"]),
    (("--user", "00u-bob"), ["refresh_reuse", "revocation"]),
    (("--kind", "consent", "--user", "00u-ada"), ["consent"]),
    (("--kind", "login", "--user", "00u-bob"), []),
    (("--since", "100m"), ["refresh_reuse", "revocation"]),  # now - 100 min: after minute 80
    (("--last", "2"), ["refresh_reuse", "revocation"]),
    (("--last", "3", "--client", CURSOR), ["login", "consent", "token_issued"]),
    (("--last", "0"), []),
]


def filtered_in_process(url: str, cases: list[tuple[str, ...]]) -> list[list[int]]:
    """The ids `audit --events --json` prints for each set of filters (the command run in this process)."""
    printed = []
    for args in cases:
        result = run_audit_in_process("--events", "--database-url", url, "--json", *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        printed.append([json.loads(line)["id"] for line in result.stdout.splitlines()])
    return printed


async def test_each_filter_selects_exactly_its_events(written: Written) -> None:
    at = written.start
    windows: list[tuple[tuple[str, ...], list[str]]] = [
        # --since is inclusive, --until exclusive, to the microsecond.
        (
            ("--since", iso(at + timedelta(minutes=10)), "--until", iso(at + timedelta(minutes=30))),
            ["login", "consent"],
        ),
        # A time without a zone is UTC; --until without --since still shows at most 50.
        (("--until", (at + timedelta(minutes=20)).replace(tzinfo=None).isoformat()), ["registration", "login"]),
        (("--since", iso(at + timedelta(minutes=60)), "--kind", "refusal"), ["refusal"]),
        (("--since", iso(at + timedelta(minutes=60, microseconds=1))), ["refresh_reuse", "revocation"]),
    ]
    cases = FILTERS + windows
    printed = await asyncio.to_thread(filtered_in_process, written.url, [args for args, _ in cases])
    by_id = {event_id: name for name, event_id in written.ids.items()}
    for (args, expected), ids in zip(cases, printed, strict=True):
        assert [by_id[event_id] for event_id in ids] == expected, args


@pytest.mark.parametrize("kind", DATABASES)
async def test_fifty_most_recent_by_default(kind: str, tmp_path: Path) -> None:
    async with database_url(kind, tmp_path) as url:
        await migrate(url)
        store = await open_store(url)
        try:
            writer = FrontDoorStore(store.engine, replica="r")
            ids = [await writer.record_event(EventKind.LOGIN, detail={"n": n}) for n in range(55)]
        finally:
            await store.close()
        result = await events_in_process(Written(url, datetime.now(UTC), {}), "--json")
        everything = await events_in_process(Written(url, datetime.now(UTC), {}), "--json", "--since", "1d")
    assert [line["id"] for line in json_lines(result)] == ids[5:]
    assert [line["detail"]["n"] for line in json_lines(everything)] == list(range(55))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "args",
    [
        ("--events", "--agent", "cursor"),
        ("--events", "--backend", "employees"),
        ("--events", "--outcome", "ok"),
        ("--events", "--follow"),
        ("--kind", "login"),
        ("--client", CURSOR),
    ],
    ids=["events-agent", "events-backend", "events-outcome", "events-follow", "kind-alone", "client-alone"],
)
def test_options_of_the_other_mode_are_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Refused before the store is opened: no database is needed, and none is created (run in this process)."""
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(cli, ["audit", "--env-file", os.devnull, *args])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert args[-1] in result.stderr or args[-2] in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unparsable_until_is_a_usage_error(tmp_path: Path) -> None:
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(cli, ["audit", "--env-file", os.devnull, "--events", "--until", "yesterday"])
    assert result.exit_code == EXIT_USAGE
    assert "--until" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("kind", DATABASES)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
async def test_database_from_before_the_front_door_is_one_error_line(kind: str, as_json: bool, tmp_path: Path) -> None:
    """The table as a subprocess (nothing else on stderr: no traceback, no log line), JSON in this process."""
    async with database_url(kind, tmp_path) as url:
        await migrate(url, "0002")
        args = ("--events", "--database-url", url, *(["--json"] if as_json else []))
        if as_json:
            result = await asyncio.to_thread(run_audit_in_process, *args)
        else:
            result = await asyncio.to_thread(run_audit, tmp_path, *args)
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "security_events" in line
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the request log's table, which shares the cells


async def test_request_log_table_escapes_hostile_text_and_takes_until(tmp_path: Path) -> None:
    """A tool name comes from the caller's request body: in the table it is escaped, in JSON it is exact."""
    start = datetime.now(UTC) - timedelta(minutes=30)
    hostile_tool = "get\x1b[2Jsalary \u202etxt"
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    await migrate(url)
    store = await open_store(url)
    try:
        writer = store.writer(AuditConfig())
        await writer.start()
        try:
            for index, name in enumerate(["first", hostile_tool, "late"]):
                event = AuditEvent(
                    time=start + timedelta(minutes=10 * index),
                    request_id=f"req-{index}",
                    replica="replica-a",
                    http_method="POST",
                    path="/employees/mcp",
                    status=200,
                    outcome="ok",
                    latency_ms=1.0,
                    mcp_method="tools/call",
                    mcp_name=name,
                )
                await writer.record(event)
        finally:
            await writer.close()
    finally:
        await store.close()
    until = iso(start + timedelta(minutes=20))
    table = await asyncio.to_thread(run_audit_in_process, "--database-url", url, "--until", until)
    as_json = await asyncio.to_thread(run_audit_in_process, "--database-url", url, "--until", until, "--json")
    assert table.returncode == as_json.returncode == 0, (table.stderr, as_json.stderr)
    assert not any(escape in table.stdout for escape in ESCAPES)
    rows = table.stdout.splitlines()[1:]
    assert len(rows) == 2
    assert "tools/call get\\x1b[2Jsalary\\x20\\u202etxt" in rows[1]
    assert [json.loads(line)["mcp_name"] for line in as_json.stdout.splitlines()] == ["first", hostile_tool]
