"""`okta-agent-proxy audit`: read the audit log — a table for people, JSON lines for a SIEM, `--follow` to tail.
`--events` reads the OAuth front door's security events instead (DESIGN.md §8: registrations, logins, consents,
token issues, refreshes, reuse detections, revocations, refusals), with the filters that apply to them.

Table cells are printed with control, format and whitespace characters escaped (`\\x1b`, `\\u202e`): a client id, a
tool name or an event's detail can be written by whoever calls the gateway, and must not move the cursor, recolour
or rewrite the operator's terminal, nor shift the columns. A security event's detail is compact JSON with non-ASCII
escaped, so a look-alike letter in a client's name shows as its code point. JSON lines escape the same way.

The store is opened read-only (`open_store(read_only=True)`): a missing SQLite file is an error, never created. A
database that cannot be read — no file, an unsupported URL, a server that refuses, a database never migrated, a
query that fails — is one line on stderr, `error: …` without the URL's password, and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import click
from sqlalchemy import inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from okta_agent_proxy.config.loader import load_settings
from okta_agent_proxy.store.db import (
    StoreConfigError,
    StoreFileMissingError,
    StoreUnavailableError,
    async_database_url,
    database_error_reason,
    database_location,
    open_store,
)
from okta_agent_proxy.store.frontdoor import EventKind, FrontDoorStore, SecurityEvent, SecurityEventQuery
from okta_agent_proxy.store.models import security_events
from okta_agent_proxy.store.queries import AuditQuery, StoredEvent, follow_events, iter_events

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
COLUMNS = ("time", "user", "agent", "backend", "mcp", "status", "outcome", "ms")
EVENT_COLUMNS = ("time", "kind", "replica", "client", "user", "grant", "detail")
EXIT_UNAVAILABLE = 2
DEFAULT_LAST = 50
T = TypeVar("T")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`30m`, `2h`, `7d` ago, or an ISO 8601 time (UTC if it names no zone)."""
    match = _RELATIVE.match(value.strip())
    if match:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use 30m, 2h, 7d or an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cell(value: str | None) -> str:
    """A table cell: `-` when empty; control, format (bidi) and whitespace characters as escapes (see above)."""
    if not value:
        return "-"
    return "".join(c if c.isprintable() and not c.isspace() else _escaped(c) for c in value)


def _escaped(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def table_row(stored: StoredEvent) -> str:
    event = stored.event
    mcp = " ".join(cell(part) for part in (event.mcp_method, event.mcp_name) if part) or cell(event.http_method)
    cells = (
        _time(event.time),
        cell(event.user_sub),
        cell(event.agent),
        cell(event.backend),
        mcp,
        str(event.status),
        cell(event.outcome),
        f"{event.latency_ms:.1f}",
    )
    return "  ".join(cells)


def event_json(event: SecurityEvent) -> dict[str, object]:
    """A security event as one JSON object: the record's fields, time in ISO 8601."""
    return {
        "id": event.id,
        "time": event.time.isoformat(),
        "kind": event.kind,
        "replica": event.replica,
        "client_id": event.client_id,
        "user_sub": event.user_sub,
        "grant_id": event.grant_id,
        "detail": event.detail,
    }


def event_row(event: SecurityEvent) -> str:
    detail = json.dumps(event.detail, separators=(",", ":"), sort_keys=True)  # ASCII only: non-ASCII escaped
    who = (event.kind, event.replica, event.client_id, event.user_sub, event.grant_id)
    return "  ".join((_time(event.time), *(cell(value) for value in who), detail))


def _line(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


def _read_failed(exc: OSError | DBAPIError, engine: AsyncEngine, database_url: str, what: str) -> StoreUnavailableError:
    where = database_location(async_database_url(database_url))
    reason = database_error_reason(exc, engine.url)
    return StoreUnavailableError(f"reading {what} at {where} failed: {reason}")


async def _echo_all(
    rows: AsyncIterator[T], render: Callable[[T], str], engine: AsyncEngine, database_url: str, what: str
) -> None:
    """Print every row; a database error while reading becomes `StoreUnavailableError` (printing has its own)."""
    while True:
        try:
            row = await anext(rows)
        except StopAsyncIteration:
            return
        except (OSError, DBAPIError) as exc:
            raise _read_failed(exc, engine, database_url, what) from None
        click.echo(render(row))


async def run_audit(database_url: str, query: AuditQuery, *, as_json: bool, follow: bool) -> None:
    """Print the matching events; raises `StoreConfigError` or `StoreUnavailableError` when the store cannot be read."""
    store = await open_store(database_url, read_only=True)
    try:
        events = follow_events(store.engine, query) if follow else iter_events(store.engine, query)
        async with contextlib.aclosing(events):
            if not as_json:
                click.echo("  ".join(COLUMNS))
            render = (lambda stored: _line(stored.as_json())) if as_json else table_row
            await _echo_all(events, render, store.engine, database_url, "the audit log")
    finally:
        await store.close()


async def _check_events_table(engine: AsyncEngine, database_url: str) -> None:
    """`StoreUnavailableError` unless the table is there — before anything is printed, so a database migrated before
    the front door existed is one error line, not a header and then an error."""
    try:
        async with engine.connect() as connection:
            present = await connection.run_sync(lambda sync: inspect(sync).has_table(security_events.name))
    except (OSError, DBAPIError) as exc:
        raise _read_failed(exc, engine, database_url, "the security events") from None
    if not present:
        where = database_location(async_database_url(database_url))
        raise StoreUnavailableError(
            f"the database at {where} has no {security_events.name} table"
            " (migrated before the front door existed; `okta-agent-proxy serve` upgrades it)"
        )


async def run_security_events(database_url: str, query: SecurityEventQuery, *, as_json: bool) -> None:
    """Print the matching front-door security events, oldest first; raises like `run_audit` (a database migrated
    before the front door existed has no `security_events` table: `StoreUnavailableError`)."""
    store = await open_store(database_url, read_only=True)
    try:
        await _check_events_table(store.engine, database_url)
        if not as_json:
            click.echo("  ".join(EVENT_COLUMNS))
        events = FrontDoorStore(store.engine).iter_events(query)
        render = (lambda event: _line(event_json(event))) if as_json else event_row
        await _echo_all(events, render, store.engine, database_url, "the security events")
    finally:
        await store.close()


def unavailable_message(exc: StoreConfigError | StoreUnavailableError) -> str:
    if isinstance(exc, StoreFileMissingError):
        return f"no audit database at {exc.path} (set DATABASE_URL or --database-url)"
    return str(exc)


def _time_option(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return parse_since(value)
    except click.BadParameter as exc:
        exc.param_hint = name
        raise


def _refuse_mixed(events: bool, given: dict[str, object]) -> None:
    """A usage error (exit 2) for options of the other mode: a filter that cannot apply must not be ignored."""
    wrong = [name for name, value in given.items() if value]
    if wrong:
        mode = "with --events" if events else "without --events"
        raise click.UsageError(f"{', '.join(wrong)} cannot be used {mode}")


@click.command("audit")
@click.option("--env-file", default=".env", show_default=True, help="The .env file to read (for DATABASE_URL).")
@click.option("--database-url", default=None, help="Default: $DATABASE_URL.")
@click.option("--events", is_flag=True, help="The front door's security events instead of the request log.")
@click.option("--last", type=click.IntRange(min=0), default=None, help="Only the N most recent (default 50).")
@click.option("--since", default=None, help="From this time: 30m, 2h, 7d (ago), or ISO 8601.")
@click.option("--until", default=None, help="Before this time: 30m, 2h, 7d (ago), or ISO 8601.")
@click.option("--user", default=None, help="The user's sub (login) or Okta uid; with --events, the Okta user id.")
@click.option("--agent", default=None)
@click.option("--backend", default=None)
@click.option("--outcome", default=None, help="ok, or an error code such as authorization_denied.")
@click.option("--kind", default=None, help=f"With --events: {', '.join(EventKind)}.")
@click.option("--client", default=None, help="With --events: the OAuth client id (a CIMD client's URL).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", is_flag=True, help="Keep printing new events until interrupted (not with --events).")
def audit_command(
    env_file: str,
    database_url: str | None,
    events: bool,
    last: int | None,
    since: str | None,
    until: str | None,
    user: str | None,
    agent: str | None,
    backend: str | None,
    outcome: str | None,
    kind: str | None,
    client: str | None,
    as_json: bool,
    follow: bool,
) -> None:
    """Query the audit log: who, through which agent, did what on which backend, and what happened. With
    `--events`, the OAuth front door's security events: registrations, logins, consents, tokens issued and
    refreshed, reuse detected, revocations and refusals.

    The database is opened read-only (a missing SQLite file is not created). When it cannot be read, one `error:`
    line on stderr and exit code 2.
    """
    from okta_agent_proxy.commands.options import run_loop

    if events:
        _refuse_mixed(True, {"--agent": agent, "--backend": backend, "--outcome": outcome, "--follow": follow})
    else:
        _refuse_mixed(False, {"--kind": kind, "--client": client})
    settings = load_settings(env_file)
    since_time, until_time = _time_option(since, "--since"), _time_option(until, "--until")
    if last is None and since_time is None:
        last = DEFAULT_LAST
    url = database_url or settings.DATABASE_URL
    if events:
        query = SecurityEventQuery(
            last=last, since=since_time, until=until_time, kind=kind, user_sub=user, client_id=client
        )
        run = run_security_events(url, query, as_json=as_json)
    else:
        audit_query = AuditQuery(
            last=last, since=since_time, until=until_time, user=user, agent=agent, backend=backend, outcome=outcome
        )
        run = run_audit(url, audit_query, as_json=as_json, follow=follow)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(run)
    except (StoreConfigError, StoreUnavailableError) as exc:
        click.echo(f"error: {unavailable_message(exc)}", err=True)
        raise SystemExit(EXIT_UNAVAILABLE) from None
