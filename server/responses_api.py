"""OpenAI's Responses API (POST, GET and DELETE /v1/responses) on the chat path.

A Responses request is a chat in other words: `instructions` become the system message,
`input` (text, or items: messages, function calls and their outputs) the turns after the
stored conversation of `previous_response_id`, `text.format` the response_format, `tools`
the function tools. `ResponsesBody.chat` writes it as a chat completions body, so what a
chat does (adapters and compositions, `rag`, structured outputs, tool calling in the
daemon's format) a response does, validated and served by the same code. The chat's reply
is packed as a `response` object, its text an `output_text` part of a message item (a RAG
answer's sources as its `file_citation` annotations) and each call a `function_call`
item, or streamed as the Responses events (`response.created`, `response.output_text.delta`,
`response.function_call_arguments.done`, ..., `response.completed`). With `store` (the
default) the response and its conversation's chat messages go into the state database,
per tenant, so any replica of a fleet answers GET for it or continues it.
"""

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from lorag.errors import InvalidRequest, NotFound
from lorag.server.engine.stream import Output
from lorag.server.errors import mapping, public_message
from lorag.server.openai_api import (
    MAX_TOOLS,
    AdapterWeight,
    ChatBody,
    FunctionSignature,
    RagOptions,
    RouteBody,
    StrictBody,
)
from lorag.server.openai_responses import FINISH, Logprobs, StreamedChoice, collected
from lorag.server.requests import Grounding, Reply
from lorag.server.service import Service
from lorag.server.tenancy import Caller

MAX_METADATA = 16  # key-value pairs a response may carry (OpenAI's limit)


class TextPart(StrictBody):
    """A message's text: input_text (a user's), output_text (an assistant's, echoed back
    from an earlier response's output, with its annotations)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[dict] | None = None
    logprobs: list[dict] | None = None


class MessageItem(StrictBody):
    """A message of the conversation."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content)


class FunctionCallItem(StrictBody):
    """A call the model made (an earlier response's output item)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictBody):
    """The result of a call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str
    id: str | None = None
    status: str | None = None


def _item_type(item) -> str | None:
    """An input item's type; a message may leave it out."""
    return item.get("type", "message") if isinstance(item, dict) else \
        getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type, custom_error_type="item_type", custom_error_message=(
        "an input item's type is message (the default), function_call or "
        "function_call_output"))]


class FunctionTool(FunctionSignature):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]


class NamedFunction(StrictBody):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(StrictBody):
    """text.format: free text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64,
                             pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def response_format(self) -> dict | None:
        """The chat's response_format."""
        if (self.type == "json_schema") != (self.schema_ is not None and bool(self.name)):
            raise InvalidRequest('text.format: "name" and "schema" go with type '
                                 '"json_schema", and only with it', field="text.format")
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name,
                                                       "schema": self.schema_}}


class TextOptions(StrictBody):
    format: TextFormat | None = None


class ResponsesBody(RouteBody):
    """POST /v1/responses. lorag's extensions, as on chat: `adapters` (a composition),
    `rag`, `seed`."""

    model: str = Field(min_length=1)
    input: list[InputItem] = Field(min_length=1)  # text: one user message
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=MAX_METADATA)
    user: str | None = None
    adapters: list[AdapterWeight] | None = Field(default=None, min_length=1)
    rag: RagOptions | None = None
    # OpenAI fields lorag does not implement: accepted only at their no-op values
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    reasoning: None = None
    include: Annotated[list[str], Field(max_length=0)] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_is_a_user_message(cls, value):
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    def messages(self) -> list[dict]:
        """`input` as chat messages (chat completions' shape): a function call joins the
        assistant message before it, or starts one; a call's output is a tool message."""
        messages = []
        for item in self.input:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if not (messages and messages[-1]["role"] == "assistant"):
                    messages.append({"role": "assistant", "content": ""})
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id,
                                 "content": item.output})
        return messages

    def chat(self, history: list[dict]) -> ChatBody:
        """The chat completions body this response is: the instructions, then `history`
        (the stored conversation it continues) and `input`."""
        system = [{"role": "system", "content": self.instructions}] \
            if self.instructions else []
        body = {"model": self.model, "messages": [*system, *history, *self.messages()],
                "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools:
            body["tools"] = [{"type": "function", "function": tool.model_dump(
                exclude={"type"}, exclude_none=True)} for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name":
                                                                    self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text and self.text.format:
            body["response_format"] = self.text.format.response_format()
        if self.adapters:
            body["adapters"] = [a.model_dump() for a in self.adapters]
        if self.rag:
            body["rag"] = self.rag.model_dump(exclude_none=True)
        try:
            return ChatBody.model_validate({k: v for k, v in body.items() if v is not None})
        except ValidationError as e:  # what the response's own fields did not catch
            first = e.errors()[0]
            where = _FIELDS.get(str(first["loc"][0]), str(first["loc"][0]))
            raise InvalidRequest(f"{where}: {first['msg'].removeprefix('Value error, ')}",
                                 field=where) from None


# a chat field an error names -> the response field it came from
_FIELDS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
           "response_format": "text.format"}


class Responses:
    """Responses on one service: each created, stored, fetched and deleted per tenant."""

    def __init__(self, service: Service):
        self.service = service

    def submit(self, caller: Caller, body: ResponsesBody) -> tuple[Reply, list[dict]]:
        """Start the chat `body` is (blocking: retrieval embeds, grammars compile); its
        reply and the chat messages of the conversation so far (without instructions)."""
        history = []
        if body.previous_response_id is not None:
            history = self._stored(caller, body.previous_response_id,
                                   "previous_response_id")[1]
        messages = [*history, *body.messages()]
        return self.service.chat(caller, body.chat(history).to_request()), messages

    def get(self, caller: Caller, response_id: str) -> dict:
        return self._stored(caller, response_id, "response_id")[0]

    def delete(self, caller: Caller, response_id: str) -> None:
        if not self.service.store.delete_response(caller.tenant, response_id):
            raise _not_found(response_id, "response_id")

    def _stored(self, caller: Caller, response_id: str, field: str) -> tuple[dict, list]:
        stored = self.service.store.response(caller.tenant, response_id)
        if stored is None:
            raise _not_found(response_id, field)
        return stored

    def store(self, caller: Caller, body: ResponsesBody, response: dict,
              messages: list[dict]) -> None:
        """Keep a finished response and its conversation (the reply's message appended)
        when the body asks to."""
        if not body.store or response["status"] == "failed":
            return
        reply = {"role": "assistant", "content": response_text(response)}
        calls = [{"id": item["call_id"], "type": "function",
                  "function": {"name": item["name"], "arguments": item["arguments"]}}
                 for item in response["output"] if item["type"] == "function_call"]
        if calls:
            reply["tool_calls"] = calls
        self.service.store.put_response(caller.tenant, response, [*messages, reply])


def _not_found(response_id: str, field: str) -> NotFound:
    return NotFound(f"no stored response {response_id!r}: it was never stored (store: "
                    "false), was deleted, or is another key's", field=field)


def response_text(response: dict) -> str:
    """The text of a response's message items (the SDK's `output_text`)."""
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def skeleton(body: ResponsesBody, response_id: str, status: str) -> dict:
    """A response object without output: what the request asked, in OpenAI's fields."""
    text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) \
        if body.text and body.text.format else {"type": "text"}
    tool_choice = body.tool_choice.model_dump() \
        if isinstance(body.tool_choice, NamedFunction) else body.tool_choice or "auto"
    return {"id": response_id, "object": "response", "created_at": int(time.time()),
            "status": status, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": body.model, "output": [], "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": body.store,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": text_format}, "tool_choice": tool_choice,
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled",
            "usage": None, "user": body.user, "metadata": body.metadata or {}}


def _message(text: str, grounding: Grounding | None, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text,
                         "annotations": _citations(grounding, len(text)), "logprobs": []}]}


def _citations(grounding: Grounding | None, end: int) -> list[dict]:
    """A RAG answer's sources as file_citation annotations (the file_search tool's
    shape), one per document, at the end of the text."""
    if grounding is None:
        return []
    documents = dict.fromkeys(source.document_id for source in grounding.sources)
    return [{"type": "file_citation", "file_id": document, "filename": document,
             "index": end} for document in documents]


def _function_call(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": status}


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _finished(response: dict, finish: str) -> dict:
    """`response` completed, or incomplete when the reply ran into max_output_tokens."""
    if finish == "length":
        response |= {"status": "incomplete",
                     "incomplete_details": {"reason": "max_output_tokens"}}
    else:
        response["status"] = "completed"
    return response


async def collected_response(body: ResponsesBody, reply: Reply, request: Request,
                             service: Service) -> dict:
    """The whole reply as one response object."""
    chat = await collected(reply, body.model, True, request, service)
    choice = chat["choices"][0]
    message = choice["message"]
    response = skeleton(body, f"resp_{uuid.uuid4().hex}", "in_progress")
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    if message["content"] or not message.get("tool_calls"):
        response["output"].append(_message(message["content"] or "", reply.grounding,
                                           status))
    response["output"] += [_function_call(call) for call in message.get("tool_calls", [])]
    usage = chat["usage"]
    response["usage"] = _usage(usage["prompt_tokens"], usage["completion_tokens"])
    extensions = {key: chat[key] for key in ("sources", "rag") if key in chat}
    return {**_finished(response, choice["finish_reason"]), **extensions}


def streamed_response(body: ResponsesBody, reply: Reply, service: Service,
                      on_end) -> StreamingResponse:
    """The reply as Responses events (SSE with `event:` names); `on_end(response)` gets
    the finished response object (to store it) before the event that says it finished."""
    events = _Events(body, reply, service)

    async def stream():
        try:
            async for event in events.run(on_end):
                yield event
        finally:
            if events.finish is None:
                service.cancel(reply.stream)  # the client went away, or it failed

    return StreamingResponse(stream(), media_type="text/event-stream")


class _Events:
    """One streamed response: the events it sends, and the response they build."""

    def __init__(self, body: ResponsesBody, reply: Reply, service: Service):
        self.reply, self.sequence, self.finish = reply, 0, None
        self.response = skeleton(body, f"resp_{uuid.uuid4().hex}", "in_progress")
        self.choice = StreamedChoice(0, Logprobs(service, True), reply.tools)
        self.message = None  # the message item text is streaming into, while one is open

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    async def run(self, on_end):
        yield self.event("response.created", response=self.response)
        yield self.event("response.in_progress", response=self.response)
        last = None
        async for out in self.reply.stream:
            if out.error is not None:
                yield self._failed(out)
                return
            last = out
            chunk = self.choice.chunk(out, True, self.reply.grounding)
            if chunk is None:
                continue
            for key in ("sources", "rag"):
                if key in chunk:
                    self.response[key] = {**self.response.get(key, {}), **chunk[key]} \
                        if key == "rag" else chunk[key]
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                for event in self._text(delta["content"]):
                    yield event
            for call in delta.get("tool_calls", []):
                for event in self._call(call):
                    yield event
            if out.finish_reason is not None:
                break
        self.finish = FINISH[last.finish_reason] if last and last.finish_reason else "stop"
        for event in self._close_message():
            yield event
        if not self.response["output"]:  # nothing said, nothing called: an empty message
            for event in [*self._text(""), *self._close_message()]:
                yield event
        self.response["usage"] = _usage(last.prompt_tokens if last else 0,
                                        last.completion_tokens if last else 0)
        _finished(self.response, self.finish)
        await run_in_threadpool(on_end, self.response)  # a database write
        kind = "response.incomplete" if self.response["status"] == "incomplete" \
            else "response.completed"
        yield self.event(kind, response=self.response)

    def _text(self, text: str) -> list[str]:
        events = []
        if self.message is None:
            self.message = _message("", None, "in_progress")
            self.response["output"].append(self.message)
            part = self.message["content"][0]
            events += [self.event("response.output_item.added", item=self.message,
                                  output_index=self._index()),
                       self.event("response.content_part.added", item_id=self.message["id"],
                                  output_index=self._index(), content_index=0, part=part)]
        self.message["content"][0]["text"] += text
        if text:
            events.append(self.event("response.output_text.delta", delta=text, logprobs=[],
                                     item_id=self.message["id"], output_index=self._index(),
                                     content_index=0))
        return events

    def _close_message(self) -> list[str]:
        if self.message is None:
            return []
        message, index = self.message, self._index()
        part = message["content"][0]
        part["annotations"] = _citations(self.reply.grounding, len(part["text"]))
        message["status"] = "incomplete" if self.finish == "length" else "completed"
        self.message = None
        return [self.event("response.output_text.done", text=part["text"], logprobs=[],
                           item_id=message["id"], output_index=index, content_index=0),
                self.event("response.content_part.done", item_id=message["id"],
                           output_index=index, content_index=0, part=part),
                self.event("response.output_item.done", item=message, output_index=index)]

    def _call(self, call: dict) -> list[str]:
        events = self._close_message()
        item = _function_call(call, "in_progress")
        arguments, item["arguments"] = item["arguments"], ""
        self.response["output"].append(item)
        index = self._index()
        events.append(self.event("response.output_item.added", item=dict(item),
                                 output_index=index))
        item |= {"arguments": arguments, "status": "completed"}
        return [*events,
                self.event("response.function_call_arguments.delta", delta=arguments,
                           item_id=item["id"], output_index=index),
                self.event("response.function_call_arguments.done", arguments=arguments,
                           item_id=item["id"], output_index=index),
                self.event("response.output_item.done", item=item, output_index=index)]

    def _index(self) -> int:
        return len(self.response["output"]) - 1

    def _failed(self, out: Output) -> str:
        m = mapping(out.error)
        self.response |= {"status": "failed", "error": {
            "code": m.openai_type, "message": public_message(out.error,
                                                             self.reply.request_id)}}
        self.finish = "error"
        return self.event("response.failed", response=self.response)
