"""The state database (lorag/state): URLs checked, migrations applied (an old data dir's
files included), a newer schema or an unreachable server refused with a clear error."""

import sqlite3

import numpy as np
import pytest
from sqlalchemy import text

from lorag.benchmarks.daemon import free_port
from lorag.errors import InvalidRequest, Unavailable
from lorag.retrieval.store import DocumentStore
from lorag.server.state import AdapterRecord, StateStore
from lorag.state import Database, state_url

# a data dir as lorag wrote it before the state database had migrations: lorag.db with
# tenants and adapters, retrieval/retrieval.db with the documents
LEGACY_STATE = """
CREATE TABLE tenants (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE adapters (tenant TEXT NOT NULL REFERENCES tenants(name), name TEXT NOT NULL,
    path TEXT NOT NULL, shared INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    PRIMARY KEY (tenant, name));
INSERT INTO tenants VALUES ('acme', 1.0);
INSERT INTO adapters VALUES ('acme', 'style', '/adapters/style', 1, 2.0);
"""
LEGACY_RETRIEVAL = """
CREATE TABLE namespaces (name TEXT PRIMARY KEY, generation INTEGER NOT NULL DEFAULT 0,
    shared INTEGER NOT NULL DEFAULT 0);
CREATE TABLE documents (namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
    id TEXT NOT NULL, sha256 TEXT NOT NULL, metadata TEXT NOT NULL,
    PRIMARY KEY (namespace, id));
CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL,
    document_id TEXT NOT NULL, position INTEGER NOT NULL, text TEXT NOT NULL,
    metadata TEXT NOT NULL, embedding BLOB NOT NULL,
    FOREIGN KEY (namespace, document_id) REFERENCES documents(namespace, id)
        ON DELETE CASCADE);
"""
PASSAGES = {"bakery": "The Zephyr Street bakery opens at 6:40 on weekdays.",
            "ferry": "The ferry to Skerry Island leaves the harbour every hour."}


@pytest.mark.parametrize("url, problem", [
    ("mysql://root@localhost/lorag", "state must be sqlite:///PATH or postgresql://"),
    ("sqlite://", "state must be a file"),
    ("not a url at all", "state must be sqlite:///PATH or postgresql://"),
])
def test_a_bad_state_url_says_what_is_allowed(url, problem):
    with pytest.raises(InvalidRequest, match=problem) as error:
        Database(url)
    assert error.value.field == "state"


def test_an_unreachable_postgresql_is_a_clear_error_at_start():
    url = f"postgresql://lorag:secret@127.0.0.1:{free_port()}/lorag"
    with pytest.raises(Unavailable, match="cannot be reached") as error:
        Database(url)
    assert "secret" not in error.value.message and "127.0.0.1" in error.value.message


@pytest.mark.slow
def test_a_schema_newer_than_the_code_is_refused(state):
    db = Database(state)
    with db.write() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    db.close()
    with pytest.raises(InvalidRequest, match="schema version 9999, newer than this lorag "
                                             "knows") as error:
        Database(state)
    assert error.value.field == "state"


@pytest.mark.slow
def test_an_old_data_dir_is_migrated_with_its_documents(tmp_path, embedder):
    old = sqlite3.connect(tmp_path / "lorag.db")
    old.executescript(LEGACY_STATE)
    old.commit()
    (tmp_path / "retrieval").mkdir()
    old = sqlite3.connect(tmp_path / "retrieval" / "retrieval.db")
    old.executescript(LEGACY_RETRIEVAL)
    old.execute("INSERT INTO namespaces VALUES ('acme.kb', 3, 0)")
    vectors = embedder.encode(list(PASSAGES.values()))
    for (name, passage), vector in zip(PASSAGES.items(), vectors, strict=True):
        old.execute("INSERT INTO documents VALUES ('acme.kb', ?, 'x', '{}')", (name,))
        old.execute("INSERT INTO chunks (namespace, document_id, position, text, metadata, "
                    "embedding) VALUES ('acme.kb', ?, 0, ?, '{\"kind\": \"old\"}', ?)",
                    (name, passage, np.asarray(vector, dtype=np.float32).tobytes()))
    old.commit()

    db = Database(state_url(None, tmp_path))  # the default: SQLite in the data dir
    assert StateStore(db).adapters() == [AdapterRecord("acme", "style", "/adapters/style",
                                                       True, "")]
    documents = DocumentStore(db, tmp_path / "retrieval", embedder)
    assert documents.documents("acme.kb") == ["bakery", "ferry"]
    hit = documents.search("acme.kb", "When does the bakery open?", k=1)[0]
    assert hit.document_id == "bakery" and hit.metadata == {"kind": "old"}
    assert documents.search("acme.kb", "ferry", k=1, filters={"kind": "old"})
    # writes go on from the old generation, with ids after the old ones
    documents.upsert("acme.kb", "lighthouse", "The Skerryvore light is lit at dusk.")
    assert documents.generation("acme.kb") == 4
    assert documents.search("acme.kb", "Skerryvore light", k=1)[0].chunk_id == 3
    documents.close()
    db.close()
    reopened = Database(state_url(None, tmp_path))  # migrated once: opens as is
    assert DocumentStore(reopened, tmp_path / "r2", embedder).counts("acme.kb") == (3, 3)
    reopened.close()
