"""Outages of the emulated Okta, for tests: `FaultyOktaEmulator` is the devkit `OktaEmulator` with one aiohttp
middleware in front of every server's `/v1/keys` and `/v1/token` that counts their requests and can answer them the
way an outage would.

- `/v1/keys` (`set_jwks_mode`): "ok"; "down" (503 with Okta's error body and `Retry-After: 1`); "slow" (the JWKS
  after a delay); "garbage" (200, `application/json`, a body that is not JSON).
- `/v1/token` (`set_token_endpoint_mode`): "ok", "down" or "slow", at every server or at one.
- `jwks_fetches`, `token_requests`: by server id, every request the endpoint received whatever the mode answered.

The middleware goes in through the emulator's public `middlewares` argument, so the product's emulator (`./run demo`,
`okta-agent-proxy demo idp`, the bench) carries no failure modes. A request for a server the org does not have is
passed on untouched and uncounted: the emulator answers it with Okta's 404.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, get_args

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from okta_agent_proxy.devkit.okta_emulator import ORG, OktaEmulator
from okta_agent_proxy.devkit.okta_emulator_oauth import okta_error

__all__ = ["FaultyOktaEmulator", "JwksMode", "TokenEndpointMode", "okta_endpoint"]

JwksMode = Literal["ok", "down", "slow", "garbage"]
TokenEndpointMode = Literal["ok", "down", "slow"]
Endpoint = Literal["keys", "token"]
_ROUTES: dict[tuple[str, str], Endpoint] = {("GET", "keys"): "keys", ("POST", "token"): "token"}


def okta_endpoint(request: web.Request) -> Endpoint | None:
    """ "keys" or "token" when the emulator routes `request` to a server's `/v1/keys` or `/v1/token`, else None."""
    if request.match_info.http_exception is not None or "/v1/" not in request.path:
        return None
    return _ROUTES.get((request.method, request.path.rpartition("/v1/")[2]))


class FaultyOktaEmulator(OktaEmulator):
    """The devkit emulator, with outages a test switches on and counts of what its key and token endpoints received."""

    def __init__(
        self,
        *,
        jwks_delay_seconds: float = 5.0,
        token_delay_seconds: float = 5.0,
        middlewares: Sequence[Middleware] = (),
        **options: Any,
    ) -> None:
        """`jwks_delay_seconds`, `token_delay_seconds`: how long "slow" answers wait. `middlewares` run outside the
        fault injection (so they see the requests it answers); `options` are `OktaEmulator`'s."""
        self._jwks_mode: JwksMode = "ok"
        self._jwks_delay_seconds = jwks_delay_seconds
        self._token_modes: dict[str | None, TokenEndpointMode] = {None: "ok"}  # by server id; None: the others
        self._token_delay_seconds = token_delay_seconds
        self.jwks_fetches: Counter[str] = Counter()
        """Requests to each server's `/v1/keys`, whatever the JWKS mode answered."""
        self.token_requests: Counter[str] = Counter()
        """Requests to each server's `/v1/token`, successful or not."""
        super().__init__(middlewares=[*middlewares, self._inject_faults], **options)

    def set_jwks_mode(self, mode: JwksMode, *, delay_seconds: float | None = None) -> None:
        """How every `/v1/keys` answers from now on: "ok"; "down" (503); "slow" (the JWKS after `delay_seconds`,
        default the constructor's `jwks_delay_seconds`); "garbage" (200, `application/json`, a body that is not JSON).
        """
        if mode not in get_args(JwksMode):
            raise ValueError(f"unknown JWKS mode {mode!r}")
        self._jwks_mode = mode
        if delay_seconds is not None:
            self._jwks_delay_seconds = delay_seconds

    def set_token_endpoint_mode(
        self, mode: TokenEndpointMode, *, delay_seconds: float | None = None, auth_server_id: str | None = None
    ) -> None:
        """How `/v1/token` answers from now on: "ok", "down" (503) or "slow" (after `delay_seconds`, default the
        constructor's `token_delay_seconds`). Only at `auth_server_id` (`ORG` or a custom id) if given, else at all
        servers (forgetting per-server modes)."""
        if mode not in get_args(TokenEndpointMode):
            raise ValueError(f"unknown token endpoint mode {mode!r}")
        self._token_modes = {**self._token_modes, auth_server_id: mode} if auth_server_id else {None: mode}
        if delay_seconds is not None:
            self._token_delay_seconds = delay_seconds

    @web.middleware
    async def _inject_faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint, server_id = okta_endpoint(request), request.match_info.get("id", ORG)
        if endpoint is None or not self._has_server(server_id):
            return await handler(request)
        if endpoint == "keys":
            self.jwks_fetches[server_id] += 1
            if self._jwks_mode == "garbage":
                return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="application/json")
            mode, delay = self._jwks_mode, self._jwks_delay_seconds
        else:
            self.token_requests[server_id] += 1
            mode, delay = self._token_modes.get(server_id, self._token_modes[None]), self._token_delay_seconds
        if mode == "down":
            body = okta_error("E0000009", "Service unavailable (emulated outage)")
            return web.Response(status=503, text=body, content_type="application/json", headers={"Retry-After": "1"})
        if mode == "slow":
            await asyncio.sleep(delay)
        return await handler(request)

    def _has_server(self, auth_server_id: str) -> bool:
        try:
            self.issuer(auth_server_id)
        except KeyError:
            return False
        return True
