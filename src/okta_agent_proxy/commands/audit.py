"""`okta-agent-proxy audit`: read the audit log — a table for people, JSON lines for a SIEM, `--follow` to tail.

The store is opened read-only (`open_store(read_only=True)`): a missing SQLite file is an error, never created. A
database that cannot be read — no file, an unsupported URL, a server that refuses, a database never migrated, a
query that fails — is one line on stderr, `error: …` without the URL's password, and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import UTC, datetime, timedelta

import click
from sqlalchemy.exc import DBAPIError

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
from okta_agent_proxy.store.queries import AuditQuery, StoredEvent, follow_events, iter_events

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
COLUMNS = ("time", "user", "agent", "backend", "mcp", "status", "outcome", "ms")
EXIT_UNAVAILABLE = 2


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


def table_row(stored: StoredEvent) -> str:
    event = stored.event
    mcp = " ".join(part for part in (event.mcp_method, event.mcp_name) if part) or event.http_method
    cells = (
        event.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        event.user_sub or "-",
        event.agent or "-",
        event.backend or "-",
        mcp,
        str(event.status),
        event.outcome,
        f"{event.latency_ms:.1f}",
    )
    return "  ".join(cells)


async def run_audit(database_url: str, query: AuditQuery, *, as_json: bool, follow: bool) -> None:
    """Print the matching events; raises `StoreConfigError` or `StoreUnavailableError` when the store cannot be read."""
    store = await open_store(database_url, read_only=True)
    try:
        events = follow_events(store.engine, query) if follow else iter_events(store.engine, query)
        async with contextlib.aclosing(events):
            if not as_json:
                click.echo("  ".join(COLUMNS))
            while True:
                try:
                    stored = await anext(events)
                except StopAsyncIteration:
                    return
                except (OSError, DBAPIError) as exc:  # only the database's errors: printing has its own
                    where = database_location(async_database_url(database_url))
                    reason = database_error_reason(exc, store.engine.url)
                    raise StoreUnavailableError(f"reading the audit log at {where} failed: {reason}") from None
                click.echo(json.dumps(stored.as_json(), separators=(",", ":")) if as_json else table_row(stored))
    finally:
        await store.close()


def unavailable_message(exc: StoreConfigError | StoreUnavailableError) -> str:
    if isinstance(exc, StoreFileMissingError):
        return f"no audit database at {exc.path} (set DATABASE_URL or --database-url)"
    return str(exc)


@click.command("audit")
@click.option("--env-file", default=".env", show_default=True, help="The .env file to read (for DATABASE_URL).")
@click.option("--database-url", default=None, help="Default: $DATABASE_URL.")
@click.option("--last", type=click.IntRange(min=0), default=None, help="Only the N most recent (default 50).")
@click.option("--since", default=None, help="From this time: 30m, 2h, 7d, or ISO 8601.")
@click.option("--user", default=None, help="The user's sub (login) or Okta uid.")
@click.option("--agent", default=None)
@click.option("--backend", default=None)
@click.option("--outcome", default=None, help="ok, or an error code such as authorization_denied.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", is_flag=True, help="Keep printing new events until interrupted.")
def audit_command(
    env_file: str,
    database_url: str | None,
    last: int | None,
    since: str | None,
    user: str | None,
    agent: str | None,
    backend: str | None,
    outcome: str | None,
    as_json: bool,
    follow: bool,
) -> None:
    """Query the audit log: who, through which agent, did what on which backend, and what happened.

    The database is opened read-only (a missing SQLite file is not created). When it cannot be read, one `error:`
    line on stderr and exit code 2.
    """
    from okta_agent_proxy.commands.options import run_loop

    settings = load_settings(env_file)
    since_time = parse_since(since) if since else None
    if last is None and since_time is None:
        last = 50
    query = AuditQuery(last=last, since=since_time, user=user, agent=agent, backend=backend, outcome=outcome)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(run_audit(database_url or settings.DATABASE_URL, query, as_json=as_json, follow=follow))
    except (StoreConfigError, StoreUnavailableError) as exc:
        click.echo(f"error: {unavailable_message(exc)}", err=True)
        raise SystemExit(EXIT_UNAVAILABLE) from None
