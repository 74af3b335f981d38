"""Reranking on the serving engine: POST /v1/rerank in vLLM's and llama.cpp's shape, and
`rag.rerank` on chat completions (per request, or a namespace's default reranker), on each
backend's daemon. A pair's score is P("yes") / (P("yes") + P("no")) of the answer's first
token on the relevance adapter (here the base or a test adapter: what a trained relevance
adapter ranks is measured by `lorag bench rag` and the demo). The tiny model of the fast
lane puts neither word among its likeliest tokens, so its scores tie at 0.5 and ties keep
the input order; the scores themselves are checked on the real model (e2e). Named by the
embedding model, a reranker scores by late interaction on the real embedder (each
document's best sentence), the same on either backend. `rag.rerank` orders by the
search's order fused with the reranker's."""

import json

import grpc
import httpx
import pytest
import torch
from peft import PeftModel

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.client import DaemonClient
from lorag.errors import InvalidRequest
from lorag.evaluation.generate import EvalOptions
from lorag.evaluation.generate import evaluate as generate
from lorag.evaluation.retrieval import evaluate
from lorag.models import load_base
from lorag.retrieval.rerank import (
    RERANK_CANDIDATES,
    fused,
    relevance,
    relevance_messages,
    sentence_scores,
    sentences,
)
from lorag.server.chat_template import render_chat
from lorag.server.engine.sampling import MAX_LOGPROBS
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BASE, BOB, LocalDaemon, embedding_model

QUERY = "When does the bakery on Zephyr Street open?"
DOCUMENTS = ["The Zephyr Street bakery opens at seven every morning.",
             "Hekla is a volcano in the south of Iceland.",
             "Invoices are paid within thirty days.",
             "Fresh bread is baked on Zephyr Street before dawn."]
KB = [{"id": f"doc-{i}", "text": text} for i, text in enumerate(DOCUMENTS)]


def post(daemon, path: str, body: dict, key: str = ALICE) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers={"Authorization": key},
                      timeout=120)


def rerank(daemon, key: str = ALICE, **fields) -> httpx.Response:
    return post(daemon, "/v1/rerank", {"model": BASE, "query": QUERY, "documents": DOCUMENTS,
                                       **fields}, key)


@pytest.fixture(scope="module")
def relevance_adapter(daemon):
    """A test adapter registered for alice as "judge" (any adapter scores; a trained
    relevance adapter scores well)."""
    response = post(daemon, "/v1/adapters", {"name": "judge",
                                            "path": str(daemon.adapters / "style")})
    assert response.status_code == 200, response.text
    return "judge"


@pytest.fixture(scope="module")
def kb(daemon):
    response = post(daemon, "/v1/namespaces/rerank-kb/documents", {"documents": KB})
    assert response.status_code == 200, response.text
    return "rerank-kb"


def test_results_come_most_relevant_first_with_each_documents_index_and_text(daemon):
    response = rerank(daemon)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in results)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4 * 20
    assert body["model"] == BASE and body["id"].startswith("rerank-")


def test_top_n_keeps_the_best_and_documents_may_be_objects(daemon):
    whole = rerank(daemon).json()["results"]
    response = rerank(daemon, top_n=2, return_documents=False,
                      documents=[{"text": text} for text in DOCUMENTS])
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [
        {"index": r["index"], "relevance_score": r["relevance_score"]} for r in whole[:2]]


def test_a_document_longer_than_the_context_is_cut_to_fit(daemon):
    response = rerank(daemon, documents=["bread " * 3000, DOCUMENTS[0]])
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


REFUSALS = [
    ("no-documents", {"documents": []}, 400, "documents"),
    ("empty-query", {"query": ""}, 400, "query"),
    ("blank-query", {"query": "   "}, 400, "query"),
    ("negative-top-n", {"top_n": -1}, 400, "top_n"),
    ("unknown-model", {"model": "nobody-has-this"}, 404, "model"),
    ("too-many", {"documents": ["x"] * 257}, 413, "documents"),
    ("query-too-long", {"query": "why " * 4000}, 400, "query"),
]


@pytest.mark.parametrize(("body", "status", "param"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_a_bad_rerank_request_names_its_field(daemon, body, status, param):
    response = rerank(daemon, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_another_tenants_adapter_is_not_found(daemon, relevance_adapter):
    response = rerank(daemon, BOB, model=relevance_adapter)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


# ---- rag.rerank on chat completions ----

def ask(daemon, rag: dict, key: str = ALICE) -> httpx.Response:
    return post(daemon, "/v1/chat/completions", {
        "model": BASE, "max_tokens": 2, "temperature": 0, "rag": rag,
        "messages": [{"role": "user", "content": QUERY}]}, key)


@pytest.mark.parametrize("reranker", ["adapter", "embedder"])
def test_rag_rerank_packs_the_top_k_by_fused_order_and_reports_its_time(
        daemon, kb, relevance_adapter, reranker):
    model = relevance_adapter if reranker == "adapter" else embedding_model(daemon)
    response = ask(daemon, {"namespace": kb, "top_k": 2, "rerank": True,
                            "rerank_model": model})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rag"]["reranker"] == model
    assert body["rag"]["timing"]["rerank_ms"] > 0 and body["rag"]["timing"]["search_ms"] > 0
    candidates = post(daemon, f"/v1/namespaces/{kb}/search",
                      {"query": QUERY, "top_k": RERANK_CANDIDATES}).json()["data"]
    scores = [0.0] * len(candidates)
    for result in rerank(daemon, model=model,
                         documents=[hit["text"] for hit in candidates]).json()["results"]:
        scores[result["index"]] = result["relevance_score"]
    assert [s["document_id"] for s in body["sources"]] == [
        candidates[i]["document_id"] for i in fused(scores)[:2]]


def test_the_embedder_reranks_by_each_documents_best_sentence(daemon, embedder):
    buried = ("Hekla is a volcano. Invoices are paid within thirty days. The Zephyr Street "
              "bakery opens at seven every morning.")
    documents = ["Bread is sold in many shops across the city.", buried]
    response = rerank(daemon, model=embedding_model(daemon), documents=documents)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body["results"]] == [1, 0]
    expected, _ = sentence_scores(embedder, QUERY, documents)
    assert [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])] \
        == pytest.approx(expected, abs=2e-3)
    read = [QUERY, documents[0], *sentences(buried)]  # each sentence is one text
    assert body["usage"]["prompt_tokens"] == sum(
        map(len, embedder.tokenizer(read)["input_ids"]))


def test_without_rerank_the_timing_has_no_rerank_stage(daemon, kb):
    body = ask(daemon, {"namespace": kb, "top_k": 2}).json()
    assert body["rag"]["reranker"] is None and body["rag"]["timing"]["rerank_ms"] is None


def test_a_namespaces_default_reranker_applies_unless_a_request_turns_it_off(
        daemon, kb, relevance_adapter):
    url = f"{daemon.url}/v1/namespaces/{kb}"
    set_default = httpx.put(url, json={"reranker": relevance_adapter},
                            headers={"Authorization": ALICE})
    assert set_default.status_code == 200, set_default.text
    try:
        listed = httpx.get(f"{daemon.url}/v1/namespaces", headers={"Authorization": ALICE})
        assert {n["name"]: n["reranker"] for n in listed.json()["data"]}[kb] == \
            relevance_adapter
        assert ask(daemon, {"namespace": kb}).json()["rag"]["reranker"] == relevance_adapter
        off = ask(daemon, {"namespace": kb, "rerank": False}).json()
        assert off["rag"]["reranker"] is None
        embedder = embedding_model(daemon)  # late interaction needs no adapter
        assert httpx.put(url, json={"reranker": embedder},
                         headers={"Authorization": ALICE}).status_code == 200
        assert ask(daemon, {"namespace": kb}).json()["rag"]["reranker"] == embedder
    finally:
        httpx.put(url, json={}, headers={"Authorization": ALICE})


def test_a_default_reranker_must_be_an_adapter_the_owner_can_use(daemon, kb):
    response = httpx.put(f"{daemon.url}/v1/namespaces/{kb}", json={"reranker": "nobody"},
                         headers={"Authorization": ALICE})
    assert response.status_code == 404 and response.json()["error"]["param"] == "reranker"


def test_rerank_without_a_reranker_names_rerank_model(daemon, kb):
    response = ask(daemon, {"namespace": kb, "rerank": True})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "rag.rerank_model"
    assert "has no default one" in response.json()["error"]["message"]


def test_a_rerank_model_of_another_tenant_is_not_found(daemon, kb, relevance_adapter):
    post(daemon, "/v1/namespaces/rerank-kb/documents", {"documents": KB}, BOB)
    response = ask(daemon, {"namespace": kb, "rerank_model": relevance_adapter}, BOB)
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "rag.rerank_model"


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_grpc_chat_reranks_and_reports_the_stages(daemon, kb, relevance_adapter):
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        reply = lorag_pb2_grpc.LoragServiceStub(channel).Chat(lorag_pb2.ChatRequest(
            messages=[lorag_pb2.ChatMessage(role="user", content=QUERY)], model=BASE,
            sampling=lorag_pb2.SamplingOptions(max_tokens=2, temperature=0),
            rag=lorag_pb2.RagOptions(namespace=kb, top_k=2, rerank=True,
                                     rerank_model=relevance_adapter)),
            metadata=[("authorization", ALICE)])
    grounding = reply.grounding
    assert grounding.reranker == relevance_adapter and grounding.HasField("rerank_ms")
    assert len(grounding.sources) == 2 and grounding.search_ms > 0



# ---- the scores, on the real model ----

def reference_scores(model_dir, tokenizer, adapter_dir=None) -> list[float]:
    """transformers' (and PEFT's) forward pass of each pair's prompt in fp32: P(yes)
    against P(no) over the MAX_LOGPROBS likeliest first tokens, as the daemon reads them."""
    model = load_base(str(model_dir), quantize="none", dtype="float32")[0]
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    words = [tokenizer.decode([i]).strip().lower() for i in range(len(tokenizer))]
    scores = []
    for document in DOCUMENTS:
        prompt = render_chat(tokenizer, relevance_messages(QUERY, document))
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        top = torch.topk(torch.log_softmax(logits, -1), MAX_LOGPROBS)
        seen = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        assert any(words[t] in ("yes", "no") for t in seen)  # else every score is a tie
        scores.append(relevance([v for t, v in seen.items() if words[t] == "yes"],
                                [v for t, v in seen.items() if words[t] == "no"],
                                floor=min(seen.values())))
    return scores


def served_scores(daemon, model: str | None = None) -> list[float]:
    """The daemon's scores of DOCUMENTS by index, on `model` (None: its base model)."""
    if model is None:
        model = httpx.get(f"{daemon.url}/v1/server",
                          headers={"Authorization": ALICE}).json()["model"]
    response = rerank(daemon, model=model)
    assert response.status_code == 200, response.text
    by_index = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    return [by_index[i] for i in range(len(DOCUMENTS))]


@pytest.fixture(scope="module")
def nudge(base_model_dir, tmp_path_factory):
    """An adapter root with "nudge": a random adapter for the real model, weak enough that
    "yes" and "no" stay among the likeliest first tokens, strong enough to move them."""
    root = tmp_path_factory.mktemp("nudge")
    model = load_base(str(base_model_dir), quantize="none", dtype="float32")[0]
    make_adapters(model, root, {"nudge": AdapterSpec(rank=8, alpha=16, scale=0.03)}, seed=3)
    return root


@pytest.fixture(scope="module")
def real_native(base_model_dir, nudge, keys_file, tmp_path_factory):
    """The native engine on the real model in fp32 (this module's alone: the shared real
    daemon serves NF4), with "nudge" registered for alice."""
    local = LocalDaemon(base_model_dir, tmp_path_factory.mktemp("data"), nudge, keys_file)
    loaded = post(local, "/v1/adapters", {"name": "nudge", "path": str(nudge / "nudge")})
    assert loaded.status_code == 200, loaded.text
    yield local
    local.stop()


@pytest.mark.e2e
def test_native_scores_are_the_models_own_forward_pass(real_native, base_model_dir,
                                                       tokenizer):
    assert served_scores(real_native) == pytest.approx(
        reference_scores(base_model_dir, tokenizer), abs=2e-3)


@pytest.mark.e2e
def test_native_scores_on_an_adapter_are_peft_forward_pass(real_native, nudge,
                                                          base_model_dir, tokenizer):
    served = served_scores(real_native, "nudge")
    assert served == pytest.approx(reference_scores(
        base_model_dir, tokenizer, nudge / "nudge"), abs=2e-3)
    assert served != pytest.approx(served_scores(real_native), abs=1e-2)


@pytest.mark.parametrize("daemon", ["vllm"], indirect=True)
def test_vllm_scores_are_the_models_own_forward_pass(daemon, base_model_dir, tokenizer):
    assert served_scores(daemon) == pytest.approx(
        reference_scores(base_model_dir, tokenizer), abs=2e-3)


def test_eval_retrieval_reranks_on_the_daemon_and_times_each_stage(daemon, kb,
                                                                  relevance_adapter):
    client = DaemonClient(daemon.url, ALICE.split()[1])

    def by_daemon(query: str, texts: list[str]) -> list[int]:
        return [r["index"] for r in client.rerank(relevance_adapter, query, texts)]

    queries = [{"query": QUERY, "relevant": ["doc-0"]}]
    result = evaluate(client, kb, queries, 2, "hybrid", by_daemon)
    assert result["mode"] == "hybrid+rerank"
    assert result["rerank_ms"]["p50"] > 0 and result["search_ms"]["p50"] > 0
    hits = client.search(kb, QUERY, RERANK_CANDIDATES, "hybrid")
    order = by_daemon(QUERY, [hit["text"] for hit in hits])
    assert result["per_query"][0]["ranked"][0] == hits[order[0]]["document_id"]


def test_eval_generate_asks_rag_to_rerank_with_the_model_it_names(daemon, kb,
                                                                 relevance_adapter, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": QUERY, "answer": "seven", "source": "doc-0"}))
    options = EvalOptions(url=daemon.url, api_key=ALICE.split()[1], data=data, model=BASE,
                          metrics=["retrieved"], rag_namespace=kb, rag_top_k=1,
                          rag_rerank_model=relevance_adapter, max_tokens=2,
                          out=tmp_path / "rows.jsonl")
    assert generate(options)["reranker"] == relevance_adapter
    row = json.loads((tmp_path / "rows.jsonl").read_text())
    assert row["reranker"] == relevance_adapter and row["rag_timing"]["rerank_ms"] > 0
    with pytest.raises(InvalidRequest) as refused:
        EvalOptions(url=daemon.url, data=data, model=BASE, metrics=["accuracy"],
                    rag_rerank_model=relevance_adapter)
    assert refused.value.field == "rag_rerank_model"
