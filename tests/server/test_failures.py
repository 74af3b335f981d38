"""Failures, on a daemon of its own (its engine is killed here): a bug answers "internal
error (request id ...)" and nothing of the exception, over HTTP, SSE and gRPC, with the
traceback in the log under that id; a request whose row fails ends alone; and a step loop
that dies is visible at once: open streams end with an error event, /health and
/health/ready answer 503, gRPC health goes NOT_SERVING, new requests get 503."""

import json
import logging
import re
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorag.client import sse_event
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BASE
from tests.polling import wait_for

SECRET = "/srv/tenants/bob/private-adapter"  # what an exception's text might carry
INTERNAL = re.compile(r"internal error \(request id (error-[0-9a-f]{16})\)")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def daemon(own_daemon):
    return own_daemon


def stream_events(daemon, content: str, max_tokens: int = 200) -> list[dict]:
    """A chat stream's events, read to the end."""
    body = {"model": BASE, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{daemon.url}{CHAT}", json=body, timeout=60,
                      headers={"Authorization": ALICE}) as response:
        assert response.status_code == 200, response.read()
        return [event for line in response.iter_lines() if (event := sse_event(line))]


def grpc_health(daemon) -> int:
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.mark.slow
def test_a_bug_is_an_internal_error_that_tells_nothing_of_it(daemon, monkeypatch, caplog):
    def broken(caller):
        raise RuntimeError(f"cannot stat {SECRET}")

    monkeypatch.setattr(daemon.service.adapters, "visible", broken)
    with caplog.at_level(logging.ERROR, logger="lorag.errors"):
        response = httpx.get(f"{daemon.url}/v1/adapters", headers={"Authorization": ALICE})
        with grpc.insecure_channel(daemon.grpc_target) as channel, \
                pytest.raises(grpc.RpcError) as rpc:
            lorag_pb2_grpc.LoragServiceStub(channel).ListAdapters(
                lorag_pb2.ListAdaptersRequest(), metadata=[("authorization", ALICE)])
    assert response.status_code == 500 and SECRET not in response.text
    error = response.json()["error"]
    assert error["type"] == "internal_error" and INTERNAL.fullmatch(error["message"])
    assert rpc.value.code() == grpc.StatusCode.INTERNAL and SECRET not in rpc.value.details()
    ids = [INTERNAL.fullmatch(error["message"])[1], INTERNAL.fullmatch(rpc.value.details())[1]]
    logged = {record.getMessage(): record for record in caplog.records}
    for request_id in ids:  # the log has each id, with the traceback that names the cause
        record = logged[f"internal error (request id {request_id})"]
        assert SECRET in str(record.exc_info[1])


def test_a_failing_row_ends_its_stream_alone_with_an_error_event(daemon):
    victim = daemon.service._render([{"role": "user", "content": "Victim."}])

    def fault(sampled, logits):
        if any(seq.prompt_ids == victim and len(seq.output_ids) >= 5 for seq in sampled):
            raise RuntimeError(f"kernel fault reading {SECRET}")

    alone = text_of(stream_events(daemon, "Other.", max_tokens=40))
    daemon.service.engine.fault_hook = fault
    results = {}
    try:
        threads = [threading.Thread(target=lambda c=content: results.update(
            {c: stream_events(daemon, c, max_tokens=40)})) for content in ("Victim.", "Other.")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        daemon.service.engine.fault_hook = None
    error = results["Victim."][-1]["error"]
    assert error["type"] == "internal_error" and SECRET not in json.dumps(results["Victim."])
    assert "the engine could not compute request chatcmpl-" in error["message"]
    assert text_of(results["Other."]) == alone


def text_of(events: list[dict]) -> str:
    assert all("error" not in event for event in events), events
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


@pytest.mark.slow
def test_a_dead_step_loop_is_visible_at_once(daemon):
    """Runs last in this module: it kills the daemon's engine."""
    engine = daemon.service.engine
    events = []
    reader = threading.Thread(target=lambda: events.extend(stream_events(daemon, "Count.",
                                                                         max_tokens=400)))
    reader.start()
    wait_for(lambda: engine.stats()["running"], 30, 0.01, "the stream running")
    assert grpc_health(daemon) == health_pb2.HealthCheckResponse.SERVING

    def broken():
        raise AssertionError("a scheduler bug (injected)")

    engine._update_merge = broken
    killed = time.monotonic()
    reader.join(timeout=10)
    assert not reader.is_alive() and time.monotonic() - killed < 5
    error = events[-1]["error"]
    assert error["type"] == "service_unavailable_error"
    assert "the engine stopped after an internal error" in error["message"]
    for path in ("/health", "/health/ready"):
        response = httpx.get(f"{daemon.url}{path}")
        assert response.status_code == 503 and response.json()["status"] == "engine stopped"
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{daemon.url}{CHAT}", json=body, headers={"Authorization": ALICE})
    assert response.status_code == 503, response.text
    assert "the engine stopped" in response.json()["error"]["message"]
    wait_for(lambda: grpc_health(daemon) == health_pb2.HealthCheckResponse.NOT_SERVING, 3, 0.1,
             "gRPC health NOT_SERVING")
