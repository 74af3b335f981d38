"""The Responses API (server/responses_api.py) with the official `openai` client, on each
backend's daemon: a response is the chat it stands for (greedy: the same text as chat
completions with the same turns), streamed as the Responses events the client's own
stream helper assembles, stored per tenant so that `previous_response_id` continues the
conversation and GET / DELETE work; function tools, structured text, `rag` (sources as
file_citation annotations) and LangChain's `use_responses_api`."""

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.daemons import ALICE, BASE, BOB
from tests.server.test_http import client, post
from tests.server.test_tools import TIME, WEATHER, valid

TOOLS = [{"type": "function", **tool["function"]} for tool in (WEATHER, TIME)]
ASK = "What is the capital of France?"


def create(daemon, key: str = ALICE, **fields):
    fields = {"model": BASE, "temperature": 0, "max_output_tokens": 12, **fields}
    return client(daemon, key).responses.create(**fields)


def chat_text(daemon, messages: list[dict], max_tokens: int = 12) -> str:
    reply = client(daemon).chat.completions.create(model=BASE, messages=messages,
                                                   temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def test_a_response_is_its_chat_and_is_stored_for_its_tenant_alone(daemon):
    response = create(daemon, input=ASK, instructions="Answer briefly.")
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output_text == chat_text(daemon, [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ASK}])
    assert response.usage.output_tokens >= 1 and response.usage.input_tokens > 5
    assert response.instructions == "Answer briefly." and response.temperature == 0

    again = client(daemon).responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    with pytest.raises(openai.NotFoundError):  # another tenant's: as if there were none
        client(daemon, BOB).responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client(daemon, BOB).responses.delete(response.id)
    client(daemon).responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client(daemon).responses.retrieve(response.id)
    assert gone.value.body["param"] == "response_id"


def test_previous_response_id_continues_the_conversation(daemon):
    """The second turn sees the first turn and its answer, not the first's instructions
    (OpenAI's rule), as a chat with those messages does; `store: false` keeps nothing."""
    first = create(daemon, input=ASK, instructions="You are terse.")
    second = create(daemon, input="And of Italy?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.output_text == chat_text(daemon, [
        {"role": "user", "content": ASK}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And of Italy?"}])
    third = create(daemon, input=[{"role": "user", "content": "And Spain?"}],
                   previous_response_id=second.id, store=False)
    with pytest.raises(openai.NotFoundError):
        client(daemon).responses.retrieve(third.id)
    with pytest.raises(openai.NotFoundError) as error:
        create(daemon, input="hi", previous_response_id="resp_nope")
    assert error.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):  # bob cannot continue alice's conversation
        create(daemon, BOB, input="hi", previous_response_id=second.id)


def test_a_streamed_response_is_the_collected_one_in_events(daemon):
    fields = {"model": BASE, "input": ASK, "temperature": 0, "max_output_tokens": 12}
    collected = client(daemon).responses.create(**fields)
    with client(daemon).responses.stream(**fields) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    # the stream helper's get_final_response() wants response.completed; a reply cut by
    # max_output_tokens ends with response.incomplete, as OpenAI's does
    final = events[-1].response
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert "response.output_text.delta" in kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done",
                          "response.incomplete" if collected.status == "incomplete"
                          else "response.completed"]
    assert final.output_text == collected.output_text
    assert final.usage.output_tokens == collected.usage.output_tokens
    # a streamed response is stored too, and continues like any other
    assert client(daemon).responses.retrieve(final.id).output_text == final.output_text


def test_max_output_tokens_makes_a_response_incomplete(daemon):
    response = create(daemon, input="Tell me a long story.", max_output_tokens=3)
    assert response.usage.output_tokens == 3 and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


def test_a_required_function_call_then_its_output_continue_the_conversation(daemon):
    response = create(daemon, input="What's the weather in Paris?", tools=TOOLS,
                      tool_choice="required", parallel_tool_calls=False, max_output_tokens=100)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.call_id.startswith("call_") and call.status == "completed"
    as_chat = SimpleNamespace(type="function", id=call.call_id, function=SimpleNamespace(
        name=call.name, arguments=call.arguments))
    assert valid(as_chat, WEATHER) or valid(as_chat, TIME), call
    # the caller runs the function and sends its output, continuing the stored conversation
    answer = create(daemon, previous_response_id=response.id, tools=TOOLS, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}])
    assert answer.status in ("completed", "incomplete")
    # the same turns sent whole, the call item echoed back, give the same answer
    whole = create(daemon, tools=TOOLS, input=[
        {"role": "user", "content": "What's the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}])
    assert whole.output_text == answer.output_text


def test_a_named_function_streams_as_function_call_events(daemon):
    with client(daemon).responses.stream(
            model=BASE, input="Weather?", tools=TOOLS, temperature=0, max_output_tokens=100,
            tool_choice={"type": "function", "name": "get_time"},
            parallel_tool_calls=False) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_time"
    assert json.loads(call.arguments)["zone"] in ("UTC", "CET")


def test_text_format_json_schema_is_the_answers_schema(daemon):
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 10}}}
    response = create(daemon, input=ASK, max_output_tokens=40, text={"format": {
        "type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    assert set(json.loads(response.output_text)) == {"city"}
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"input": []}, "input", "at least 1 item"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input", "input"),
    ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format",
     '"name" and "schema" go with type "json_schema"'),
    ({"input": "hi", "background": True}, "background", "background"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"input": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"input": "hi", "adapters": [{"name": "nope"}]}, "adapters", "nope"),
], ids=["empty-input", "unknown-role", "schema-without-name", "background", "choice-no-tools",
        "temperature", "unknown-adapter"])
def test_bad_responses_are_a_4xx_naming_the_field(daemon, body, param, message):
    response = post(daemon, "/v1/responses", {"model": BASE, **body})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and message in error["message"], error


@pytest.mark.slow
def test_rag_sources_are_file_citations(daemon):
    documents = [{"id": "bakery", "text": "The head baker at Zephyr Street is Ada Brandt."},
                 {"id": "hours", "text": "The bakery opens at seven."}]
    assert post(daemon, "/v1/namespaces/resp-kb/documents",
                {"documents": documents}).status_code == 200
    response = create(daemon, input="Who is the head baker?",
                      extra_body={"rag": {"namespace": "resp-kb", "top_k": 2}})
    (message,) = response.output
    cited = {a.file_id for a in message.content[0].annotations}
    assert cited == {"bakery", "hours"}
    assert {a.type for a in message.content[0].annotations} == {"file_citation"}
    assert {s["document_id"] for s in response.model_extra["sources"]} == cited
    fetched = httpx.get(f"{daemon.url}/v1/responses/{response.id}", timeout=30,
                        headers={"Authorization": ALICE}).json()
    assert fetched["rag"]["namespace"] == "resp-kb"


def test_langchain_speaks_the_responses_api(daemon):
    from langchain_openai import ChatOpenAI

    def llm(max_tokens: int) -> ChatOpenAI:
        return ChatOpenAI(base_url=f"{daemon.url}/v1", api_key=ALICE.split()[1], model=BASE,
                          temperature=0, max_tokens=max_tokens, max_retries=0,
                          use_responses_api=True)

    message = llm(12).invoke(ASK)
    assert message.text == chat_text(daemon, [{"role": "user", "content": ASK}])
    (call,) = llm(100).bind_tools([WEATHER], tool_choice="get_weather",
                                  parallel_tool_calls=False).invoke("Weather?").tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome", "Oslo")
