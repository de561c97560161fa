"""The front door's signing keys (DESIGN.md §8): the ES256 key that signs its tokens, shared by every replica, and
the keys it replaced, still published at `/oauth/jwks` until no token they signed can be live.

`SigningKeyStore` is mixed into `FrontDoorStore` (`frontdoor.py`), which sets the engine and the clock; it returns
`StoredSigningKey` (`frontdoor_records.py`). The private key arrives sealed by the caller (`STATE_ENCRYPTION_KEY`)
and leaves as it came. One key for all replicas: exactly one row has `slot = 'current'` (a unique constraint). Creating
it is `INSERT … ON CONFLICT DO NOTHING` then a read, and rotating it a conditional UPDATE of the expected current
key, so whichever replica loses a race gets the winner's key and discards its own. `prune` deletes a retired key
after `Retention.retired_keys`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from okta_agent_proxy.store.db import write_transaction
from okta_agent_proxy.store.frontdoor_records import StoredSigningKey, first_row, upsert
from okta_agent_proxy.store.models import signing_keys

__all__ = ["CURRENT", "SigningKeyStore"]

CURRENT = "current"  # `signing_keys.slot` of the key that signs


class SigningKeyStore:
    """The current signing key and the retired ones (see the module docstring); mixed into `FrontDoorStore`."""

    _engine: AsyncEngine
    _clock: Callable[[], datetime]

    async def current_signing_key(self) -> StoredSigningKey | None:
        async with self._engine.connect() as connection:
            return await self._current_key(connection)

    async def create_signing_key(
        self, *, kid: str, algorithm: str, private_key: bytes, public_jwk: Mapping[str, Any]
    ) -> StoredSigningKey:
        """Make this key the current one unless a key is current already; returns the current key — another
        replica's when it won the race (then discard yours)."""
        async with write_transaction(self._engine) as connection:
            statement = upsert(connection, signing_keys).values(self._key_row(kid, algorithm, private_key, public_jwk))
            await connection.execute(statement.on_conflict_do_nothing(index_elements=[signing_keys.c.slot]))
            current = await self._current_key(connection)
        assert current is not None
        return current

    async def rotate_signing_key(
        self, *, expected_kid: str, kid: str, algorithm: str, private_key: bytes, public_jwk: Mapping[str, Any]
    ) -> StoredSigningKey:
        """Retire `expected_kid` and make this key current — unless `expected_kid` is no longer current (another
        replica rotated first): returns the current key either way."""
        k = signing_keys.c
        now = self._clock()
        async with write_transaction(self._engine) as connection:
            retired = await connection.execute(
                update(signing_keys).where(k.kid == expected_kid, k.slot == CURRENT).values(slot=None, retired_at=now)
            )
            if retired.rowcount == 1:
                row = self._key_row(kid, algorithm, private_key, public_jwk)
                await connection.execute(insert(signing_keys).values(row))
            current = await self._current_key(connection)
        assert current is not None
        return current

    async def published_signing_keys(self, *, retired_within: timedelta) -> list[StoredSigningKey]:
        """The current key, then keys retired less than `retired_within` ago (for `/oauth/jwks`), newest first."""
        k = signing_keys.c
        cutoff = self._clock() - retired_within
        statement = (
            select(signing_keys)
            .where(or_(k.slot == CURRENT, k.retired_at >= cutoff))
            .order_by(k.retired_at.is_not(None), k.created_at.desc())
        )
        async with self._engine.connect() as connection:
            return [StoredSigningKey(**row) for row in (await connection.execute(statement)).mappings()]

    def _key_row(self, kid: str, algorithm: str, private_key: bytes, public_jwk: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "kid": kid,
            "algorithm": algorithm,
            "private_key": private_key,
            "public_jwk": dict(public_jwk),
            "slot": CURRENT,
            "created_at": self._clock(),
            "retired_at": None,
        }

    @staticmethod
    async def _current_key(connection: AsyncConnection) -> StoredSigningKey | None:
        row = await first_row(connection, select(signing_keys).where(signing_keys.c.slot == CURRENT))
        return StoredSigningKey(**row) if row is not None else None
