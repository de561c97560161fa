"""The OAuth front door's storage (DESIGN.md §8): all a replica needs to serve any step of a flow another began.

`FrontDoorStore` wraps the store's engine (SQLite or PostgreSQL); nothing is kept in process. It is in four modules
(import everything from here):

- here: `FrontDoorStore` itself — clients (registered, or cached metadata documents), pending steps (single-use
  values), consents, security events, and `prune`;
- `frontdoor_grants.py`: `GrantStore`, mixed in — grants and their family: codes, refresh tokens (rotation, the
  grace period, reuse) and the single-flight refresh of the Okta tokens;
- `frontdoor_keys.py`: `SigningKeyStore`, mixed in — the signing key all replicas share, and its rotation;
- `frontdoor_records.py`: the records, outcomes and results the methods return.

How it stays correct when replicas race, and why each choice was made (the grant family's and the signing key's own
choices are in their modules):

- **Nothing secret in clear.** Codes, refresh tokens and single-use values (the Okta `state`, a consent form's CSRF
  token) are stored as their SHA-256 (`secret_hash`): they are ≥ 128-bit random values, so a plain hash is enough —
  nothing to brute-force, no salt or slow hash needed — and the methods take the values themselves, so a caller
  cannot store one unhashed by mistake. What must stay usable (the user's Okta tokens, a signing key, the
  successor pair of a refresh-token rotation) arrives as `bytes` already sealed by the caller (AES-GCM,
  `STATE_ENCRYPTION_KEY`); this module never sees a key. A revoked grant's sealed Okta tokens are erased (returned
  once, for revocation at Okta).
- **Single use across replicas** is one conditional UPDATE (`… WHERE used_at IS NULL`) whose row count says who
  won. On PostgreSQL (READ COMMITTED, its default) a second UPDATE of the row waits for the first to commit and
  re-checks its WHERE, so it matches nothing; on SQLite writes run one at a time (`write_transaction`: BEGIN
  IMMEDIATE). The loser then reads the row in the same transaction to tell "already used" from "expired" or
  "unknown". Under REPEATABLE READ or SERIALIZABLE the loser gets a serialization error instead: never two winners.

Times come from `clock` (UTC, injectable for tests); replicas' clocks must agree to within seconds, as they must
for token expiry anyway.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from okta_agent_proxy.store.db import write_transaction
from okta_agent_proxy.store.frontdoor_grants import CODE_TTL, GrantStore
from okta_agent_proxy.store.frontdoor_keys import SigningKeyStore
from okta_agent_proxy.store.frontdoor_records import (
    AuthorizationCode,
    CodeUse,
    Consent,
    EventKind,
    Grant,
    OAuthClient,
    OktaRefreshLease,
    Outcome,
    PendingUse,
    RefreshToken,
    Retention,
    RevokeReason,
    Rotation,
    SecurityEvent,
    SecurityEventQuery,
    StoredSigningKey,
    check_event_detail,
    first_row,
    row_values,
    secret_hash,
    upsert,
)
from okta_agent_proxy.store.models import (
    oauth_clients,
    oauth_codes,
    oauth_consents,
    oauth_grants,
    oauth_pending,
    oauth_refresh_tokens,
    security_events,
    signing_keys,
)

__all__ = [
    "CODE_TTL",
    "PENDING_TTL",
    "AuthorizationCode",
    "CodeUse",
    "Consent",
    "EventKind",
    "FrontDoorStore",
    "Grant",
    "OAuthClient",
    "OktaRefreshLease",
    "Outcome",
    "PendingUse",
    "RefreshToken",
    "Retention",
    "RevokeReason",
    "Rotation",
    "SecurityEvent",
    "SecurityEventQuery",
    "StoredSigningKey",
    "secret_hash",
]

PENDING_TTL = timedelta(minutes=10)
TOUCH_INTERVAL = timedelta(minutes=1)  # `last_used_at` is written at most this often per client
PRUNE_CHUNK = 5_000
PAGE_SIZE = 1000

_g = oauth_grants.c
_rt = oauth_refresh_tokens.c


def _utcnow() -> datetime:
    return datetime.now(UTC)


class FrontDoorStore(GrantStore, SigningKeyStore):
    """The front door's tables on `engine` (see the module docstring). `replica` names this process in events."""

    def __init__(self, engine: AsyncEngine, *, replica: str = "", clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._replica = replica
        self._clock = clock

    # ------------------------------------------------------------ clients

    async def register_client(
        self, *, client_name: str | None, redirect_uris: Sequence[str], document: Mapping[str, Any] | None = None
    ) -> OAuthClient:
        """Store an RFC 7591 registration (already validated) under a new random `client_id` (192 bits)."""
        client = OAuthClient(
            client_id=secrets.token_urlsafe(24),
            kind="registered",
            client_name=client_name,
            redirect_uris=list(redirect_uris),
            document=dict(document) if document is not None else None,
            created_at=self._clock(),
            last_used_at=None,
            fetched_at=None,
            expires_at=None,
        )
        async with write_transaction(self._engine) as connection:
            await connection.execute(insert(oauth_clients).values(row_values(client, oauth_clients)))
        return client

    async def save_cimd_client(
        self,
        *,
        client_id: str,
        client_name: str | None,
        redirect_uris: Sequence[str],
        document: Mapping[str, Any],
        expires_at: datetime,
    ) -> OAuthClient:
        """Cache a fetched (and validated) client metadata document under its URL, replacing an older copy."""
        now = self._clock()
        values = {
            "client_name": client_name,
            "redirect_uris": list(redirect_uris),
            "document": dict(document),
            "fetched_at": now,
            "expires_at": expires_at,
        }
        async with write_transaction(self._engine) as connection:
            statement = upsert(connection, oauth_clients).values(
                client_id=client_id, kind="cimd", created_at=now, **values
            )
            statement = statement.on_conflict_do_update(
                index_elements=[oauth_clients.c.client_id], set_=values, where=oauth_clients.c.kind == "cimd"
            )
            await connection.execute(statement)
            row = await first_row(connection, select(oauth_clients).where(oauth_clients.c.client_id == client_id))
        assert row is not None
        return OAuthClient(**row)

    async def get_client(self, client_id: str) -> OAuthClient | None:
        async with self._engine.connect() as connection:
            row = await first_row(connection, select(oauth_clients).where(oauth_clients.c.client_id == client_id))
        return OAuthClient(**row) if row is not None else None

    async def touch_client(self, client_id: str) -> None:
        """Note that the client started a flow (call it on every authorization request): `prune` keeps clients in
        use. Written at most once a minute per client."""
        now = self._clock()
        c = oauth_clients.c
        async with write_transaction(self._engine) as connection:
            await connection.execute(
                update(oauth_clients)
                .where(c.client_id == client_id, or_(c.last_used_at.is_(None), c.last_used_at < now - TOUCH_INTERVAL))
                .values(last_used_at=now)
            )

    # ------------------------------------------------------------ pending steps (single-use values)

    async def start_pending(
        self,
        value: str,
        *,
        purpose: str,
        ttl: timedelta = PENDING_TTL,
        client_id: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Remember a single-use value (the Okta `state`, a CSRF token) for `ttl`; `payload`, sealed by the caller,
        comes back from `consume_pending` (the pending request itself travels in a sealed cookie, DESIGN §8)."""
        now = self._clock()
        async with write_transaction(self._engine) as connection:
            await connection.execute(
                insert(oauth_pending).values(
                    key_hash=secret_hash(value),
                    purpose=purpose,
                    client_id=client_id,
                    payload=payload,
                    created_at=now,
                    expires_at=now + ttl,
                    used_at=None,
                )
            )

    async def consume_pending(self, value: str, *, purpose: str) -> PendingUse:
        """Use a value once, whichever replica asks: OK the first time, ALREADY_USED after, EXPIRED, or UNKNOWN
        (never started, another purpose, or pruned)."""
        now = self._clock()
        key = secret_hash(value)
        p = oauth_pending.c
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_pending)
                .where(p.key_hash == key, p.purpose == purpose, p.used_at.is_(None), p.expires_at > now)
                .values(used_at=now)
            )
            row = await first_row(connection, select(oauth_pending).where(p.key_hash == key, p.purpose == purpose))
        if row is None:
            return PendingUse(Outcome.UNKNOWN)
        if won.rowcount == 1:
            return PendingUse(Outcome.OK, row["payload"], row["client_id"])
        return PendingUse(Outcome.ALREADY_USED if row["used_at"] is not None else Outcome.EXPIRED)

    # ------------------------------------------------------------ consents

    async def record_consent(self, *, user_sub: str, client_id: str, backend: str, scopes: Sequence[str]) -> Consent:
        """Remember that the user approved the client for the backend with `scopes` (replacing an older approval:
        pass every scope the consent page showed)."""
        consent = Consent(user_sub, client_id, backend, sorted(set(scopes)), self._clock())
        key = [oauth_consents.c.user_sub, oauth_consents.c.client_id, oauth_consents.c.backend]
        async with write_transaction(self._engine) as connection:
            statement = upsert(connection, oauth_consents).values(
                user_sub=user_sub,
                client_id=client_id,
                backend=backend,
                scopes=consent.scopes,
                approved_at=consent.approved_at,
            )
            changed = {"scopes": statement.excluded.scopes, "approved_at": statement.excluded.approved_at}
            await connection.execute(statement.on_conflict_do_update(index_elements=key, set_=changed))
        return consent

    async def find_consent(self, user_sub: str, client_id: str, backend: str) -> Consent | None:
        c = oauth_consents.c
        async with self._engine.connect() as connection:
            row = await first_row(
                connection,
                select(oauth_consents).where(c.user_sub == user_sub, c.client_id == client_id, c.backend == backend),
            )
        return Consent(**row) if row is not None else None

    # ------------------------------------------------------------ security events

    async def record_event(
        self,
        kind: str,
        *,
        client_id: str | None = None,
        user_sub: str | None = None,
        grant_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Write a security event now; returns its id. `detail` must be JSON and hold no secret (keys named like
        one are refused: ValueError)."""
        detail = dict(detail or {})
        check_event_detail(detail)
        row = {
            "time": self._clock(),
            "kind": str(kind),
            "replica": self._replica,
            "client_id": client_id,
            "user_sub": user_sub,
            "grant_id": grant_id,
            "detail": detail,
        }
        async with write_transaction(self._engine) as connection:
            result = await connection.execute(insert(security_events).values(row))
        (event_id,) = result.inserted_primary_key or (0,)
        return int(event_id)

    async def iter_events(self, query: SecurityEventQuery | None = None) -> AsyncIterator[SecurityEvent]:
        """The matching events, oldest first (by time, then id), read a page at a time."""
        query = query or SecurityEventQuery()
        t = security_events.c
        base = select(security_events).where(*query.conditions())
        if query.last is not None:
            async with self._engine.connect() as connection:
                rows = await self._events(connection, base.order_by(t.time.desc(), t.id.desc()).limit(query.last))
            for event in reversed(rows):
                yield event
            return
        after: SecurityEvent | None = None
        while True:
            page = base
            if after is not None:
                page = base.where(or_(t.time > after.time, and_(t.time == after.time, t.id > after.id)))
            async with self._engine.connect() as connection:
                rows = await self._events(connection, page.order_by(t.time, t.id).limit(PAGE_SIZE))
            for event in rows:
                yield event
            if len(rows) < PAGE_SIZE:
                return
            after = rows[-1]

    async def list_events(self, query: SecurityEventQuery | None = None) -> list[SecurityEvent]:
        return [event async for event in self.iter_events(query)]

    @staticmethod
    async def _events(connection: AsyncConnection, statement: Any) -> list[SecurityEvent]:
        return [SecurityEvent(**row) for row in (await connection.execute(statement)).mappings()]

    # ------------------------------------------------------------ pruning

    async def prune(self, retention: Retention | None = None) -> dict[str, int]:
        """Delete what can no longer be used, in chunks (short write locks on SQLite); returns the count per table
        (`successors_erased`: grace-period pairs set to NULL). Safe to run on every replica at once."""
        r = retention or Retention()
        now = self._clock()
        p, c, k, e, cl = oauth_pending.c, oauth_codes.c, signing_keys.c, security_events.c, oauth_clients.c
        counts = {
            "oauth_pending": await self._delete(oauth_pending, p.key_hash, p.expires_at < now - r.replay_window),
            "oauth_codes": await self._delete(oauth_codes, c.code_hash, c.expires_at < now - r.replay_window),
            "oauth_refresh_tokens": await self._delete(oauth_refresh_tokens, _rt.token_hash, _rt.expires_at < now),
            "successors_erased": await self._erase_successors(now - r.refresh_grace),
            "oauth_grants": await self._delete(
                oauth_grants,
                _g.grant_id,
                or_(_g.revoked_at < now - r.dead_grants, _g.expires_at < now - r.dead_grants),
            ),
        }
        unused = or_(
            cl.last_used_at < now - r.idle_clients,
            and_(cl.last_used_at.is_(None), cl.created_at < now - r.never_used_clients),
        )
        without_grants = ~exists().where(_g.client_id == cl.client_id)
        counts["oauth_clients"] = await self._delete(oauth_clients, cl.client_id, unused, without_grants)
        counts["security_events"] = await self._delete(security_events, e.id, e.time < now - r.events)
        counts["signing_keys"] = await self._delete(
            signing_keys, k.kid, k.slot.is_(None), k.retired_at < now - r.retired_keys
        )
        return counts

    async def _delete(self, table: Table, key: Any, *conditions: ColumnElement[bool]) -> int:
        chunk = select(key).where(*conditions).limit(PRUNE_CHUNK).scalar_subquery()
        total = 0
        while True:
            async with write_transaction(self._engine) as connection:
                deleted = (await connection.execute(delete(table).where(key.in_(chunk)))).rowcount
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def _erase_successors(self, rotated_before: datetime) -> int:
        async with write_transaction(self._engine) as connection:
            erased = await connection.execute(
                update(oauth_refresh_tokens)
                .where(_rt.successor_sealed.is_not(None), _rt.rotated_at < rotated_before)
                .values(successor_sealed=None)
            )
        return erased.rowcount
