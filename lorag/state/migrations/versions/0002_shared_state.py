"""Shared state: the retrieval store joins the state database, with a change sequence.

Adapter records gain a content `version`. Namespaces, documents and chunks move in (they
had their own file, retrieval/retrieval.db); a namespace's `generation` becomes its change
sequence (each chunk records the one that wrote it, `removed_chunks` the ones that removed
chunks), so replicas catch up on changes instead of rebuilding. A SQLite data dir from
before keeps its documents: they are copied over from retrieval/retrieval.db beside it,
which is left in place, unused.

Revision ID: 0002
Revises: 0001
"""

import logging
import sqlite3
import uuid
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
log = logging.getLogger("lorag.state")
ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
DOCUMENT_JSON = sa.JSON().with_variant(JSONB(), "postgresql")
BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("adapters") as adapters:
        adapters.add_column(sa.Column("version", sa.String, nullable=False,
                                      server_default=""))
    op.create_table(
        "namespaces",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("generation", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("shared", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("incarnation", sa.String, nullable=False),
        sa.Column("floor", sa.BigInteger, nullable=False, server_default="0"))
    op.create_table(
        "documents",
        sa.Column("namespace", sa.String, sa.ForeignKey("namespaces.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("sha256", sa.String, nullable=False),
        sa.Column("metadata", DOCUMENT_JSON, nullable=False))
    op.create_table(
        "chunks",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("namespace", sa.String, nullable=False),
        sa.Column("document_id", sa.String, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("metadata", DOCUMENT_JSON, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(["namespace", "document_id"],
                                ["documents.namespace", "documents.id"], ondelete="CASCADE"),
        sqlite_autoincrement=True)
    op.create_index("chunks_by_document", "chunks", ["namespace", "document_id"])
    op.create_index("chunks_by_seq", "chunks", ["namespace", "seq"])
    op.create_table(
        "removed_chunks",
        sa.Column("namespace", sa.String, sa.ForeignKey("namespaces.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("chunk_id", ID, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False))
    op.create_index("removed_by_seq", "removed_chunks", ["namespace", "seq"])
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.engine.url.database:
        legacy = Path(bind.engine.url.database).parent / "retrieval" / "retrieval.db"
        if legacy.is_file():
            _import_legacy(bind, legacy)


def _import_legacy(bind, path: Path) -> None:
    """Copy namespaces, documents and chunks from a data dir's old retrieval.db (read-only;
    ATTACH is not allowed inside the migration's transaction)."""
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        generations = dict(source.execute("SELECT name, generation FROM namespaces"))
        copies = [
            ("namespaces", "SELECT name, generation, shared, generation FROM namespaces",
             ("name", "generation", "shared", "floor")),
            ("documents", "SELECT namespace, id, sha256, metadata FROM documents",
             ("namespace", "id", "sha256", "metadata")),
            ("chunks", "SELECT id, namespace, document_id, position, text, metadata, "
             "embedding FROM chunks ORDER BY id",
             ("id", "namespace", "document_id", "position", "text", "metadata",
              "embedding")),
        ]
        for table, query, columns in copies:
            cursor = source.execute(query)
            while rows := cursor.fetchmany(BATCH):
                values = [dict(zip(columns, row, strict=True)) for row in rows]
                if table == "namespaces":
                    for value in values:
                        value["incarnation"] = uuid.uuid4().hex
                if table == "chunks":  # every old chunk: written at or before the current
                    for value in values:
                        value["seq"] = generations[value["namespace"]]
                bind.execute(sa.table(table, *map(sa.column, values[0])).insert(), values)
        log.info("copied %d namespaces from %s into the state database", len(generations),
                 path)
    finally:
        source.close()

