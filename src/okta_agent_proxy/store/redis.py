"""The gateway's link to Redis (`REDIS_URL`, DESIGN.md §4): shared state that may fail without failing a request.

Everything kept in Redis is an optimisation shared across replicas (today: the backend-credential cache and its
single-flight lock), never a decision. So every call here answers quickly or not at all: a command that fails, takes
longer than `timeout`, or gets a reply it cannot use is reported and treated as "Redis has nothing".

After a failure, commands are held back for `retry_after` seconds (a Redis that is down then costs a request
nothing, not a timeout per request); then one command at a time probes, and the others keep skipping Redis until a
probe succeeds. Commands that clean up after us — releasing a lock, publishing an invalidation — are `always` tried,
bounded by the timeout: skipping them would leave other replicas waiting or trusting a refused credential. The first
command after a failure runs on a fresh connection pool (a connection that outlived a restart of Redis would fail it;
redis-py does not notice on checkout); the old pool is closed in the background once no command uses it.

Failures are counted through `on_error(operation)` (wired to `oap_redis_errors_total`) and logged at most once a
minute; the first success after them is logged once. The URL, which may hold a password, is never logged.

The subscription (`listen`) runs on a connection of its own. It pings when the channel has been quiet for
`PING_SECONDS` and reconnects when nothing (not even the pong) arrives for twice that, so a connection that went
silent (a lost host, a dropped NAT entry) is noticed; whenever it (re)subscribes, `on_gap` is called first —
messages may have been missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.maint_notifications import MaintNotificationsConfig

log = structlog.get_logger(__name__)
T = TypeVar("T")

TIMEOUT_SECONDS = 0.5  # a command slower than this is a failure: Redis is meant to answer in about a millisecond
RETRY_AFTER_SECONDS = 1.0
WARN_EVERY_SECONDS = 60.0
PING_SECONDS = 5.0
MAX_CONNECTIONS = 50


class RedisLink:
    def __init__(
        self,
        url: str,
        *,
        on_error: Callable[[str], None] = lambda operation: None,
        timeout: float = TIMEOUT_SECONDS,
        retry_after: float = RETRY_AFTER_SECONDS,
        ping_seconds: float = PING_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self.client = self._new_client()
        self._on_error = on_error
        self._retry_after = retry_after
        self._ping_seconds = ping_seconds
        self._clock = clock
        self._down_until = 0.0
        self._failing = False  # since the last success
        self._probing = False  # one command is finding out whether Redis is back
        self._pool_stale = False
        self._last_warning = -WARN_EVERY_SECONDS
        self._closing: set[asyncio.Future[None]] = set()

    def _new_client(self, **options: object) -> Redis:
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=MAX_CONNECTIONS,
            timeout=self._timeout,  # waiting for a free connection counts against the same bound
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),  # redis-py would retry on its own; we fall back instead
            maint_notifications_config=MaintNotificationsConfig(enabled=False),  # it would relax the timeout to 10 s
            **options,
        )
        return Redis.from_pool(pool)  # owns the pool: closing the client closes it

    @property
    def available(self) -> bool:
        """False while commands are held back after a failure, or while another command probes."""
        return self._clock() >= self._down_until and not self._probing

    async def run(self, operation: str, command: Callable[[Redis], Awaitable[T]], *, always: bool = False) -> T | None:
        """`command(client)`, or None when Redis is held back, fails, is slow or answers nonsense (reported).
        `always`: tried even while held back (bounded by the timeout all the same)."""
        probe = False
        if not self.available:
            if not always:
                return None
        elif self._failing:
            probe = self._probing = True
        if self._pool_stale:
            self._renew_pool()
        try:
            result = await command(self.client)
        except Exception as exc:  # any failure of Redis, its client or its reply means "nothing shared"
            self.failed(operation, exc)
            return None
        finally:
            if probe:
                self._probing = False
        self._recovered()
        return result

    async def ping(self) -> bool:
        """Whether Redis answers now (tried even while commands are held back: this is how /readyz looks)."""
        return await self.run("ping", lambda client: client.ping(), always=True) is not None

    def failed(self, operation: str, exc: BaseException, *, hold_back: bool = True) -> None:
        """Count and (at most once a minute) log a failure; with `hold_back`, try no command for `retry_after`.
        A bad value from a healthy Redis is reported with `hold_back=False`."""
        self._on_error(operation)
        now = self._clock()
        if hold_back:
            self._down_until = now + self._retry_after
            self._failing = True
            self._pool_stale = True
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning(
                "redis_unavailable",
                operation=operation,
                reason=type(exc).__name__,
                effect="shared state off (credential cache, rate-limit buckets): each process on its own",
            )

    def _recovered(self) -> None:
        self._down_until = 0.0
        if self._failing:
            self._failing = False
            log.info("redis_available", effect="shared credential cache on again")

    def _renew_pool(self) -> None:
        """A fresh client for the commands from now on; the old one closes once its commands are done."""
        self._pool_stale = False
        old, self.client = self.client, self._new_client()
        closing = asyncio.ensure_future(_quietly(old.aclose()))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def publish(self, channel: str, message: str) -> None:
        await self.run("publish", lambda client: client.publish(channel, message), always=True)

    async def listen(self, channel: str, on_message: Callable[[str], None], on_gap: Callable[[], None]) -> None:
        """Call `on_message` with each message on `channel`, until cancelled; `on_gap` whenever (re)subscribed."""
        while True:
            subscriber = Redis.from_url(
                self._url,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                maint_notifications_config=MaintNotificationsConfig(enabled=False),
            )
            pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await asyncio.wait_for(pubsub.subscribe(channel), self._timeout * 4)
                on_gap()
                await self._receive(pubsub, on_message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost, silent or confused connection: subscribe again
                self.failed("subscribe", exc)
            finally:
                await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]
                await _quietly(subscriber.aclose())
            await asyncio.sleep(self._retry_after)

    async def _receive(self, pubsub: PubSub, on_message: Callable[[str], None]) -> None:
        heard = self._clock()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=self._ping_seconds / 5)
            now = self._clock()
            if message is not None:
                heard, pinged = now, False
                data = message.get("data")
                if message.get("type") == "message" and isinstance(data, bytes):
                    on_message(data.decode("utf-8", "replace"))
            elif now - heard > 2 * self._ping_seconds:
                raise RedisConnectionError("the subscription went silent")
            elif now - heard > self._ping_seconds and not pinged:
                await asyncio.wait_for(pubsub.ping(), self._timeout)
                pinged = True

    async def close(self) -> None:
        await _quietly(self.client.aclose())
        for closing in list(self._closing):
            await closing


async def _quietly(closing: Awaitable[object]) -> None:
    with contextlib.suppress(Exception):  # closing a connection to a server that is gone, or confused
        await closing
