"""Faults injected while other tenants stream, each with what must hold:

- a client that reads its stream very slowly (HTTP and gRPC) holds its own output and
  nothing else: the step loop finishes its request without waiting for it, other streams
  produce the tokens they produce alone, and the slow client gets every token in the end;
- the disk under the data dir fills during an ingest: the write that did not fit is a 503
  that says so, nothing acknowledged is lost, other streams finish, and once space is
  freed ingest works again, across a restart too;
- SIGKILL of `lorag serve` during adapter registrations and during ingests: after a
  restart every acknowledged registration serves and every acknowledged document is
  found; nothing is half there.

(An adapter's folder rewritten or deleted while it serves:
tests/server/engine/test_adapter_files.py and tests/server/test_restart.py.)
"""

import http.client
import itertools
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess
from lorag.client import sse_event
from lorag.server import tenancy
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BASE, BOB, LocalDaemon
from tests.polling import wait_for
from tests.server.test_failures import grpc_health, stream_events, text_of
from tests.tiny import tiny_model

# every event carries 20 alternatives: ~2 KB each, far more than socket buffers hold
HEAVY = {"model": BASE, "messages": [{"role": "user", "content": "Go on and on."}],
         "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True,
         "logprobs": True, "top_logprobs": 20, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def daemon(own_daemon):
    return own_daemon


def wait_idle(daemon, timeout: float = 120) -> None:
    """Until the engine runs and queues nothing."""
    def idle() -> bool:
        load = daemon.service.engine.occupancy()
        return load["running"] == load["waiting"] == 0

    wait_for(idle, timeout, what="an idle engine")


def slow_client(daemon) -> http.client.HTTPConnection:
    """A connection with a 4 KiB receive buffer that has sent HEAVY and reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(("127.0.0.1", daemon.options.port))
    connection = http.client.HTTPConnection("127.0.0.1", daemon.options.port, timeout=60)
    connection.sock = sock
    connection.request("POST", "/v1/chat/completions", json.dumps(HEAVY),
                       {"Authorization": BOB, "Content-Type": "application/json"})
    return connection


@pytest.mark.slow
def test_a_slow_http_reader_holds_its_own_output_and_nothing_else(daemon):
    alone = text_of(stream_events(daemon, "Other.", max_tokens=60))
    connection = slow_client(daemon)
    time.sleep(0.5)  # its stream is running, its buffers full
    assert text_of(stream_events(daemon, "Other.", max_tokens=60)) == alone
    wait_idle(daemon)  # the step loop finished it: it never waits for a reader

    response = connection.getresponse()  # now read it all
    assert response.status == 200
    events = [event for line in response.read().decode().splitlines()
              if (event := sse_event(line))]
    connection.close()
    tokens = [t for e in events for c in e["choices"] if c.get("logprobs")
              for t in c["logprobs"]["content"]]
    assert len(tokens) == HEAVY["max_tokens"] and events[-1]["usage"]["completion_tokens"] \
        == HEAVY["max_tokens"]


@pytest.mark.slow
def test_a_slow_grpc_reader_holds_its_own_output_and_nothing_else(daemon):
    request = lorag_pb2.ChatRequest(
        messages=[lorag_pb2.ChatMessage(role="user", content="Go on and on.")],
        sampling=lorag_pb2.SamplingOptions(max_tokens=400, temperature=0, logprobs=20))
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        stub = lorag_pb2_grpc.LoragServiceStub(channel)
        unread = stub.ChatStream(request, metadata=[("authorization", BOB)], timeout=120)
        time.sleep(0.5)
        other = stub.Chat(lorag_pb2.ChatRequest(
            messages=[lorag_pb2.ChatMessage(role="user", content="Other.")],
            sampling=lorag_pb2.SamplingOptions(max_tokens=30, temperature=0)),
            metadata=[("authorization", ALICE)], timeout=60)
        assert other.usage.completion_tokens > 0 and grpc_health(daemon) == 1  # SERVING
        wait_idle(daemon)
        pieces = list(unread)
    assert pieces[-1].finish_reason != lorag_pb2.FINISH_REASON_UNSPECIFIED
    assert pieces[-1].usage.completion_tokens == sum(len(p.logprobs) for p in pieces) > 0


# ---- a full disk ----

# each document has a word of its own (qx7vz), which search finds it by
DOC = "The tide table of harbour qx{i}vz says high water comes at noon. " * 12


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: a disk that can fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    assert done.returncode == 0, (
        f"this test mounts a size-limited tmpfs, as root (with CAP_SYS_ADMIN): "
        f"{done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk, leave: int) -> None:
    """Take all of the disk's space but `leave` bytes."""
    stat = shutil.disk_usage(disk)
    with open(disk / "filler", "wb") as filler:
        filler.write(b"\0" * max(stat.free - leave, 0))


def put(daemon, i: int) -> httpx.Response:
    return httpx.post(f"{daemon.url}/v1/namespaces/tides/documents",
                      json={"id": f"doc-{i}", "text": DOC.format(i=i)},
                      headers={"Authorization": ALICE}, timeout=60)


def stored(local: LocalDaemon) -> list[str]:
    """The ids of the documents in alice's namespace "tides", as the state database has
    them."""
    return local.service.namespaces.store.documents(tenancy.key("alice", "tides"))


@pytest.mark.slow
def test_a_full_disk_during_ingest_loses_nothing_acknowledged(tiny_base, keys_file,
                                                              small_disk, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    local = LocalDaemon(tiny_base, small_disk / "data", root, keys_file)
    try:
        acknowledged, i = [], 0
        for i in range(3):
            assert put(local, i).status_code == 200
            acknowledged.append(f"doc-{i}")
        fill(small_disk, leave=64 << 10)
        other = ThreadPoolExecutor(1).submit(stream_events, local, "Other.", 200)
        while (response := put(local, i := i + 1)).status_code == 200:
            acknowledged.append(f"doc-{i}")
            assert i < 500, "the disk never filled"
        assert response.status_code == 503, response.text
        message = response.json()["error"]["message"]
        assert "disk is full" in message and "nothing of this request was stored" in message
        assert len(text_of(other.result(timeout=120))) > 0 and local.health()["status"] == "ok"
        assert sorted(stored(local)) == sorted(acknowledged)

        (small_disk / "filler").unlink()
        assert put(local, i).status_code == 200  # space again: the refused one goes in
        acknowledged.append(f"doc-{i}")
        local.restart()
        found = httpx.post(f"{local.url}/v1/namespaces/tides/search",
                           json={"query": f"harbour qx{i}vz", "top_k": 1},
                           headers={"Authorization": ALICE}).json()["data"]
        assert found[0]["document_id"] == f"doc-{i}"
        assert sorted(stored(local)) == sorted(acknowledged)
    finally:
        local.stop()


# ---- SIGKILL mid-write ----

ADAPTERS = 16

@pytest.mark.slow
def test_sigkill_during_registrations_and_ingests_leaves_nothing_half_done(
        tiny_base, keys_file, tmp_path):
    root = tmp_path / "adapters"
    specs = {f"a{i}": AdapterSpec(rank=4, alpha=8) for i in range(ADAPTERS)}
    make_adapters(tiny_model(), root, specs, seed=1)
    flags = ["--model", str(tiny_base), "--quantize", "none", "--dtype", "float32",
             "--attention-backend", "torch",  # vLLM's kernel: ~10 s of imports a start
             "--max-model-len", "512", "--api-keys", str(keys_file), "--adapter-root", str(root)]
    daemon = DaemonProcess(tmp_path / "data", flags, tmp_path / "daemon.log")
    registered, ingested, stop = [], [], threading.Event()

    def register() -> str:
        for i in itertools.count():  # round and round: again is a no-op that answers 200
            name = f"a{i % ADAPTERS}"
            response = httpx.post(f"{daemon.url}/v1/load_lora_adapter", json={
                "lora_name": name, "lora_path": str(root / name)},
                headers={"Authorization": ALICE}, timeout=60)
            if response.status_code != 200 or stop.is_set():
                return response.text
            registered.append(name)

    def ingest() -> str:
        for i in range(1, 1000):
            response = put(daemon, i)
            if response.status_code != 200 or stop.is_set():
                return response.text
            ingested.append(f"doc-{i}")

    assert put(daemon, 0).status_code == 200  # the embedder is loaded: both go quickly
    ingested.append("doc-0")
    pool = ThreadPoolExecutor(2)
    writers = [pool.submit(register), pool.submit(ingest)]
    try:
        deadline = time.monotonic() + 120
        while len(registered) < 8 or len(ingested) < 8:
            assert time.monotonic() < deadline, "the writers did not get going"
            assert not any(w.done() for w in writers), [w.result() for w in writers]
            time.sleep(0.01)
    finally:  # the fault (in the middle of the next write of each), and never an orphan
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        stop.set()
        pool.shutdown()  # the connections broke: the writers end
    registered_at_kill, ingested_at_kill = list(registered), list(ingested)

    # the restart, on the same data dir: in this process (a second `lorag serve` would
    # cost its start-up again, and what is read back is the same)
    daemon = LocalDaemon(tiny_base, tmp_path / "data", root, keys_file)
    try:
        names = {row["id"] for row in httpx.get(f"{daemon.url}/v1/models", headers={
            "Authorization": ALICE}).json()["data"]}
        assert set(registered_at_kill) <= names
        for name in names & {f"a{i}" for i in range(ADAPTERS)}:
            answer = httpx.post(f"{daemon.url}/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3}, headers={"Authorization": ALICE}, timeout=60)
            assert answer.status_code == 200, answer.text  # nothing half-registered
        # the ingests ran one after another: the first n were acknowledged, and the one in
        # flight is there whole or not at all
        counts = httpx.get(f"{daemon.url}/v1/namespaces", headers={
            "Authorization": ALICE}).json()["data"]
        count = next(row["documents"] for row in counts if row["name"] == "tides")
        assert count in (len(ingested_at_kill), len(ingested_at_kill) + 1)
        for i in (0, len(ingested_at_kill) - 1):
            hits = httpx.post(f"{daemon.url}/v1/namespaces/tides/search", json={
                "query": f"harbour qx{i}vz", "top_k": 1},
                headers={"Authorization": ALICE}).json()["data"]
            assert hits[0]["document_id"] == f"doc-{i}"
    finally:
        daemon.stop()
