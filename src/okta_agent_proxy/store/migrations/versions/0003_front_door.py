"""The OAuth front door's tables (DESIGN.md §8): clients, pending steps, grants, codes, refresh tokens, consents,
security events, signing keys.

Revision ID: 0003
Revises: 0002

Written out in full rather than derived from `models.py` (like 0001); a test compares the migrated schema with the
models. Only new tables: nothing existing is touched, so a replica still on 0002 keeps working beside one on 0003.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TIME = sa.DateTime(timezone=True)


def _text(name: str, *, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, _TIME, nullable=nullable)


def _index(table: str, *columns: str) -> None:
    op.create_index(f"ix_{table}_{'_'.join(columns)}", table, list(columns))


def upgrade() -> None:
    op.create_table(
        "oauth_clients",
        _text("client_id"),
        _text("kind"),
        _text("client_name", nullable=True),
        sa.Column("redirect_uris", sa.JSON(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=True),
        _time("created_at"),
        _time("last_used_at", nullable=True),
        _time("fetched_at", nullable=True),
        _time("expires_at", nullable=True),
        sa.PrimaryKeyConstraint("client_id", name="pk_oauth_clients"),
        sa.CheckConstraint("kind IN ('registered', 'cimd')", name="ck_oauth_clients_kind"),
    )
    _index("oauth_clients", "created_at")
    _index("oauth_clients", "last_used_at")

    op.create_table(
        "oauth_pending",
        _text("key_hash"),
        _text("purpose"),
        _text("client_id", nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        _time("created_at"),
        _time("expires_at"),
        _time("used_at", nullable=True),
        sa.PrimaryKeyConstraint("key_hash", name="pk_oauth_pending"),
    )
    _index("oauth_pending", "expires_at")

    op.create_table(
        "oauth_grants",
        _text("grant_id"),
        _text("user_sub"),
        sa.Column("user_claims", sa.JSON(), nullable=False),
        _text("client_id"),
        _text("resource"),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("okta_id_token", sa.LargeBinary(), nullable=True),
        _time("okta_id_token_expires_at", nullable=True),
        sa.Column("okta_refresh_token", sa.LargeBinary(), nullable=True),
        _time("okta_refresh_token_expires_at", nullable=True),
        _time("okta_refreshed_at", nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        _text("refresh_lease_holder", nullable=True),
        _time("refresh_lease_until", nullable=True),
        _time("created_at"),
        _time("expires_at"),
        _time("revoked_at", nullable=True),
        _text("revoked_reason", nullable=True),
        sa.PrimaryKeyConstraint("grant_id", name="pk_oauth_grants"),
        sa.ForeignKeyConstraint(
            ["client_id"], ["oauth_clients.client_id"], name="fk_oauth_grants_client_id_oauth_clients"
        ),
    )
    for column in ("user_sub", "client_id", "expires_at", "revoked_at"):
        _index("oauth_grants", column)

    op.create_table(
        "oauth_codes",
        _text("code_hash"),
        _text("grant_id"),
        _text("client_id"),
        _text("redirect_uri"),
        _text("code_challenge"),
        _text("resource"),
        sa.Column("scopes", sa.JSON(), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        _time("used_at", nullable=True),
        sa.PrimaryKeyConstraint("code_hash", name="pk_oauth_codes"),
        sa.ForeignKeyConstraint(
            ["grant_id"],
            ["oauth_grants.grant_id"],
            name="fk_oauth_codes_grant_id_oauth_grants",
            ondelete="CASCADE",
        ),
    )
    _index("oauth_codes", "grant_id")
    _index("oauth_codes", "expires_at")

    op.create_table(
        "oauth_refresh_tokens",
        _text("token_hash"),
        _text("grant_id"),
        _text("parent_hash", nullable=True),
        _time("issued_at"),
        _time("expires_at"),
        _time("rotated_at", nullable=True),
        _text("replaced_by", nullable=True),
        sa.Column("successor_sealed", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_oauth_refresh_tokens"),
        sa.ForeignKeyConstraint(
            ["grant_id"],
            ["oauth_grants.grant_id"],
            name="fk_oauth_refresh_tokens_grant_id_oauth_grants",
            ondelete="CASCADE",
        ),
    )
    for column in ("grant_id", "expires_at", "rotated_at"):
        _index("oauth_refresh_tokens", column)

    op.create_table(
        "oauth_consents",
        _text("user_sub"),
        _text("client_id"),
        _text("backend"),
        sa.Column("scopes", sa.JSON(), nullable=False),
        _time("approved_at"),
        sa.PrimaryKeyConstraint("user_sub", "client_id", "backend", name="pk_oauth_consents"),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["oauth_clients.client_id"],
            name="fk_oauth_consents_client_id_oauth_clients",
            ondelete="CASCADE",
        ),
    )
    _index("oauth_consents", "client_id")

    op.create_table(
        "security_events",
        sa.Column("id", _ROW_ID, autoincrement=True, nullable=False),
        _time("time"),
        _text("kind"),
        _text("replica"),
        _text("client_id", nullable=True),
        _text("user_sub", nullable=True),
        _text("grant_id", nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_security_events"),
    )
    for columns in (("time",), ("kind", "time"), ("user_sub", "time"), ("client_id", "time")):
        _index("security_events", *columns)

    op.create_table(
        "signing_keys",
        _text("kid"),
        _text("algorithm"),
        sa.Column("private_key", sa.LargeBinary(), nullable=False),
        sa.Column("public_jwk", sa.JSON(), nullable=False),
        _text("slot", nullable=True),
        _time("created_at"),
        _time("retired_at", nullable=True),
        sa.PrimaryKeyConstraint("kid", name="pk_signing_keys"),
        sa.UniqueConstraint("slot", name="uq_signing_keys_slot"),
    )
    _index("signing_keys", "retired_at")


def downgrade() -> None:
    for table in (
        "signing_keys",
        "security_events",
        "oauth_consents",
        "oauth_refresh_tokens",
        "oauth_codes",
        "oauth_grants",
        "oauth_pending",
        "oauth_clients",
    ):
        op.drop_table(table)
