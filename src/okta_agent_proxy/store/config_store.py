"""The loaded config in the database: `backends` and `agents` as loaded, and each change in `config_history`.

Nothing secret is written. `public_view` turns the config into JSON by an allow-list of value types: a `SecretStr`
(pre-shared keys, passwords, client secrets) becomes `"(secret)"`, an agent's signing key its `kid` and algorithm,
a password inside a URL `***`, and any type it does not know its type name — never its `str()`. A rotated secret is
therefore invisible in the diff; the file's SHA-256 still changes, and a change of file alone is recorded too.

`save_config` is called at start and on every reload. It compares the new view with the one the latest history row
recorded; when neither the view nor the file hash changed (another replica, or a restart, got there first) it
writes nothing. It runs under a lock — a PostgreSQL transaction-level advisory lock, SQLite's write lock — so
replicas starting together record a change once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr
from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from okta_agent_proxy.config.models import GatewayConfig
from okta_agent_proxy.keys import SigningKey
from okta_agent_proxy.store.db import write_transaction
from okta_agent_proxy.store.models import agents, backends, config_history

__all__ = [
    "SECRET",
    "ConfigChange",
    "config_changes",
    "config_file_hash",
    "config_snapshot",
    "diff",
    "public_view",
    "save_config",
]

SECRET = "(secret)"
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"okta-agent-proxy/config").digest()[:8], "big", signed=True)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def config_file_hash(data: bytes) -> str:
    """The SHA-256 (hex) of the YAML file's bytes, as recorded in `config_history.file_hash`."""
    return hashlib.sha256(data).hexdigest()


def _mask_url(value: str) -> str:
    if "@" not in value or "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def public_view(value: Any) -> Any:
    """A JSON value of `value` that holds no secret (see the module docstring)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, SecretStr):
        return SECRET
    if isinstance(value, SigningKey):
        return {"kid": value.kid, "algorithm": value.algorithm}
    if isinstance(value, BaseModel):
        return {name: public_view(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(key): public_view(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [public_view(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((public_view(item) for item in value), key=repr)
    return f"<{type(value).__name__}>"


def config_snapshot(config: GatewayConfig) -> dict[str, Any]:
    """The secret-free view of the whole config: `{"backends": {…}, "agents": {…}, "audit": {…}}`."""
    view: dict[str, Any] = public_view(config)
    return view


def diff(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """JSON-Patch-like operations from `old` to `new`: `add`, `remove` or `change` at a dotted `path`."""
    if isinstance(old, dict) and isinstance(new, dict):
        operations: list[dict[str, Any]] = []
        for key in sorted(old.keys() | new.keys()):
            where = f"{path}.{key}" if path else key
            if key not in old:
                operations.append({"op": "add", "path": where, "new": new[key]})
            elif key not in new:
                operations.append({"op": "remove", "path": where, "old": old[key]})
            else:
                operations += diff(old[key], new[key], where)
        return operations
    return [] if old == new else [{"op": "change", "path": path, "old": old, "new": new}]


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One `config_history` row."""

    id: int
    time: datetime
    file_hash: str
    previous_hash: str | None
    source: str | None
    replica: str | None
    operations: list[dict[str, Any]]


async def save_config(
    engine: AsyncEngine,
    config: GatewayConfig,
    *,
    file_hash: str,
    source: str | None = None,
    replica: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> ConfigChange | None:
    """Store `config` (loaded from a file with SHA-256 `file_hash`); returns the change recorded, or None."""
    snapshot = config_snapshot(config)
    now = clock()
    async with write_transaction(engine) as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        latest = (
            (await connection.execute(select(config_history).order_by(config_history.c.id.desc()).limit(1)))
            .mappings()
            .first()
        )
        previous: dict[str, Any] = latest["snapshot"] if latest is not None else {}
        previous_hash: str | None = latest["file_hash"] if latest is not None else None
        operations = diff(previous, snapshot)
        if latest is not None and not operations and previous_hash == file_hash:
            return None
        await connection.execute(delete(backends))
        await connection.execute(delete(agents))
        backend_rows = [
            {
                "name": name,
                "url": view["url"],
                "auth_method": view["auth_method"],
                "enabled": view["enabled"],
                "paths": view["paths"],
                "config": view,
                "file_hash": file_hash,
                "updated_at": now,
            }
            for name, view in snapshot["backends"].items()
        ]
        agent_rows = [
            {
                "name": name,
                "client_id": view["client_id"],
                "enabled": view["enabled"],
                "config": view,
                "file_hash": file_hash,
                "updated_at": now,
            }
            for name, view in snapshot["agents"].items()
        ]
        if backend_rows:
            await connection.execute(insert(backends), backend_rows)
        if agent_rows:
            await connection.execute(insert(agents), agent_rows)
        history = {
            "time": now,
            "file_hash": file_hash,
            "previous_hash": previous_hash,
            "source": source,
            "replica": replica,
            "changes": operations,
            "snapshot": snapshot,
        }
        row_id = (await connection.execute(insert(config_history).returning(config_history.c.id), history)).scalar_one()
    return ConfigChange(row_id, now, file_hash, previous_hash, source, replica, operations)


async def config_changes(engine: AsyncEngine, *, last: int = 20) -> list[ConfigChange]:
    """The `last` recorded changes, oldest first."""
    statement = select(config_history).order_by(config_history.c.id.desc()).limit(last)
    async with engine.connect() as connection:
        rows = (await connection.execute(statement)).mappings().all()
    return [
        ConfigChange(r["id"], r["time"], r["file_hash"], r["previous_hash"], r["source"], r["replica"], r["changes"])
        for r in reversed(rows)
    ]
