"""What the trainer's tests share: a real document store on the test corpus."""

import pytest

from lorag.retrieval.ingest import ingest
from lorag.retrieval.store import DocumentStore
from lorag.state import Database
from tests.trainer.examples import CORPUS


@pytest.fixture(scope="module")
def search(tmp_path_factory, embedder):
    """The test corpus ingested into namespace "kb" of a real store; (question, k) ->
    its hybrid search's hits, as RAFT and the relevance pairs search."""
    folder = tmp_path_factory.mktemp("corpus-store")
    store = DocumentStore(Database(f"sqlite:///{folder / 'lorag.db'}"), folder / "retrieval",
                          embedder)
    ingest(store, "kb", [CORPUS])
    yield lambda question, k: store.search("kb", question, k=k, mode="hybrid")
    store.close()
    store.db.close()
