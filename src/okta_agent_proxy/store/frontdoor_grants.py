"""The grant side of the front door's storage (DESIGN.md §8): a user's login for one client and resource (`Grant`)
and what hangs off it — its authorization codes, its family of refresh tokens, and the sealed Okta tokens it holds
with the lease to refresh them. Revoking a grant ends all of these at once.

`GrantStore` is mixed into `FrontDoorStore` (`frontdoor.py`, whose docstring says how single use holds across
replicas and what is stored hashed or sealed); the records it returns are in `frontdoor_records.py`. The choices
particular to a grant's family, and why:

- **Replays revoke at once.** A code redeemed twice and a refresh token presented again after the grace period
  revoke their grant inside the transaction that detects them, so nothing can come between detection and
  revocation (a crash, a forgotten call); the caller records the security event and tells the other replicas.
  A missing grant counts as revoked (pruned rows are gone for good).
- **Refresh grace.** DESIGN: a rotated refresh token presented again within `FRONT_DOOR_REFRESH_GRACE_SECONDS`
  (a client refreshing from several processes at once) gets the *same* new pair. The tokens are stored hashed, so
  the pair cannot be re-derived from the row: the rotation keeps the successor pair (access + refresh token) sealed
  by the caller on the rotated row, returns it to whoever presents the old token within the grace, and `prune`
  erases it once the grace is over (revocation does at once). The caller mints and seals its new pair *before*
  calling `rotate_refresh_token` — it cannot know whether it will win; a loser throws its own pair away, and since
  the loser's refresh token was never stored it is worth nothing. Rejected: deriving the successor from the old
  token (an HMAC) — an ES256 access token cannot be re-made byte for byte (its signature is randomised), and one
  key plus one old token would yield every later token; or issuing the second caller a pair of its own — two live
  branches of one family, which would defeat reuse detection.
- **Okta refresh, single-flight per grant**: a lease — a conditional UPDATE of `refresh_lease_until`, the same on
  both databases — rather than a PostgreSQL row lock (`SELECT … FOR UPDATE`) held across the HTTP call to Okta,
  which would pin a pooled connection and an open transaction for the call's whole length (and SQLite has no row
  locks). A lease ends by itself if its holder dies; give it longer than the Okta call's timeout. `Grant.version`
  goes up on every change of the Okta tokens, so replicas that waited see the refresh happened.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from okta_agent_proxy.store.db import write_transaction
from okta_agent_proxy.store.frontdoor_records import (
    AuthorizationCode,
    CodeUse,
    Grant,
    OktaRefreshLease,
    Outcome,
    RefreshToken,
    RevokeReason,
    Rotation,
    first_row,
    row_values,
    secret_hash,
)
from okta_agent_proxy.store.models import oauth_codes, oauth_grants, oauth_refresh_tokens

__all__ = ["CODE_TTL", "GrantStore"]

CODE_TTL = timedelta(seconds=60)

_g = oauth_grants.c
_rt = oauth_refresh_tokens.c


def _grant_live(grant_id: ColumnElement[str], now: datetime) -> ColumnElement[bool]:
    return exists().where(_g.grant_id == grant_id, _g.revoked_at.is_(None), _g.expires_at > now)


async def _grant(connection: AsyncConnection, grant_id: str, *, lock: bool = False) -> Grant | None:
    statement = select(oauth_grants).where(_g.grant_id == grant_id)
    row = await first_row(connection, statement.with_for_update() if lock else statement)  # FOR UPDATE: not on SQLite
    return Grant(**row) if row is not None else None


async def _revoke(connection: AsyncConnection, grant_id: str, reason: str, now: datetime) -> bool:
    """Revoke a live grant: erase its sealed Okta tokens and any successor pair of its family. True if it was live."""
    revoked = await connection.execute(
        update(oauth_grants)
        .where(_g.grant_id == grant_id, _g.revoked_at.is_(None))
        .values(
            revoked_at=now,
            revoked_reason=reason,
            okta_id_token=None,
            okta_refresh_token=None,
            refresh_lease_holder=None,
            refresh_lease_until=None,
        )
    )
    await connection.execute(
        update(oauth_refresh_tokens)
        .where(_rt.grant_id == grant_id, _rt.successor_sealed.is_not(None))
        .values(successor_sealed=None)
    )
    return revoked.rowcount == 1


class GrantStore:
    """Grants, codes, refresh tokens and Okta refresh leases (see the module docstring); mixed into
    `FrontDoorStore`, which sets the engine and the clock."""

    _engine: AsyncEngine
    _clock: Callable[[], datetime]

    # ------------------------------------------------------------ grants

    async def create_grant(
        self,
        *,
        user_sub: str,
        user_claims: Mapping[str, Any],
        client_id: str,
        resource: str,
        scopes: Sequence[str],
        okta_id_token: bytes,
        okta_id_token_expires_at: datetime | None,
        okta_refresh_token: bytes | None,
        okta_refresh_token_expires_at: datetime | None,
        expires_at: datetime,
        grant_id: str | None = None,
    ) -> Grant:
        """Store a login (tokens sealed by the caller, who may choose the id they are sealed to; else a random
        one). `expires_at`: until when it lives without a refresh token — a short time (the consent's) is right:
        `issue_refresh_token` extends it to each token's expiry, so a login whose consent is never given goes away
        soon."""
        now = self._clock()
        grant = Grant(
            grant_id=grant_id or secrets.token_urlsafe(18),
            user_sub=user_sub,
            user_claims=dict(user_claims),
            client_id=client_id,
            resource=resource,
            scopes=list(scopes),
            okta_id_token=okta_id_token,
            okta_id_token_expires_at=okta_id_token_expires_at,
            okta_refresh_token=okta_refresh_token,
            okta_refresh_token_expires_at=okta_refresh_token_expires_at,
            okta_refreshed_at=None,
            version=1,
            refresh_lease_holder=None,
            refresh_lease_until=None,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            revoked_reason=None,
        )
        async with write_transaction(self._engine) as connection:
            await connection.execute(insert(oauth_grants).values(row_values(grant, oauth_grants)))
        return grant

    async def get_grant(self, grant_id: str) -> Grant | None:
        """The grant, revoked or not (None: unknown or pruned — treat as revoked)."""
        async with self._engine.connect() as connection:
            return await _grant(connection, grant_id)

    async def grant_is_live(self, grant_id: str) -> bool:
        """Neither revoked, expired nor pruned: the check behind a gateway token (cache it ≤ 30 s, DESIGN §8)."""
        live = (_g.grant_id == grant_id, _g.revoked_at.is_(None), _g.expires_at > self._clock())
        async with self._engine.connect() as connection:
            return (await connection.execute(select(_g.grant_id).where(*live))).first() is not None

    async def revoke_grant(self, grant_id: str, reason: str) -> Grant | None:
        """Revoke a grant and with it its codes and every refresh token of its family. Returns the grant as it was
        (with its sealed Okta tokens, for revoking them at Okta) when this call revoked it; None when it was
        already revoked or is unknown. The Okta tokens are erased from the row."""
        async with write_transaction(self._engine) as connection:
            grant = await _grant(connection, grant_id, lock=True)
            if grant is None or not await _revoke(connection, grant_id, reason, self._clock()):
                return None
        return grant

    # ------------------------------------------------------------ authorization codes

    async def create_code(
        self,
        code: str,
        *,
        grant_id: str,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        resource: str,
        scopes: Sequence[str],
        ttl: timedelta = CODE_TTL,
    ) -> AuthorizationCode:
        """Store a new code's bindings under its hash (the code is the caller's, ≥ 128 random bits)."""
        now = self._clock()
        record = AuthorizationCode(
            code_hash=secret_hash(code),
            grant_id=grant_id,
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            resource=resource,
            scopes=list(scopes),
            created_at=now,
            expires_at=now + ttl,
            used_at=None,
        )
        async with write_transaction(self._engine) as connection:
            await connection.execute(insert(oauth_codes).values(row_values(record, oauth_codes)))
        return record

    async def consume_code(self, code: str) -> CodeUse:
        """Redeem a code once across all replicas. Consume first, then check its bindings (client, redirect URI,
        PKCE): any attempt spends it. A second redemption revokes the grant the first one issued tokens for."""
        now = self._clock()
        key = secret_hash(code)
        c = oauth_codes.c
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_codes)
                .where(c.code_hash == key, c.used_at.is_(None), c.expires_at > now)
                .values(used_at=now)
            )
            row = await first_row(connection, select(oauth_codes).where(c.code_hash == key))
            if row is None:
                return CodeUse(Outcome.UNKNOWN)
            record = AuthorizationCode(**row)
            grant = await _grant(connection, record.grant_id)
            if won.rowcount == 1:
                live = grant is not None and grant.live(now)
                return CodeUse(Outcome.OK if live else Outcome.REVOKED, record, grant)
            if record.used_at is None:
                return CodeUse(Outcome.EXPIRED, record, grant)
            await _revoke(connection, record.grant_id, RevokeReason.CODE_REPLAY, now)
            return CodeUse(Outcome.ALREADY_USED, record, await _grant(connection, record.grant_id))

    # ------------------------------------------------------------ refresh tokens

    async def issue_refresh_token(self, token: str, *, grant_id: str, expires_at: datetime) -> RefreshToken | None:
        """Store the first refresh token of a grant (after a code), extending the grant to its expiry. None: the
        grant is no longer live (revoked meanwhile): issue nothing."""
        now = self._clock()
        async with write_transaction(self._engine) as connection:
            grant = await _grant(connection, grant_id, lock=True)
            if grant is None or not grant.live(now):
                return None
            return await self._insert_refresh_token(connection, token, grant_id, None, expires_at, now)

    async def find_refresh_token(self, token: str) -> tuple[RefreshToken, Grant] | None:
        """A refresh token and its grant, before rotating it (to check its client and resource and mint the next
        pair) or to revoke it (RFC 7009)."""
        async with self._engine.connect() as connection:
            return await self._token_and_grant(connection, secret_hash(token))

    async def rotate_refresh_token(
        self, token: str, *, new_token: str, new_expires_at: datetime, successor_sealed: bytes, grace: timedelta
    ) -> Rotation:
        """Replace `token` with `new_token` once across all replicas (see the module docstring, "Refresh grace").

        `successor_sealed` is the new pair (access and refresh token) sealed by the caller, kept for `grace` and
        handed to whoever presents `token` again within it (WITHIN_GRACE); after the grace, presenting it is
        reuse: the grant is revoked here (REUSED)."""
        now = self._clock()
        old = secret_hash(token)
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_refresh_tokens)
                .where(
                    _rt.token_hash == old,
                    _rt.rotated_at.is_(None),
                    _rt.expires_at > now,
                    _grant_live(_rt.grant_id, now),
                )
                .values(rotated_at=now, replaced_by=secret_hash(new_token), successor_sealed=successor_sealed)
            )
            found = await self._token_and_grant(connection, old)
            if found is None:
                return Rotation(Outcome.UNKNOWN)
            record, grant = found
            if won.rowcount == 1:
                await self._insert_refresh_token(connection, new_token, grant.grant_id, old, new_expires_at, now)
                return Rotation(Outcome.OK, grant)
            return await self._refused_rotation(connection, record, grant, grace, now)

    async def _refused_rotation(
        self, connection: AsyncConnection, record: RefreshToken, grant: Grant, grace: timedelta, now: datetime
    ) -> Rotation:
        if grant.revoked_at is not None:
            return Rotation(Outcome.REVOKED, grant)
        if record.rotated_at is None:  # the token (or its grant, which ends with its last token) has expired
            return Rotation(Outcome.EXPIRED, grant)
        if record.rotated_at > now - grace and record.successor_sealed is not None:
            return Rotation(Outcome.WITHIN_GRACE, grant, record.successor_sealed)
        await _revoke(connection, grant.grant_id, RevokeReason.REFRESH_TOKEN_REUSE, now)
        return Rotation(Outcome.REUSED, await _grant(connection, grant.grant_id))

    async def _insert_refresh_token(
        self,
        connection: AsyncConnection,
        token: str,
        grant_id: str,
        parent_hash: str | None,
        expires_at: datetime,
        now: datetime,
    ) -> RefreshToken:
        record = RefreshToken(
            token_hash=secret_hash(token),
            grant_id=grant_id,
            parent_hash=parent_hash,
            issued_at=now,
            expires_at=expires_at,
            rotated_at=None,
            replaced_by=None,
            successor_sealed=None,
        )
        await connection.execute(insert(oauth_refresh_tokens).values(row_values(record, oauth_refresh_tokens)))
        await connection.execute(
            update(oauth_grants)
            .where(_g.grant_id == grant_id, _g.expires_at < expires_at)
            .values(expires_at=expires_at)
        )
        return record

    async def _token_and_grant(self, connection: AsyncConnection, token_hash: str) -> tuple[RefreshToken, Grant] | None:
        row = await first_row(connection, select(oauth_refresh_tokens).where(_rt.token_hash == token_hash))
        if row is None:
            return None
        grant = await _grant(connection, row["grant_id"])
        return (RefreshToken(**row), grant) if grant is not None else None

    # ------------------------------------------------------------ Okta tokens: single-flight refresh

    async def acquire_okta_refresh(
        self, grant_id: str, *, ttl: timedelta, version: int | None = None
    ) -> OktaRefreshLease | None:
        """The lease to refresh a live grant's Okta tokens for `ttl` (longer than the Okta call's timeout), or None
        while another replica holds it — then wait for `Grant.version` to change, or for the lease to end.
        `version`: the version the caller read; None also when another caller refreshed since (no second refresh
        with the tokens the first one replaced)."""
        now = self._clock()
        holder = secrets.token_hex(8)
        same = (_g.version == version,) if version is not None else ()
        async with write_transaction(self._engine) as connection:
            won = await connection.execute(
                update(oauth_grants)
                .where(
                    _g.grant_id == grant_id,
                    _g.revoked_at.is_(None),
                    or_(_g.refresh_lease_until.is_(None), _g.refresh_lease_until <= now),
                    *same,
                )
                .values(refresh_lease_holder=holder, refresh_lease_until=now + ttl)
            )
            grant = await _grant(connection, grant_id) if won.rowcount == 1 else None
        return OktaRefreshLease(grant, holder) if grant is not None else None

    async def save_okta_tokens(
        self,
        lease: OktaRefreshLease,
        *,
        okta_id_token: bytes,
        okta_id_token_expires_at: datetime | None,
        okta_refresh_token: bytes | None,
        okta_refresh_token_expires_at: datetime | None,
    ) -> bool:
        """Store refreshed Okta tokens (sealed) and end the lease; `okta_refresh_token` None keeps the one held
        (Okta did not rotate it). False: the lease was lost (it ran out and another replica took it) or the grant
        was revoked — nothing written."""
        values: dict[str, Any] = {
            "okta_id_token": okta_id_token,
            "okta_id_token_expires_at": okta_id_token_expires_at,
            "okta_refreshed_at": self._clock(),
            "version": _g.version + 1,
            "refresh_lease_holder": None,
            "refresh_lease_until": None,
        }
        if okta_refresh_token is not None:
            values |= {"okta_refresh_token": okta_refresh_token}
            values |= {"okta_refresh_token_expires_at": okta_refresh_token_expires_at}
        async with write_transaction(self._engine) as connection:
            saved = await connection.execute(update(oauth_grants).where(*self._held(lease)).values(values))
        return saved.rowcount == 1

    async def release_okta_refresh(self, lease: OktaRefreshLease) -> None:
        """End a lease without a refresh (the call to Okta failed), so another replica may try at once."""
        async with write_transaction(self._engine) as connection:
            await connection.execute(
                update(oauth_grants)
                .where(*self._held(lease))
                .values(refresh_lease_holder=None, refresh_lease_until=None)
            )

    @staticmethod
    def _held(lease: OktaRefreshLease) -> tuple[ColumnElement[bool], ...]:
        grant_id = lease.grant.grant_id
        return (_g.grant_id == grant_id, _g.refresh_lease_holder == lease.holder, _g.revoked_at.is_(None))
