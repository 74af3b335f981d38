"""Two replicas on one PostgreSQL (the tiny model's native daemons, each with its own data
dir, one adapter folder both read): what is written through one is served by the other,
an unload through one stops the other at once, and a PostgreSQL outage costs only the
requests that need state."""

import logging
import shutil

import httpx
import pytest

from tests.daemons import ALICE, BASE, LocalDaemon
from tests.polling import wait_for
from tests.server.conftest import adapters_for
from tests.server.test_http import chat, load, post
from tests.tiny import tiny_model

log = logging.getLogger("lorag.tests.fleet")
DOCUMENT = {"id": "harbour", "text": "The harbour master of Skerry Island is Ilse Marrow."}
QUESTION = {"query": "Who is the harbour master?", "top_k": 3}


@pytest.fixture(scope="module")
def fleet(postgres, tiny_base, keys_file, tmp_path_factory):
    """Replicas A and B on one fresh PostgreSQL database."""
    state = postgres.new_database()
    root = adapters_for(tiny_model(), tmp_path_factory.mktemp("fleet-adapters"), scale=0.3)
    replicas = [LocalDaemon(tiny_base, tmp_path_factory.mktemp(f"replica-{name}"), root,
                            keys_file, state=state) for name in "ab"]
    yield replicas
    for replica in replicas:
        replica.stop()


def search_ids(replica) -> list[str]:
    response = post(replica, "/v1/namespaces/fleet-kb/search", QUESTION)
    assert response.status_code == 200, response.text
    return [hit["document_id"] for hit in response.json()["data"]]


@pytest.mark.slow
def test_what_one_replica_writes_the_other_serves(fleet):
    a, b = fleet
    documents_b = b.service.namespaces.store
    assert post(a, "/v1/namespaces/fleet-kb/documents", DOCUMENT).status_code == 200
    assert search_ids(b) == ["harbour"]  # a search catches up first: no waiting
    log.info("ingest through A, search through B: found at once")

    more = [{"id": f"note-{i}", "text": f"Ferry note {i}: the boat leaves at {i}:15."}
            for i in range(20)]
    assert post(a, "/v1/namespaces/fleet-kb/documents", {"documents": more}).status_code \
        == 200
    target = a.service.namespaces.store.generation("alice.fleet-kb")
    lag = wait_for(lambda: documents_b.generation("alice.fleet-kb") == target, interval=0.01)
    log.info("B's indexes caught up with A's write of 20 documents in %.3f s, unasked "
             "(LISTEN/NOTIFY)", lag)

    assert load(a, "roamer", a.adapters / "style").status_code == 200
    answer = chat(a, "roamer")
    assert chat(b, "roamer") == answer  # registered through A, read by B on first use
    log.info("register through A, chat through B: the same greedy answer")

    assert post(a, "/v1/unload_lora_adapter", {"lora_name": "roamer"}).status_code == 200
    refused = post(b, "/v1/chat/completions",
                   {"model": "roamer", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 404, refused.text  # at once: B checks the record
    log.info("unload through A: B refuses the next request (404)")

    response = httpx.delete(f"{b.url}/v1/namespaces/fleet-kb/documents/harbour",
                            headers={"Authorization": ALICE}, timeout=60)
    assert response.status_code == 200, response.text
    assert "harbour" not in search_ids(a)
    log.info("delete through B: A's search no longer returns the document")


def test_a_conversation_stored_by_one_replica_continues_on_the_other(fleet):
    """A stored response (Responses API) is in the shared database: replica B returns it
    and continues its conversation exactly as replica A would."""
    a, b = fleet
    first = post(a, "/v1/responses", {"model": BASE, "input": "Hello there.",
                                      "temperature": 0, "max_output_tokens": 6})
    assert first.status_code == 200, first.text
    stored = httpx.get(f"{b.url}/v1/responses/{first.json()['id']}", timeout=30,
                       headers={"Authorization": ALICE})
    assert stored.json() == first.json()
    turn = {"model": BASE, "input": "And then?", "temperature": 0, "max_output_tokens": 6,
            "previous_response_id": first.json()["id"], "store": False}
    on_a, on_b = (post(replica, "/v1/responses", turn).json() for replica in (a, b))
    assert on_b["output"][0]["content"][0]["text"] == \
        on_a["output"][0]["content"][0]["text"]
    assert on_b["usage"] == on_a["usage"]


def test_a_re_registration_replaces_the_weights_everywhere(fleet):
    a, b = fleet
    assert load(a, "moving", a.adapters / "style").status_code == 200
    first = chat(b, "moving")
    renamed = a.adapters / "style-v2"
    shutil.copytree(a.adapters / "other", renamed, dirs_exist_ok=True)
    assert load(a, "moving", renamed).status_code == 200  # same name, other weights
    assert chat(b, "moving") == chat(a, "moving") != first
    # the follower drops unloaded weights from B without a request
    assert post(a, "/v1/unload_lora_adapter", {"lora_name": "moving"}).status_code == 200
    lag = wait_for(lambda: "alice.moving" not in b.service.adapters.records, interval=0.01)
    log.info("unload through A: B's engine let the weights go after %.3f s", lag)


@pytest.mark.slow
def test_a_postgresql_outage_costs_only_the_requests_that_need_state(fleet, postgres):
    a, b = fleet
    assert load(a, "steady", a.adapters / "third").status_code == 200
    kept = post(a, "/v1/namespaces/fleet-kb/documents",
                {"id": "kept", "text": "Acknowledged before the outage."})
    assert kept.status_code == 200
    before = chat(b, "steady")
    postgres.stop("fast")
    try:
        assert chat(b, "steady") == before  # known adapters keep serving
        assert chat(b, BASE) and b.health()["status"] == "ok"
        refused = load(a, "newcomer", a.adapters / "fourth")
        assert refused.status_code == 503, refused.text
        message = refused.json()["error"]["message"]
        assert "state database" in message and "cannot be reached" in message
        ingest = post(b, "/v1/namespaces/fleet-kb/documents",
                      {"id": "lost", "text": "Written while the database was down."})
        assert ingest.status_code == 503
    finally:
        postgres.start()
    # the pool reconnects by itself; what was acknowledged is there, the refused is not
    wait_for(lambda: post(a, "/v1/namespaces/fleet-kb/documents",
                          {"id": "after", "text": "Written after the outage."})
             .status_code == 200, timeout=30)
    ids = a.service.namespaces.store.documents("alice.fleet-kb")
    assert "after" in ids and "kept" in ids and "lost" not in ids
    assert load(a, "newcomer", a.adapters / "fourth").status_code == 200
    assert chat(b, "newcomer")
    for name in ("steady", "newcomer"):
        assert post(a, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
