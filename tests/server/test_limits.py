"""Per-request limits (server/limits.py): each one set by `--limit NAME=N`, each answered
413 / RESOURCE_EXHAUSTED naming the limit, over HTTP and gRPC, with the daemon healthy.
The default limits are in the blast-radius table (tests/server/test_blast_radius.py)."""

from dataclasses import replace

import grpc
import httpx
import pytest

from lorag.errors import InvalidRequest
from lorag.server.limits import RequestLimits
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BASE


def test_settings_change_limits_and_refuse_what_is_not_one():
    limits = RequestLimits().with_settings(["messages=2", "stop_strings=40"])
    assert (limits.messages, limits.stop_strings, limits.stop_chars) == (2, 40, 256)
    for bad in ("messages", "messages=two", "nope=3", "messages=-1"):
        with pytest.raises(InvalidRequest, match="--limit takes NAME=INTEGER with NAME one "
                                                 "of adapters_per_tenant, document_chars"):
            RequestLimits().with_settings([bad])
    with pytest.raises(InvalidRequest, match="limit messages must be an integer >= 1, got 0"):
        RequestLimits().with_settings(["messages=0"])


@pytest.fixture
def tight(own_daemon, monkeypatch):
    """The module's daemon with small limits."""
    limits = replace(RequestLimits(), messages=2, stop_strings=1, documents_per_request=2,
                     document_chars=100, adapters_per_tenant=1)
    monkeypatch.setattr(own_daemon.service, "limits", limits)
    monkeypatch.setattr(own_daemon.service.namespaces, "limits", limits)
    monkeypatch.setattr(own_daemon.service.adapters, "limits", limits)
    return own_daemon


def post(daemon, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers={"Authorization": ALICE},
                      timeout=60)


def message(response: httpx.Response) -> str:
    assert response.status_code == 413, response.text
    return response.json()["error"]["message"]


@pytest.mark.slow
def test_each_limit_as_configured(tight):
    hi = {"role": "user", "content": "hi"}
    assert message(post(tight, "/v1/chat/completions", {
        "model": BASE, "messages": [hi] * 3, "max_tokens": 2})) == (
        "messages has 3 messages in a chat; at most 2 are taken (the daemon's --limit "
        "messages)")
    assert post(tight, "/v1/chat/completions", {
        "model": BASE, "messages": [hi] * 2, "max_tokens": 2, "stop": ["x"]}).status_code == 200
    assert "--limit stop_strings" in message(post(tight, "/v1/completions", {
        "model": BASE, "prompt": "hi", "max_tokens": 2, "stop": ["x", "y"]}))

    docs = [{"id": f"d{i}", "text": "short"} for i in range(3)]
    assert "documents has 3 documents in one request; at most 2" in message(
        post(tight, "/v1/namespaces/limited/documents", {"documents": docs}))
    assert "documents.0.text has 101 characters in a document; at most 100" in message(
        post(tight, "/v1/namespaces/limited/documents", {"id": "long", "text": "x" * 101}))

    path = str(tight.adapters / "style")
    assert post(tight, "/v1/load_lora_adapter", {"lora_name": "one", "lora_path": path}) \
        .status_code == 200
    assert post(tight, "/v1/load_lora_adapter", {"lora_name": "one", "lora_path": path}) \
        .status_code == 200  # the same one again takes no more room
    assert message(post(tight, "/v1/load_lora_adapter", {
        "lora_name": "two", "lora_path": path})) == (
        "tenant 'alice' has 1 adapters, the most one tenant may register (the daemon's "
        "--limit adapters_per_tenant); unload one first")
    assert post(tight, "/v1/unload_lora_adapter", {"lora_name": "one"}).status_code == 200
    assert tight.health()["status"] == "ok"


def test_grpc_answers_resource_exhausted(tight):
    with grpc.insecure_channel(tight.grpc_target) as channel, \
            pytest.raises(grpc.RpcError) as error:
        lorag_pb2_grpc.LoragServiceStub(channel).Chat(lorag_pb2.ChatRequest(
            messages=[lorag_pb2.ChatMessage(role="user", content="hi")] * 3),
            metadata=[("authorization", ALICE)], timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--limit messages" in error.value.details()


def test_headers_over_the_limit_get_431(own_daemon):
    response = httpx.get(f"{own_daemon.url}/v1/models", timeout=30, headers={
        "Authorization": ALICE, "X-Padding": "a" * (20 << 10)})
    assert response.status_code == 431
    assert "over the 16384 this daemon takes (its --limit header_kb)" in \
        response.json()["error"]["message"]
    assert own_daemon.health()["status"] == "ok"
