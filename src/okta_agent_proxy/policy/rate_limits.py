"""Request budgets (DESIGN.md §9): token buckets per user, per agent and per (user, backend), taken all or none.

A bucket holds `burst` tokens and refills at `requests_per_minute`/60 a second. Each request on a backend route takes
one token from every bucket that applies to it — from all of them, or, when one is empty, from none (a request refused
by one budget spends nothing of the others) — and a refused request learns how long until every one of those
buckets has a token again: its `Retry-After`, rounded up, at least 1 second.

Where the buckets live:
- `LocalBuckets`, this process's memory. Each process has the whole budget (with `--workers N`, N times it). A
  bucket that has refilled to full is the same as no bucket, so once a minute the full ones are dropped; beyond
  `MAX_LOCAL_BUCKETS` the oldest go too (a tenth at a time, so that this stays rare). Memory stays bounded however
  many users come, at worst giving a user whose bucket was dropped a full one early.
- `RedisBuckets`, with `REDIS_URL`: one budget across every replica and worker. One Lua script checks and takes all
  the buckets of a request atomically, on Redis's own clock (`TIME`: the replicas' clocks do not matter); each key
  expires when its bucket would be full again. Keys are `oap:rl:<sha256>`: a user id (often an email) is never
  stored in clear.
`RateLimiter.take` asks Redis when there is one; when Redis does not answer (down, slow, or held back after a failure:
`RedisLink` decides, and counts it), the process's own buckets decide: limits fail open to local, never to none.

Units: time in seconds, and a token worth `TOKEN` = 60, so that a bucket refilling at N a minute gains N a second.
Python and the Lua script do the same IEEE double operations in the same order (and the script stores numbers with
%.17g, which reads back as the same double), so for the same clock they give the same answers to the last bit. The
clock is injectable; `RedisBuckets` takes one only so that tests can hold the script to `LocalBuckets`' answers
(production uses Redis `TIME`).

Written out here because no maintained library offers token buckets over Redis taken all-or-none (`limits` has
windows only), and the whole thing is small. It is on every request's path when a budget is set, hence plain tuples,
one dict lookup per bucket, each caller's buckets made once, and no coroutine when there is no Redis: about 2.5 % of
a request's instructions with all three budgets set (bench/instructions.py, part `rate-limit`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from okta_agent_proxy.config.limits import RateLimits, RequestRate
from okta_agent_proxy.errors import RateLimited
from okta_agent_proxy.store.redis import RedisLink

TOKEN = 60.0  # one token: a bucket refilling at N a minute gains N a second
MAX_LOCAL_BUCKETS = 100_000  # ~40 MB at most; a bucket of each limit per active user is far fewer in practice
SWEEP_SECONDS = 60.0  # how often full buckets are dropped from memory
KEY_PREFIX = "oap:rl:"
MAX_CACHED_CALLERS = 10_000  # (user, agent, backend) → its buckets, made once: ~3,000 of ~21,000 instructions a take
Clock = Callable[[], float]  # seconds

# KEYS: the buckets. ARGV[1]: now in seconds ("" = Redis TIME); then per bucket its requests_per_minute and burst.
# A bucket is a hash {l: its level after the last take, s: the time of it}; no key is a full bucket. Returns {1} (a
# token taken from every bucket), or {0, seconds until every bucket has a token (text: a Lua number in a reply is
# cut to an integer), the index of the first bucket that waits that long}. The arithmetic is LocalBuckets.take's,
# operation for operation; numbers are stored with %.17g, which reads back as the same double (Lua's own conversion
# keeps 14 digits).
SCRIPT = """
local TOKEN = 60
local now = tonumber(ARGV[1])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local levels = {}
local wait, refused = 0, 0
for i, key in ipairs(KEYS) do
  local per_minute, full = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]) * TOKEN
  local state = redis.call('HMGET', key, 'l', 's')
  local level, stamp = tonumber(state[1]), tonumber(state[2])
  if level == nil or stamp == nil then
    level = full
  else
    if now > stamp then
      level = level + (now - stamp) * per_minute
    end
    level = math.min(full, level)
  end
  levels[i] = level
  if level < TOKEN then
    local seconds = (TOKEN - level) / per_minute
    if seconds > wait then
      wait, refused = seconds, i
    end
  end
end
if refused > 0 then
  return {0, string.format('%.17g', wait), refused}
end
for i, key in ipairs(KEYS) do
  local per_minute, full = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]) * TOKEN
  local left = levels[i] - TOKEN
  redis.call('HSET', key, 'l', string.format('%.17g', left), 's', string.format('%.17g', now))
  redis.call('PEXPIRE', key, string.format('%.0f', math.ceil((full - left) / per_minute * 1000)))
end
return {1}
"""


@dataclass(frozen=True, slots=True)
class Rate:
    """A budget's bucket size and refill, as one config generation sets them (made once per reload)."""

    limit: str  # the setting it comes from: per_user, per_agent, per_user_backend or backends.<name>
    per_minute: int
    burst: int
    full: float = field(init=False, repr=False, compare=False)  # the burst, in the buckets' unit

    def __post_init__(self) -> None:
        object.__setattr__(self, "full", self.burst * TOKEN)

    @classmethod
    def of(cls, limit: str, rate: RequestRate) -> Rate:
        return cls(limit, rate.requests_per_minute, rate.capacity)


# One bucket a request takes from: who it counts — ("u", user), ("a", agent) or ("b", backend, user); it holds a user
# id, so it is never logged or stored as is — and its rate. Plain tuples: they are on the request's path.
Key = tuple[str, ...]
Bucket = tuple[Key, Rate]


@dataclass(frozen=True, slots=True)
class Refusal:
    """No token now: `seconds` until every bucket of the request has one; `limit` is the first of those that wait
    longest."""

    limit: str
    seconds: float

    @property
    def retry_after(self) -> int:
        """`Retry-After`: whole seconds, rounded up, at least 1."""
        return max(1, math.ceil(self.seconds))


def refusal_of(buckets: Sequence[Bucket], lefts: Sequence[float]) -> Refusal:
    """The refusal of a request whose buckets would be left at `lefts` (level − TOKEN), one of them below 0. The
    wait is the script's `(TOKEN - level) / per_minute`: IEEE subtraction is antisymmetric, so −left is exactly that."""
    waits = [(-left / rate.per_minute, rate.limit) for (_, rate), left in zip(buckets, lefts, strict=True) if left < 0]
    longest = max(wait for wait, _ in waits)
    return Refusal(next(limit for wait, limit in waits if wait == longest), longest)


class LocalBuckets:
    """Buckets in this process: key → (level after the last take, its time, the rate it was taken at). Synchronous:
    a take cannot interleave with another on the event loop."""

    def __init__(self, clock: Clock = time.monotonic, max_buckets: int = MAX_LOCAL_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        self._state: dict[Key, tuple[float, float, Rate]] = {}
        self._next_sweep = clock() + SWEEP_SECONDS

    def __len__(self) -> int:
        return len(self._state)

    def take(self, buckets: Sequence[Bucket]) -> Refusal | None:
        now = self._clock()
        state = self._state
        taken = []  # each bucket's next state, written only if every one has a token
        short = False
        for key, rate in buckets:
            full = rate.full
            entry = state.get(key)
            if entry is None:
                level = full
            else:
                level = entry[0]
                if now > entry[1]:  # a clock that went back adds nothing
                    level = level + (now - entry[1]) * rate.per_minute
                if level > full:
                    level = full
            left = level - TOKEN
            if left < 0:
                short = True
            taken.append((key, (left, now, rate)))
        if short:
            return refusal_of(buckets, [entry[0] for _, entry in taken])
        state.update(taken)
        if now >= self._next_sweep or len(state) > self._max:
            self._sweep(now)
        return None

    def _sweep(self, now: float) -> None:
        """Drop the buckets that are full again; then, if more than nine tenths of the cap remain, those nearest to
        full down to nine tenths — never the emptiest (a runaway caller's), and leaving a tenth of the cap before
        the next scan."""
        self._next_sweep = now + SWEEP_SECONDS
        state = self._state

        def full_at(item: tuple[Key, tuple[float, float, Rate]]) -> float:
            left, then, rate = item[1]
            return then + (rate.full - left) / rate.per_minute

        for key in [key for key, entry in state.items() if full_at((key, entry)) <= now]:
            del state[key]
        keep = self._max * 9 // 10
        if len(state) > keep:
            for key, _ in heapq.nsmallest(len(state) - keep, state.items(), key=full_at):
                del state[key]


class RedisUnavailable(Exception):
    """Redis did not answer (RedisLink has counted and logged it), or not as the script does: decide locally."""


class RedisBuckets:
    """Buckets in Redis, shared by every process that uses the same server. `clock`: tests only (see above)."""

    def __init__(self, link: RedisLink, clock: Clock | None = None) -> None:
        self._link = link
        self._clock = clock
        self._script = link.client.register_script(SCRIPT)  # EVALSHA, loading the script when Redis lacks it

    async def take(self, buckets: Sequence[Bucket]) -> Refusal | None:
        keys = [redis_key(key) for key, _ in buckets]
        args: list[str | int] = ["" if self._clock is None else repr(float(self._clock()))]
        for _, rate in buckets:
            args += [rate.per_minute, rate.burst]
        reply = await self._link.run("rate_limit", lambda client: self._script(keys, args, client=client))
        if reply == [1]:
            return None
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == 0 and 1 <= reply[2] <= len(buckets):
            return Refusal(buckets[reply[2] - 1][1].limit, float(reply[1]))
        if reply is not None:  # not the script's answer (another script under its sha?): reported, then local
            self._link.failed("rate_limit", ValueError("unexpected reply"), hold_back=False)
        raise RedisUnavailable


def redis_key(key: Key) -> str:
    """`oap:rl:` and a digest of the key (JSON: no two keys alike), so no user id is stored in clear."""
    return KEY_PREFIX + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


class RateLimiter:
    """The process's buckets: in Redis when there is one, else (or while it does not answer) in memory. One per
    process, so budgets outlive a reload; each take brings the sizes of the generation serving the request."""

    def __init__(
        self,
        redis: RedisLink | None = None,
        *,
        clock: Clock = time.monotonic,
        redis_clock: Clock | None = None,
        max_local_buckets: int = MAX_LOCAL_BUCKETS,
    ) -> None:
        self.local = LocalBuckets(clock, max_local_buckets)
        self.shared = RedisBuckets(redis, redis_clock) if redis is not None else None

    async def take(self, buckets: Sequence[Bucket]) -> Refusal | None:
        if self.shared is not None:
            try:
                return await self.shared.take(buckets)
            except RedisUnavailable:
                pass
        return self.local.take(buckets)


class RequestLimits:
    """One config generation's budgets over the process's limiter: which buckets a request takes from, and the 429
    when it cannot. Built only when `rate_limits` sets a budget; `on_refused(backend, agent)` counts refusals."""

    def __init__(
        self,
        config: RateLimits,
        limiter: RateLimiter,
        on_refused: Callable[[str, str], None] = lambda backend, agent: None,
    ) -> None:
        self._per_user = Rate.of("per_user", config.per_user) if config.per_user else None
        self._per_agent = Rate.of("per_agent", config.per_agent) if config.per_agent else None
        self._per_user_backend = (
            Rate.of("per_user_backend", config.per_user_backend) if config.per_user_backend else None
        )
        self._backends = {name: Rate.of(f"backends.{name}", rate) for name, rate in config.backends.items()}
        self._limiter = limiter
        self._on_refused = on_refused
        self._cache: dict[tuple[str, str, str], tuple[Bucket, ...]] = {}

    def buckets(self, user: str, agent: str, backend: str) -> tuple[Bucket, ...]:
        """The buckets a request of `user` through `agent` to `backend` takes from (none: it is unlimited)."""
        key = (user, agent, backend)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= MAX_CACHED_CALLERS:
                self._cache.clear()
            found = self._cache[key] = tuple(self._buckets(user, agent, backend))
        return found

    def _buckets(self, user: str, agent: str, backend: str) -> list[Bucket]:
        found: list[Bucket] = []
        if self._per_user is not None:
            found.append((("u", user), self._per_user))
        if self._per_agent is not None:
            found.append((("a", agent), self._per_agent))
        rate = self._backends.get(backend, self._per_user_backend)
        if rate is not None:
            found.append((("b", backend, user), rate))
        return found

    def take(self, user: str, agent: str, backend: str) -> Awaitable[None] | None:
        """A token from each of the request's buckets, or RateLimited (429, `Retry-After`) taking none. In process
        the answer is immediate (None, or the exception); with Redis it is an awaitable — no coroutine is made for
        the first case, which is every request's when there is no Redis."""
        buckets = self.buckets(user, agent, backend)
        if not buckets:
            return None
        if self._limiter.shared is not None:
            return self._shared_take(buckets, agent, backend)
        refusal = self._limiter.local.take(buckets)
        if refusal is not None:
            self._refuse(refusal, agent, backend)
        return None

    async def _shared_take(self, buckets: tuple[Bucket, ...], agent: str, backend: str) -> None:
        refusal = await self._limiter.take(buckets)
        if refusal is not None:
            self._refuse(refusal, agent, backend)

    def _refuse(self, refusal: Refusal, agent: str, backend: str) -> NoReturn:
        self._on_refused(backend, agent)
        raise RateLimited(
            f"over the rate limit ({refusal.limit}): retry after {refusal.retry_after} s",
            retry_after=refusal.retry_after,
            agent_id=agent,
        )
