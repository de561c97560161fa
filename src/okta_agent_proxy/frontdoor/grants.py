"""Grants at run time (DESIGN.md §8, "Grants across replicas"): is a grant still live, and its Okta ID token, fresh.

**Liveness.** Every request with a front-door token asks whether its grant still lives. The answer is cached in
the process for at most `LIVENESS_SECONDS`, so a revocation made by another replica is seen within that time (§8
says 30 s); the replica that revokes forgets at once, and with `REDIS_URL` it publishes the grant id on
`oap:frontdoor:revoked`, so every replica forgets at once too. A store that cannot answer → 503, never "live".

**The held ID token** is what Cross App Access step 1 presents for a front-door caller. Okta's ID tokens last an
hour; within `REFRESH_AHEAD_SECONDS` of its expiry the token is refreshed with the held Okta refresh token, once per
grant across all replicas: the store's lease (`acquire_okta_refresh`) decides who calls Okta; the others wait for
the grant's version to change (or the lease to end) and read the new token. Okta's `invalid_grant` on a refresh
means the user's session at Okta is over: the grant is revoked and the caller gets 401 with the challenge, and
logs in again. Okta unreachable → 503 (while the held token is still valid, it is used instead).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from okta_agent_proxy.errors import CredentialUnavailable, IdpUnavailable, InvalidToken
from okta_agent_proxy.frontdoor.okta_login import (
    InvalidIdToken,
    OktaLogin,
    OktaLoginError,
    OktaTokens,
    OktaUnavailable,
)
from okta_agent_proxy.sealing import Sealer
from okta_agent_proxy.store.frontdoor import EventKind, FrontDoorStore, Grant, RevokeReason
from okta_agent_proxy.store.redis import RedisLink

log = structlog.get_logger(__name__)
LIVENESS_SECONDS = 25.0  # < 30 s (DESIGN §8), with room for one slow store read
REVOKED_CHANNEL = "oap:frontdoor:revoked"
REFRESH_AHEAD_SECONDS = 300.0
LEASE = timedelta(seconds=30)  # longer than an Okta call's timeout
WAIT_SECONDS = 10.0  # for another replica's refresh
_MAX_CACHED = 100_000


def id_token_aad(grant_id: str) -> bytes:
    return f"oap-grant:{grant_id}:okta-id-token".encode()


def refresh_token_aad(grant_id: str) -> bytes:
    return f"oap-grant:{grant_id}:okta-refresh-token".encode()


def seal_okta_tokens(sealer: Sealer, grant_id: str, tokens: OktaTokens) -> tuple[bytes, bytes | None]:
    id_token = sealer.seal(tokens.id_token.encode(), id_token_aad(grant_id))
    refresh = tokens.refresh_token
    return id_token, sealer.seal(refresh.encode(), refresh_token_aad(grant_id)) if refresh else None


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class GrantLiveness:
    def __init__(
        self,
        store: FrontDoorStore,
        *,
        redis: RedisLink | None = None,
        ttl: float = LIVENESS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._redis = redis
        self._ttl = ttl
        self._clock = clock
        self._checked: dict[str, tuple[bool, float]] = {}

    async def is_live(self, grant_id: str) -> bool:
        now = self._clock()
        cached = self._checked.get(grant_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            live = await self._store.grant_is_live(grant_id)
        except Exception as exc:  # the store is down: nobody is let in on a grant it cannot vouch for
            log.warning("grant_liveness_unavailable", reason=type(exc).__name__)
            raise IdpUnavailable("the gateway cannot check this login right now") from None
        if len(self._checked) >= _MAX_CACHED:
            self._checked.clear()
        self._checked[grant_id] = (live, now + self._ttl)
        return live

    async def revoked(self, grant_id: str) -> None:
        """A grant was revoked here: forget it now, and tell the other replicas."""
        self.forget(grant_id)
        if self._redis is not None:
            await self._redis.publish(REVOKED_CHANNEL, grant_id)

    def forget(self, grant_id: str) -> None:
        self._checked.pop(grant_id, None)

    async def listen(self) -> None:
        """Forget grants other replicas revoke (run for the process's life when Redis is configured)."""
        if self._redis is not None:
            await self._redis.listen(REVOKED_CHANNEL, self.forget, self._checked.clear)


class HeldIdTokens:
    """The Okta ID token each grant holds, refreshed ahead of expiry (see the module docstring)."""

    def __init__(
        self,
        store: FrontDoorStore,
        sealer: Sealer,
        login: OktaLogin,
        liveness: GrantLiveness,
        *,
        refresh_ahead: float = REFRESH_AHEAD_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._login = login
        self._liveness = liveness
        self._refresh_ahead = refresh_ahead
        self._clock = clock

    async def id_token(self, grant_id: str) -> str:
        grant = await self._live_grant(grant_id)
        token, expires_at = self._id_token(grant)
        if expires_at - self._clock() > self._refresh_ahead:
            return token
        return await self._refreshed(grant, token, expires_at)

    async def _live_grant(self, grant_id: str) -> Grant:
        grant = await self._store.get_grant(grant_id)
        if grant is None or not grant.live(datetime.now(UTC)):
            raise InvalidToken("this login has ended; sign in again")
        return grant

    def _id_token(self, grant: Grant) -> tuple[str, float]:
        sealed = grant.okta_id_token
        opened = self._sealer.open(sealed, id_token_aad(grant.grant_id)) if sealed is not None else None
        if opened is None:
            raise CredentialUnavailable("the gateway cannot open the login it holds (STATE_ENCRYPTION_KEY changed?)")
        expires = grant.okta_id_token_expires_at
        return opened.decode(), expires.timestamp() if expires is not None else 0.0

    async def _refreshed(self, grant: Grant, token: str, expires_at: float) -> str:
        valid = expires_at > self._clock()
        if grant.okta_refresh_token is None:  # Okta gave none (offline_access not granted): the login ends with it
            if valid:
                return token
            await self._revoke(grant, RevokeReason.OKTA_EXPIRED)  # so the client's refresh fails too: a new login
            raise InvalidToken("this login has expired; sign in again")
        lease = await self._store.acquire_okta_refresh(grant.grant_id, ttl=LEASE, version=grant.version)
        if lease is None:
            return await self._after_other_refresh(grant, token, valid)
        refresh = self._sealer.open(grant.okta_refresh_token, refresh_token_aad(grant.grant_id))
        if refresh is None:
            await self._store.release_okta_refresh(lease)
            raise CredentialUnavailable("the gateway cannot open the login it holds (STATE_ENCRYPTION_KEY changed?)")
        try:
            tokens = await self._login.refresh(refresh.decode(), subject=grant.user_sub)
        except OktaLoginError as exc:
            await self._store.release_okta_refresh(lease)
            if exc.error == "invalid_grant":
                await self._revoke(grant, RevokeReason.OKTA_REFUSED)
                raise InvalidToken("Okta ended this login; sign in again") from None
            log.error("okta_refresh_refused", error=exc.error)
            raise CredentialUnavailable("Okta refused to refresh the gateway's login") from None
        except InvalidIdToken as invalid:
            await self._store.release_okta_refresh(lease)
            log.error("okta_refreshed_id_token_refused", reason=str(invalid))
            raise CredentialUnavailable("Okta's refreshed ID token was refused") from None
        except OktaUnavailable:
            await self._store.release_okta_refresh(lease)
            if valid:
                return token
            raise IdpUnavailable("Okta is unavailable") from None
        id_token, refresh_token = seal_okta_tokens(self._sealer, grant.grant_id, tokens)
        await self._store.save_okta_tokens(
            lease,
            okta_id_token=id_token,
            okta_id_token_expires_at=_utc(tokens.expires_at),
            okta_refresh_token=refresh_token,
            okta_refresh_token_expires_at=None,
        )
        await self._store.record_event(
            EventKind.OKTA_REFRESH, client_id=grant.client_id, user_sub=grant.user_sub, grant_id=grant.grant_id
        )
        return tokens.id_token

    async def _after_other_refresh(self, grant: Grant, token: str, valid: bool) -> str:
        deadline = self._clock() + WAIT_SECONDS
        while self._clock() < deadline:
            await asyncio.sleep(0.1)
            current = await self._live_grant(grant.grant_id)
            if current.version != grant.version:
                return self._id_token(current)[0]
            if current.refresh_lease_holder is None:  # the other replica gave up: try ourselves
                return await self._refreshed(current, token, self._id_token(current)[1])
        if valid:
            return token
        raise IdpUnavailable("Okta is slow to refresh this login")

    async def _revoke(self, grant: Grant, reason: RevokeReason) -> None:
        if await self._store.revoke_grant(grant.grant_id, reason) is not None:
            await self._store.record_event(
                EventKind.REVOCATION,
                client_id=grant.client_id,
                user_sub=grant.user_sub,
                grant_id=grant.grant_id,
                detail={"reason": str(reason)},
            )
        await self._liveness.revoked(grant.grant_id)
