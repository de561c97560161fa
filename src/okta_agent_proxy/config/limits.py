"""The `rate_limits:` section (DESIGN.md §9): request budgets (token buckets per user, per agent and per user on a
backend) and the caps on open SSE streams. Only data here; `policy/rate_limits.py` and `mcp/stream_slots.py` enforce
them.
"""

from __future__ import annotations

from pydantic import Field

from okta_agent_proxy.config.strict import Strict


class StreamLimits(Strict):
    """Open SSE streams (GET, and POST answered as SSE) at most, per replica (DESIGN.md §9)."""

    per_user_agent: int = Field(100, ge=1, description="Open streams of one user through one agent.")
    per_backend: int = Field(800, ge=1, description="Open streams to one backend.")


MAX_RATE = 100_000_000


class RequestRate(Strict):
    """A token bucket (DESIGN.md §9): it holds `burst` requests and refills at `requests_per_minute`; each request
    takes one, and a request that finds none is refused with 429 until the next one is in."""

    # Bounded all the same: more than 100 million a minute is no budget at all, and more likely a typo.
    requests_per_minute: int = Field(
        ge=1, le=MAX_RATE, description="Requests a minute, sustained: the bucket's refill rate."
    )
    burst: int | None = Field(
        None,
        ge=1,
        le=MAX_RATE,
        description="Requests at once after a quiet spell: the bucket's size (default requests_per_minute).",
    )

    @property
    def capacity(self) -> int:
        return self.requests_per_minute if self.burst is None else self.burst


class RateLimits(Strict):
    """Request budgets and stream caps (DESIGN.md §9). Every budget is optional: one not set is unlimited. A request
    takes one token from each budget that applies to it, or none when one is empty (429 `rate_limited`). Budgets are
    shared by every replica through Redis when `REDIS_URL` is set; otherwise each process has the whole of each."""

    per_user: RequestRate | None = Field(
        None, description="Budget of one user (the token's uid, else its sub) across every agent and backend."
    )
    per_agent: RequestRate | None = Field(None, description="Budget of one agent, all its users together.")
    per_user_backend: RequestRate | None = Field(
        None, description="Budget of one user on each backend (one listed under `backends` has its own instead)."
    )
    backends: dict[str, RequestRate] = Field(
        default_factory=dict,
        description="Backend name → the budget of one user on that backend, in place of per_user_backend.",
    )
    streams: StreamLimits = Field(StreamLimits(), description="Caps on open SSE streams; over → 429.")

    @property
    def limits_requests(self) -> bool:
        """Whether any request budget is set (else the request path does no rate-limit work at all)."""
        return bool(self.per_user or self.per_agent or self.per_user_backend or self.backends)
