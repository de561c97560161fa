"""Alembic environment: migrate the connection `upgrade()` hands over, or (alembic commands run by a developer, e.g.
`alembic.command.revision(alembic_config(), autogenerate=True, message=…)`) open an async engine on
`DATABASE_URL` / the `sqlalchemy.url` option and run on it.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from okta_agent_proxy.store.models import Model

target_metadata = Model.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copy; later revisions get that for free
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_on_own_engine() -> None:
    from okta_agent_proxy.store.db import create_store_engine, write_transaction

    engine = create_store_engine(context.config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL"))
    try:
        async with write_transaction(engine) as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


def _run_offline() -> None:
    from okta_agent_proxy.store.db import async_database_url

    url = async_database_url(context.config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL"))
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if context.is_offline_mode():
    _run_offline()
elif given is not None:
    _run(given)
else:
    asyncio.run(_run_on_own_engine())
