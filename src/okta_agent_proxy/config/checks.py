"""The checks that look across the configuration's sections and settings, and `Problem`, what every check reports.

No single model can see these: references between backends, agents and their rules, route clashes, budgets for
backends that do not exist or for callers nobody authenticates, and settings that the YAML (or each other) needs.
`loader.load` runs them all; each returns a list of problems, errors and warnings, and never quotes a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from okta_agent_proxy.config.models import Agent, CrossAppBackend, GatewayConfig
from okta_agent_proxy.config.settings import Settings, is_loopback_host


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


def cross_check(config: GatewayConfig, *, front_door: bool = False) -> list[Problem]:
    """Problems no single model can see: references between backends and agents, and route clashes. With the
    front door on, an agent without a key can still reach Cross App Access backends for front-door callers (the
    gateway's own Okta app signs then): only a warning."""
    problems: list[Problem] = []
    seen_paths: dict[str, str] = {}
    for name, backend in config.backends.items():
        for index, route in enumerate(backend.paths):
            other = seen_paths.setdefault(route, name)
            if other != name:
                problems.append(Problem(f"backends.{name}.paths[{index}]", f"{route} is also a path of {other}"))
            elif backend.paths.index(route) != index:
                problems.append(Problem(f"backends.{name}.paths[{index}]", f"{route} is listed twice"))
    seen_ids: dict[str, str] = {}
    for name, agent in config.agents.items():
        if agent.private_key is not None and agent.private_key.is_published_example:
            problems.append(
                Problem(
                    f"agents.{name}.private_key",
                    "the example key from env.template is public; make your own",
                    "warning",
                )
            )
        for cid in agent.caller_client_ids:
            other = seen_ids.setdefault(cid, name)
            if other != name:
                problems.append(Problem(f"agents.{name}", f"client id {cid} also identifies agent {other}"))
        for index, backend_name in enumerate(agent.backend_access):
            where = f"agents.{name}.backend_access[{index}]"
            target = config.backends.get(backend_name)
            if target is None:
                problems.append(Problem(where, f"backend {backend_name} is not defined", "warning"))
            elif isinstance(target, CrossAppBackend) and agent.private_key is None:
                if front_door:
                    message = f"none: only front-door callers through this agent can reach {backend_name}"
                    problems.append(Problem(f"agents.{name}.private_key", message, "warning"))
                else:
                    problems.append(
                        Problem(
                            f"agents.{name}.private_key",
                            f"required: the agent may reach okta-cross-app backend {backend_name}",
                        )
                    )
        problems += _access_rule_problems(config, name, agent)
    default_agent = config.front_door.default_agent
    if default_agent is not None and default_agent not in config.agents:
        problems.append(Problem("front_door.default_agent", f"agent {default_agent} is not defined"))
    for backend_name in config.rate_limits.backends:
        if backend_name not in config.backends:  # a misspelt name: the budget it meant to set never applies
            why = f"backend {backend_name} is not defined: this budget never applies"
            problems.append(Problem(f"rate_limits.backends.{backend_name}", why, "warning"))
    return problems


def _access_rule_problems(config: GatewayConfig, name: str, agent: Agent) -> list[Problem]:
    """Warnings for DESIGN.md §7 rules that cannot do what they seem to: a rule for a backend that is not defined or
    that the agent cannot reach (it never applies), an empty `allow` (it hides everything), and an `allow` glob that
    is also in `deny` verbatim (deny wins: it matches nothing)."""
    problems: list[Problem] = []
    sections = (
        ("tool_access", "tool", agent.tool_access),
        ("resource_access", "resource", agent.resource_access),
        ("prompt_access", "prompt", agent.prompt_access),
    )
    for section, noun, rules in sections:
        for backend_name, rule in rules.items():
            where = f"agents.{name}.{section}.{backend_name}"
            if backend_name not in config.backends:
                problems.append(Problem(where, f"backend {backend_name} is not defined", "warning"))
            elif backend_name not in agent.backend_access:
                why = f"{backend_name} is not in this agent's backend_access: the rule can never apply"
                problems.append(Problem(where, why, "warning"))
            if rule.allow == ():
                why = f"hides every {noun} of {backend_name} from agent {name}; use deny: ['*'] to say so"
                problems.append(Problem(f"{where}.allow", why, "warning"))
            for index, glob in enumerate(rule.allow or ()):
                if glob in rule.deny:
                    why = f"{glob} is also in deny, which wins: this entry matches nothing"
                    problems.append(Problem(f"{where}.allow[{index}]", why, "warning"))
    return problems


def check_cross_app_settings(config: GatewayConfig, settings: Settings) -> list[Problem]:
    """Cross App Access needs the Okta org (step 1) and a verified caller (the subject token and the agent): an Okta
    token (OKTA_ISSUER) or, with the front door on, the ID token the front door holds."""
    names = [name for name, backend in config.backends.items() if isinstance(backend, CrossAppBackend)]
    needed = ("OKTA_DOMAIN",) if settings.front_door else ("OKTA_DOMAIN", "OKTA_ISSUER")
    return [
        Problem(
            f"env {variable}",
            f"not set: okta-cross-app backends ({', '.join(names)}) answer 502 token_exchange_failed without it",
            "warning",
        )
        for variable in needed
        if names and not getattr(settings, variable)
    ]


def check_front_door(config: GatewayConfig, settings: Settings) -> list[Problem]:
    """With FRONT_DOOR on, warn when no dynamically registered client could ever be an agent (the settings' own
    refusals are in `check_settings_consistency`, reported even when the YAML does not load)."""
    if not settings.front_door:
        return []
    if config.front_door.default_agent is None and not any(agent.client_names for agent in config.agents.values()):
        why = (
            "not set, and no agent has client_names: a dynamically registered client is no agent and gets 403 "
            "(only CIMD clients and those in an agent's inbound_client_ids get through)"
        )
        return [Problem("front_door.default_agent", why, "warning")]
    return []


def check_request_budgets(config: GatewayConfig, settings: Settings) -> list[Problem]:
    """Request budgets count users and agents; with no inbound identity (no OKTA_ISSUER, the front door off) no
    caller is authenticated, so no budget ever applies (only the per-backend stream cap does): a warning."""
    limits = config.rate_limits
    if settings.authenticates or not limits.limits_requests:
        return []
    named = [name for name in ("per_user", "per_agent", "per_user_backend") if getattr(limits, name) is not None]
    named += ["backends"] if limits.backends else []
    why = (
        f"budgets set ({', '.join(named)}) apply to nobody: they count users and agents, and without OKTA_ISSUER "
        "(or FRONT_DOOR on) no caller is authenticated"
    )
    return [Problem("rate_limits", why, "warning")]


def check_settings_consistency(settings: Settings) -> list[Problem]:
    """Problems between settings; with FRONT_DOOR on, an error per setting the front door cannot run with (so serve
    refuses to start, as `check` does)."""
    problems = [Problem(f"env {variable}", reason) for variable, reason in settings.front_door_refusals()]
    if settings.replicated and settings.SESSION_SECRET is None:
        why = "not set, while REDIS_URL or a PostgreSQL DATABASE_URL suggests replicas: serve refuses to start"
        problems.append(Problem("env SESSION_SECRET", why, "warning"))
    for name in ("OKTA_DOMAIN", "OKTA_ISSUER", "OKTA_JWKS_URI"):
        value = getattr(settings, name)
        if not value:
            continue
        url = value if "://" in value else f"https://{value}"
        parts = urlsplit(url)
        if parts.scheme != "https" and not is_loopback_host(parts.hostname):
            problems.append(Problem(f"env {name}", "must use https (plain http only on loopback hosts)"))
    issuer = settings.OKTA_ISSUER
    if not settings.authenticates:
        problems.append(
            Problem(
                "env OKTA_ISSUER",
                "not set (nor FRONT_DOOR on): callers are not authenticated, and serve listens on loopback "
                "addresses only",
                "warning",
            )
        )
    elif issuer and "/oauth2/" not in issuer:
        problems.append(
            Problem(
                "env OKTA_ISSUER",
                "looks like the org authorization server; its access tokens are for Okta's own APIs. "
                "Use a custom authorization server (…/oauth2/<id>)",
                "warning",
            )
        )
    return problems
