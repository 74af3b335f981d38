"""gRPC fuzzing: hypothesis builds messages for every RPC of lorag.v1.LoragService from the
proto's own descriptors (every field, at sizes and values no client should send: huge and
negative numbers, NaN and infinities, NUL and any unicode, unknown enum values, filters of
any JSON), with a valid key, plus a string field of invalid UTF-8 on the wire for each.
What must hold: no INTERNAL or UNKNOWN status, ever; health stays SERVING.
"""

import grpc
import pytest
from google.protobuf import descriptor, json_format, message_factory, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorag.v1 import lorag_pb2
from tests.daemons import ALICE

pytestmark = pytest.mark.fuzz
SERVICE = lorag_pb2.DESCRIPTOR.services_by_name["LoragService"]
FD = descriptor.FieldDescriptor
INTEGERS = {FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_INT64: (-2**63, 2**63 - 1),
            FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_UINT64: (0, 2**64 - 1)}
JSON = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(), inner, max_size=3), max_leaves=6)


def values(field: FD, depth: int) -> st.SearchStrategy:
    """Python values for one (non-repeated) field."""
    if field.type == FD.TYPE_STRING:
        return st.text(max_size=40) | st.sampled_from(["test-base", "user", "kb", "style"])
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in INTEGERS:
        low, high = INTEGERS[field.type]
        return st.integers(low, high) | st.integers(0, 64)
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == FD.TYPE_FLOAT else 64)
    if field.type == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(0, 99)
    if field.message_type.full_name == "google.protobuf.Value":
        return JSON
    return messages(field.message_type, depth + 1)


@st.composite
def messages(draw, message: descriptor.Descriptor, depth: int = 0) -> dict:
    """A message of type `message` as {field name: value}; deeper levels get fewer fields."""
    chosen = {}
    for oneof in message.oneofs:
        members = [f for f in oneof.fields if not f.name.startswith("_")]
        if members and len(oneof.fields) > 1 and draw(st.booleans()):
            field = draw(st.sampled_from(members))
            chosen[field.name] = draw(values(field, depth))
    for field in message.fields:
        if field.containing_oneof is not None and len(field.containing_oneof.fields) > 1:
            continue
        if depth > 2 or not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            chosen[field.name] = draw(st.dictionaries(st.text(max_size=12),
                                                      values(value_field, depth), max_size=3))
        elif field.is_repeated:
            chosen[field.name] = draw(st.lists(values(field, depth), max_size=3))
        else:
            chosen[field.name] = draw(values(field, depth))
    return chosen


def build(message_class, fields: dict):
    """The protobuf message of `fields` (values as `messages` draws them)."""
    message = message_class()
    for name, value in fields.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():  # the one map here: string -> Value
                json_format.ParseDict(item, target[key])
        elif field.is_repeated and field.message_type is not None:
            kind = message_factory.GetMessageClass(field.message_type)
            target.extend(build(kind, item) for item in value)
        elif field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(build(type(target), value))
        else:
            setattr(message, name, value)
    return message


@pytest.fixture(scope="module")
def daemon(own_daemon):
    return own_daemon


@pytest.fixture(scope="module")
def channel(daemon):
    with grpc.insecure_channel(daemon.grpc_target) as open_channel:
        yield open_channel


def call(channel, method: descriptor.MethodDescriptor, payload: bytes):
    """Send raw request bytes to `method`; the status code it ends with (OK included)."""
    path = f"/{SERVICE.full_name}/{method.name}"
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    stub = kind(path, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    try:
        answer = stub(payload, metadata=[("authorization", ALICE)], timeout=60)
        if method.server_streaming:
            list(answer)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def healthy(channel) -> bool:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=[m.name for m in SERVICE.methods])
def test_no_message_gets_an_internal_error(channel, method, request):
    message_class = getattr(lorag_pb2, method.input_type.name)
    examples = request.config.getoption("--fuzz-examples") * 3

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(messages(method.input_type))
    def fuzz(fields):
        try:
            payload = build(message_class, fields).SerializeToString()
        except (ValueError, TypeError):  # the client library refuses it: nothing to send
            return
        code, details = call(channel, method, payload)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), \
            f"{method.name}({fields!r}) -> {code}: {details}"

    fuzz()
    assert healthy(channel)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=[m.name for m in SERVICE.methods])
def test_invalid_utf8_on_the_wire_is_invalid_argument(channel, method):
    strings = [f for f in method.input_type.fields if f.type == FD.TYPE_STRING]
    number = strings[0].number if strings else 1  # ListAdapters: a field it does not have
    payload = bytes([number << 3 | 2, 2]) + b"\xff\xfe"  # length-delimited, 2 bad bytes
    code, details = call(channel, method, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT if strings else code == grpc.StatusCode.OK
    if strings:
        assert f"is not a valid {method.input_type.full_name}" in details
    assert healthy(channel)


@pytest.mark.parametrize("request_message", [
    lorag_pb2.SearchRequest(namespace="kb", query="x", mode=4),
    lorag_pb2.SearchRequest(namespace="kb", query="x",
                            filter={"a": struct_pb2.Value(number_value=float("inf"))}),
], ids=["unknown-enum-value", "infinite-filter-value"])
def test_what_fuzzing_found_is_invalid_argument(channel, request_message):
    code, details = call(channel, SERVICE.methods_by_name["Search"],
                         request_message.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
