"""What the playground needs beyond the generation API, usable by any client: file
uploads into a namespace (POST /v1/namespaces/{ns}/files, an outcome per file) and the
server's form (GET /v1/server: defaults, limits, the caller's rights)."""

import httpx
import pytest

from lorag.retrieval.ingest import SUFFIXES
from lorag.server.requests import SAMPLING_DEFAULTS
from tests.daemons import ALICE, ALICE_USER, BOB, MAX_MODEL_LEN

HOURS = b"# Hours\n\nThe Osaka depot opens at 6:50 and closes at 22:10.\n"
PAGE = b"<html><head><title>Ferry</title></head><body><h1>Ferry</h1><p>The ferry to " \
       b"Bergen leaves at 8:25.</p><script>ignored()</script></body></html>"


def upload(daemon, namespace: str, files: list[tuple[str, bytes]], key: str = ALICE):
    return httpx.post(f"{daemon.url}/v1/namespaces/{namespace}/files",
                      files=[("files", (name, data)) for name, data in files],
                      headers={"Authorization": key}, timeout=120)


def search(daemon, namespace: str, query: str, key: str = ALICE) -> list[dict]:
    response = httpx.post(f"{daemon.url}/v1/namespaces/{namespace}/search",
                          json={"query": query, "top_k": 3}, headers={"Authorization": key})
    assert response.status_code == 200, response.text
    return response.json()["data"]


@pytest.mark.slow
def test_each_file_is_read_as_lorag_ingest_reads_it_and_fails_alone(daemon):
    records = b'{"id": "r1", "text": "Record one is about tides.", "metadata": {"k": 1}}\n'
    response = upload(daemon, "uploads", [
        ("hours.md", HOURS), ("ferry.html", PAGE), ("records.jsonl", records),
        ("scan.pdf", b"%PDF-1.4 broken"), ("tool.exe", b"MZ"), ("latin.txt", b"caf\xe9"),
        ("../../escape.txt", b"Escaped names keep their last part only."),
        ("..", b"no name at all")])
    assert response.status_code == 200, response.text
    files = {row["file"]: row for row in response.json()["files"]}
    assert files["hours.md"]["documents"] == [{"id": "hours.md", "status": "added"}]
    assert files["ferry.html"]["documents"] == [{"id": "ferry.html", "status": "added"}]
    assert files["records.jsonl"]["documents"] == [{"id": "r1", "status": "added"}]
    assert files["escape.txt"]["documents"] == [{"id": "escape.txt", "status": "added"}]
    assert files["scan.pdf"]["error"].startswith("scan.pdf is not a readable PDF")
    assert files["tool.exe"]["error"] == (
        f"tool.exe: unsupported file type '.exe'; supported: {', '.join(sorted(SUFFIXES))}")
    assert files["latin.txt"]["error"].startswith("latin.txt is not UTF-8 text")
    assert files["unnamed"]["error"].startswith("unnamed: unsupported file type ''")
    assert "/tmp" not in response.text  # no server paths in what the client sees

    hit = search(daemon, "uploads", "When does the Osaka depot open?")[0]
    assert hit["document_id"] == "hours.md" and hit["metadata"]["format"] == "md"
    ferry = search(daemon, "uploads", "ferry to Bergen")[0]
    assert ferry["metadata"]["title"] == "Ferry" and "ignored" not in ferry["text"]
    again = upload(daemon, "uploads", [("hours.md", HOURS)]).json()["files"]
    assert again == [{"file": "hours.md", "documents": [{"id": "hours.md",
                                                          "status": "unchanged"}]}]
    other = httpx.post(f"{daemon.url}/v1/namespaces/uploads/search",
                       json={"query": "Osaka depot"}, headers={"Authorization": BOB})
    assert other.status_code == 404  # another tenant's namespace: not there for bob


def test_bad_uploads_say_what_is_wrong_and_write_nothing(daemon):
    denied = upload(daemon, "user-uploads", [("hours.md", HOURS)], key=ALICE_USER)
    assert denied.status_code == 403 and "admin" in denied.json()["error"]["message"]
    bad_name = upload(daemon, "no/slashes", [("hours.md", HOURS)])
    assert bad_name.status_code in (400, 404)
    too_many = upload(daemon, "many", [(f"{i}.txt", b"x") for i in range(33)])
    assert too_many.status_code == 413
    assert too_many.json()["error"]["message"] == (
        "files has 33 files in one upload; at most 32 are taken (the daemon's --limit "
        "upload_files)")
    none = httpx.post(f"{daemon.url}/v1/namespaces/empty/files",
                      headers={"Authorization": ALICE})
    assert none.status_code == 400 and none.json()["error"]["param"] == "files"
    names = [row["name"] for row in httpx.get(f"{daemon.url}/v1/namespaces", headers={
        "Authorization": ALICE}).json()["data"]]
    assert not {"user-uploads", "many", "empty"} & set(names)
    assert daemon.health()["status"] == "ok"


def test_the_server_form_says_defaults_limits_and_rights(daemon):
    info = httpx.get(f"{daemon.url}/v1/server", headers={"Authorization": ALICE}).json()
    assert info["defaults"] == {**SAMPLING_DEFAULTS, "max_tokens": None, "seed": None}
    assert info["max_model_len"] == MAX_MODEL_LEN
    abstain = info["rag"].pop("abstain")
    assert info["rag"] == {"top_k": 4, "max_top_k": 20, "mode": "hybrid",
                           "modes": ["vector", "bm25", "hybrid"], "rerank_candidates": 20}
    assert abstain["answer"] == "The sources do not say." and abstain["source"] == "none"
    assert "sources do not say" in abstain["phrases"]
    assert info["ingest_file_types"] == sorted(SUFFIXES)
    assert info["request_limits"]["messages"] == 1024
    assert info["caller"] == {"tenant": "alice", "admin": True}
    user = httpx.get(f"{daemon.url}/v1/server", headers={"Authorization": ALICE_USER}).json()
    assert user["caller"] == {"tenant": "alice", "admin": False}
    refused = httpx.get(f"{daemon.url}/v1/server")
    assert refused.status_code == 401
