"""The front door's storage (`store/frontdoor.py`) on real databases: the same suite on a SQLite file and on the
PostgreSQL server (a database of its own per test, skipped when unreachable unless `OAP_REQUIRE_SERVICES=1`).

Covered: migration 0003 from an empty database and from 0002 with audit rows (and back down), the schema equal to the
models; every repository operation and its refusals; races between two "replicas" — two engines, two connection
pools, on one database — for a code, a state, a refresh token, the signing key and the Okta refresh lease; pruning
(what goes and what stays); and no code, token or state in clear, neither in any column nor in the SQLite file's
bytes. Time is a shared fake clock, so expiry is exact and no test sleeps.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, func, insert, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from okta_agent_proxy.store import frontdoor
from okta_agent_proxy.store.db import create_store_engine, migrate
from okta_agent_proxy.store.frontdoor import (
    EventKind,
    FrontDoorStore,
    Grant,
    Outcome,
    Retention,
    RevokeReason,
    SecurityEventQuery,
    secret_hash,
)
from okta_agent_proxy.store.migrations import alembic_config
from okta_agent_proxy.store.models import Model, audit_events
from tests.support.stacks import postgres_database

HEAD_REVISION = "0005"
FRONT_DOOR_TABLES = (
    "oauth_clients",
    "oauth_pending",
    "oauth_grants",
    "oauth_codes",
    "oauth_refresh_tokens",
    "oauth_consents",
    "security_events",
    "signing_keys",
)
GRACE = timedelta(seconds=30)
DAY = timedelta(days=1)
RACERS = 10
T = TypeVar("T")


# ---------------------------------------------------------------- fixtures


class Clock:
    """The time every replica of a test reads; tests move it forward."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=250_000)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'frontdoor.db'}"
    else:
        async with postgres_database() as url:
            yield url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def engines(database_url: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two engines on one migrated database: two replicas' connection pools."""
    await migrate(database_url)
    first, second = create_store_engine(database_url), create_store_engine(database_url)
    try:
        yield first, second
    finally:
        await first.dispose()
        await second.dispose()


@pytest.fixture
def store(engines: tuple[AsyncEngine, AsyncEngine], clock: Clock) -> FrontDoorStore:
    return FrontDoorStore(engines[0], replica="replica-a", clock=clock)


@pytest.fixture
def replicas(engines: tuple[AsyncEngine, AsyncEngine], clock: Clock) -> tuple[FrontDoorStore, FrontDoorStore]:
    return (
        FrontDoorStore(engines[0], replica="replica-a", clock=clock),
        FrontDoorStore(engines[1], replica="replica-b", clock=clock),
    )


def seal(value: str | bytes, key: bytes = AESGCM.generate_key(bit_length=256)) -> bytes:
    """What the caller does before storing: AES-256-GCM, nonce first."""
    nonce = os.urandom(12)
    data = value.encode() if isinstance(value, str) else value
    return nonce + AESGCM(key).encrypt(nonce, data, None)


async def a_grant(
    store: FrontDoorStore, clock: Clock, *, client_id: str | None = None, id_token: str = "okta-id-token"
) -> Grant:
    if client_id is None:
        client_id = (await store.register_client(client_name="Cursor", redirect_uris=["cursor://cb"])).client_id
    return await store.create_grant(
        user_sub="00u-ada",
        user_claims={"email": "ada@example.com", "name": "Ada", "groups": ["engineering"]},
        client_id=client_id,
        resource="https://gw.example.com/employees",
        scopes=["mcp:read"],
        okta_id_token=seal(id_token),
        okta_id_token_expires_at=clock.now + timedelta(hours=1),
        okta_refresh_token=seal("okta-refresh-token"),
        okta_refresh_token_expires_at=None,
        expires_at=clock.now + timedelta(minutes=10),
    )


async def a_code(store: FrontDoorStore, grant: Grant, code: str = "code-1") -> None:
    await store.create_code(
        code,
        grant_id=grant.grant_id,
        client_id=grant.client_id,
        redirect_uri="http://127.0.0.1:33418/callback",
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        resource=grant.resource,
        scopes=grant.scopes,
    )


async def race(calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls at once: each waits at a barrier, so none starts before all are ready."""
    barrier = asyncio.Barrier(len(calls))

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        await barrier.wait()
        return await call()

    async with asyncio.timeout(60):
        return list(await asyncio.gather(*(run(call) for call in calls)))


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


# ---------------------------------------------------------------- migrations


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Model.metadata))


def _indexed(connection: Connection, table: str) -> set[tuple[str, ...]]:
    inspector = inspect(connection)
    indexes = {tuple(str(c) for c in index["column_names"]) for index in inspector.get_indexes(table)}
    primary = tuple(str(c) for c in inspector.get_pk_constraint(table)["constrained_columns"])
    unique = {tuple(str(c) for c in u["column_names"]) for u in inspector.get_unique_constraints(table)}
    return indexes | unique | {primary}


async def _version(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return list((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())


async def test_migration_from_empty_creates_the_tables_of_the_models(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    engine = engines[0]
    assert await _version(engine) == [HEAD_REVISION]
    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []
        indexed = {table: await connection.run_sync(_indexed, table) for table in FRONT_DOOR_TABLES}
    # Every lookup and every prune condition has an index (or is the primary key).
    expected: dict[str, list[tuple[str, ...]]] = {
        "oauth_clients": [("client_id",), ("last_used_at",), ("created_at",)],
        "oauth_pending": [("key_hash",), ("expires_at",)],
        "oauth_grants": [("grant_id",), ("user_sub",), ("client_id",), ("expires_at",), ("revoked_at",)],
        "oauth_codes": [("code_hash",), ("grant_id",), ("expires_at",)],
        "oauth_refresh_tokens": [("token_hash",), ("grant_id",), ("expires_at",), ("rotated_at",)],
        "oauth_consents": [("user_sub", "client_id", "backend"), ("client_id",)],
        "security_events": [("time",), ("kind", "time"), ("user_sub", "time"), ("client_id", "time")],
        "signing_keys": [("kid",), ("slot",), ("retired_at",)],
    }
    for table, columns in expected.items():
        for wanted in columns:
            assert wanted in indexed[table], (table, wanted)


async def test_migration_from_0002_keeps_audit_rows_and_downgrades_cleanly(database_url: str) -> None:
    await migrate(database_url, "0002")
    engine = create_store_engine(database_url)
    row = {
        "time": datetime.now(UTC),
        "request_id": "req-before-0003",
        "replica": "r",
        "http_method": "POST",
        "path": "/mcp",
        "status": 200,
        "outcome": "ok",
        "latency_ms": 1.0,
        "bytes_in": 0,
        "bytes_out": 0,
    }
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(audit_events).values(row))
            assert not await connection.run_sync(lambda c: inspect(c).has_table("oauth_grants"))
        await migrate(database_url)
        await migrate(database_url)  # head → head: nothing
        assert await _version(engine) == [HEAD_REVISION]
        assert await count(engine, "audit_events") == 1
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_diff) == []
        async with engine.begin() as connection:
            await connection.run_sync(lambda sync: alembic_command.downgrade(alembic_config(sync), "0002"))
        async with engine.connect() as connection:
            tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
        assert tables.isdisjoint(FRONT_DOOR_TABLES)
        assert await count(engine, "audit_events") == 1
        assert await _version(engine) == ["0002"]
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- clients


async def test_registered_clients_get_random_ids_and_keep_every_redirect_uri(store: FrontDoorStore) -> None:
    cursor_uris = ["cursor://anysphere.cursor-mcp/oauth/callback", "http://127.0.0.1/cb", "http://localhost/cb"]
    first = await store.register_client(client_name="Cursor", redirect_uris=cursor_uris, document={"scope": "x"})
    second = await store.register_client(client_name="Cursor", redirect_uris=cursor_uris)
    assert first.client_id != second.client_id
    assert len(first.client_id) >= 32
    stored = await store.get_client(first.client_id)
    assert stored == first
    assert stored.kind == "registered"
    assert stored.redirect_uris == cursor_uris
    assert stored.document == {"scope": "x"}
    assert await store.get_client("no-such-client") is None


async def test_touching_a_client_writes_its_last_use_at_most_once_a_minute(store: FrontDoorStore, clock: Clock) -> None:
    client = await store.register_client(client_name=None, redirect_uris=["http://127.0.0.1/cb"])
    assert client.last_used_at is None
    first_use = clock.now
    await store.touch_client(client.client_id)
    clock.advance(timedelta(seconds=30))
    await store.touch_client(client.client_id)
    assert (await store.get_client(client.client_id)).last_used_at == first_use  # type: ignore[union-attr]
    clock.advance(timedelta(seconds=31))
    await store.touch_client(client.client_id)
    assert (await store.get_client(client.client_id)).last_used_at == clock.now  # type: ignore[union-attr]


async def test_a_client_metadata_document_is_cached_under_its_url_and_replaced(
    store: FrontDoorStore, clock: Clock
) -> None:
    url = "https://claude.ai/oauth/claude-code-client-metadata"
    document = {"client_id": url, "client_name": "Claude Code", "redirect_uris": ["http://localhost/callback"]}
    saved = await store.save_cimd_client(
        client_id=url,
        client_name="Claude Code",
        redirect_uris=["http://localhost/callback"],
        document=document,
        expires_at=clock.now + timedelta(hours=1),
    )
    assert saved.kind == "cimd"
    assert saved.document == document
    assert saved.fetched_at == clock.now
    assert saved.document_fresh(clock.now)
    assert not saved.document_fresh(clock.now + timedelta(hours=1))
    created = saved.created_at
    clock.advance(timedelta(hours=2))
    again = await store.save_cimd_client(
        client_id=url,
        client_name="Claude Code 2",
        redirect_uris=["http://127.0.0.1/callback"],
        document=document | {"client_name": "Claude Code 2"},
        expires_at=clock.now + timedelta(hours=1),
    )
    assert again.client_name == "Claude Code 2"
    assert again.redirect_uris == ["http://127.0.0.1/callback"]
    assert again.fetched_at == clock.now
    assert again.created_at == created
    assert await store.get_client(url) == again


# ---------------------------------------------------------------- pending steps


async def test_a_pending_value_is_used_once(store: FrontDoorStore, clock: Clock) -> None:
    await store.start_pending("state-abc", purpose="okta_state", client_id="c1", payload=b"sealed-request")
    used = await store.consume_pending("state-abc", purpose="okta_state")
    assert used.outcome is Outcome.OK
    assert (used.payload, used.client_id) == (b"sealed-request", "c1")
    again = await store.consume_pending("state-abc", purpose="okta_state")
    assert again.outcome is Outcome.ALREADY_USED
    assert again.payload is None
    assert (await store.consume_pending("never-started", purpose="okta_state")).outcome is Outcome.UNKNOWN

    await store.start_pending("csrf-xyz", purpose="consent", ttl=timedelta(minutes=5))
    assert (await store.consume_pending("csrf-xyz", purpose="okta_state")).outcome is Outcome.UNKNOWN  # wrong purpose
    clock.advance(timedelta(minutes=5))
    assert (await store.consume_pending("csrf-xyz", purpose="consent")).outcome is Outcome.EXPIRED


# ---------------------------------------------------------------- grants


async def test_a_grant_round_trips_and_revocation_erases_its_okta_tokens(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    assert await store.get_grant(grant.grant_id) == grant
    assert await store.grant_is_live(grant.grant_id)
    assert grant.version == 1

    revoked = await store.revoke_grant(grant.grant_id, "user_logout")
    assert revoked is not None
    assert revoked.okta_refresh_token == grant.okta_refresh_token  # handed back once, to revoke it at Okta
    assert await store.revoke_grant(grant.grant_id, "again") is None
    stored = await store.get_grant(grant.grant_id)
    assert stored is not None
    assert (stored.revoked_at, stored.revoked_reason) == (clock.now, "user_logout")
    assert stored.okta_id_token is None
    assert stored.okta_refresh_token is None
    assert not await store.grant_is_live(grant.grant_id)
    assert not await store.grant_is_live("no-such-grant")
    assert await store.revoke_grant("no-such-grant", "x") is None


async def test_a_grant_without_refresh_token_ends_at_its_expiry(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    clock.advance(timedelta(minutes=10))
    assert not await store.grant_is_live(grant.grant_id)


# ---------------------------------------------------------------- codes


async def test_a_code_is_redeemed_once_and_a_replay_revokes_its_grant(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    await a_code(store, grant)
    used = await store.consume_code("code-1")
    assert used.outcome is Outcome.OK
    assert used.code is not None
    assert used.code.code_hash == secret_hash("code-1")
    assert used.code.redirect_uri == "http://127.0.0.1:33418/callback"
    assert used.code.code_challenge == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert (used.code.resource, used.code.scopes) == (grant.resource, ["mcp:read"])
    assert used.grant is not None
    assert used.grant.user_claims["groups"] == ["engineering"]
    assert await store.issue_refresh_token("rt-1", grant_id=grant.grant_id, expires_at=clock.now + DAY) is not None

    clock.advance(timedelta(seconds=5))
    replay = await store.consume_code("code-1")
    assert replay.outcome is Outcome.ALREADY_USED
    assert replay.grant is not None
    assert replay.grant.revoked_reason == RevokeReason.CODE_REPLAY
    assert not await store.grant_is_live(grant.grant_id)
    # What the first redemption issued is dead with it.
    rotation = await store.rotate_refresh_token(
        "rt-1", new_token="rt-2", new_expires_at=clock.now + DAY, successor_sealed=b"pair", grace=GRACE
    )
    assert rotation.outcome is Outcome.REVOKED


async def test_an_expired_or_unknown_code_is_refused_without_revoking(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    await a_code(store, grant)
    clock.advance(frontdoor.CODE_TTL)
    expired = await store.consume_code("code-1")
    assert expired.outcome is Outcome.EXPIRED
    assert await store.grant_is_live(grant.grant_id)
    assert (await store.consume_code("code-never-issued")).outcome is Outcome.UNKNOWN


async def test_a_code_of_a_revoked_grant_is_refused(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    await a_code(store, grant)
    await store.revoke_grant(grant.grant_id, "okta_invalid_grant")
    assert (await store.consume_code("code-1")).outcome is Outcome.REVOKED
    assert await store.issue_refresh_token("rt", grant_id=grant.grant_id, expires_at=clock.now + DAY) is None


# ---------------------------------------------------------------- refresh tokens


async def test_refresh_tokens_rotate_with_a_grace_then_reuse_revokes(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    issued = await store.issue_refresh_token("rt-1", grant_id=grant.grant_id, expires_at=clock.now + 30 * DAY)
    assert issued is not None
    assert (await store.get_grant(grant.grant_id)).expires_at == clock.now + 30 * DAY  # type: ignore[union-attr]
    found = await store.find_refresh_token("rt-1")
    assert found is not None
    assert (found[0].token_hash, found[1].grant_id) == (secret_hash("rt-1"), grant.grant_id)
    assert await store.find_refresh_token("rt-unknown") is None

    clock.advance(timedelta(hours=1))
    rotated = await store.rotate_refresh_token(
        "rt-1", new_token="rt-2", new_expires_at=clock.now + 30 * DAY, successor_sealed=b"pair-2", grace=GRACE
    )
    assert rotated.outcome is Outcome.OK
    assert (await store.get_grant(grant.grant_id)).expires_at == clock.now + 30 * DAY  # type: ignore[union-attr]
    child = await store.find_refresh_token("rt-2")
    assert child is not None
    assert child[0].parent_hash == secret_hash("rt-1")

    clock.advance(GRACE - timedelta(seconds=1))
    again = await store.rotate_refresh_token(
        "rt-1", new_token="rt-2-other", new_expires_at=clock.now + 30 * DAY, successor_sealed=b"other", grace=GRACE
    )
    assert (again.outcome, again.successor_sealed) == (Outcome.WITHIN_GRACE, b"pair-2")
    assert await store.find_refresh_token("rt-2-other") is None  # the loser's pair was never stored

    clock.advance(timedelta(seconds=1))
    reuse = await store.rotate_refresh_token(
        "rt-1", new_token="rt-3", new_expires_at=clock.now + 30 * DAY, successor_sealed=b"pair-3", grace=GRACE
    )
    assert reuse.outcome is Outcome.REUSED
    assert reuse.grant is not None
    assert reuse.grant.revoked_reason == RevokeReason.REFRESH_TOKEN_REUSE
    # The whole family is dead, and the sealed pair is gone.
    follow = await store.rotate_refresh_token(
        "rt-2", new_token="rt-4", new_expires_at=clock.now + 30 * DAY, successor_sealed=b"pair-4", grace=GRACE
    )
    assert follow.outcome is Outcome.REVOKED
    found = await store.find_refresh_token("rt-1")
    assert found is not None
    assert found[0].successor_sealed is None


async def test_an_expired_or_unknown_refresh_token_is_refused(store: FrontDoorStore, clock: Clock) -> None:
    grant = await a_grant(store, clock)
    await store.issue_refresh_token("rt-1", grant_id=grant.grant_id, expires_at=clock.now + timedelta(hours=1))
    clock.advance(timedelta(hours=1))
    rotation = await store.rotate_refresh_token(
        "rt-1", new_token="rt-2", new_expires_at=clock.now + DAY, successor_sealed=b"p", grace=GRACE
    )
    assert rotation.outcome is Outcome.EXPIRED
    unknown = await store.rotate_refresh_token(
        "rt-never", new_token="rt-3", new_expires_at=clock.now + DAY, successor_sealed=b"p", grace=GRACE
    )
    assert unknown.outcome is Outcome.UNKNOWN


# ---------------------------------------------------------------- Okta refresh lease


async def test_the_okta_refresh_lease_is_exclusive_until_saved_released_or_expired(
    store: FrontDoorStore, clock: Clock
) -> None:
    grant = await a_grant(store, clock)
    ttl = timedelta(seconds=20)
    lease = await store.acquire_okta_refresh(grant.grant_id, ttl=ttl)
    assert lease is not None
    assert lease.grant.refresh_lease_until == clock.now + ttl
    assert await store.acquire_okta_refresh(grant.grant_id, ttl=ttl) is None

    assert await store.save_okta_tokens(
        lease,
        okta_id_token=seal("id-2"),
        okta_id_token_expires_at=clock.now + timedelta(hours=1),
        okta_refresh_token=None,  # Okta did not rotate it: the one held stays
        okta_refresh_token_expires_at=None,
    )
    saved = await store.get_grant(grant.grant_id)
    assert saved is not None
    assert (saved.version, saved.okta_refreshed_at, saved.refresh_lease_holder) == (2, clock.now, None)
    assert saved.okta_id_token != grant.okta_id_token
    assert saved.okta_refresh_token == grant.okta_refresh_token
    assert not await store.save_okta_tokens(  # a lease is spent once
        lease,
        okta_id_token=b"x",
        okta_id_token_expires_at=None,
        okta_refresh_token=None,
        okta_refresh_token_expires_at=None,
    )

    second = await store.acquire_okta_refresh(grant.grant_id, ttl=ttl)
    assert second is not None
    await store.release_okta_refresh(second)
    third = await store.acquire_okta_refresh(grant.grant_id, ttl=ttl)
    assert third is not None
    clock.advance(ttl)  # its holder died: the lease runs out
    fourth = await store.acquire_okta_refresh(grant.grant_id, ttl=ttl)
    assert fourth is not None
    assert not await store.save_okta_tokens(  # the late holder writes nothing
        third,
        okta_id_token=b"late",
        okta_id_token_expires_at=None,
        okta_refresh_token=b"late",
        okta_refresh_token_expires_at=None,
    )
    assert (await store.get_grant(grant.grant_id)).version == 2  # type: ignore[union-attr]

    await store.revoke_grant(grant.grant_id, "okta_invalid_grant")
    clock.advance(ttl)
    assert await store.acquire_okta_refresh(grant.grant_id, ttl=ttl) is None


# ---------------------------------------------------------------- consents


async def test_consent_is_remembered_per_user_client_and_backend(store: FrontDoorStore, clock: Clock) -> None:
    client = await store.register_client(client_name="VS Code", redirect_uris=["http://127.0.0.1/cb"])
    await store.record_consent(user_sub="u1", client_id=client.client_id, backend="employees", scopes=["mcp:read"])
    consent = await store.find_consent("u1", client.client_id, "employees")
    assert consent is not None
    assert consent.covers(["mcp:read"])
    assert not consent.covers(["mcp:read", "mcp:write"])
    assert await store.find_consent("u1", client.client_id, "partners") is None
    assert await store.find_consent("u2", client.client_id, "employees") is None
    clock.advance(timedelta(minutes=1))
    await store.record_consent(
        user_sub="u1", client_id=client.client_id, backend="employees", scopes=["mcp:write", "mcp:read"]
    )
    replaced = await store.find_consent("u1", client.client_id, "employees")
    assert replaced is not None
    assert (replaced.scopes, replaced.approved_at) == (["mcp:read", "mcp:write"], clock.now)


# ---------------------------------------------------------------- security events


async def test_security_events_are_recorded_filtered_and_paged(
    store: FrontDoorStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await store.record_event(EventKind.REGISTRATION, client_id="c1", detail={"client_name": "Cursor"})
    clock.advance(timedelta(seconds=1))
    for index in range(7):  # the same instant: paging must break ties by id
        await store.record_event(EventKind.REFRESH, client_id="c1", user_sub="u1", grant_id="g1", detail={"n": index})
    clock.advance(timedelta(seconds=1))
    await store.record_event(EventKind.REFUSAL, detail={"reason": "redirect_mismatch", "nested": {"ok": True}})
    monkeypatch.setattr(frontdoor, "PAGE_SIZE", 3)

    events = await store.list_events()
    assert len(events) == 9
    assert events[0].id == first
    assert (events[0].kind, events[0].replica, events[0].detail) == (
        "registration",
        "replica-a",
        {"client_name": "Cursor"},
    )
    assert [e.detail.get("n") for e in events[1:8]] == list(range(7))
    assert [e.kind for e in await store.list_events(SecurityEventQuery(kind="refusal"))] == ["refusal"]
    assert len(await store.list_events(SecurityEventQuery(user_sub="u1"))) == 7
    assert len(await store.list_events(SecurityEventQuery(client_id="c1", until=clock.now))) == 8
    assert [e.kind for e in await store.list_events(SecurityEventQuery(since=clock.now))] == ["refusal"]
    assert [e.detail.get("n") for e in await store.list_events(SecurityEventQuery(last=2))] == [6, None]


@pytest.mark.parametrize(
    "detail",
    [{"refresh_token": "x"}, {"ID_TOKEN": "x"}, {"code": "x"}, {"state": "x"}, {"outer": {"client_secret": "x"}}],
)
async def test_a_security_event_detail_named_like_a_secret_is_refused(
    store: FrontDoorStore, detail: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="secret"):
        await store.record_event(EventKind.REFUSAL, detail=detail)
    assert await store.list_events() == []


# ---------------------------------------------------------------- signing keys


async def test_one_current_signing_key_rotation_keeps_the_previous_published(
    store: FrontDoorStore, clock: Clock
) -> None:
    assert await store.current_signing_key() is None
    jwk = {"kty": "EC", "crv": "P-256", "x": "x1", "y": "y1"}
    first = await store.create_signing_key(kid="k1", algorithm="ES256", private_key=seal("pem-1"), public_jwk=jwk)
    assert (first.kid, first.slot, first.public_jwk) == ("k1", "current", jwk)
    late = await store.create_signing_key(kid="k-late", algorithm="ES256", private_key=b"x", public_jwk={})
    assert late.kid == "k1"

    clock.advance(timedelta(days=30))
    second = await store.rotate_signing_key(
        expected_kid="k1", kid="k2", algorithm="ES256", private_key=seal("pem-2"), public_jwk={"kid": "k2"}
    )
    assert second.kid == "k2"
    stale = await store.rotate_signing_key(
        expected_kid="k1", kid="k3", algorithm="ES256", private_key=b"x", public_jwk={}
    )
    assert stale.kid == "k2"  # another replica rotated first: nothing done
    published = await store.published_signing_keys(retired_within=timedelta(days=1))
    assert [(k.kid, k.slot) for k in published] == [("k2", "current"), ("k1", None)]
    assert published[1].retired_at == clock.now
    clock.advance(timedelta(days=1, seconds=1))
    assert [k.kid for k in await store.published_signing_keys(retired_within=timedelta(days=1))] == ["k2"]


# ---------------------------------------------------------------- races between replicas


async def test_replicas_redeeming_one_code_at_once_let_exactly_one_win(
    replicas: tuple[FrontDoorStore, FrontDoorStore], clock: Clock
) -> None:
    a, b = replicas
    for round_ in range(3):
        grant = await a_grant(a, clock)
        code = f"code-race-{round_}"
        await a_code(a, grant, code)
        uses = await race([partial(s.consume_code, code) for s in (a, b) * (RACERS // 2)])
        outcomes = sorted(use.outcome for use in uses)
        assert outcomes.count(Outcome.OK) == 1, outcomes
        assert outcomes.count(Outcome.ALREADY_USED) == RACERS - 1, outcomes
        assert not await b.grant_is_live(grant.grant_id)  # the replays revoked it


async def test_replicas_consuming_one_state_at_once_let_exactly_one_win(
    replicas: tuple[FrontDoorStore, FrontDoorStore],
) -> None:
    a, b = replicas
    await a.start_pending("state-race", purpose="okta_state")
    uses = await race([partial(s.consume_pending, "state-race", purpose="okta_state") for s in (a, b) * 5])
    assert sorted(use.outcome for use in uses).count(Outcome.OK) == 1


async def test_replicas_rotating_one_refresh_token_at_once_rotate_it_once(
    replicas: tuple[FrontDoorStore, FrontDoorStore], engines: tuple[AsyncEngine, AsyncEngine], clock: Clock
) -> None:
    a, b = replicas
    grant = await a_grant(a, clock)
    await a.issue_refresh_token("rt-race", grant_id=grant.grant_id, expires_at=clock.now + DAY)

    def rotate(store: FrontDoorStore, index: int) -> Callable[[], Awaitable[frontdoor.Rotation]]:
        return partial(
            store.rotate_refresh_token,
            "rt-race",
            new_token=f"rt-next-{index}",
            new_expires_at=clock.now + DAY,
            successor_sealed=f"pair-{index}".encode(),
            grace=GRACE,
        )

    rotations = await race([rotate((a, b)[i % 2], i) for i in range(RACERS)])
    winners = [i for i, r in enumerate(rotations) if r.outcome is Outcome.OK]
    assert len(winners) == 1, [r.outcome for r in rotations]
    others = [r for r in rotations if r.outcome is not Outcome.OK]
    assert {(r.outcome, r.successor_sealed) for r in others} == {(Outcome.WITHIN_GRACE, f"pair-{winners[0]}".encode())}
    assert await count(engines[0], "oauth_refresh_tokens") == 2  # the token and its one successor
    assert await a.find_refresh_token(f"rt-next-{winners[0]}") is not None
    assert await a.grant_is_live(grant.grant_id)


async def test_replicas_creating_the_signing_key_at_once_share_one(
    replicas: tuple[FrontDoorStore, FrontDoorStore], engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    a, b = replicas
    keys = await race(
        [
            partial(s.create_signing_key, kid=f"k{i}", algorithm="ES256", private_key=b"x", public_jwk={})
            for i, s in enumerate((a, b) * (RACERS // 2))
        ]
    )
    assert len({key.kid for key in keys}) == 1
    assert await count(engines[0], "signing_keys") == 1


async def test_replicas_taking_the_okta_refresh_lease_at_once_give_it_to_one(
    replicas: tuple[FrontDoorStore, FrontDoorStore], clock: Clock
) -> None:
    a, b = replicas
    grant = await a_grant(a, clock)
    leases = await race(
        [partial(s.acquire_okta_refresh, grant.grant_id, ttl=timedelta(seconds=20)) for s in (a, b) * 5]
    )
    assert sum(lease is not None for lease in leases) == 1


# ---------------------------------------------------------------- pruning


async def test_prune_deletes_what_is_spent_and_keeps_what_is_live(
    store: FrontDoorStore, engines: tuple[AsyncEngine, AsyncEngine], clock: Clock
) -> None:
    retention = Retention(events=timedelta(days=90))
    start = clock.now
    # Kept: a live grant with its live refresh token, its client and consent, the current key.
    live = await a_grant(store, clock)
    await store.issue_refresh_token("rt-live", grant_id=live.grant_id, expires_at=start + 200 * DAY)
    await store.record_consent(user_sub="u", client_id=live.client_id, backend="employees", scopes=["mcp:read"])
    await store.create_signing_key(kid="k1", algorithm="ES256", private_key=b"x", public_jwk={})
    await store.rotate_signing_key(expected_kid="k1", kid="k2", algorithm="ES256", private_key=b"y", public_jwk={})
    # Gone: a spent code and state, a rotated token's sealed pair, a revoked grant, a never-used registration.
    await a_code(store, live, "code-spent")
    await store.consume_code("code-spent")
    await store.start_pending("state-old", purpose="okta_state")
    await store.rotate_refresh_token(
        "rt-live", new_token="rt-live-2", new_expires_at=start + 200 * DAY, successor_sealed=b"pair", grace=GRACE
    )
    dead = await a_grant(store, clock)
    await store.issue_refresh_token("rt-dead", grant_id=dead.grant_id, expires_at=start + 200 * DAY)
    await store.revoke_grant(dead.grant_id, "user_logout")
    unused = await store.register_client(client_name="abandoned", redirect_uris=["http://127.0.0.1/cb"])
    await store.record_event(EventKind.LOGIN, user_sub="u")

    assert set((await store.prune(retention)).values()) == {0}  # nothing is old yet
    clock.advance(timedelta(days=2))
    await store.record_event(EventKind.REFRESH, user_sub="u")
    counts = await store.prune(retention)
    assert counts == {
        "oauth_pending": 1,
        "oauth_codes": 1,
        "oauth_refresh_tokens": 0,  # none expired: rt-dead goes with its grant
        "successors_erased": 1,
        "oauth_grants": 1,
        "oauth_clients": 2,  # the abandoned registration, and the revoked grant's client
        "security_events": 0,
        "signing_keys": 0,
    }
    assert await store.find_refresh_token("rt-dead") is None
    assert await store.get_grant(dead.grant_id) is None
    assert await store.get_client(unused.client_id) is None
    assert await store.grant_is_live(live.grant_id)
    assert await store.get_client(live.client_id) is not None
    assert await store.find_consent("u", live.client_id, "employees") is not None
    rotated = await store.find_refresh_token("rt-live")
    assert rotated is not None
    assert rotated[0].successor_sealed is None
    assert await store.find_refresh_token("rt-live-2") is not None

    clock.advance(timedelta(days=89))  # the first event is 91 days old, the second 89; k1 retired 91 days ago
    counts = await store.prune(retention)
    assert (counts["security_events"], counts["signing_keys"]) == (1, 1)
    assert [e.kind for e in await store.list_events()] == ["refresh"]
    assert (await store.current_signing_key()).kid == "k2"  # type: ignore[union-attr]

    clock.advance(timedelta(days=200))  # every refresh token has expired, and the grant with them
    counts = await store.prune(retention)
    assert (counts["oauth_refresh_tokens"], counts["oauth_grants"]) == (2, 1)
    for table in ("oauth_grants", "oauth_refresh_tokens", "oauth_codes", "oauth_pending"):
        assert await count(engines[0], table) == 0, table


async def test_prune_works_in_chunks(store: FrontDoorStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontdoor, "PRUNE_CHUNK", 4)
    for index in range(10):
        await store.start_pending(f"s{index}", purpose="okta_state")
    clock.advance(timedelta(days=1))
    assert (await store.prune())["oauth_pending"] == 10


# ---------------------------------------------------------------- nothing secret in clear


async def test_no_code_token_or_state_is_stored_in_clear(
    store: FrontDoorStore, engines: tuple[AsyncEngine, AsyncEngine], clock: Clock, database_url: str
) -> None:
    secrets_used = {
        "code": "code-SECRET-4f1d9a7c2b",
        "refresh": "refresh-SECRET-9e8d7c6b5a",
        "refresh-next": "refresh-SECRET-next-1a2b3c4d",
        "state": "state-SECRET-0a9b8c7d6e",
        "okta-id": "okta-id-token-SECRET-eyJhbGciOi",
        "okta-refresh": "okta-refresh-SECRET-5c4b3a",
        "signing": "-----BEGIN PRIVATE KEY-----SECRET",
    }
    grant = await store.create_grant(
        user_sub="00u-ada",
        user_claims={"email": "ada@example.com"},
        client_id=(await store.register_client(client_name="c", redirect_uris=["http://127.0.0.1/cb"])).client_id,
        resource="https://gw.example.com/employees",
        scopes=["mcp:read"],
        okta_id_token=seal(secrets_used["okta-id"]),
        okta_id_token_expires_at=None,
        okta_refresh_token=seal(secrets_used["okta-refresh"]),
        okta_refresh_token_expires_at=None,
        expires_at=clock.now + DAY,
    )
    await store.start_pending(secrets_used["state"], purpose="okta_state")
    await store.consume_pending(secrets_used["state"], purpose="okta_state")
    await a_code(store, grant, secrets_used["code"])
    await store.consume_code(secrets_used["code"])
    await store.issue_refresh_token(secrets_used["refresh"], grant_id=grant.grant_id, expires_at=clock.now + DAY)
    await store.rotate_refresh_token(
        secrets_used["refresh"],
        new_token=secrets_used["refresh-next"],
        new_expires_at=clock.now + DAY,
        successor_sealed=seal(secrets_used["refresh-next"]),
        grace=GRACE,
    )
    await store.create_signing_key(
        kid="k1", algorithm="ES256", private_key=seal(secrets_used["signing"]), public_jwk={}
    )
    await store.record_event(EventKind.TOKEN_ISSUED, grant_id=grant.grant_id, detail={"jti": "j1"})
    await store.record_consent(user_sub="00u-ada", client_id=grant.client_id, backend="employees", scopes=["mcp:read"])

    stored = await _every_value(engines[0])
    for name, secret in secrets_used.items():
        assert secret not in stored, name
    for name in ("code", "refresh", "refresh-next", "state"):
        assert secret_hash(secrets_used[name]) in stored, name  # it is there, hashed

    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite:///"))
        files = [p for p in (path, path.with_name(path.name + "-wal")) if p.exists()]
        raw = b"".join(p.read_bytes() for p in files)
        assert secret_hash(secrets_used["code"]).encode() in raw  # the grep reads the right bytes
        for name, secret in secrets_used.items():
            assert secret.encode() not in raw, name


async def _every_value(engine: AsyncEngine) -> str:
    """Every value of every front-door row, as text (bytes decoded leniently)."""
    parts: list[str] = []
    async with engine.connect() as connection:
        for table in FRONT_DOOR_TABLES:
            for row in await connection.execute(select(Model.metadata.tables[table])):
                for value in row:
                    parts.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
            rows = (await connection.execute(select(func.count()).select_from(Model.metadata.tables[table]))).scalar()
            assert rows, f"{table} is empty: the search would prove nothing there"
    return "\n".join(parts)
