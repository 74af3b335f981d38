"""The thin end-to-end lane: `lorag serve` on the real default model (NF4) in a subprocess
on 127.0.0.1, reached the ways users reach it: the official `openai` client, a gRPC stub,
the `lorag` command, a client that goes away, and a restart on the same data dir. The
server's semantics and its bad-input table run in the fast lane (test_http.py,
test_bad_input.py, test_rag.py, test_grpc.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from google.protobuf import json_format

from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BOB, client
from tests.polling import wait_for

pytestmark = pytest.mark.e2e
BASE = "smollm2-135m-instruct"
CORPUS = Path(__file__).parents[1] / "data" / "corpus"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
BAKER = "Who is the head baker at the Zephyr Street bakery?"


def chat(daemon, model: str, key: str = ALICE) -> str:
    response = client(daemon, key).chat.completions.create(
        model=model, messages=CAPITAL, max_tokens=12, temperature=0)
    return response.choices[0].message.content


def post(daemon, path: str, body: dict, key: str = ALICE) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers={"Authorization": key},
                      timeout=120)


@pytest.fixture(scope="module")
def corpus(real_daemon):
    """The test corpus in alice's namespace "kb", ingested by the installed `lorag`
    command over --url: the CLI's subprocess smoke test against a daemon."""
    command = [str(Path(sys.executable).parent / "lorag"), "ingest", "--namespace", "kb",
               str(CORPUS), "--url", real_daemon.url]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LORAG_API_KEY": ALICE.split()[1]})
    assert run.returncode == 0, run.stderr
    assert "kb: 8 added, 0 updated, 0 unchanged, 0 failed" in " ".join(run.stderr.split())


def test_openai_client_chat_stream_and_completion(real_daemon):
    answer = client(real_daemon).chat.completions.create(model=BASE, messages=CAPITAL,
                                                         max_tokens=12, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 5
    chunks = list(client(real_daemon).chat.completions.create(
        model=BASE, messages=CAPITAL, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    counted = client(real_daemon).completions.create(model=BASE, prompt="1, 2, 3, 4,",
                                                     max_tokens=20, temperature=0, stop=[" 7"])
    assert counted.choices[0].finish_reason == "stop" and "7" not in counted.choices[0].text
    assert "6" in counted.choices[0].text


def test_runtime_adapter_over_http_and_grpc(real_daemon, real_adapters):
    loaded = post(real_daemon, "/v1/load_lora_adapter",
                  {"lora_name": "style", "lora_path": str(real_adapters / "style")})
    assert loaded.status_code == 200, loaded.text
    tuned = chat(real_daemon, "style")
    assert tuned != chat(real_daemon, BASE)
    with grpc.insecure_channel(real_daemon.grpc_target) as channel:
        reply = lorag_pb2_grpc.LoragServiceStub(channel).Chat(lorag_pb2.ChatRequest(
            model="style", messages=[lorag_pb2.ChatMessage(**m) for m in CAPITAL],
            sampling=lorag_pb2.SamplingOptions(max_tokens=12, temperature=0)),
            metadata=[("authorization", ALICE)], timeout=60)
    assert reply.text == tuned
    with pytest.raises(openai.NotFoundError):
        chat(real_daemon, "style", key=BOB)  # alice's adapter, not bob's


def test_rag_grounds_the_answer_and_grpc_equals_http(real_daemon, corpus):
    """The real model answers from the passages, and the same greedy question with rag
    gives the same text and sources over HTTP and gRPC's ChatStream (the streams' shapes
    are test_rag.py's)."""
    body = {"model": BASE, "messages": [{"role": "user", "content": BAKER}],
            "max_tokens": 24, "temperature": 0}
    plain = post(real_daemon, "/v1/chat/completions", body).json()
    assert "Ottoline" not in plain["choices"][0]["message"]["content"]
    assert "sources" not in plain
    body["rag"] = {"namespace": "kb", "top_k": 3}
    http = post(real_daemon, "/v1/chat/completions", body).json()
    text = http["choices"][0]["message"]["content"]
    assert "Ottoline Brandvold" in text
    assert http["sources"][0]["document_id"] == "guides/bakery.txt"
    assert http["rag"]["used"] == len(http["sources"])

    request = dict(messages=[lorag_pb2.ChatMessage(role="user", content=BAKER)],
                   sampling=lorag_pb2.SamplingOptions(max_tokens=24, temperature=0),
                   rag=lorag_pb2.RagOptions(namespace="kb", top_k=3))
    with grpc.insecure_channel(real_daemon.grpc_target) as channel:
        pieces = list(lorag_pb2_grpc.LoragServiceStub(channel).ChatStream(
            lorag_pb2.ChatStreamRequest(**request), metadata=[("authorization", ALICE)],
            timeout=120))
    assert "".join(p.text for p in pieces) == text
    grounding = pieces[0].grounding
    assert [(s.document_id, s.chunk_id, s.score, json_format.MessageToDict(s.metadata),
             s.text) for s in grounding.sources] == \
        [(s["document_id"], s["chunk_id"], s["score"], s["metadata"], s["text"])
         for s in http["sources"]]
    assert (grounding.namespace, grounding.retrieved, grounding.dropped) == \
        ("kb", http["rag"]["retrieved"], http["rag"]["dropped"])
    assert pieces[-1].usage.completion_tokens == http["usage"]["completion_tokens"]
    print(json.dumps({"http": [text, [s["chunk_id"] for s in http["sources"]]],
                      "grpc": ["".join(p.text for p in pieces),
                               [s.chunk_id for s in grounding.sources]]}))


def test_client_disconnect_cancels_the_request(real_daemon):
    body = {"model": BASE, "messages": CAPITAL, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{real_daemon.url}/v1/chat/completions", json=body,
                      headers={"Authorization": ALICE}, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert real_daemon.health()["running"] == 1
    wait_for(lambda: real_daemon.health()["running"] == 0, 20, 0.2, "the request cancelled")
    assert real_daemon.health()["waiting"] == 0
    cancelled = 'lorag_requests_total{adapter="base",finish_reason="cancelled"} 1.0'
    # the operator's port (--metrics-port) and the key's own view on the API port
    assert cancelled in httpx.get(real_daemon.metrics_url).text
    assert cancelled in httpx.get(f"{real_daemon.url}/metrics",
                                  headers={"Authorization": ALICE}).text


def test_restart_keeps_adapters_and_namespaces(real_daemon, real_adapters, corpus):
    """Last in this module: the daemon is stopped (SIGTERM) and started again on the same
    data dir, as a redeploy does."""
    before = chat(real_daemon, "style")
    real_daemon.restart()
    listed = httpx.get(f"{real_daemon.url}/v1/adapters", headers={"Authorization": ALICE})
    row = next(a for a in listed.json()["data"] if a["name"] == "style")
    assert row["path"] == str(real_adapters / "style") and not row["in_ram"]  # lazy
    assert chat(real_daemon, "style") == before
    assert "style" not in {m.id for m in client(real_daemon, BOB).models.list().data}
    hits = post(real_daemon, "/v1/namespaces/kb/search", {"query": BAKER, "top_k": 1})
    assert hits.json()["data"][0]["document_id"] == "guides/bakery.txt"
