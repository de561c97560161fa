"""Request budgets (DESIGN.md §9): the token buckets' arithmetic on an injected clock, checked against an independent
restatement (GCRA over exact fractions); the Lua script against a real Redis, answer for answer the same as the
in-process buckets; all-or-none in both; key names and TTLs in Redis; local limits when Redis does not answer; the
YAML and `check`'s warning.

Redis is the shared server of the suite (`OAP_TEST_REDIS_URL`): every test's user, agent and backend names carry a
fresh uuid, so parallel runs never touch each other's buckets.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from okta_agent_proxy.config.checks import cross_check
from okta_agent_proxy.config.limits import RateLimits
from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.errors import RateLimited
from okta_agent_proxy.policy.rate_limits import (
    KEY_PREFIX,
    Bucket,
    Key,
    LocalBuckets,
    Rate,
    RateLimiter,
    RedisBuckets,
    Refusal,
    RequestLimits,
    redis_key,
)
from okta_agent_proxy.store.redis import RedisLink
from tests.support.processes import LOOPBACK, free_port
from tests.support.redis_servers import own_redis, shared_redis_url
from tests.unit.helpers import printed, run_check

TICK = 1 / 1024  # a step of the test clock: binary fractions of a second add up exactly, as the model's do


@dataclass
class Clock:
    now: float = 1_000_000.0  # seconds

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}"


def bucket(key: str, per_minute: int, burst: int, limit: str = "per_user") -> Bucket:
    return ((limit, key), Rate(limit, per_minute, burst))


def allowed(answers: Sequence[Refusal | None]) -> int:
    return sum(answer is None for answer in answers)


# ---------------------------------------------------------------- the arithmetic, in process


def test_a_fresh_bucket_gives_its_burst_at_once_then_refuses_until_the_next_token() -> None:
    buckets, user = LocalBuckets(Clock()), [bucket("u", per_minute=6, burst=3)]
    assert allowed([buckets.take(user) for _ in range(3)]) == 3
    refusal = buckets.take(user)
    assert refusal == Refusal("per_user", 10.0)  # 6 a minute: one every 10 s
    assert refusal.retry_after == 10


def test_a_bucket_refills_at_requests_per_minute_over_60_a_second() -> None:
    clock = Clock()
    buckets, user = LocalBuckets(clock), [bucket("u", per_minute=6, burst=1)]
    assert buckets.take(user) is None
    clock.advance(10 - TICK)
    assert buckets.take(user) == Refusal("per_user", TICK)  # a tick short
    clock.advance(TICK)
    assert buckets.take(user) is None
    clock.advance(25)  # two and a half tokens, but a burst of 1
    assert buckets.take(user) is None
    assert buckets.take(user) == Refusal("per_user", 10.0)


def test_a_quiet_spell_refills_up_to_burst_and_no_more() -> None:
    clock = Clock()
    buckets, user = LocalBuckets(clock), [bucket("u", per_minute=60, burst=2)]
    assert allowed([buckets.take(user) for _ in range(5)]) == 2
    clock.advance(3600)
    assert allowed([buckets.take(user) for _ in range(5)]) == 2


@pytest.mark.parametrize(
    ("seconds", "retry_after"),
    [(1e-6, 1), (1 - 1e-6, 1), (1.0, 1), (1 + 1e-6, 2), (60 / 7, 9), (60.0, 60)],
)
def test_retry_after_is_the_wait_rounded_up_and_at_least_one_second(seconds: float, retry_after: int) -> None:
    assert Refusal("per_user", seconds).retry_after == retry_after


@pytest.mark.parametrize(("per_minute", "retry_after"), [(7, 9), (60, 1), (6000, 1), (1, 60)])
def test_retry_after_of_an_empty_bucket(per_minute: int, retry_after: int) -> None:
    buckets, user = LocalBuckets(Clock()), [bucket("u", per_minute, burst=1)]
    buckets.take(user)
    refusal = buckets.take(user)
    assert refusal is not None and refusal.retry_after == retry_after


@pytest.mark.parametrize("tight_first", [True, False])
def test_a_request_refused_by_one_bucket_takes_nothing_from_the_others(tight_first: bool) -> None:
    buckets = LocalBuckets(Clock())
    tight, roomy = bucket("u", 1, burst=1), bucket("a", 1, burst=3, limit="per_agent")
    both = [tight, roomy] if tight_first else [roomy, tight]
    assert buckets.take(both) is None
    assert buckets.take(both) == Refusal("per_user", 60.0)
    assert buckets.take(both) == Refusal("per_user", 60.0)
    # Only the first take spent a token of `roomy`: two are left.
    assert allowed([buckets.take([roomy]) for _ in range(3)]) == 2


def test_the_refusal_names_the_bucket_that_waits_longest() -> None:
    buckets = LocalBuckets(Clock())
    fast, slow = bucket("u", 60, burst=1), bucket("a", 6, burst=1, limit="per_agent")
    assert buckets.take([fast, slow]) is None
    assert buckets.take([fast, slow]) == Refusal("per_agent", 10.0)  # the request waits for both


def test_buckets_full_again_are_dropped_from_memory_once_a_minute() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    for index in range(1000):
        buckets.take([bucket(f"idle-{index}", per_minute=60, burst=1)])  # full again a second later
    slow = [bucket("slow", per_minute=1, burst=2)]
    assert allowed([buckets.take(slow), buckets.take(slow)]) == 2  # empty: full again in two minutes
    clock.advance(59)
    assert buckets.take([bucket("busy", per_minute=60, burst=5)]) is None
    assert len(buckets) == 1002  # not yet a minute
    clock.advance(1)
    assert buckets.take([bucket("busy", per_minute=60, burst=5)]) is None
    assert len(buckets) == 2  # the one still filling, and the one just taken from
    assert buckets.take(slow) is None  # the one token it has refilled: remembered, not reset to full
    assert buckets.take(slow) == Refusal("per_user", 60.0)


def test_beyond_the_cap_the_oldest_buckets_go() -> None:
    buckets = LocalBuckets(Clock(), max_buckets=10)
    for index in range(50):
        assert buckets.take([bucket(f"u{index}", per_minute=1, burst=1)]) is None
        assert len(buckets) <= 10
    assert buckets.take([bucket("u49", 1, 1)]) is not None  # remembered: still empty
    assert buckets.take([bucket("u0", 1, 1)]) is None  # forgotten (the price of bounded memory): full again


def test_at_the_cap_a_runaway_callers_empty_bucket_is_kept_and_scans_are_rare() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock, max_buckets=100)
    hot = [bucket("runaway", per_minute=1, burst=3)]
    for _ in range(3):
        assert buckets.take(hot) is None
    assert buckets.take(hot) is not None  # empty: a minute from its next token
    sweeps = 0
    sweep = buckets._sweep

    def counting(now: float) -> None:
        nonlocal sweeps
        sweeps += 1
        sweep(now)

    buckets._sweep = counting  # type: ignore[method-assign]  # counts the scans, the real one runs
    for index in range(1000):  # many callers, each a token short of full for a second
        assert buckets.take([bucket(f"u{index}", per_minute=60, burst=2)]) is None
        assert len(buckets) <= 100
    assert buckets.take(hot) is not None  # not forgotten: the emptiest bucket is the last to go
    assert sweeps <= 1000 // 10 + 1  # at most one scan per tenth of the cap


# ---------------------------------------------------------------- an independent restatement: GCRA, exactly


@dataclass
class Gcra:
    """The generic cell rate algorithm (ITU-T I.371), over exact fractions of a second: a key's theoretical arrival
    time moves on by the emission interval T = 60/rpm with each request taken, and a request at t conforms while
    TAT − t ≤ τ = (burst − 1)·T. Equivalent to a token bucket of `burst` by its definition, not by our code."""

    tat: dict[Key, Fraction] = field(default_factory=dict)

    def take(self, now: Fraction, buckets: Sequence[Bucket]) -> list[tuple[Fraction, str]]:
        """The (seconds late, limit) of each bucket that refuses, in order; none: every one conformed (and moved)."""
        late = [
            (self.tat.get(key, now) - now - (r.burst - 1) * Fraction(60, r.per_minute), r.limit) for key, r in buckets
        ]
        refusing = [(seconds, limit) for seconds, limit in late if seconds > 0]
        if not refusing:
            for key, r in buckets:
                self.tat[key] = max(self.tat.get(key, now), now) + Fraction(60, r.per_minute)
        return refusing


requests_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=30 * 1024),  # ticks since the previous request
        st.lists(st.sampled_from(range(4)), min_size=1, max_size=3, unique=True),  # which buckets it takes from
    ),
    min_size=1,
    max_size=60,
)
rates_st = st.lists(
    st.tuples(st.integers(min_value=1, max_value=600), st.integers(min_value=1, max_value=5)), min_size=4, max_size=4
)


@settings(max_examples=300, deadline=None)
@given(rates=rates_st, requests=requests_st)
def test_the_buckets_agree_with_gcra(rates: list[tuple[int, int]], requests: list[tuple[int, list[int]]]) -> None:
    pool = [bucket(f"key-{index}", rpm, burst, f"limit-{index}") for index, (rpm, burst) in enumerate(rates)]
    clock, model = Clock(), Gcra()
    buckets = LocalBuckets(clock)
    for gap, chosen in requests:
        clock.advance(gap * TICK)
        taken = [pool[index] for index in chosen]
        answer = buckets.take(taken)
        refusing = model.take(Fraction(clock.now), taken)
        if not refusing:
            assert answer is None
            continue
        # The wait is the exact one, rounded once to a double; the first of the longest is named.
        longest = max(seconds for seconds, _ in refusing)
        assert answer == Refusal(next(limit for seconds, limit in refusing if seconds == longest), float(longest))
        assert answer.retry_after == max(1, math.ceil(longest))


# ---------------------------------------------------------------- the Lua script, against a real Redis


@pytest.fixture
async def link() -> AsyncIterator[RedisLink]:
    errors: list[str] = []
    made = RedisLink(shared_redis_url(), on_error=errors.append)
    try:
        yield made
    finally:
        await made.close()
        assert errors == [], "Redis failed during a test that needs it"


@pytest.fixture
async def raw() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(shared_redis_url())
    try:
        yield client
    finally:
        await client.aclose()


async def test_the_script_answers_as_the_local_buckets_do(link: RedisLink) -> None:
    answers: list[Refusal | None] = []
    for seed in range(3):
        rng = random.Random(seed)
        clock = Clock()
        local, shared = LocalBuckets(clock), RedisBuckets(link, clock)
        users, backends = [fresh("user") for _ in range(3)], [fresh("backend") for _ in range(2)]
        rates = {key: (rng.randint(1, 120), rng.randint(1, 4)) for key in [*users, *backends, "agent"]}
        agent = fresh("agent")
        for _ in range(150):
            clock.advance(rng.choice([0, 0, rng.uniform(0, 3), rng.uniform(0, 60)]))  # any double: the same ops
            user, backend = rng.choice(users), rng.choice(backends)
            request = [
                bucket(f"u:{user}", *rates[user]),
                bucket(f"a:{agent}", *rates["agent"], limit="per_agent"),
                bucket(f"b:{backend}:{user}", *rates[backend], limit="per_user_backend"),
            ]
            request = rng.sample(request, rng.randint(1, 3))
            answer = await shared.take(request)
            assert answer == local.take(request)
            answers.append(answer)
    assert 50 < allowed(answers) < len(answers) - 50  # both answers, many times


@pytest.mark.parametrize("tight_first", [True, False])
async def test_the_script_takes_all_or_none(link: RedisLink, raw: redis.asyncio.Redis, tight_first: bool) -> None:
    shared = RedisBuckets(link, Clock())
    tight, roomy = bucket(fresh("u"), 1, burst=1), bucket(fresh("a"), 1, burst=3, limit="per_agent")
    both = [tight, roomy] if tight_first else [roomy, tight]
    assert await shared.take(both) is None
    before = await raw.hgetall(redis_key(roomy[0]))
    assert await shared.take(both) == Refusal("per_user", 60.0)
    assert await raw.hgetall(redis_key(roomy[0])) == before  # not written at all
    assert allowed([await shared.take([roomy]) for _ in range(3)]) == 2


async def test_on_redis_time_a_burst_is_allowed_then_refused(link: RedisLink) -> None:
    shared = RedisBuckets(link)  # no clock: the server's TIME, as in production
    user = [bucket(fresh("u"), per_minute=1, burst=3)]
    assert allowed([await shared.take(user) for _ in range(3)]) == 3
    refusal = await shared.take(user)
    assert refusal is not None and refusal.limit == "per_user"
    assert 59 < refusal.seconds <= 60
    assert refusal.retry_after == 60


async def test_keys_are_hashed_and_expire_once_the_bucket_is_full_again(
    link: RedisLink, raw: redis.asyncio.Redis
) -> None:
    email = f"{uuid.uuid4().hex}@example.com"
    user = bucket(f"u:{email}", per_minute=6, burst=2)
    assert await RedisBuckets(link).take([user]) is None
    key = redis_key(user[0])
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 32 and email not in key
    assert set(await raw.hgetall(key)) == {b"l", b"s"}
    assert 9_000 < await raw.pttl(key) <= 10_000  # one token short of 2: full again in 10 s
    assert [k async for k in raw.scan_iter(match=f"*{email.split('@')[0]}*")] == []


async def test_a_healthy_redis_leaves_the_local_buckets_alone(link: RedisLink) -> None:
    limiter = RateLimiter(link)
    user = [bucket(fresh("u"), per_minute=1, burst=2)]
    assert allowed([await limiter.take(user) for _ in range(4)]) == 2
    assert len(limiter.local) == 0


async def test_without_redis_the_local_buckets_decide() -> None:
    errors: list[str] = []
    unreachable = RedisLink(f"redis://{LOOPBACK}:{free_port()}/0", on_error=errors.append)
    try:
        limiter = RateLimiter(unreachable)
        user = [bucket(fresh("u"), per_minute=1, burst=2)]
        answers = [await limiter.take(user) for _ in range(4)]
        assert [answer is None for answer in answers] == [True, True, False, False]  # limited, not unlimited
        assert len(limiter.local) == 1
        assert "rate_limit" in errors
    finally:
        await unreachable.close()


async def test_when_redis_stops_the_local_buckets_take_over() -> None:
    with own_redis() as server:
        link = RedisLink(server.url)
        try:
            limiter = RateLimiter(link)
            user = [bucket(fresh("u"), per_minute=1, burst=2)]
            assert allowed([await limiter.take(user) for _ in range(3)]) == 2  # Redis's budget, spent
            assert len(limiter.local) == 0
            server.stop()
            answers = [await limiter.take(user) for _ in range(3)]
            assert allowed(answers) == 2  # the process's own budget: its own burst, then refusals
            assert len(limiter.local) == 1
        finally:
            await link.close()


# ---------------------------------------------------------------- which buckets a request takes from


def limits(**yaml: Any) -> RateLimits:
    return RateLimits.model_validate(yaml)


def test_a_request_takes_from_every_budget_that_applies() -> None:
    config = limits(
        per_user={"requests_per_minute": 600, "burst": 100},
        per_agent={"requests_per_minute": 6000},
        per_user_backend={"requests_per_minute": 300, "burst": 50},
        backends={"ledger": {"requests_per_minute": 60, "burst": 10}},
    )
    request_limits = RequestLimits(config, RateLimiter(clock=Clock()))
    employees = request_limits.buckets("alice", "claude", "employees")
    ledger = request_limits.buckets("alice", "claude", "ledger")
    assert [rate for _, rate in employees] == [
        Rate("per_user", 600, 100),
        Rate("per_agent", 6000, 6000),  # burst defaults to requests_per_minute
        Rate("per_user_backend", 300, 50),
    ]
    assert ledger[2][1] == Rate("backends.ledger", 60, 10)
    assert employees[0][0] == ledger[0][0] and employees[1][0] == ledger[1][0]  # one user, one agent
    assert employees[2][0] != ledger[2][0]


def test_a_backend_without_a_budget_is_not_limited_at_all() -> None:
    limiter = RateLimiter(clock=Clock())
    request_limits = RequestLimits(limits(backends={"ledger": {"requests_per_minute": 1}}), limiter)
    assert request_limits.buckets("alice", "claude", "employees") == ()
    for _ in range(5):
        assert request_limits.take("alice", "claude", "employees") is None
    assert len(limiter.local) == 0
    assert request_limits.take("alice", "claude", "ledger") is None  # decided at once, in process
    assert len(limiter.local) == 1


def test_over_a_budget_is_429_rate_limited_with_retry_after_and_counted() -> None:
    refused: list[tuple[str, str]] = []
    config = limits(per_user={"requests_per_minute": 2, "burst": 1})
    request_limits = RequestLimits(config, RateLimiter(clock=Clock()), lambda *labels: refused.append(labels))
    request_limits.take("alice", "claude", "employees")
    with pytest.raises(RateLimited) as raised:
        request_limits.take("alice", "claude", "employees")
    error = raised.value
    assert (error.status, error.code, error.agent_id) == (429, "rate_limited", "claude")
    assert error.headers["Retry-After"] == "30"
    assert refused == [("employees", "claude")]
    assert request_limits.take("bob", "claude", "employees") is None  # another user: a budget of their own


async def test_with_redis_the_answer_is_awaited(link: RedisLink) -> None:
    refused: list[tuple[str, str]] = []
    config = limits(per_user={"requests_per_minute": 2, "burst": 1})
    request_limits = RequestLimits(config, RateLimiter(link), lambda *labels: refused.append(labels))
    user = fresh("alice")
    first = request_limits.take(user, "claude", "employees")
    assert first is not None
    await first
    second = request_limits.take(user, "claude", "employees")
    assert second is not None
    with pytest.raises(RateLimited) as raised:
        await second
    assert raised.value.headers["Retry-After"] == "30"
    assert refused == [("employees", "claude")]


# ---------------------------------------------------------------- the YAML, and `check`

DESIGN_EXAMPLE = {
    "per_user": {"requests_per_minute": 600, "burst": 100},
    "per_agent": {"requests_per_minute": 6000},
    "per_user_backend": {"requests_per_minute": 300, "burst": 50},
    "backends": {"ledger": {"requests_per_minute": 60, "burst": 10}},
}


def test_the_design_example_loads_and_streams_keep_their_defaults() -> None:
    config = limits(**DESIGN_EXAMPLE)
    assert config.limits_requests
    assert config.per_agent is not None and config.per_agent.capacity == 6000
    assert (config.streams.per_user_agent, config.streams.per_backend) == (100, 800)
    assert not limits().limits_requests  # no section: no request budget


@pytest.mark.parametrize(
    "bad",
    [
        {"per_user": {"requests_per_minute": 0}},
        {"per_user": {"requests_per_minute": 10, "burst": 0}},
        {"per_user": {"burst": 10}},
        {"per_user": {"requests_per_minute": 10, "bursts": 5}},
        {"per_users": {"requests_per_minute": 10}},
        {"backends": {"ledger": {"requests_per_minute": 10, "extra": 1}}},
    ],
)
def test_bad_budgets_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="rate_limits"):
        GatewayConfig.model_validate({"rate_limits": bad})


def test_check_warns_of_a_budget_for_a_backend_that_does_not_exist(tmp_path: Path) -> None:
    backend = {"url": "http://localhost:9001/mcp", "paths": ["/ledger"], "auth_method": "pre-shared-key"}
    document = {
        "backends": {"ledger": {**backend, "auth_config": {"key": "${PSK}"}}},
        "rate_limits": {"backends": {"ledger": {"requests_per_minute": 6}, "ledgr": {"requests_per_minute": 6}}},
    }
    assert [p.path for p in cross_check(GatewayConfig.model_validate(document))] == ["rate_limits.backends.ledgr"]
    result = run_check(tmp_path, document, ["OKTA_ISSUER=https://example.okta.com/oauth2/aus1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stderr, "warning") == {"rate_limits.backends.ledgr"}


def test_check_warns_that_budgets_apply_to_nobody_when_no_caller_is_authenticated(tmp_path: Path) -> None:
    backend = {"url": "http://localhost:9001/mcp", "paths": ["/ledger"], "auth_method": "pre-shared-key"}
    document: dict[str, Any] = {
        "backends": {"ledger": {**backend, "auth_config": {"key": "${PSK}"}}},
        "rate_limits": {"per_agent": {"requests_per_minute": 6}, "backends": {"ledger": {"requests_per_minute": 6}}},
    }
    (tmp_path / "budgets").mkdir()
    result = run_check(tmp_path / "budgets", document)  # no OKTA_ISSUER, the front door off
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stderr, "warning") == {"env OKTA_ISSUER", "rate_limits"}
    assert "warning: rate_limits: budgets set (per_agent, backends) apply to nobody" in result.stderr
    (tmp_path / "streams").mkdir()  # the stream caps alone are no request budget: no warning
    result = run_check(tmp_path / "streams", {**document, "rate_limits": {"streams": {"per_backend": 10}}})
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed(result.stderr, "warning") == {"env OKTA_ISSUER"}
