"""Tool calling with the official `openai` client, on each backend's daemon
(tests/server/conftest.py): `required` and a named function decode under a grammar built
from the tools' schemas, so even the tiny random model calls a listed function with valid
arguments; `auto` and `none` leave the model free; calls stream as `delta.tool_calls`;
a conversation with past calls and their results renders; adapters and compositions
call tools as the base does (the format is the daemon's); bad tools are 400s naming
the field (a 413 past a limit); gRPC's Chat and ChatStream call tools as HTTP does."""

import json

import grpc
import pytest

from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BASE
from tests.server.test_http import QUESTION, client, post

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
DEEP = {"type": "object"}
for _ in range(40):
    DEEP = {"type": "object", "properties": {"a": DEEP}}


def chat(daemon, max_tokens: int = 100, **extra):  # room for the tags and the arguments
    return client(daemon).chat.completions.create(model=BASE, messages=ASK, temperature=0,
                                                  max_tokens=max_tokens, **extra)


def valid(call, tool: dict) -> bool:
    arguments = json.loads(call.function.arguments)
    properties = tool["function"]["parameters"]["properties"]
    return call.type == "function" and call.id.startswith("call_") and \
        call.function.name == tool["function"]["name"] and \
        set(tool["function"]["parameters"]["required"]) <= arguments.keys() <= \
        properties.keys() and all(arguments[k] in properties[k]["enum"] for k in arguments)


def test_required_calls_a_listed_function_with_valid_arguments(daemon):
    reply = chat(daemon, tools=[WEATHER, TIME], tool_choice="required",
                 parallel_tool_calls=False).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    (call,) = reply.message.tool_calls
    assert valid(call, WEATHER) or valid(call, TIME), call


def test_a_named_function_is_the_one_called(daemon):
    for tool in (WEATHER, TIME):
        reply = chat(daemon, tools=[WEATHER, TIME], parallel_tool_calls=False, tool_choice={
            "type": "function", "function": {"name": tool["function"]["name"]}}).choices[0]
        assert reply.finish_reason == "tool_calls"
        assert [valid(call, tool) for call in reply.message.tool_calls] == [True]


def test_parallel_calls_are_each_a_valid_call(daemon):
    reply = chat(daemon, tools=[WEATHER, TIME], tool_choice="required").choices[0]
    assert reply.message.tool_calls, reply
    for call in reply.message.tool_calls:
        assert valid(call, WEATHER) or valid(call, TIME), call


def test_calls_stream_as_tool_call_deltas(daemon):
    ask = dict(tools=[WEATHER], parallel_tool_calls=False,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = chat(daemon, **ask).choices[0].message.tool_calls[0]
    chunks = list(chat(daemon, stream=True, **ask))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert deltas[0].function.arguments == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_auto_and_none_leave_the_model_free_and_the_tools_are_in_the_prompt(daemon):
    plain = chat(daemon, max_tokens=12)
    auto = chat(daemon, max_tokens=12, tools=[WEATHER], tool_choice="auto")
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the signatures
    assert auto.choices[0].finish_reason in ("stop", "length")
    none = chat(daemon, max_tokens=12, tools=[WEATHER], tool_choice="none")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # not offered
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_a_conversation_with_a_call_and_its_result_renders(daemon):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "C": 21}'}]
    reply = client(daemon).chat.completions.create(model=BASE, messages=history,
                                                   tools=[WEATHER], max_tokens=8,
                                                   temperature=0)
    offered = chat(daemon, max_tokens=1, tools=[WEATHER])
    assert reply.usage.prompt_tokens > offered.usage.prompt_tokens


BAD = [
    ("schema-that-cannot-compile",
     {"tools": [{**WEATHER, "function": {**WEATHER["function"],
                                         "parameters": {"type": "wat"}}}]},
     "tools.0.function.parameters", "tools.0.function.parameters: the schema cannot be used"),
    ("a-schema-too-deep",
     {"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": DEEP}}]},
     "tools.0.function.parameters", "levels of nesting in a json_schema; at most 32 are taken"),
    ("result-without-a-call",
     {"messages": QUESTION + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages.1", "tool_call_id 'call_x', which no earlier assistant message's tool_calls"),
    ("unknown-named-function",
     {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "names function 'nope', which is not in tools"),
    ("required-without-tools", {"tool_choice": "required"}, "tool_choice",
     "tool_choice 'required' needs tools"),
    ("the-same-name-twice", {"tools": [WEATHER, WEATHER]}, "tools.1.function.name",
     "a function named 'get_weather' is already in tools"),
    ("calls-on-a-user-message",
     {"messages": [{"role": "user", "content": "hi", "tool_calls": [{
         "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0", "only an assistant message carries tool_calls"),
    ("required-and-a-response-format",
     {"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}},
     "tool_choice", "send it without response_format"),
]


@pytest.mark.parametrize("extra, param, message", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_tools_are_a_4xx_naming_the_field(daemon, extra, param, message):
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 4, **extra}
    response = post(daemon, "/v1/chat/completions", body)
    too_large = "at most" in message  # past a --limit: 413, as every limit
    assert response.status_code == (413 if too_large else 400), response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert chat(daemon, max_tokens=4).choices[0].message.content  # and it serves on


def test_langchains_bind_tools_gets_the_call(daemon):
    """LangChain's ChatOpenAI, unmodified, pointed at the daemon: `bind_tools` with a
    forced function returns the call as LangChain's own tool call."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{daemon.url}/v1", api_key=ALICE.split()[1], model=BASE,
                     temperature=0, max_tokens=100, max_retries=0)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather", parallel_tool_calls=False
                             ).invoke(ASK[0]["content"])
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome", "Oslo")


def test_adapters_and_compositions_keep_the_tool_format(daemon, daemon_adapters):
    """The format is the daemon's, so an adapter, and a weighted composition, call tools
    as the base does."""
    assert post(daemon, "/v1/load_lora_adapter", {
        "lora_name": "tools-style", "lora_path": str(daemon_adapters / "style")}).status_code \
        == 200
    try:
        forced = dict(tools=[WEATHER], parallel_tool_calls=False, max_tokens=100,
                      temperature=0, messages=ASK,
                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        for model, extra in (("tools-style", {}), (BASE, {"extra_body": {"adapters": [
                {"name": "tools-style", "weight": 0.5}, {"name": "tools-style",
                                                         "weight": 0.25}]}})):
            reply = client(daemon).chat.completions.create(model=model, **forced, **extra)
            assert [valid(call, WEATHER) for call in reply.choices[0].message.tool_calls] == \
                [True], model
    finally:
        post(daemon, "/v1/unload_lora_adapter", {"lora_name": "tools-style"})


def grpc_tool(tool: dict) -> lorag_pb2.FunctionTool:
    function = tool["function"]
    return lorag_pb2.FunctionTool(name=function["name"], description=function["description"],
                                  parameters=json.dumps(function["parameters"]))


def grpc_chat(daemon, method: str, **fields):
    request = {"messages": [lorag_pb2.ChatMessage(role="user", content=ASK[0]["content"])],
               "sampling": lorag_pb2.SamplingOptions(max_tokens=100, temperature=0),
               **fields}
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        stub = lorag_pb2_grpc.LoragServiceStub(channel)
        if method == "Chat":
            return stub.Chat(lorag_pb2.ChatRequest(**request),
                             metadata=[("authorization", ALICE)], timeout=60)
        return list(stub.ChatStream(lorag_pb2.ChatStreamRequest(**request),
                                    metadata=[("authorization", ALICE)], timeout=60))


@pytest.mark.slow
def test_grpc_chat_calls_tools_as_http_does(daemon):
    """The same tools, choices and calls over gRPC: a required call is a valid ToolCall,
    the same as HTTP's; streamed, the call comes whole in one piece; a conversation with
    a call and its result renders."""
    tools = [grpc_tool(WEATHER), grpc_tool(TIME)]
    whole = grpc_chat(daemon, "Chat", tools=tools, tool_choice="required",
                      parallel_tool_calls=False)
    (call,) = whole.tool_calls
    http = chat(daemon, tools=[WEATHER, TIME], tool_choice="required",
                parallel_tool_calls=False).choices[0].message.tool_calls[0]
    assert (call.name, call.arguments) == (http.function.name, http.function.arguments)
    assert whole.text == "" and call.id.startswith("call_")

    pieces = grpc_chat(daemon, "ChatStream", tools=tools, tool_choice="get_time")
    calls = [c for piece in pieces for c in piece.tool_calls]
    assert [c.name for c in calls][:1] == ["get_time"]
    assert json.loads(calls[0].arguments)["zone"] in ("UTC", "CET")
    assert "<tool_call>" not in "".join(piece.text for piece in pieces)

    history = [lorag_pb2.ChatMessage(role="user", content="Weather in Paris?"),
               lorag_pb2.ChatMessage(role="assistant", tool_calls=[lorag_pb2.ToolCall(
                   id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
               lorag_pb2.ChatMessage(role="tool", tool_call_id="call_1", content="21 C")]
    answered = grpc_chat(daemon, "Chat", tools=tools, messages=history)
    offered = grpc_chat(daemon, "Chat", tools=tools)
    assert answered.usage.prompt_tokens > offered.usage.prompt_tokens


@pytest.mark.parametrize(("fields", "word"), [
    ({"tools": [lorag_pb2.FunctionTool(name="f", parameters="{not json")]},
     "tools[0].parameters is not JSON"),
    ({"tools": [lorag_pb2.FunctionTool(name="bad name")]}, "tools[0].name must be"),
    ({"tools": [lorag_pb2.FunctionTool(name="f")], "tool_choice": "g"},
     "names function 'g', which is not in tools"),
    ({"messages": [lorag_pb2.ChatMessage(role="tool", content="1")]},
     "needs the tool_call_id"),
], ids=["parameters-not-json", "bad-name", "unknown-choice", "result-without-id"])
def test_grpc_tool_refusals_name_the_field(daemon, fields, word):
    with pytest.raises(grpc.RpcError) as error:
        grpc_chat(daemon, "Chat", **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert word in error.value.details()
