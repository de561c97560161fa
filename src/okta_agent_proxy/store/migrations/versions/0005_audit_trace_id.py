"""`audit_events.trace_id`: the request's OpenTelemetry trace id when tracing is on (DESIGN.md §9), so that an audit
row leads to its trace, and a trace to its row.

Revision ID: 0005
Revises: 0004

One nullable column: rows written before it, with tracing off, and by a replica still on 0004, have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("trace_id", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("trace_id")
