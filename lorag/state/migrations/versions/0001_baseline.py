"""Baseline: tenants and adapter records, as the first data dirs had them (lorag.db).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("created", sa.Float, nullable=False))
    op.create_table(
        "adapters",
        sa.Column("tenant", sa.String, sa.ForeignKey("tenants.name"), primary_key=True),
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("shared", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created", sa.Float, nullable=False))
