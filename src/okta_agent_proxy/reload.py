"""Reload `config.yaml` without a restart: on SIGHUP, or when the file's content changes (checked every few seconds).

The new file is loaded and checked exactly as at start, with `${NAME}` resolved against the environment snapshot
taken at start (the `.env` file and the environment are read once: the demo, for one, passes its secrets only
then). If it has any error, every problem is logged and the old config keeps serving; the watcher tries each
content of the file once, so a refused file is logged once, not on every poll (SIGHUP always tries, and logs).
Otherwise the gateway swaps in a new generation (`Gateway.reload`: nothing in flight is dropped), the log names
what changed (backends and agents added, removed or changed, and whether the audit settings did — names only,
never values), and the change goes to `config_history`.

What counts as a change is the config's fingerprint: the YAML's bytes and each `{file: …}` secret's bytes. The
watcher looks at the YAML only, so a rotated secret file applies on SIGHUP.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from okta_agent_proxy.config.loader import ConfigError, LoadedConfig, load
from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.gateway import Gateway, replica_id
from okta_agent_proxy.keys import SigningKey
from okta_agent_proxy.observability.logging import get_logger
from okta_agent_proxy.store.config_store import save_config
from okta_agent_proxy.store.db import Store

log = get_logger(__name__)

SETTLE_SECONDS = 0.5
FILE_CHANGED = "file changed"


class ConfigReloader:
    def __init__(
        self,
        gateway: Gateway,
        loaded: LoadedConfig,
        store: Store | None,
        *,
        poll_seconds: float = 2.0,
        settle_seconds: float = SETTLE_SECONDS,
    ):
        self._gateway = gateway
        self._loaded = loaded
        self._store = store
        self._poll = poll_seconds
        self._settle = settle_seconds
        self._lock = asyncio.Lock()
        self._yaml_tried = loaded.source_hash  # the YAML content last loaded, whether applied or refused

    async def reload(self, reason: str) -> bool:
        """Load the file again and apply it; False (old config kept) if it has errors."""
        async with self._lock:
            current = self._loaded
            assert current.source is not None
            try:
                fresh = await asyncio.to_thread(
                    load,
                    current.source,
                    environ=current.environ,
                    env_file=current.env_file,
                    overrides=current.settings.model_dump(),  # every setting as at start (read once)
                )
            except ConfigError as exc:
                if exc.sources is not None and exc.sources.yaml_hash is not None:
                    self._yaml_tried = exc.sources.yaml_hash
                log.error("config_reload_rejected", reason=reason, problems=[str(p) for p in exc.problems])
                return False
            self._yaml_tried = fresh.source_hash
            if fresh.fingerprint == current.fingerprint:
                log.info("config_reload_unchanged", reason=reason)
                return True
            await self._gateway.reload(fresh)
            self._loaded = fresh
            log.info("config_changed", reason=reason, **changed_names(current.config, fresh.config))
            for warning in fresh.warnings:
                log.warning("config_warning", problem=str(warning))
            if self._store is not None and fresh.source_hash is not None:
                await save_config(
                    self._store.engine,
                    fresh.config,
                    file_hash=fresh.source_hash,
                    source=f"{fresh.source} ({reason})",
                    replica=replica_id(),
                )
            return True

    async def watch(self) -> None:
        """Reload whenever the file's bytes change and then stay the same for a moment; runs until cancelled.

        The pause matters: an editor or `>` truncates the file before writing it, and a half-written file may well
        be valid YAML (an empty one is: no backends) — applying it would take every route down for a moment."""
        assert self._loaded.source is not None
        path = Path(self._loaded.source)
        while True:
            await asyncio.sleep(self._poll)
            digest = await _digest(path)
            if digest is None or digest == self._yaml_tried:
                continue
            await asyncio.sleep(self._settle)
            if await _digest(path) == digest:
                self._yaml_tried = digest  # even if the load stops before reading it (then `reload` says so once)
                await self.reload(FILE_CHANGED)


def changed_names(old: GatewayConfig, new: GatewayConfig) -> dict[str, Any]:
    """What a reload changes, by name: `backends_added`, `…_removed`, `…_changed`, the same for agents, and
    `audit_changed`, `rate_limits_changed`, `front_door_changed`. Never a value: a rotated secret shows as its
    backend or agent having changed."""
    changes: dict[str, Any] = {}
    for section, before, after in (
        ("backends", old.backends, new.backends),
        ("agents", old.agents, new.agents),
    ):
        changes[f"{section}_added"] = sorted(after.keys() - before.keys())
        changes[f"{section}_removed"] = sorted(before.keys() - after.keys())
        changes[f"{section}_changed"] = sorted(
            name for name in before.keys() & after.keys() if _comparable(before[name]) != _comparable(after[name])
        )
    for section in ("audit", "rate_limits", "front_door"):
        changes[f"{section}_changed"] = _comparable(getattr(old, section)) != _comparable(getattr(new, section))
    return changes


def _comparable(value: Any) -> Any:
    """A value that compares equal when the config means the same (a loaded private key object never compares
    equal to another load of the same key: it is compared by its kid, algorithm and public key). In memory only."""
    if isinstance(value, BaseModel):
        return tuple((name, _comparable(getattr(value, name))) for name in type(value).model_fields)
    if isinstance(value, SecretStr):
        return ("secret", value.get_secret_value())
    if isinstance(value, SigningKey):
        return ("key", value.kid, value.algorithm, sorted(value.public_jwk().items()))
    if isinstance(value, Mapping):
        return tuple(sorted((str(key), _comparable(item)) for key, item in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        items = [_comparable(item) for item in value]
        return tuple(sorted(items, key=repr) if isinstance(value, set | frozenset) else items)
    return value


async def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(await asyncio.to_thread(path.read_bytes)).hexdigest()
    except OSError:
        return None  # mid-replace, or gone for a moment: look again next time
