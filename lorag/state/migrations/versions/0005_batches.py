"""The Batch API: uploaded files (batch input, and the output and error files a batch
writes), batches, and each batch's lines, claimed by the replica that runs them.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
DOCUMENT_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("purpose", sa.String, nullable=False),
        sa.Column("filename", sa.String, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("batch", DOCUMENT_JSON, nullable=False),
    )
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String, sa.ForeignKey("batches.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("custom_id", sa.String, nullable=False),
        sa.Column("request", DOCUMENT_JSON, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("owner", sa.String, nullable=True),
        sa.Column("lease", sa.Float, nullable=True),
        sa.Column("result", DOCUMENT_JSON, nullable=True),
        sa.Column("ok", sa.Boolean, nullable=True),
    )
    op.create_index("batch_lines_by_status", "batch_lines", ["status", "batch_id"])
