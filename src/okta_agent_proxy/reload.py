"""Reload `config.yaml` without a restart: on SIGHUP, or when the file's content changes (checked every few seconds).

The new file is loaded and checked exactly as at start; if it has any error, every problem is logged and the old
config keeps serving. Otherwise the gateway swaps in a new generation (`Gateway.reload`: nothing in flight is
dropped) and the change goes to `config_history`. The environment (`.env`, settings) is read once at start: a
change there needs a restart, and a reload says so when it sees one.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from okta_agent_proxy.config_loader import ConfigError, LoadedConfig, load
from okta_agent_proxy.gateway import Gateway, replica_id
from okta_agent_proxy.observability.logging import get_logger
from okta_agent_proxy.store.config_store import save_config
from okta_agent_proxy.store.db import Store

log = get_logger(__name__)


class ConfigReloader:
    def __init__(self, gateway: Gateway, loaded: LoadedConfig, store: Store | None, *, poll_seconds: float = 2.0):
        self._gateway = gateway
        self._loaded = loaded
        self._store = store
        self._poll = poll_seconds
        self._lock = asyncio.Lock()

    async def reload(self, reason: str) -> bool:
        """Load the file again and apply it; False (old config kept) if it has errors."""
        async with self._lock:
            current = self._loaded
            assert current.source is not None
            try:
                fresh = await asyncio.to_thread(
                    load,
                    current.source,
                    env_file=current.env_file,
                    overrides=current.settings.model_dump(exclude_unset=True),
                )
            except ConfigError as exc:
                log.error("config_reload_rejected", reason=reason, problems=[str(p) for p in exc.problems])
                return False
            if fresh.source_hash == current.source_hash:
                return True
            await self._gateway.reload(fresh)
            self._loaded = fresh
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
            if digest is None or digest == self._loaded.source_hash:
                continue
            await asyncio.sleep(SETTLE_SECONDS)
            if await _digest(path) == digest:
                await self.reload("file changed")


SETTLE_SECONDS = 0.5


async def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(await asyncio.to_thread(path.read_bytes)).hexdigest()
    except OSError:
        return None  # mid-replace, or gone for a moment: look again next time
