"""SQLite: `audit_events.time` as integer microseconds since the Unix epoch (was DATETIME text); PostgreSQL: nothing.

Revision ID: 0002
Revises: 0001

The time is a key of six indexes on the busiest table; as an integer it is cheaper to make and to compare than the
text "YYYY-MM-DD HH:MM:SS.ffffff" (`models.EpochMicroseconds`). Rows already stored are converted in place, then
the column is declared BIGINT (SQLite alters a column by copying the table; its indexes are made again).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# "YYYY-MM-DD HH:MM:SS[.ffffff]" (naive UTC, as SQLAlchemy stores DATETIME) → microseconds since the epoch; a
# fraction shorter than six digits is padded ("…:05.5" is 500 000 µs).
_TO_MICROSECONDS = """
    UPDATE audit_events SET time = CAST(strftime('%s', substr(time, 1, 19)) AS INTEGER) * 1000000
        + CAST(substr(substr(time, 21) || '000000', 1, 6) AS INTEGER)
    WHERE typeof(time) = 'text'
"""
_TO_TEXT = """
    UPDATE audit_events SET time = strftime('%Y-%m-%d %H:%M:%S', time / 1000000, 'unixepoch')
        || printf('.%06d', time % 1000000)
    WHERE typeof(time) = 'integer'
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(_TO_MICROSECONDS)
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column(
            "time", existing_type=sa.DateTime(timezone=True), type_=sa.BigInteger(), existing_nullable=False
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column(
            "time", existing_type=sa.BigInteger(), type_=sa.DateTime(timezone=True), existing_nullable=False
        )
    op.execute(_TO_TEXT)
