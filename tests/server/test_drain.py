"""Graceful drain: `lorag serve` in a subprocess gets SIGTERM while streams are open.

Readiness fails at once (HTTP 503, gRPC health NOT_SERVING) while liveness stays up, new
requests get 503 / UNAVAILABLE with a clear message, the open streams run to their final
chunk, and the process exits 0 within --shutdown-timeout; streams still running when it
runs out end with an error event instead. The model is a random Llama a few times the
tiny one's size, so that a stream runs for seconds, not milliseconds.
"""

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorag.benchmarks.daemon import DaemonProcess
from lorag.client import sse_data
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE
from tests.polling import wait_for
from tests.tiny import tiny_model

STREAMS = 4
BODY = {"model": "slow-tiny", "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 440, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def slow_tiny(tmp_path_factory, tokenizer):
    """A random Llama whose 440-token streams take seconds on two cores."""
    folder = tmp_path_factory.mktemp("models") / "slow-tiny"
    tiny_model(hidden_size=256, intermediate_size=512, num_hidden_layers=4).save_pretrained(
        folder)
    tokenizer.save_pretrained(folder)
    return folder


def start(slow_tiny, keys_file, tmp_path, shutdown_timeout: float) -> DaemonProcess:
    return DaemonProcess(tmp_path / "data", [
        "--model", str(slow_tiny), "--quantize", "none", "--dtype", "float32",
        "--attention-backend", "torch",  # vLLM's kernel costs ~10 s of imports per start
        "--max-model-len", "512", "--api-keys", str(keys_file),
        "--shutdown-timeout", str(shutdown_timeout)], tmp_path / "daemon.log")


def open_streams(daemon: DaemonProcess) -> tuple[ThreadPoolExecutor, list]:
    """STREAMS chat streams, each read in a thread to its end once its first chunk came;
    returns when every one has its first chunk."""
    started = [False] * STREAMS

    def read(index: int) -> list[str]:
        events = []
        with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json=BODY,
                          headers={"Authorization": ALICE}, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if (data := sse_data(line)) is not None:
                    events.append(data)
                    started[index] = True
        return events

    pool = ThreadPoolExecutor(STREAMS)
    futures = [pool.submit(read, index) for index in range(STREAMS)]
    def all_started() -> bool:
        assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
        return all(started)

    wait_for(all_started, 30, 0.01, "every stream started")
    return pool, futures


def grpc_health(daemon: DaemonProcess) -> int:
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.mark.slow
def test_sigterm_drains_open_streams_refuses_new_ones_and_exits_0(slow_tiny, keys_file,
                                                                   tmp_path):
    daemon = start(slow_tiny, keys_file, tmp_path, shutdown_timeout=60)
    assert httpx.get(f"{daemon.url}/health/ready").status_code == 200
    assert grpc_health(daemon) == health_pb2.HealthCheckResponse.SERVING
    pool, streams = open_streams(daemon)
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)

    ready = httpx.get(f"{daemon.url}/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert httpx.get(f"{daemon.url}/health").status_code == 200  # alive: not restarted
    assert grpc_health(daemon) == health_pb2.HealthCheckResponse.NOT_SERVING
    refused = httpx.post(f"{daemon.url}/v1/chat/completions", json=BODY,
                         headers={"Authorization": ALICE}, timeout=10)
    assert refused.status_code == 503, refused.text
    assert "shutting down and takes no new requests" in refused.json()["error"]["message"]
    with grpc.insecure_channel(daemon.grpc_target) as channel, \
            pytest.raises(grpc.RpcError) as refused_rpc:
        lorag_pb2_grpc.LoragServiceStub(channel).Generate(
            lorag_pb2.GenerateRequest(prompt="1, 2,"), timeout=10,
            metadata=[("authorization", ALICE)])
    assert refused_rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused_rpc.value.details()
    assert not any(stream.done() for stream in streams), "the streams ended too soon to tell"

    assert daemon.process.wait(timeout=60) == 0
    for stream in streams:  # every one ran to its final chunk
        events = stream.result()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length", last
    pool.shutdown()
    log = daemon.log.read_text()
    assert f"draining: no new requests; {STREAMS} in flight" in log
    assert time.monotonic() - signalled < 60


@pytest.mark.slow
def test_streams_still_running_at_the_shutdown_timeout_end_with_an_error_event(
        slow_tiny, keys_file, tmp_path):
    daemon = start(slow_tiny, keys_file, tmp_path, shutdown_timeout=1)
    pool, streams = open_streams(daemon)
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        assert daemon.process.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        raise
    assert time.monotonic() - signalled < 1 + 15  # the timeout, then a quick stop
    for stream in streams:
        events = stream.result()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "--shutdown-timeout 1 s" in error["message"], error
    pool.shutdown()
    assert f"{STREAMS} requests still running after 1 s were ended" in daemon.log.read_text()
