"""The daemon over gRPC: a client built from proto/lorag/v1, health checking, reflection,
and the status codes of the error mapping (the fast lane's daemon, tests/daemons.py)."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, ALICE_USER, BOB

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GREEDY = lorag_pb2.SamplingOptions(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def channel(daemon):
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        yield channel


def call(method, request, key: str = ALICE):
    return method(request, metadata=[("authorization", key)], timeout=60)


def test_generate_and_stream_on_base_and_runtime_adapter(channel, daemon_adapters):
    stub = lorag_pb2_grpc.LoragServiceStub(channel)
    base = call(stub.Generate, lorag_pb2.GenerateRequest(prompt=PROMPT, sampling=GREEDY))
    assert base.text and base.usage.completion_tokens <= 12
    assert base.finish_reason in (lorag_pb2.FINISH_REASON_STOP, lorag_pb2.FINISH_REASON_LENGTH)

    loaded = call(stub.LoadAdapter, lorag_pb2.LoadAdapterRequest(
        name="grpc-style", path=str(daemon_adapters / "style")))
    assert loaded.loaded is True
    tuned = call(stub.Generate, lorag_pb2.GenerateRequest(prompt=PROMPT, adapter="grpc-style",
                                                          sampling=GREEDY))
    assert tuned.text != base.text
    pieces = list(call(stub.GenerateStream, lorag_pb2.GenerateStreamRequest(
        prompt=PROMPT, adapter="grpc-style", sampling=GREEDY)))
    assert "".join(p.text for p in pieces) == tuned.text
    assert pieces[-1].finish_reason == tuned.finish_reason and pieces[-1].usage.prompt_tokens
    assert all(p.finish_reason == lorag_pb2.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])

    names = [a.name for a in call(stub.ListAdapters, lorag_pb2.ListAdaptersRequest()).adapters]
    assert "grpc-style" in names
    assert "grpc-style" not in [a.name for a in call(
        stub.ListAdapters, lorag_pb2.ListAdaptersRequest(), BOB).adapters]
    assert call(stub.UnloadAdapter, lorag_pb2.UnloadAdapterRequest(name="grpc-style")).unloaded


@pytest.mark.parametrize("request_, key, code", [
    (lorag_pb2.GenerateRequest(prompt=PROMPT, adapter="nope"), ALICE,
     grpc.StatusCode.NOT_FOUND),
    (lorag_pb2.GenerateRequest(prompt=""), ALICE, grpc.StatusCode.INVALID_ARGUMENT),
    (lorag_pb2.GenerateRequest(prompt=PROMPT, sampling=lorag_pb2.SamplingOptions(
        max_tokens=100000)), ALICE, grpc.StatusCode.INVALID_ARGUMENT),
    (lorag_pb2.GenerateRequest(prompt=PROMPT, sampling=lorag_pb2.SamplingOptions(
        top_p=0)), ALICE, grpc.StatusCode.INVALID_ARGUMENT),
    (lorag_pb2.GenerateRequest(prompt=PROMPT), "Bearer wrong-key", grpc.StatusCode.UNAUTHENTICATED),
], ids=["unknown-adapter", "empty-prompt", "too-long", "bad-top-p", "bad-key"])
def test_errors_map_to_status_codes(channel, daemon, request_, key, code):
    stub = lorag_pb2_grpc.LoragServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        call(stub.Generate, request_, key)
    assert error.value.code() == code and error.value.details()
    assert daemon.health()["status"] == "ok"


def test_a_folder_outside_the_adapter_roots_is_an_invalid_argument(channel, tmp_path):
    stub = lorag_pb2_grpc.LoragServiceStub(channel)
    with pytest.raises(grpc.RpcError) as outside:
        call(stub.LoadAdapter, lorag_pb2.LoadAdapterRequest(name="x", path=str(tmp_path)))
    assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the configured adapter roots" in outside.value.details()


def test_a_key_without_admin_rights_may_not_load_adapters(channel, daemon_adapters):
    stub = lorag_pb2_grpc.LoragServiceStub(channel)
    with pytest.raises(grpc.RpcError) as denied:
        call(stub.LoadAdapter, lorag_pb2.LoadAdapterRequest(
            name="x", path=str(daemon_adapters / "style")), ALICE_USER)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_server_and_its_service_report_serving_to_health_checks(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lorag.v1.LoragService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_services(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert {"lorag.v1.LoragService", "grpc.health.v1.Health"} <= names
    described = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="lorag.v1.LoragService")]), timeout=10))
    assert described.file_descriptor_response.file_descriptor_proto
