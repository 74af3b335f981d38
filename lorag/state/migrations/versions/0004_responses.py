"""Stored responses of the Responses API (`store: true`): each tenant's, with the
conversation they close, so that `previous_response_id` continues it on any replica.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
DOCUMENT_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("response", DOCUMENT_JSON, nullable=False),
        sa.Column("messages", DOCUMENT_JSON, nullable=False),
    )
