"""Which scopes a front-door client is granted (DESIGN.md §8, "Scopes") — the one place this is decided.

Allowed = `front_door.default_scopes` ∪ the scopes of every `scopes_by_group` entry whose Okta group is in the ID
token's `groups`. Granted = requested ∩ allowed; nothing requested → everything allowed. A requested scope outside
the allowed set is dropped, not refused: the token response's `scope` says what was granted (RFC 6749 §3.3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from okta_agent_proxy.config.models import FrontDoorConfig


def groups_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    groups = claims.get("groups")
    if not isinstance(groups, list):
        return ()
    return tuple(group for group in groups if isinstance(group, str))


def allowed_scopes(config: FrontDoorConfig, groups: Iterable[str]) -> frozenset[str]:
    allowed = set(config.default_scopes)
    for group in groups:
        allowed.update(config.scopes_by_group.get(group, ()))
    return frozenset(allowed)


def granted_scopes(requested: str | None, allowed: frozenset[str]) -> Sequence[str]:
    if requested is None:
        return sorted(allowed)
    return sorted(set(requested.split()) & allowed)


def supported_scopes(config: FrontDoorConfig, backend_scopes: Iterable[str]) -> frozenset[str]:
    """What the metadata's `scopes_supported` lists: every scope the front door can grant, and those backends ask."""
    scopes = set(config.default_scopes).union(*config.scopes_by_group.values())
    return frozenset(scopes.union(backend_scopes))
