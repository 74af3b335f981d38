"""Rollouts: a tenant's adapter name served by weighted versions of it (`name@version`
registrations), and which version each API key was given, so every replica splits
requests the same way and a key stays on its version.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
DOCUMENT_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("tenant", sa.String, sa.ForeignKey("tenants.name"), primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("versions", DOCUMENT_JSON, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_table(
        "rollout_keys",
        sa.Column("tenant", sa.String, primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("key_id", sa.String, primary_key=True),
        sa.Column("version", sa.String, nullable=False),
    )
