"""`audit_events.agent_evidence`: how the request's agent was identified (DESIGN.md §8, "Agents": the audit row says
whether a front-door client's identity was verified — its metadata document's URL — or only declared).

Revision ID: 0004
Revises: 0003

One nullable column: rows written before it, and by a replica still on 0003, have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("agent_evidence", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("agent_evidence")
