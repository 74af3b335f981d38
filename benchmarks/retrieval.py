"""`lorag bench retrieval`: ingest throughput through the store, and search latency and
recall of the FAISS indexes at scale. Prints JSON.

- ingest: synthetic-but-realistic documents (a fictional company's staff, product and
  policy pages) go through the whole store: chunking by the embedder's tokens, MiniLM
  embeddings, SQLite, FAISS. Reports chunks/s, then store search latency (query embedding,
  search, SQLite fetch) in each mode.
- scale: for each size (default 100k and 1M), vectors of the embedder's dimension made
  from the real chunk embeddings above: each a normalised mix of two real chunk vectors
  plus noise, so the set keeps the cluster structure real text has. Queries are real
  embedded questions. Exact (flat) search is the reference; IVF is built by the store's
  own `build_index`, searched at several nprobe. Single-query latency p50/p99 (as a
  request sees it), recall@10 against exact, build time.
- state (with `--state URL`): the same documents through two replicas of the store on one
  state database, the given one (PostgreSQL, say) beside a temporary SQLite file:
  replica A ingests in batches of 50 while replica B follows (notifications where the
  database has them, else polls); ingest rate, B's catch-up lag after A's last commit
  returned, then B's search p50.
"""

import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import select

from lorag.benchmarks.stats import print_json

NAMES = ["Ada Varga", "Bram Okafor", "Cleo Lindqvist", "Dario Mensah", "Elin Takeda",
         "Farid Novak", "Greta Ocampo", "Hugo Brennan", "Ines Kowalski", "Jonas Adeyemi",
         "Kira Halvorsen", "Luca Moreau", "Mira Castellanos", "Nils Fonseca", "Oona Reyes"]
ROLES = ["head of logistics", "lead engineer", "support manager", "finance director",
         "data analyst", "safety officer", "product owner", "recruiter"]
OFFICES = ["Tallinn", "Porto", "Dundee", "Kraków", "Lyon", "Bergen", "Cork", "Graz"]
PRODUCTS = ["Aurora", "Basalt", "Cinder", "Drift", "Ember", "Fjord", "Gale", "Halo"]
TOPICS = ["travel expenses", "remote work", "parental leave", "security badges",
          "equipment returns", "overtime", "training budgets", "incident reports"]


def make_documents(count: int, seed: int = 0) -> list[dict]:
    """Pages of a fictional company: people, product specs and policies."""
    rng = random.Random(seed)
    documents = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            name, role, office = rng.choice(NAMES), rng.choice(ROLES), rng.choice(OFFICES)
            text = (f"{name} is the {role} at the {office} office and joined in "
                    f"{rng.randint(2009, 2025)}. {name} reports to {rng.choice(NAMES)} and "
                    f"owns the {rng.choice(PRODUCTS)} account. ")
        elif kind == 1:
            product = rng.choice(PRODUCTS)
            text = (f"The {product} {rng.randint(2, 9)}00 series weighs "
                    f"{rng.randint(2, 40)} kg, draws {rng.randint(50, 900)} W and ships from "
                    f"{rng.choice(OFFICES)}. Its warranty lasts {rng.randint(1, 5)} years. ")
        else:
            topic = rng.choice(TOPICS)
            text = (f"Policy on {topic}: requests go to the {rng.choice(ROLES)} and are "
                    f"answered within {rng.randint(2, 15)} working days. Exceptions need "
                    f"approval from {rng.choice(NAMES)}. ")
        filler = " ".join(rng.choice(
            ["Records are kept for seven years.", "See the intranet for forms.",
             "Questions go to the help desk.", "This page is reviewed every quarter.",
             "Earlier versions are archived.", "Local law takes precedence."])
            for _ in range(rng.randint(5, 60)))
        documents.append({"id": f"doc-{i:05d}", "text": text + filler,
                          "metadata": {"kind": ["person", "product", "policy"][kind]}})
    return documents


def make_questions(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    forms = [lambda: f"Who is the {rng.choice(ROLES)} in {rng.choice(OFFICES)}?",
             lambda: f"How much does the {rng.choice(PRODUCTS)} weigh?",
             lambda: f"What is the policy on {rng.choice(TOPICS)}?",
             lambda: f"When did {rng.choice(NAMES)} join?"]
    return [rng.choice(forms)() for _ in range(count)]


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def bench_ingest(documents: list[dict], questions: list[str]) -> tuple[dict, np.ndarray]:
    """The whole store: ingest rate, then search latency per mode. Returns the chunk
    embeddings too (the seed of the synthetic vectors at scale)."""
    from lorag.retrieval.embedder import Embedder
    from lorag.retrieval.ingest import Document
    from lorag.retrieval.store import MODES, DocumentStore
    from lorag.state import Database
    from lorag.state.schema import chunks as chunk_table

    embedder = Embedder()
    embedder.encode(["warm up"])
    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite:///{folder}/state.db")
        store = DocumentStore(db, Path(folder), embedder)
        start = time.perf_counter()
        store.put_documents("bench", [Document(d["id"], d["text"], d["metadata"])
                                      for d in documents])
        wall = time.perf_counter() - start
        _, chunks = store.counts("bench")
        with db.read() as connection:
            texts = list(connection.scalars(select(chunk_table.c.text)))
        start = time.perf_counter()
        vectors = embedder.encode(texts)
        embed_wall = time.perf_counter() - start
        search = {}
        for mode in MODES:
            store.search("bench", questions[0], 10, mode=mode)  # builds BM25 once
            times = []
            for question in questions[:100]:
                t = time.perf_counter()
                store.search("bench", question, 10, mode=mode)
                times.append(time.perf_counter() - t)
            search[mode] = percentiles(times)
        store.close()
        db.close()
    return {"documents": len(documents), "chunks": chunks, "wall_s": round(wall, 2),
            "chunks_per_s": round(chunks / wall, 1),
            "embedding_only_chunks_per_s": round(len(texts) / embed_wall, 1),
            "store_search_top10": search}, vectors


def bench_state(state: str, documents: list[dict], questions: list[str],
                poll_s: float = 2.0) -> dict:
    """Two replicas on the state database at `state`: A ingests, B follows and searches."""
    from lorag.retrieval.embedder import Embedder
    from lorag.retrieval.ingest import Document
    from lorag.retrieval.store import DocumentStore
    from lorag.state import Database

    embedder = Embedder()
    embedder.encode(["warm up"])
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as folder:
        a = DocumentStore(Database(state), Path(folder) / "a", embedder)
        b = DocumentStore(Database(state), Path(folder) / "b", embedder)
        a.create(namespace)
        b.search(namespace, "warm up", 1)  # B holds the namespace: it follows it
        follower = b.db.follow(lambda topic, name: b.refresh(name), poll_s)
        try:
            start = time.perf_counter()
            for at in range(0, len(documents), 50):
                a.put_documents(namespace, [Document(d["id"], d["text"], d["metadata"])
                                            for d in documents[at:at + 50]])
            committed = time.perf_counter()
            target = a.generation(namespace)
            while b.generation(namespace) != target:
                time.sleep(0.001)
            lag = time.perf_counter() - committed
            times = []
            for question in questions[:100]:
                t = time.perf_counter()
                b.search(namespace, question, 10)
                times.append(time.perf_counter() - t)
            _, chunks = a.counts(namespace)
        finally:
            follower.stop()
            a.drop_namespace(namespace)
            for store in (a, b):
                store.db.close()
    return {"state": a.db.dialect, "documents": len(documents), "chunks": chunks,
            "ingest_chunks_per_s": round(chunks / (committed - start), 1),
            "catch_up_lag_ms": round(lag * 1e3, 1), "follower_poll_s": poll_s,
            "replica_b_hybrid_search_top10": percentiles(times)}


def synthetic_vectors(seed_vectors: np.ndarray, n: int, rng: np.random.Generator,
                      noise: float = 0.05) -> np.ndarray:
    """n unit vectors, each a random mix of two real chunk vectors plus Gaussian noise."""
    out = np.empty((n, seed_vectors.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        a = seed_vectors[rng.integers(0, len(seed_vectors), m)]
        b = seed_vectors[rng.integers(0, len(seed_vectors), m)]
        w = rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32)
        block = w * a + (1 - w) * b + noise * rng.standard_normal(a.shape, dtype=np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int, nprobe: int = 0) -> tuple[np.ndarray, list]:
    """One query at a time through the store's own search call, as a request runs it."""
    from lorag.retrieval.faiss_index import search_index

    ids, times = [], []
    for query in queries:
        t = time.perf_counter()
        _, found = search_index(index, query[None, :], k, nprobe)
        times.append(time.perf_counter() - t)
        ids.append(found[0])
    return np.stack(ids), times


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(e)) / 10 for f, e in
                                zip(found, exact, strict=True)])), 4)


def bench_scale(n: int, seed_vectors: np.ndarray, queries: np.ndarray,
                nprobes: list[int]) -> dict:
    from lorag.retrieval.faiss_index import build_index

    rng = np.random.default_rng(n)
    start = time.perf_counter()
    vectors = synthetic_vectors(seed_vectors, n, rng)
    ids = np.arange(n, dtype=np.int64)
    generate_s = time.perf_counter() - start

    start = time.perf_counter()
    flat = build_index(vectors, ids, ivf_threshold=n + 1)
    flat_build = time.perf_counter() - start
    exact, flat_times = timed_search(flat, queries, 10)
    result = {"vectors": n, "dim": int(vectors.shape[1]), "generate_s": round(generate_s, 1),
              "flat": {"build_s": round(flat_build, 2),
                       "add_vectors_per_s": round(n / flat_build), **percentiles(flat_times),
                       "recall_at_10": 1.0}}
    del flat
    start = time.perf_counter()
    ivf = build_index(vectors, ids, ivf_threshold=0)
    ivf_build = time.perf_counter() - start
    lists = faiss.extract_index_ivf(ivf).nlist
    rows = []
    for nprobe in nprobes:
        found, times = timed_search(ivf, queries, 10, nprobe)
        rows.append({"nprobe": nprobe, **percentiles(times),
                     "recall_at_10": recall_at_10(found, exact)})
    result["ivf"] = {"lists": lists, "build_s": round(ivf_build, 1),
                     "add_train_vectors_per_s": round(n / ivf_build), "by_nprobe": rows}
    return result


def main(sizes: list[int], documents: int, queries: int, nprobes: list[int],
         json_path: Path | None = None, state: str | None = None) -> dict:
    docs, questions = make_documents(documents), make_questions(queries)
    states = []
    if state:  # the given database beside SQLite, each peer in the same run
        with tempfile.TemporaryDirectory() as folder:
            for url in (f"sqlite:///{folder}/state.db", state):
                states.append(bench_state(url, docs, questions))
                print(json.dumps(states[-1]), file=sys.stderr, flush=True)
    ingest, seed_vectors = bench_ingest(docs, questions)
    from lorag.retrieval.embedder import Embedder

    query_vectors = Embedder().encode(questions)
    result = {"machine": {"faiss_threads": faiss.omp_get_max_threads(),
                          "faiss": faiss.__version__},
              "ingest": ingest, **({"state": states} if states else {}),
              "scale": [bench_scale(n, seed_vectors, query_vectors, nprobes) for n in sizes]}
    print_json(result, json_path)
    return result
