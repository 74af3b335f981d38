"""A restart on the same data dir: adapters come back from the SQLite registry (read and
validated again on first use, never trusted from before), namespaces from their FAISS
files, and answers are the same. On the native daemon: what a restart restores goes
through the Backend interface (`load_adapter(..., lazy=True)`), which the vLLM backend's
own test exercises without paying for a second vLLM start-up
(tests/server/test_vllm_backend.py)."""

import shutil

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.daemons import ALICE, BOB
from tests.server.test_http import chat, load, post


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_restart_keeps_adapters_and_namespaces_and_revalidates(daemon, daemon_adapters):
    fragile = daemon_adapters / "fragile"
    shutil.copytree(daemon_adapters / "other", fragile)
    for name, path in (("kept", daemon_adapters / "style"), ("fragile", fragile)):
        assert load(daemon, name, path).status_code == 200
    document = {"id": "restart-doc", "text": "The lighthouse keeper is called Ansel Varga."}
    assert post(daemon, "/v1/namespaces/restart-kb/documents", document).status_code == 200
    before = chat(daemon, "kept")

    daemon.restart()
    # the file changed while the daemon was down: checked against the registered content
    # before it is served
    tensors = load_file(fragile / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("inf")
    save_file(tensors, fragile / "adapter_model.safetensors")

    listed = httpx.get(f"{daemon.url}/v1/adapters", headers={"Authorization": ALICE}).json()
    rows = {row["name"]: row for row in listed["data"]}
    assert rows["kept"]["path"] == str(daemon_adapters / "style")
    assert not rows["kept"]["in_ram"] and not rows["fragile"]["in_ram"]  # read on first use
    assert chat(daemon, "kept") == before
    refused = post(daemon, "/v1/chat/completions",
                   {"model": "fragile", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 409  # the content registered is not there any more
    assert "can no longer be read as it was registered" in refused.json()["error"]["message"]
    assert daemon.health()["status"] == "ok"
    hits = post(daemon, "/v1/namespaces/restart-kb/search", {"query": "lighthouse keeper"})
    assert hits.json()["data"][0]["document_id"] == "restart-doc"
    assert post(daemon, "/v1/namespaces/restart-kb/search", {"query": "x"}, BOB) \
        .status_code == 404  # still alice's alone
    for name in ("kept", "fragile"):
        assert post(daemon, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
