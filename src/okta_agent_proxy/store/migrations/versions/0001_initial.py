"""Initial schema: audit_events, backends, agents, config_history.

Revision ID: 0001
Revises: (none)

Written out in full rather than derived from `models.py`, so that this revision creates the same tables whatever
the models become later; a test compares the migrated schema with the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", _ROW_ID, autoincrement=True, nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("replica", sa.Text(), nullable=False),
        sa.Column("http_method", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("headers_ms", sa.Double(), nullable=True),
        sa.Column("backend", sa.Text(), nullable=True),
        sa.Column("user_sub", sa.Text(), nullable=True),
        sa.Column("user_uid", sa.Text(), nullable=True),
        sa.Column("token_jti", sa.Text(), nullable=True),
        sa.Column("agent", sa.Text(), nullable=True),
        sa.Column("client_id", sa.Text(), nullable=True),
        sa.Column("mcp_method", sa.Text(), nullable=True),
        sa.Column("mcp_name", sa.Text(), nullable=True),
        sa.Column("jsonrpc_id", sa.Text(), nullable=True),
        sa.Column("credential_method", sa.Text(), nullable=True),
        sa.Column("credential_cache_hit", sa.Boolean(), nullable=True),
        sa.Column("id_jag_jti", sa.Text(), nullable=True),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("arguments", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    for columns in (
        ("time",),
        ("user_sub", "time"),
        ("user_uid", "time"),
        ("agent", "time"),
        ("backend", "time"),
        ("outcome", "time"),
        ("request_id",),
    ):
        op.create_index(f"ix_audit_events_{'_'.join(columns)}", "audit_events", list(columns))

    op.create_table(
        "backends",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("auth_method", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("paths", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("file_hash", sa.Text(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_backends"),
    )
    op.create_table(
        "agents",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("file_hash", sa.Text(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_agents"),
    )
    op.create_table(
        "config_history",
        sa.Column("id", _ROW_ID, autoincrement=True, nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("file_hash", sa.Text(), nullable=False),
        sa.Column("previous_hash", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("replica", sa.Text(), nullable=True),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("snapshot", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_config_history"),
    )
    op.create_index("ix_config_history_time", "config_history", ["time"])


def downgrade() -> None:
    op.drop_table("config_history")
    op.drop_table("agents")
    op.drop_table("backends")
    op.drop_table("audit_events")
