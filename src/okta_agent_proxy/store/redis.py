"""The gateway's link to Redis (`REDIS_URL`, DESIGN.md §4): shared state that may fail without failing a request.

Everything kept in Redis is an optimisation shared across replicas (today: the backend-credential cache and its
single-flight lock), never a decision. So every call here answers quickly or not at all: a command that fails or
takes longer than `timeout` is reported and treated as "Redis has nothing", and for `retry_after` seconds after a
failure no command is tried at all (a Redis that is down costs the request path nothing, not a timeout per request).
Failures are counted through `on_error(operation)` (wired to `oap_redis_errors_total`) and logged at most once a
minute; the first success after them is logged once. The URL, which may hold a password, is never logged.

The subscription (`listen`) runs on its own connection and reconnects every `retry_after` seconds while Redis is
away; whenever it (re)starts, `on_gap` is called first — messages may have been missed while it was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = structlog.get_logger(__name__)
T = TypeVar("T")

TIMEOUT_SECONDS = 0.5  # a command slower than this is a failure: Redis is meant to answer in about a millisecond
RETRY_AFTER_SECONDS = 1.0
WARN_EVERY_SECONDS = 60.0


class RedisLink:
    def __init__(
        self,
        url: str,
        *,
        on_error: Callable[[str], None] = lambda operation: None,
        timeout: float = TIMEOUT_SECONDS,
        retry_after: float = RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        no_retry = Retry(NoBackoff(), 0)  # redis-py would retry on its own; we fall back instead
        self.client: Redis = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retry)
        # Pub/sub waits for messages indefinitely: no read timeout, and a dead server shows as a closed connection.
        self._subscriber: Redis = Redis.from_url(
            url, socket_connect_timeout=timeout, health_check_interval=30, retry=no_retry
        )
        self._on_error = on_error
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._failing = False
        self._pool_stale = False
        self._last_warning = -WARN_EVERY_SECONDS

    @property
    def available(self) -> bool:
        """False for `retry_after` seconds after a failure: commands are not tried then."""
        return self._clock() >= self._down_until

    async def run(self, operation: str, command: Callable[[Redis], Awaitable[T]]) -> T | None:
        """`command(client)`, or None when Redis is unavailable, fails or is slow (the failure reported)."""
        if not self.available:
            return None
        try:
            if self._pool_stale:
                await self._drop_connections()
            result = await command(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(operation, exc)
            return None
        self._recovered()
        return result

    async def ping(self) -> bool:
        """Whether Redis answers now (tried even while commands are held back: this is how /readyz looks)."""
        try:
            if self._pool_stale:
                await self._drop_connections()
            await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed("ping", exc)
            return False
        self._down_until = 0.0
        self._recovered()
        return True

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
                effect="shared credential cache off: each process caches and exchanges on its own",
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("redis_available", effect="shared credential cache on again")

    async def _drop_connections(self) -> None:
        """Close the pooled connections before the first command after a failure: a connection that outlived a
        restart of Redis would fail that command (redis-py does not notice on checkout), costing another hold-back."""
        self._pool_stale = False
        await _quietly(self.client.connection_pool.disconnect())

    async def publish(self, channel: str, message: str) -> None:
        await self.run("publish", lambda client: client.publish(channel, message))

    async def listen(self, channel: str, on_message: Callable[[str], None], on_gap: Callable[[], None]) -> None:
        """Call `on_message` with each message on `channel`, until cancelled; `on_gap` whenever (re)subscribed."""
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                on_gap()
                self._recovered()
                async for message in pubsub.listen():
                    data: Any = message.get("data")
                    if isinstance(data, bytes):
                        on_message(data.decode("utf-8", "replace"))
            except (RedisError, OSError, TimeoutError) as exc:
                self.failed("subscribe", exc)
            finally:
                await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]
            await asyncio.sleep(self._retry_after)

    async def close(self) -> None:
        await _quietly(self.client.aclose())
        await _quietly(self._subscriber.aclose())


async def _quietly(closing: Awaitable[object]) -> None:
    with contextlib.suppress(RedisError, OSError, TimeoutError):  # closing a connection to a server that is gone
        await closing
