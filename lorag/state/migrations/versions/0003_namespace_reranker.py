"""Namespaces gain a default reranker: the relevance adapter a RAG chat on the namespace
reranks its candidates with, unless the request says otherwise.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("namespaces") as namespaces:
        namespaces.add_column(sa.Column("reranker", sa.String, nullable=True))
