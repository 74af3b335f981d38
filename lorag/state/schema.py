"""The state's tables, as SQLAlchemy Core sees them (the queries are written against
these). Their history, from the first data dir on, is in migrations/versions/; a change
here comes with a new migration there.

- tenants, adapters: who exists, and the adapters each registered. `version` is the
  adapter's content digest at registration: a replica serving an older version reloads.
- namespaces: `generation` is the namespace's change sequence, bumped once per committed
  write; `incarnation` tells a namespace from a dropped one of the same name; tombstones at
  or below `floor` were pruned (a replica behind it rebuilds instead of catching up).
- documents, chunks: the retrieval store. A chunk's `seq` is the generation that wrote it.
- removed_chunks: tombstones, one per chunk a write removed, at that write's generation.
- responses: the Responses API's stored responses (the response object as sent) and the
  chat messages of the conversation up to and including each, for previous_response_id.
- files, batches, batch_lines: the Batch API. A batch's row holds its object as sent
  (`status` beside it, for the runners' queries); each line its request, its state
  (pending, running: `owner` holds it until `lease`, done) and its result.
- rollouts: a tenant's adapter name served by weighted versions (`name@version` adapters);
  rollout_keys: the version each API key was given under the rollout as it is now.
"""

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()
ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite's rowid alias must be INTEGER
DOCUMENT_JSON = JSON().with_variant(JSONB(), "postgresql")

tenants = Table(
    "tenants", metadata,
    Column("name", String, primary_key=True),
    Column("created", Float, nullable=False),
)

adapters = Table(
    "adapters", metadata,
    Column("tenant", String, ForeignKey("tenants.name"), primary_key=True),
    Column("name", String, primary_key=True),
    Column("path", Text, nullable=False),
    Column("shared", Boolean, nullable=False, default=False),
    Column("created", Float, nullable=False),
    Column("version", String, nullable=False, default=""),
)

namespaces = Table(
    "namespaces", metadata,
    Column("name", String, primary_key=True),
    Column("generation", BigInteger, nullable=False, default=0),
    Column("shared", Boolean, nullable=False, default=False),
    Column("incarnation", String, nullable=False),
    Column("floor", BigInteger, nullable=False, default=0),
    # the adapter a RAG chat on this namespace reranks with unless it says otherwise
    Column("reranker", String, nullable=True),
)

documents = Table(
    "documents", metadata,
    Column("namespace", String, ForeignKey("namespaces.name", ondelete="CASCADE"),
           primary_key=True),
    Column("id", String, primary_key=True),
    Column("sha256", String, nullable=False),
    Column("metadata", DOCUMENT_JSON, nullable=False),
)

chunks = Table(
    "chunks", metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("namespace", String, nullable=False),
    Column("document_id", String, nullable=False),
    Column("position", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("metadata", DOCUMENT_JSON, nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    Column("seq", BigInteger, nullable=False),
    ForeignKeyConstraint(["namespace", "document_id"], ["documents.namespace", "documents.id"],
                         ondelete="CASCADE"),
    Index("chunks_by_document", "namespace", "document_id"),
    Index("chunks_by_seq", "namespace", "seq"),
    sqlite_autoincrement=True,  # ids are never reused: FAISS and tombstones name chunks by id
)

removed_chunks = Table(
    "removed_chunks", metadata,
    Column("namespace", String, ForeignKey("namespaces.name", ondelete="CASCADE"),
           primary_key=True),
    Column("chunk_id", ID, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Index("removed_by_seq", "namespace", "seq"),
)

responses = Table(
    "responses", metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String, ForeignKey("tenants.name"), nullable=False),
    Column("created", Float, nullable=False),
    Column("response", DOCUMENT_JSON, nullable=False),
    Column("messages", DOCUMENT_JSON, nullable=False),
)

files = Table(
    "files", metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String, ForeignKey("tenants.name"), nullable=False),
    Column("purpose", String, nullable=False),
    Column("filename", String, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
    Column("content", LargeBinary, nullable=False),
)

batches = Table(
    "batches", metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String, ForeignKey("tenants.name"), nullable=False),
    Column("status", String, nullable=False),
    Column("batch", DOCUMENT_JSON, nullable=False),
)

batch_lines = Table(
    "batch_lines", metadata,
    Column("batch_id", String, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("line", Integer, primary_key=True),
    Column("custom_id", String, nullable=False),
    Column("request", DOCUMENT_JSON, nullable=False),
    Column("status", String, nullable=False),
    Column("owner", String, nullable=True),
    Column("lease", Float, nullable=True),
    Column("result", DOCUMENT_JSON, nullable=True),
    Column("ok", Boolean, nullable=True),  # the result's status was 2xx
    Index("batch_lines_by_status", "status", "batch_id"),
)

rollouts = Table(
    "rollouts", metadata,
    Column("tenant", String, ForeignKey("tenants.name"), primary_key=True),
    Column("name", String, primary_key=True),
    Column("versions", DOCUMENT_JSON, nullable=False),  # {version: weight}
    Column("updated", Float, nullable=False),
)

rollout_keys = Table(
    "rollout_keys", metadata,
    Column("tenant", String, primary_key=True),
    Column("name", String, primary_key=True),
    Column("key_id", String, primary_key=True),
    Column("version", String, nullable=False),
)
