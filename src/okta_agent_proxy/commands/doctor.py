"""`okta-agent-proxy doctor`: check a deployment from the outside, the way the gateway will meet it.

Each check prints one line, `✓ <check>: <what was seen>` or `✗ <check>: <what is wrong>` followed by `  fix: …`
(`! config: …` for a configuration warning, `○ <check>: …` for what cannot be verified from here). The check names
are stable: `config`, `issuer metadata`, `issuer jwks`, `front door org metadata`, `front door client auth` and
`front door redirect uri` (with `FRONT_DOOR=on`), `backend NAME mcp`, `backend NAME authorization server`,
`agent NAME key`, `agent NAME key at okta`, `redis` (with `REDIS_URL`). Exit 0 when nothing failed, 1 when a check
failed, 2 when the configuration does not load (as `check`).

This module loads the configuration, runs the probes (`doctor_probes.py`, and `doctor_front_door.py` for the
front door's Okta app) concurrently on one aiohttp session, each bounded by `--timeout`, and prints their results in
a stable order: the issuer, the front door's Okta app, then each backend, then each agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping

import aiohttp
import click

from okta_agent_proxy.commands.doctor_front_door import check_front_door
from okta_agent_proxy.commands.doctor_probes import (
    Result,
    check_agent_at_okta,
    check_backend_as,
    check_backend_mcp,
    check_issuer,
    check_redis,
    fail,
    ok,
    skip,
)
from okta_agent_proxy.config.loader import ConfigError, LoadedConfig, load
from okta_agent_proxy.config.models import CrossAppBackend
from okta_agent_proxy.outbound.discovery import AuthorizationServerInfo
from okta_agent_proxy.outbound.oauth_client import TokenEndpointClient

__all__ = ["doctor_command", "fail", "ok", "run_checks"]

EXIT_FAILED, EXIT_CONFIG = 1, 2


async def check_agents(
    client: TokenEndpointClient,
    loaded: LoadedConfig,
    cross_app: Mapping[str, CrossAppBackend],
    targets: Mapping[str, AuthorizationServerInfo],
) -> list[Result]:
    """For each agent that may reach an okta-cross-app backend: its key, and whether Okta holds its public half."""
    entries: list[tuple[Result, Result | Awaitable[Result]]] = []
    domain = loaded.settings.OKTA_DOMAIN
    for name, agent in loaded.config.agents.items():
        reachable = [b for b in agent.backend_access if b in cross_app]
        if not agent.enabled or agent.private_key is None or not reachable:
            continue
        key = agent.private_key
        with_target = [b for b in reachable if b in targets]
        at_okta: Result | Awaitable[Result]
        if domain and with_target:
            backend = cross_app[with_target[0]]
            at_okta = check_agent_at_okta(client, name, agent, backend, targets[with_target[0]].issuer, domain)
        else:
            why = "OKTA_DOMAIN is not set" if not domain else "no backend authorization server was found"
            at_okta = skip(f"agent {name} key at okta", f"cannot verify here: {why}")
        entries.append((ok(f"agent {name} key", f"{key.algorithm} key parses, kid {key.kid}"), at_okta))
    probed = iter(await asyncio.gather(*(e for _, e in entries if not isinstance(e, Result))))
    return [r for first, e in entries for r in (first, e if isinstance(e, Result) else next(probed))]


async def run_checks(loaded: LoadedConfig, timeout: float) -> list[Result]:
    """Every network check, in the printed order: the issuer, the front door, each enabled backend, each agent."""
    settings = loaded.settings
    backends = {name: backend for name, backend in loaded.config.backends.items() if backend.enabled}
    cross_app = {name: b for name, b in backends.items() if isinstance(b, CrossAppBackend)}
    async with aiohttp.ClientSession() as session:
        client = TokenEndpointClient(session, timeout=timeout)
        issuer, front_door, mcp_results, as_results = await asyncio.gather(
            check_issuer(
                session, settings.OKTA_ISSUER, settings.OKTA_JWKS_URI, timeout, front_door=settings.front_door
            ),
            check_front_door(session, client, settings, timeout),
            asyncio.gather(*(check_backend_mcp(session, name, b, timeout) for name, b in backends.items())),
            asyncio.gather(*(check_backend_as(client, name, b) for name, b in cross_app.items())),
        )
        results = issuer + front_door
        by_name = dict(zip(cross_app, as_results, strict=True))
        for name, mcp_result in zip(backends, mcp_results, strict=True):
            results += [mcp_result, by_name[name][0]] if name in by_name else [mcp_result]
        targets = {name: info for name, (_, info) in by_name.items() if info is not None}
        results += await check_agents(client, loaded, cross_app, targets)
    if settings.REDIS_URL:
        results.append(await check_redis(settings.REDIS_URL, timeout))
    return results


@click.command("doctor")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="YAML path.")
@click.option("--env-file", default=".env", show_default=True, help="The .env file to read.")
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=10.0, show_default=True, help="Per request.")
def doctor_command(config: str | None, env_file: str, timeout: float) -> None:
    """Check env, YAML, Okta, every backend and each agent's key; print ✓/✗ with a fix; exit 1 on a failure."""
    try:
        loaded = load(config, env_file=env_file)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(Result("config", "fail" if problem.severity == "error" else "warn", str(problem)).lines()[0])
        click.echo("    fix: correct each path above in the YAML or the environment (`okta-agent-proxy check`)")
        raise SystemExit(EXIT_CONFIG) from None
    for warning in loaded.warnings:
        click.echo(Result("config", "warn", str(warning)).lines()[0])
    cfg = loaded.config
    click.echo(ok("config", f"{loaded.source}: {len(cfg.backends)} backend(s), {len(cfg.agents)} agent(s)").lines()[0])
    try:
        results = asyncio.run(asyncio.wait_for(run_checks(loaded, timeout), timeout=timeout * 6 + 5))
    except TimeoutError:
        results = [fail("doctor", "the checks did not finish in time", "raise --timeout, or check the network")]
    for result in results:
        for line in result.lines():
            click.echo(line)
    failed = sum(result.status == "fail" for result in results)
    click.echo(f"{failed} check(s) failed" if failed else "all checks passed")
    if failed:
        raise SystemExit(EXIT_FAILED)
