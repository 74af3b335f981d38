"""Retrieval through the daemon: documents, search and `rag` on chat completions, with
namespaces owned by tenants exactly like adapters (HTTP, gRPC and `lorag --url`, on the
fast lane's daemon; what the real model answers with rag is in test_daemon_e2e.py)."""

import json
import logging
import shutil
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from typer.testing import CliRunner

from lorag.cli import app
from lorag.cli.train import daemon_fit
from lorag.client import DaemonClient, sse_event
from lorag.errors import InvalidRequest, NotFound, PermissionDenied
from lorag.retrieval.ingest import files_under, load
from lorag.retrieval.rag import declines
from lorag.retrieval.store import Hit
from lorag.server.chat_template import render_chat
from lorag.server.requests import RAG_ANSWER_TOKENS, Rag
from lorag.trainer.raft import RaftOptions, raft_examples
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, ALICE_USER, BASE, BOB, MAX_MODEL_LEN
from tests.schemas import SCHEMAS

CORPUS = Path(__file__).parents[1] / "data" / "corpus"
QUESTION = "Who is the head baker at the Zephyr Street bakery?"


def post(daemon, path: str, body: dict, key: str = ALICE) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers={"Authorization": key},
                      timeout=120)


def search(daemon, namespace: str, query: str, key: str = ALICE, **fields) -> list[dict]:
    response = post(daemon, f"/v1/namespaces/{namespace}/search", {"query": query, **fields},
                    key)
    assert response.status_code == 200, response.text
    return response.json()["data"]


@pytest.fixture(scope="module")
def corpus(daemon) -> list[dict]:
    """The test corpus, posted into alice's namespace "kb" in one request."""
    documents = [{"id": doc.id, "text": doc.text, "metadata": doc.metadata}
                 for path, doc_id in files_under([CORPUS]) for doc in load(path, doc_id)]
    response = post(daemon, "/v1/namespaces/kb/documents", {"documents": documents})
    assert response.status_code == 200, response.text
    assert {d["status"] for d in response.json()["documents"]} == {"added"}
    return documents


@pytest.mark.slow
def test_documents_search_replace_and_delete(daemon, corpus):
    hits = search(daemon, "kb", QUESTION, top_k=3)
    assert hits[0]["document_id"] == "guides/bakery.txt"
    assert set(hits[0]) == {"document_id", "chunk_id", "score", "text", "metadata"}
    shipping = search(daemon, "kb", "how long does delivery take", mode="vector",
                      filter={"lang": "de"})
    assert [h["document_id"] for h in shipping] == ["faq-versand"]

    again = post(daemon, "/v1/namespaces/kb/documents", {"documents": corpus})
    assert {d["status"] for d in again.json()["documents"]} == {"unchanged"}
    # re-posting an id replaces the document: the old text is gone from search
    replaced = post(daemon, "/v1/namespaces/kb/documents",
                    {"id": "note", "text": "The vault code is 4471."})
    assert replaced.json()["documents"] == [{"id": "note", "status": "added"}]
    post(daemon, "/v1/namespaces/kb/documents", {"id": "note", "text": "The vault code is 9902.",
                                                 "metadata": {"rev": 2}})
    texts = [h["text"] for h in search(daemon, "kb", "vault code", top_k=20)]
    assert any("9902" in t for t in texts) and not any("4471" in t for t in texts)

    deleted = httpx.delete(f"{daemon.url}/v1/namespaces/kb/documents/note",
                           headers={"Authorization": ALICE})
    assert deleted.status_code == 200
    assert "note" not in {h["document_id"] for h in search(daemon, "kb", "vault code",
                                                           top_k=20)}
    missing = httpx.delete(f"{daemon.url}/v1/namespaces/kb/documents/note",
                           headers={"Authorization": ALICE})
    assert missing.status_code == 404 and "no document 'note'" in missing.json()["error"][
        "message"]


@pytest.mark.slow
def test_namespaces_belong_to_tenants(daemon, corpus):
    # bob has no "kb": the same 404 as a name nobody has, whatever alice holds
    for name in ("kb", "nobody-has-this"):
        response = post(daemon, f"/v1/namespaces/{name}/search", {"query": "bakery"}, BOB)
        assert response.status_code == 404
        assert response.json()["error"]["message"].startswith(f"namespace {name!r} does not")
    # bob's own "kb" is another namespace; neither search sees the other's chunks
    post(daemon, "/v1/namespaces/kb/documents",
         {"id": "bob-secret", "text": "The Zephyr Street bakery is owned by Bob."}, BOB)
    assert {h["document_id"] for h in search(daemon, "kb", "Zephyr Street bakery", BOB,
                                             top_k=20)} == {"bob-secret"}
    assert "bob-secret" not in {h["document_id"] for h in search(
        daemon, "kb", "Zephyr Street bakery owner", top_k=20)}
    # bob cannot delete in alice's namespace: his DELETE means his own "kb"
    response = httpx.delete(f"{daemon.url}/v1/namespaces/kb/documents/guides/bakery.txt",
                            headers={"Authorization": BOB})
    assert response.status_code == 404
    assert search(daemon, "kb", QUESTION, top_k=1)[0]["document_id"] == "guides/bakery.txt"
    # a non-admin key of alice's searches but does not write
    assert search(daemon, "kb", QUESTION, ALICE_USER, top_k=1)
    refused = post(daemon, "/v1/namespaces/kb/documents", {"id": "x", "text": "y"}, ALICE_USER)
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "authorization"
    listed = httpx.get(f"{daemon.url}/v1/namespaces", headers={"Authorization": BOB}).json()
    assert [(n["name"], n["owner"]) for n in listed["data"]] == [("kb", "bob")]

    # a shared namespace: everyone reads it, only its owner writes or deletes it
    shared = httpx.put(f"{daemon.url}/v1/namespaces/public", json={"shared": True},
                       headers={"Authorization": BOB})
    assert shared.status_code == 200 and shared.json()["created"] is True
    post(daemon, "/v1/namespaces/public/documents",
         {"id": "hours", "text": "The public library opens at 9:00."}, BOB)
    assert search(daemon, "public", "library hours")[0]["document_id"] == "hours"
    taken = httpx.put(f"{daemon.url}/v1/namespaces/public", json={"shared": True},
                      headers={"Authorization": ALICE})
    assert taken.status_code == 400 and "already exists" in taken.json()["error"]["message"]
    gone = httpx.delete(f"{daemon.url}/v1/namespaces/public/documents/hours",
                        headers={"Authorization": ALICE})
    assert gone.status_code == 404
    assert search(daemon, "public", "library hours")[0]["document_id"] == "hours"


# the service's context budget, the same on both backends (vLLM's lane runs the RAG
# round trip above)
@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_rag_drops_the_lowest_ranked_passages_to_fit_the_context(daemon, corpus):
    max_tokens = 200  # reserved in the context; the answer itself may stop early
    body = {"model": BASE, "max_tokens": max_tokens, "temperature": 0, "stop": [".", "\n"],
            "messages": [{"role": "user", "content": "What does the handbook say about "
                          "onboarding, expenses, security and leave?"}],
            "rag": {"namespace": "kb", "top_k": 8}}
    response = post(daemon, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    rag = answer["rag"]
    assert rag["retrieved"] == 8 and rag["dropped"] > 0
    assert rag["used"] + rag["dropped"] == rag["retrieved"] == len(answer["sources"]) + \
        rag["dropped"]
    assert answer["usage"]["prompt_tokens"] <= MAX_MODEL_LEN - max_tokens
    ranked = [(h["chunk_id"], h["text"]) for h in search(
        daemon, "kb", body["messages"][0]["content"], top_k=8)]
    assert [(s["chunk_id"], s["text"]) for s in answer["sources"]] == ranked[:rag["used"]]


def grpc_search(daemon, key: str = ALICE, **request) -> lorag_pb2.SearchResponse:
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        return lorag_pb2_grpc.LoragServiceStub(channel).Search(
            lorag_pb2.SearchRequest(**request), metadata=[("authorization", key)])


def test_grpc_search_finds_the_best_passage_first(daemon, corpus):
    response = grpc_search(daemon, namespace="kb", query=QUESTION, top_k=2)
    assert response.hits[0].document_id == "guides/bakery.txt"
    assert len(response.hits) == 2


def test_grpc_search_keeps_to_the_metadata_filter(daemon, corpus):
    german = grpc_search(daemon, namespace="kb", query="delivery time",
                         mode=lorag_pb2.SEARCH_MODE_VECTOR,
                         filter={"lang": struct_pb2.Value(string_value="de")})
    assert [h.document_id for h in german.hits] == ["faq-versand"]
    assert german.hits[0].metadata["topic"] == "shipping"


def test_grpc_search_of_another_tenants_namespace_is_not_found(daemon, corpus):
    post(daemon, "/v1/namespaces/alice-only/documents", {"id": "a", "text": "private"})
    with pytest.raises(grpc.RpcError) as error:
        grpc_search(daemon, BOB, namespace="alice-only", query="private")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_search_of_an_empty_query_is_an_invalid_argument(daemon, corpus):
    with pytest.raises(grpc.RpcError) as error:
        grpc_search(daemon, namespace="kb", query="")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_raft_chat_is_the_prompt_the_daemon_builds_for_rag(daemon, corpus):
    """RAFT searched through the daemon (as `lorag train --rag-namespace --url` does): each
    training chat whose passages hold the gold renders, with the daemon's chat template,
    to the very tokens the daemon's own `rag` chat runs on, passages its context has no
    room for dropped alike (this daemon's 512 tokens keep two or three of four)."""
    client = DaemonClient(daemon.url, ALICE.split()[1])

    def search_daemon(question: str, k: int) -> list[Hit]:
        return [Hit(**hit) for hit in client.search("kb", question, k, "hybrid")]

    questions = [{"question": QUESTION, "answer": "Ottoline Brandvold",
                  "source": "guides/bakery.txt"},
                 {"question": "When are refunds issued?", "answer": "within 14 days",
                  "source": "faq-refunds"}]
    service, caller = daemon.service, daemon.service.caller(ALICE)
    fit = daemon_fit(daemon.options.model, MAX_MODEL_LEN - RAG_ANSWER_TOKENS)  # train's
    examples, _ = raft_examples(questions, search_daemon, RaftOptions("kb", oracle_p=1.0),
                                fit)
    for example in examples:
        asked = [{"role": "user", "content": example.question}]
        ids, grounding = service.ground(caller, asked, Rag("kb"), None)
        assert [s.document_id for s in grounding.sources] == \
            [hit.document_id for hit in example.passages]
        assert render_chat(service.engine.tokenizer, example.messages[:-1]) == ids
    assert any(len(example.passages) < 4 for example in examples)  # the budget dropped some


def test_an_adapter_trained_on_another_rag_layout_is_warned_of_once(daemon, corpus, caplog):
    folder = daemon.adapters / "older-raft"
    shutil.copytree(daemon.adapters / "style", folder, dirs_exist_ok=True)
    (folder / "training.json").write_text(json.dumps({"rag": {"layout": "rank-order/0"}}))
    loaded = post(daemon, "/v1/load_lora_adapter",
                  {"lora_name": "older-raft", "lora_path": str(folder)})
    assert loaded.status_code == 200, loaded.text
    body = {"model": "older-raft", "max_tokens": 2, "rag": {"namespace": "kb"},
            "messages": [{"role": "user", "content": QUESTION}]}
    with caplog.at_level(logging.WARNING, logger="lorag.adapters"):
        for _ in range(2):
            assert post(daemon, "/v1/chat/completions", body).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "RAG prompt layout" in r.getMessage()]
    assert len(warnings) == 1 and "'rank-order/0'" in warnings[0]


def test_rag_sources_lead_the_stream_and_grpc_gives_the_same(daemon, corpus):
    """One service call builds a grounded chat for every transport and reply shape: HTTP
    collected and streamed (the sources in the first chunk only), gRPC Chat and
    ChatStream (the grounding on the first piece only) give the same text and sources."""
    body = {"model": BASE, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24, "temperature": 0, "rag": {"namespace": "kb", "top_k": 3}}
    http = post(daemon, "/v1/chat/completions", body).json()
    text = http["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", timeout=120,
                      headers={"Authorization": ALICE}, json={**body, "stream": True}) as sse:
        chunks = [event for line in sse.iter_lines() if (event := sse_event(line))]
    def counts(rag: dict) -> dict:  # each request's own stage times aside
        return {name: value for name, value in rag.items() if name not in ("timing",
                                                                           "declined")}

    assert chunks[0]["sources"] == http["sources"]
    assert counts(chunks[0]["rag"]) == counts(http["rag"])
    assert not any("sources" in c for c in chunks[1:])
    # whether the answer declined is known at its end: in the finishing chunk
    assert http["rag"]["declined"] is declines(text)
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["rag"]["declined"] is declines(text)
    assert [c for c in chunks if "declined" in c.get("rag", {})] == finishing
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c["choices"]) == text

    request = dict(messages=[lorag_pb2.ChatMessage(role="user", content=QUESTION)],
                   sampling=lorag_pb2.SamplingOptions(max_tokens=24, temperature=0),
                   rag=lorag_pb2.RagOptions(namespace="kb", top_k=3))
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        stub = lorag_pb2_grpc.LoragServiceStub(channel)
        metadata = [("authorization", ALICE)]
        pieces = list(stub.ChatStream(lorag_pb2.ChatStreamRequest(**request),
                                      metadata=metadata, timeout=60))
        whole = stub.Chat(lorag_pb2.ChatRequest(model=BASE, **request), metadata=metadata,
                          timeout=60)
        plain = stub.Chat(lorag_pb2.ChatRequest(model=BASE, messages=request["messages"],
                                                sampling=request["sampling"]),
                          metadata=metadata, timeout=60)
    assert "".join(p.text for p in pieces) == whole.text == text
    grounding = pieces[0].grounding
    assert [(s.document_id, s.chunk_id) for s in grounding.sources] == \
        [(s["document_id"], s["chunk_id"]) for s in http["sources"]]
    assert not any(p.HasField("grounding") for p in pieces[1:])
    whole.grounding.search_ms = grounding.search_ms  # each request's own
    assert whole.grounding == grounding and not plain.HasField("grounding")
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens == \
        http["usage"]["completion_tokens"]
    assert pieces[-1].finish_reason == whole.finish_reason != \
        lorag_pb2.FINISH_REASON_UNSPECIFIED


CITED = {"type": "object", "required": ["answer", "source"], "additionalProperties": False,
         "properties": {"answer": {"type": "string", "maxLength": 12},
                        "source": {"type": "string", "minLength": 1}}}


def test_rag_cite_lets_the_answer_name_only_a_packed_passage(daemon, corpus):
    """rag.cite limits the response_format's `source` to the passages the prompt carries
    and "none", over HTTP and gRPC: whatever the (random-weight) model prefers, the cited
    name is one of them."""
    format_ = {"type": "json_schema", "json_schema": {"name": "cited", "schema": CITED}}
    body = {"model": BASE, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 80, "temperature": 1.0, "seed": 3, "n": 3,
            "response_format": format_, "rag": {"namespace": "kb", "top_k": 2, "cite": "source"}}
    reply = post(daemon, "/v1/chat/completions", body).json()
    packed = {s["document_id"] for s in reply["sources"]}
    assert len(packed) >= 1
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop", choice
        assert json.loads(choice["message"]["content"])["source"] in packed | {"none"}

    request = lorag_pb2.ChatRequest(
        model=BASE, messages=[lorag_pb2.ChatMessage(role="user", content=QUESTION)],
        sampling=lorag_pb2.SamplingOptions(
            max_tokens=80, temperature=0, response_format=lorag_pb2.ResponseFormat(
                json_schema=json.dumps(CITED))),
        rag=lorag_pb2.RagOptions(namespace="kb", top_k=2, cite="source"))
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        whole = lorag_pb2_grpc.LoragServiceStub(channel).Chat(
            request, metadata=[("authorization", ALICE)], timeout=60)
    packed = {s.document_id for s in whole.grounding.sources}
    assert json.loads(whole.text)["source"] in packed | {"none"}


@pytest.mark.parametrize(("format_", "message"), [
    (None, "send response_format {type: json_schema}"),
    ({"type": "json_object"}, "send response_format {type: json_schema}"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}}}},
     "no top-level property 'source'"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"source": {"type": "integer"}}}}},
     "must be a plain string"),
], ids=["no-format", "json-object", "no-such-property", "not-a-string"])
def test_rag_cite_refusals_name_the_field(daemon, corpus, format_, message):
    body = {"model": BASE, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 4, "rag": {"namespace": "kb", "cite": "source"},
            **({"response_format": format_} if format_ else {})}
    response = post(daemon, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "rag.cite" and message in error["message"], error


def test_grpc_chat_refusals_name_the_problem(daemon, corpus):
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        stub = lorag_pb2_grpc.LoragServiceStub(channel)
        question = [lorag_pb2.ChatMessage(role="user", content=QUESTION)]
        cases = [
            (lorag_pb2.ChatRequest(messages=question, rag=lorag_pb2.RagOptions(
                namespace="nowhere")), ALICE, grpc.StatusCode.NOT_FOUND, "nowhere"),
            (lorag_pb2.ChatRequest(messages=question, rag=lorag_pb2.RagOptions(
                namespace="kb", top_k=50)), ALICE, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
            (lorag_pb2.ChatRequest(messages=[lorag_pb2.ChatMessage(role="robot", content="x")]),
             ALICE, grpc.StatusCode.INVALID_ARGUMENT, "role"),
            (lorag_pb2.ChatRequest(), ALICE, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
            (lorag_pb2.ChatRequest(messages=question, model="nope"), ALICE,
             grpc.StatusCode.NOT_FOUND, "nope"),
            (lorag_pb2.ChatRequest(messages=question, rag=lorag_pb2.RagOptions(
                namespace="kb")), "Bearer not-a-key-at-all-000", grpc.StatusCode.UNAUTHENTICATED,
             "API key"),
        ]
        for request, key, code, word in cases:
            with pytest.raises(grpc.RpcError) as error:
                stub.Chat(request, metadata=[("authorization", key)], timeout=60)
            assert error.value.code() == code and word in error.value.details(), request


def lorag(*args: str, key: str = ALICE):
    """A `lorag` command in this process (Typer's runner), as the holder of `key`."""
    return CliRunner().invoke(app, list(args), env={"LORAG_API_KEY": key.split()[1]})


@pytest.mark.slow
def test_cli_works_on_a_daemon_with_url(daemon):
    url = ["--url", daemon.url]
    first = lorag("ingest", "--namespace", "cli-kb", str(CORPUS), *url)
    assert first.exit_code == 0, first.output
    assert "cli-kb: 8 added, 0 updated, 0 unchanged, 0 failed" in " ".join(first.output.split())
    again = lorag("ingest", "--namespace", "cli-kb", str(CORPUS), *url)
    assert "0 added, 0 updated, 8 unchanged" in " ".join(again.output.split())
    hits = json.loads(lorag("search", "--namespace", "cli-kb", QUESTION, "--k", "1", "--json",
                            *url).stdout)
    assert hits[0]["document_id"] == "guides/bakery.txt"
    german = json.loads(lorag("search", "--namespace", "cli-kb", "Werktage", "--filter",
                              "lang=de", "--mode", "bm25", "--json", *url).stdout)
    assert [h["document_id"] for h in german] == ["faq-versand"]
    assert "cli-kb" in lorag("namespaces", "list", *url).stdout
    hidden = lorag("search", "--namespace", "cli-kb", "bakery", *url, key=BOB)
    assert isinstance(hidden.exception, NotFound)
    assert "namespace 'cli-kb' does not exist" in hidden.exception.message
    refused = lorag("ingest", "--namespace", "cli-kb", str(CORPUS), *url, key=ALICE_USER)
    assert isinstance(refused.exception, PermissionDenied)
    assert "admin key" in refused.exception.message
    assert lorag("namespaces", "delete", "cli-kb", *url).exit_code == 0
    gone = lorag("namespaces", "delete", "cli-kb", *url)
    assert isinstance(gone.exception, NotFound) and "does not exist" in gone.exception.message


@pytest.fixture
def qa(tmp_path) -> Path:
    """Two questions on the corpus' bakery guide, as `lorag eval generate` reads them."""
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"question": QUESTION, "answer": "Ottoline Brandvold", "source": "guides/bakery.txt"},
        {"question": "What time does the Zephyr Street bakery open on Saturdays?",
         "answer": "8:15", "source": "guides/bakery.txt"}]) + "\n")
    return data


def evaluate(daemon, data: Path, *args: str):
    return lorag("eval", "generate", "--data", str(data), "--url", daemon.url,
                 "--max-tokens", "16", *args)


# the CLI's pipeline around a daemon: which engine answers is not what these test
@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_eval_generate_scores_what_the_daemon_answers(daemon, corpus, qa, tmp_path):
    """The pipeline of `lorag eval generate` (each question through the daemon, scored,
    written out); how well the real model answers is the e2e lane's and the demo's."""
    run = evaluate(daemon, qa, "--model", BASE, "--rag-namespace", "kb", "--metrics",
                   "accuracy,retrieved,f1,rouge_l,exact_match,format", "--format-regex",
                   ".+", "--out", str(tmp_path / "rows.jsonl"), "--json",
                   str(tmp_path / "s.json"))
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["examples"] == 2 and summary["retrieved"] == 1.0
    assert summary["latency_p50_s"] > 0 and "accuracy" in run.stdout
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["sources"][0] for r in rows] == ["guides/bakery.txt"] * 2
    for metric in ("accuracy", "f1", "rouge_l", "exact_match", "format"):
        assert summary[metric] == sum(r["scores"][metric] for r in rows) / 2, metric
    first = rows[0]
    assert first["scores"]["accuracy"] == float("Ottoline Brandvold" in first["answer"])


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_eval_generate_scores_abstention_on_unanswerable_questions_only(daemon, corpus, qa,
                                                                        tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text(qa.read_text() + json.dumps(
        {"question": "Who founded the bakery's rival across town?", "answerable": False}) + "\n")
    run = evaluate(daemon, data, "--model", BASE, "--rag-namespace", "kb", "--metrics",
                   "accuracy,abstain,supported", "--out", str(tmp_path / "rows.jsonl"),
                   "--json", str(tmp_path / "s.json"))
    assert run.exit_code == 0, run.output
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [set(r["scores"]) - {"supported"} for r in rows] == \
        [{"accuracy", "false_abstain"}] * 2 + [{"abstain"}]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["abstain"] == rows[2]["scores"]["abstain"]
    assert summary["false_abstain"] == sum(r["scores"]["false_abstain"] for r in rows[:2]) / 2


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_eval_generate_sends_the_response_format_it_is_given(daemon, qa, tmp_path):
    schema = tmp_path / "verdict.schema.json"
    schema.write_text(json.dumps(SCHEMAS["verdict"]))
    constrained = tmp_path / "response_format.json"
    constrained.write_text(json.dumps({"type": "json_schema", "json_schema": {
        "name": "verdict", "schema": SCHEMAS["verdict"]}}))
    run = evaluate(daemon, qa, "--model", BASE, "--metrics", "format", "--format-schema",
                   str(schema), "--response-format", str(constrained), "--max-tokens", "150",
                   "--out", str(tmp_path / "rows.jsonl"), "--json", str(tmp_path / "c.json"))
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "c.json").read_text())["format"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["finish_reason"] for r in rows] == ["stop", "stop"]


BROKEN_FORMAT = json.dumps({"type": "json_schema",
                            "json_schema": {"name": "broken", "schema": {"type": "wat"}}})


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
@pytest.mark.parametrize(("args", "files", "error", "message"), [
    (["--model", BASE, "--response-format", "{rf}"], {"rf": ("rf.json", BROKEN_FORMAT)},
     InvalidRequest, 'Unsupported type "wat"'),
    (["--model", BASE, "--response-format", "{rf}"], {"rf": ("rf.json", "[1, 2]")},
     InvalidRequest, "must hold a JSON object"),
    (["--model", "nope"], {}, NotFound, "'nope' is neither"),
    (["--model", BASE, "--rag-cite", "source"], {}, InvalidRequest,
     "it needs both --rag-namespace and --response-format"),
    (["--model", BASE, "--metrics", "format"], {}, InvalidRequest,
     "--format-schema or --format-regex"),
    (["--model", BASE, "--data", "{bad}"], {"bad": ("bad.jsonl", '{"question": "q"}\n')},
     InvalidRequest, 'bad.jsonl:1: "answer" must be a string'),
], ids=["unsupported-schema", "format-not-an-object", "unknown-model", "cite-alone",
        "format-metric-without-a-format", "answer-missing"])
def test_eval_generate_refuses_what_it_cannot_run(daemon, qa, tmp_path, args, files, error,
                                                   message):
    """Each refusal names what is wrong; `files` ({placeholder: (file name, text)}) are
    written first and their paths put in `args`."""
    paths = {name: tmp_path / filename for name, (filename, _) in files.items()}
    for name, (_, text) in files.items():
        paths[name].write_text(text)
    refused = evaluate(daemon, qa, *(arg.format(**paths) for arg in args))
    assert isinstance(refused.exception, error), refused.output
    assert message in refused.exception.message
