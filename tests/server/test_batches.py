"""The Batch API (server/batches.py) with the official `openai` client: files.create,
batches.create, batches.retrieve until the batch completed, the output file. Every line's
result equals the same request sent alone (greedy); a batch survives a SIGKILL of its
replica (the restarted one takes the dead one's lines once their lease ran out, and no
line is lost or answered twice); bad lines fail the batch naming them; a cancelled batch
keeps what finished; a tenant sees only its own files and batches."""

import json
import signal
import time

import openai
import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess
from lorag.state.schema import batch_lines
from tests.daemons import BASE, BOB, LocalDaemon
from tests.polling import wait_for
from tests.server.test_http import client, load, post
from tests.tiny import tiny_model

QUESTIONS = ["Name a colour.", "Count to three.", "Say hello.", "What is tea?",
             "Describe the sea.", "Pick a number.", "Name a city.", "What is rain?"]


def chat_line(custom_id: str, model: str, question: str, max_tokens: int = 8) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "temperature": 0, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": question}]}}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def run_batch(api: openai.OpenAI, lines: list[dict], endpoint="/v1/chat/completions",
              timeout: float = 600):
    """Upload, create, and wait until the batch ended; the batch."""
    upload = api.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint=endpoint,
                               completion_window="24h", metadata={"run": "test"})
    return ended(api, batch.id, ("completed", "failed", "cancelled"), timeout)


def ended(api: openai.OpenAI, batch_id: str, statuses: tuple[str, ...],
          timeout: float = 300):
    """The batch, once its status is one of `statuses`."""
    seen = {}

    def done() -> bool:
        seen["batch"] = api.batches.retrieve(batch_id)
        return seen["batch"].status in statuses

    wait_for(done, timeout, interval=0.2, what=f"batch {batch_id} to be {statuses}")
    return seen["batch"]


def results(api: openai.OpenAI, file_id: str) -> dict[str, dict]:
    """custom_id -> the output line, every custom_id once."""
    rows = [json.loads(line) for line in api.files.content(file_id).text.splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id answered twice"
    return by_id


def alone(daemon, line: dict) -> str:
    response = post(daemon, line["url"], line["body"])
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def eight_adapters(daemon, daemon_adapters) -> list[str]:
    """The daemon's four test adapters and four more, registered as alice's."""
    if daemon.backend == "native":
        make_adapters(tiny_model(), daemon_adapters / "batch",
                      {f"b{i}": AdapterSpec(rank=8, alpha=16, scale=0.3) for i in range(4)},
                      seed=9)
        extra = {f"b{i}": daemon_adapters / "batch" / f"b{i}" for i in range(4)}
    else:  # the real model's adapters take a minute to make: the same four, other names
        extra = {f"b{i}": daemon_adapters / name
                 for i, name in enumerate(["style", "other", "third", "fourth"])}
    names = {**{name: daemon_adapters / name for name in ("style", "other", "third",
                                                          "fourth")}, **extra}
    for name, path in names.items():
        assert load(daemon, name, path).status_code == 200
    return list(names)


@pytest.mark.slow
def test_every_line_of_a_batch_across_8_adapters_is_its_request_answered_alone(
        daemon, eight_adapters):
    # native: each of the 64 (adapter, question) bodies once, and half of them twice;
    # vLLM-CPU on the real model is slower
    count = 96 if daemon.backend == "native" else 16
    lines = [chat_line(f"req-{i}", eight_adapters[i % 8], QUESTIONS[i // 8 % 8])
             for i in range(count)]
    lines[7]["body"]["model"] = BASE  # the base model among them
    api = client(daemon)
    batch = run_batch(api, lines)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == batch.request_counts.completed == count
    assert batch.error_file_id is None and batch.metadata == {"run": "test"}
    output = results(api, batch.output_file_id)
    assert list(output) == [line["custom_id"] for line in lines]  # in line order
    answered_alone = {}  # a line's body -> its answer sent alone (64 bodies in 96 lines)
    for line in lines:
        row = output[line["custom_id"]]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        body = row["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == line["body"]["model"]
        assert row["response"]["request_id"] == body["id"]
        request = json.dumps(line["body"], sort_keys=True)
        if request not in answered_alone:
            answered_alone[request] = alone(daemon, line)
        assert body["choices"][0]["message"]["content"] == answered_alone[request], line
    assert batch.id in [b.id for b in api.batches.list()]


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_a_line_that_fails_goes_to_the_error_file_and_the_others_complete(daemon):
    lines = [chat_line("ok", BASE, "Say hi."), chat_line("no-such-model", "nope", "Hi."),
             {"custom_id": "grounded", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": BASE, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Hi."}],
                       "rag": {"namespace": "no-such-namespace"}}}]
    api = client(daemon)
    batch = run_batch(api, lines)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    assert list(results(api, batch.output_file_id)) == ["ok"]
    failed = results(api, batch.error_file_id)
    assert failed["no-such-model"]["response"]["status_code"] == 404
    assert "nope" in failed["no-such-model"]["response"]["body"]["error"]["message"]
    assert failed["grounded"]["response"]["status_code"] == 404
    assert "no-such-namespace" in failed["grounded"]["response"]["body"]["error"]["message"]


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_an_embeddings_batch(daemon):
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "all-minilm-l6-v2", "input": [f"text {i}", "more"]}}
             for i in range(3)]
    api = client(daemon)
    batch = run_batch(api, lines, endpoint="/v1/embeddings")
    assert batch.status == "completed", batch
    rows = results(api, batch.output_file_id)
    alone_vectors = api.embeddings.create(model="all-minilm-l6-v2", input=["text 1", "more"])
    assert rows["e1"]["response"]["body"]["data"][0]["embedding"] == \
        pytest.approx(alone_vectors.data[0].embedding, abs=1e-6)


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_bad_lines_fail_the_batch_naming_each(daemon):
    lines = [chat_line("a", BASE, "x"), chat_line("a", BASE, "y"),
             {**chat_line("b", BASE, "z"), "url": "/v1/completions"},
             {**chat_line("c", BASE, "z"), "body": {"model": BASE, "messages": [],
                                                     "max_tokens": 2}},
             {**chat_line("d", BASE, "z"), "body": {**chat_line("d", BASE, "z")["body"],
                                                     "stream": True}}]
    api = client(daemon)
    upload = api.files.create(file=("bad.jsonl", jsonl(lines) + b"not json\n"),
                              purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.status == "failed" and batch.request_counts.total == 0
    errors = {error.line: error for error in batch.errors.data}
    assert set(errors) == {2, 3, 4, 5, 6}
    assert "custom_id 'a' is on an earlier line" in errors[2].message
    assert "endpoint is '/v1/chat/completions'" in errors[3].message
    assert errors[4].param == "messages" and errors[5].param == "body.stream"
    assert "Invalid JSON" in errors[6].message or "json" in errors[6].message.lower()


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_files_and_batches_are_their_tenants_alone(daemon):
    api, other = client(daemon), client(daemon, BOB)
    upload = api.files.create(file=("mine.jsonl", jsonl([chat_line("a", BASE, "x")])),
                              purpose="batch")
    for call in (lambda: other.files.retrieve(upload.id),
                 lambda: other.files.content(upload.id),
                 lambda: other.files.delete(upload.id),
                 lambda: other.batches.create(input_file_id=upload.id,
                                              endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert upload.id not in [f.id for f in other.files.list()]
    with pytest.raises(openai.BadRequestError) as error:
        api.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert error.value.body["param"] == "purpose"
    assert api.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(upload.id)


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_a_cancelled_batch_keeps_what_finished(daemon):
    lines = [chat_line(f"c{i}", BASE, "Tell a long story.", max_tokens=200)
             for i in range(40)]
    api = client(daemon)
    upload = api.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    wait_for(lambda: api.batches.retrieve(batch.id).request_counts.completed >= 1, 120,
             interval=0.2, what="a first finished line")
    # finalizing: a runner whose line stopped is writing the output file just then
    assert api.batches.cancel(batch.id).status in ("cancelling", "finalizing", "cancelled")
    cancelled = ended(api, batch.id, ("cancelled",), 120)
    done = cancelled.request_counts.completed
    assert 1 <= done < 40
    assert len(results(api, cancelled.output_file_id)) == done
    assert api.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes


@pytest.mark.slow
def test_a_batch_survives_a_sigkill_of_its_replica(tiny_base, keys_file, tmp_path):
    """`lorag serve` runs a batch; SIGKILL mid-batch; the restarted replica (same data
    dir) takes the dead one's lines once their 2 s lease ran out and finishes the batch:
    every line answered once, each as the same request alone."""
    root = tmp_path / "adapters"
    make_adapters(tiny_model(), root, {"style": AdapterSpec(rank=8, alpha=16, scale=0.3)},
                  seed=3)
    flags = ["--model", str(tiny_base), "--quantize", "none", "--dtype", "float32",
             "--served-model-name", BASE, "--attention-backend", "torch",
             "--max-model-len", "512", "--api-keys", str(keys_file), "--adapter-root",
             str(root), "--batch-concurrency", "2", "--batch-lease-s", "2"]
    process = DaemonProcess(tmp_path / "data", flags, tmp_path / "daemon.log")
    assert load(process, "style", root / "style").status_code == 200
    lines = [chat_line(f"k{i}", ["style", BASE][i % 2], QUESTIONS[i % 8], max_tokens=48)
             for i in range(40)]
    api = client(process)
    upload = api.files.create(file=("k.jsonl", jsonl(lines)), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    try:
        wait_for(lambda: api.batches.retrieve(batch.id).request_counts.completed >= 6, 300,
                 interval=0.2, what="six finished lines")
    finally:
        process.process.send_signal(signal.SIGKILL)
        process.process.wait()
    killed_at = time.monotonic()

    daemon = LocalDaemon(tiny_base, tmp_path / "data", root, keys_file)
    try:
        api = client(daemon)
        finished = ended(api, batch.id, ("completed",))
        assert time.monotonic() - killed_at >= 2  # the dead replica's lease ran out first
        assert finished.request_counts.completed == 40
        assert finished.request_counts.failed == 0
        output = results(api, finished.output_file_id)
        assert sorted(output) == sorted(line["custom_id"] for line in lines)
        for line in lines:
            assert output[line["custom_id"]]["response"]["body"]["choices"][0]["message"][
                "content"] == alone(daemon, line)
    finally:
        daemon.stop()


@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["native"], indirect=True)
@pytest.mark.parametrize("status", ["in_progress", "finalizing"])
def test_a_batch_its_replica_left_unfinished_is_finished_by_another(daemon, status):
    """Every line answered, but the replica that answered the last one died before it
    wrote the output (left in_progress), or while it did (finalizing, a lease ago): a
    runner finishes it within a lease renewal."""
    store = daemon.service.batches
    now = int(time.time())
    batch_id = f"batch_stalled_{status}"
    store.create("alice", {"id": batch_id, "object": "batch", "status": status,
                           "created_at": now, "finalizing_at": now - 3600,
                           "cancelling_at": None, "errors": None, "metadata": {}},
                 [("only", {"url": "/v1/chat/completions", "body": {}})])
    with store.db.write() as connection:  # the line answered by the replica that died
        connection.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id).values(
            status="done", ok=True, result={"status_code": 200, "body": {"id": "x"}}))
    api = client(daemon)
    finished = ended(api, batch_id, ("completed",), timeout=60)
    assert list(results(api, finished.output_file_id)) == ["only"]
