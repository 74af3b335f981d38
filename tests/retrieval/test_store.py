"""The document store on a small real corpus (tests/data/corpus) with the real embedder:
ingest, incremental re-ingest, delete, filters inside the search, persistence, and a
SIGKILL in the middle of an ingest. Every test runs on both state backends (the `state`
fixture: SQLite and a real PostgreSQL)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorag.errors import InvalidRequest
from lorag.retrieval.ingest import ingest
from lorag.retrieval.store import DocumentStore
from lorag.state import Database

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


def open_store(state: str, folder: Path, embedder, **options) -> DocumentStore:
    """A document store on the state database at `state`, its index snapshots in
    `folder` (a replica's own)."""
    return DocumentStore(Database(state), folder, embedder, **options)


@pytest.fixture
def store(state, tmp_path, embedder):
    opened = open_store(state, tmp_path / "retrieval", embedder)
    yield opened
    opened.close()
    opened.db.close()


@pytest.mark.slow
def test_ingest_then_reingest_is_incremental(store, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    first = ingest(store, "kb", [corpus])
    assert (first["added"], first["updated"], first["unchanged"], first["failed"]) == (8, 0, 0, [])
    assert store.documents("kb") == ["faq-refunds", "faq-shipping", "faq-versand",
                                     "guides/bakery.txt", "guides/glossary.html",
                                     "guides/handbook.md", "guides/lighthouse.pdf",
                                     "guides/volcanoes.md"]
    again = ingest(store, "kb", [corpus])
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 8)

    bakery = corpus / "guides" / "bakery.txt"
    bakery.write_text(bakery.read_text().replace("6:40", "7:05"))
    changed = ingest(store, "kb", [corpus])
    assert (changed["updated"], changed["unchanged"]) == (1, 7)
    hit = store.search("kb", "When does the bakery open on weekdays?", k=1)[0]
    assert hit.document_id == "guides/bakery.txt" and "7:05" in hit.text and "6:40" not in \
        " ".join(h.text for h in store.search("kb", "bakery opening time", k=10))

    lone = ingest(store, "other", [bakery])
    assert lone["added"] == 1 and store.documents("other") == ["bakery.txt"]


def test_search_finds_the_right_passage_with_its_section(store):
    ingest(store, "kb", [CORPUS])
    hit = store.search("kb", "Which volcano lies under a glacier and causes floods?", k=1)[0]
    assert hit.document_id == "guides/volcanoes.md" and "Katla" in hit.text
    assert hit.metadata["section"] == "Volcanoes of the North Atlantic > Katla"
    knot = store.search("kb", "Which knot makes a loop that will not slip?", k=1)[0]
    assert knot.document_id == "guides/glossary.html" and "bowline" in knot.text
    assert knot.metadata["section"] == "Sailing glossary > Knots"
    assert knot.metadata["title"] == "Sailing glossary" and "console.log" not in knot.text
    light = store.search("kb", "When is the Skerryvore light lit?", k=1)[0]
    assert light.document_id == "guides/lighthouse.pdf" and light.metadata["pages"] == 1
    toll = store.search("kb", "How much is the toll for crossing with a cart?", k=3)
    assert any("seven copper marks" in h.text for h in toll)
    chunks = {h.chunk_id for h in store.search("kb", "ferry rule", k=50)
              if h.document_id == "guides/handbook.md"}
    assert len(chunks) > 3  # the long document was split into several chunks


@pytest.mark.slow
def test_filters_apply_inside_the_search(store):
    ingest(store, "kb", [CORPUS])
    german = store.search("kb", "how long does shipping take", k=3, filters={"lang": "de"})
    assert [h.document_id for h in german] == ["faq-versand"]
    either = store.search("kb", "shipping", k=10, filters={"topic": ["billing", "shipping"]})
    assert {h.document_id for h in either} == {"faq-refunds", "faq-shipping", "faq-versand"}
    assert store.search("kb", "shipping", k=3, filters={"topic": "nothing-has-this"}) == []
    with pytest.raises(InvalidRequest, match="filter key"):
        store.search("kb", "x", filters={"a'); DROP TABLE chunks; --": "x"})


@pytest.mark.slow
def test_a_deleted_document_is_never_found_again(store):
    ingest(store, "kb", [CORPUS])
    assert store.delete("kb", "guides/volcanoes.md") is True
    assert store.delete("kb", "guides/volcanoes.md") is False
    assert all(h.document_id != "guides/volcanoes.md"
               for h in store.search("kb", "Hekla volcano eruption", k=10))


def test_a_reopened_store_has_what_was_stored_and_deleted(store, state, tmp_path, embedder):
    ingest(store, "kb", [CORPUS])
    store.delete("kb", "guides/volcanoes.md")
    reopened = open_store(state, tmp_path / "retrieval", embedder)
    assert "guides/volcanoes.md" not in reopened.documents("kb")
    assert reopened.search("kb", "cardamom bun", k=1)[0].document_id == "guides/bakery.txt"
    assert reopened.drop_namespace("kb") is True and reopened.namespaces() == []


def test_bad_input_is_refused_clearly(store, tmp_path):
    with pytest.raises(InvalidRequest, match="namespace"):
        ingest(store, "../escape", [CORPUS])
    with pytest.raises(InvalidRequest, match="does not exist"):
        ingest(store, "kb", [tmp_path / "missing"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": 3}\n')
    (broken / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (broken / "fake.pdf").write_bytes(b"this is not a pdf at all")
    counts = ingest(store, "kb", [broken])
    reasons = sorted(f["reason"] for f in counts["failed"])
    assert "bad.jsonl:2: needs string 'id' and 'text'" in reasons[0]
    assert "fake.pdf is not a readable PDF" in reasons[1]
    assert "is not UTF-8 text" in reasons[2]
    with pytest.raises(InvalidRequest, match="k must be an integer in 1..100"):
        store.search("kb", "x", k=0)


WRITER = """
import sys
from pathlib import Path
from lorag.retrieval.embedder import Embedder
from lorag.retrieval.store import DocumentStore
from lorag.state import Database
store = DocumentStore(Database(sys.argv[1]), Path(sys.argv[2]), Embedder())
for i in range(1000):
    store.upsert("kb", f"doc-{i}", f"Document number {i} talks about topic {i % 7}. " * 40)
    print(f"done doc-{i}", flush=True)
"""


@pytest.mark.slow
def test_a_kill_during_ingest_loses_nothing_committed(state, tmp_path, embedder):
    folder = tmp_path / "retrieval"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, state, str(folder)],
                              stdout=subprocess.PIPE, text=True)
    done = []
    deadline = time.monotonic() + 300
    while len(done) < 8 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if line.startswith("done "):
            done.append(line.split()[1])
    time.sleep(0.05)  # land somewhere inside the next upsert
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert len(done) == 8

    store = open_store(state, folder, embedder)
    documents = set(store.documents("kb"))
    assert set(done) <= documents  # every upsert that returned is there
    # the snapshot the writer left (its first rebuild) caught up to the database
    stamp = json.loads((folder / "faiss" / "kb.json").read_text())
    derived = store.indexes.catch_up("kb")
    assert stamp["generation"] < derived.generation
    assert derived.index.ntotal == len(derived.texts) == store.counts("kb")[1]
    hits = store.search("kb", "Document number 3 talks about topic 3", k=5)
    assert {h.document_id for h in hits} <= documents


FAULTS = ["the circulation pump overheated", "the inlet valve is stuck closed",
          "the door latch did not engage", "the drain filter is blocked",
          "the heating element failed", "the drum motor stalled",
          "the water level sensor is faulty", "the detergent drawer is jammed"]


@pytest.mark.slow
def test_hybrid_beats_either_mode_alone(store):
    ingest(store, "kb", [CORPUS])
    codes = [f"E{1000 + 137 * i}" for i in range(48)]  # look-alike error codes
    for i, code in enumerate(codes):
        store.upsert("kb", f"err-{code}", f"Error {code} means {FAULTS[i % len(FAULTS)]}; "
                                          "see the service manual.", {"topic": "errors"})
    # exact identifiers (vector search blurs look-alike codes) and paraphrases that share
    # no word with their answer (BM25 has nothing to match)
    queries = [(f"what does error {codes[i]} mean on my washing machine", f"err-{codes[i]}")
               for i in (3, 11, 19, 27, 35, 43)]
    queries += [("When can I get my money back?", "faq-refunds"),
                ("mountain that spews lava in Iceland", "guides/volcanoes.md"),
                ("how fast will my parcel arrive", "faq-shipping"),
                ("where can I buy fresh bread early in the morning", "guides/bakery.txt")]
    found = {mode: sum(want in [h.document_id for h in store.search("kb", q, 1, mode=mode)]
                       for q, want in queries)
             for mode in ("vector", "bm25", "hybrid")}
    print(f"hit@1 over {len(queries)} queries: {found}")
    assert found["hybrid"] > found["vector"] and found["hybrid"] > found["bm25"]
    assert found["hybrid"] == len(queries)
    with pytest.raises(InvalidRequest, match="mode must be one of"):
        store.search("kb", "x", mode="fuzzy")


@pytest.mark.slow
def test_a_large_namespace_switches_to_ivf_and_stays_correct(state, tmp_path, embedder):
    import faiss

    store = open_store(state, tmp_path / "ivf", embedder, ivf_threshold=120, nprobe=4)
    colors = ["red", "green", "blue", "amber", "violet", "grey"]
    places = ["harbor", "forest", "desert", "glacier", "meadow", "canyon", "island"]
    for i in range(130):
        store.upsert("big", f"fact-{i}", f"Fact {i}: the {colors[i % 6]} lantern hangs in "
                                         f"the {places[i % 7]} number {i}.", {"n": i % 2})
    index = store.indexes.catch_up("big").index
    assert faiss.try_extract_index_ivf(index) is not None and index.ntotal == 130
    hit = store.search("big", "Fact 77: the grey lantern in the harbor number 77", k=1)[0]
    assert hit.document_id == "fact-77"
    odd = store.search("big", "lantern", k=20, filters={"n": 1}, mode="vector")
    assert len(odd) == 20 and all(h.metadata["n"] == 1 for h in odd)
    assert store.delete("big", "fact-77")
    reopened = open_store(state, tmp_path / "ivf", embedder, ivf_threshold=120, nprobe=4)
    index = reopened.indexes.catch_up("big").index
    assert faiss.try_extract_index_ivf(index) is not None and index.ntotal == 129
    assert all(h.document_id != "fact-77" for h in reopened.search("big", "Fact 77", k=5))


def test_a_namespace_of_stop_words_alone_searches_to_vector_hits_only(store):
    """Chunks that leave BM25 no term (stop words, digits, punctuation) index nothing
    lexical; the search still answers, from the vectors (found by schema fuzzing: it
    failed with bm25s's `max() arg is an empty sequence`)."""
    documents = [SimpleNamespace(id="zero", text="0", metadata={}),
                 SimpleNamespace(id="the", text="the of and", metadata={})]
    store.put_documents("kb", documents)
    assert store.search("kb", "0", k=5, mode="bm25") == []
    assert {hit.document_id for hit in store.search("kb", "0", k=5)} == {"zero", "the"}
