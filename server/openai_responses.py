"""A service Reply packed as OpenAI packs it: one JSON object, or server-sent events,
with a choice per stream of the reply (n of them, by `index`).

Both paths cancel the request in the engine when the client goes away before the end,
and both carry a RAG reply's grounding (`sources`, `rag`): in the object, or in the
first chunk of the stream, with `rag.declined` (whether the answer declined, by
retrieval/rag.py `declines`) in the object or the stream's finishing chunk. Logprobs,
when asked, come in OpenAI's two shapes: a chat's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` and a completion's
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, per chunk when streamed.
"""

import asyncio
import json
import time
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import StreamingResponse

from lorag.retrieval.rag import declines
from lorag.server.engine.stream import Output, TokenLogprob, joined
from lorag.server.errors import mapping, openai_error, public_message
from lorag.server.metrics import TrackedStream
from lorag.server.requests import Grounding, Reply
from lorag.server.service import Service
from lorag.server.tools import CallStream, ToolUse, split_calls

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


async def collected(reply: Reply, model: str, chat: bool, request: Request | None,
                    service: Service) -> dict:
    """The whole completion as one `chat.completion` / `text_completion` object, a choice
    per stream; usage counts the prompt once and every choice's tokens. `request`: the
    HTTP request whose client's going away cancels it (None: no client to watch)."""
    wholes = await asyncio.gather(*(_collect(stream, request, service)
                                    for stream in reply.streams))
    error = next((whole.error for whole in wholes if whole.error is not None), None)
    if error is not None:
        raise error
    choices = [_choice(index, whole, chat, Logprobs(service, chat)(whole.logprobs),
                       reply.tools) for index, whole in enumerate(wholes)]
    return {"id": reply.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(wholes), **grounding_fields(reply.grounding, wholes[0].text)}


async def _collect(stream: TrackedStream, request: Request | None,
                   service: Service) -> Output:
    """One choice's outputs joined; the request is cancelled if the client goes away."""
    outputs = []
    try:
        async for out in stream:
            outputs.append(out)
            if request is not None and await request.is_disconnected():
                service.cancel(stream)
    finally:
        if not outputs or outputs[-1].finish_reason is None:
            service.cancel(stream)
    return joined(outputs)


def _choice(index: int, whole: Output, chat: bool, logprobs: dict | None,
            tools: ToolUse | None) -> dict:
    finish = FINISH[whole.finish_reason]
    if not chat:
        return {"index": index, "text": whole.text, "logprobs": logprobs,
                "finish_reason": finish}
    message = {"role": "assistant", "content": whole.text}
    if tools is not None:
        message["content"], calls = split_calls(whole.text, tools)
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls" if finish == "stop" else finish
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def streamed(reply: Reply, model: str, chat: bool, include_usage: bool,
             service: Service) -> StreamingResponse:
    """The completion as SSE chunks, each choice's with its `index`, interleaved as they
    come, one usage chunk (with stream_options.include_usage) after the last choice ends,
    `data: [DONE]` last; an error mid-stream is one event in OpenAI's error shape."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": reply.request_id, "object": kind, "created": int(time.time()),
            "model": model}

    async def events():
        choices = [StreamedChoice(index, Logprobs(service, chat), reply.tools)
                   for index in range(len(reply.streams))]
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(index, stream, queue))
                 for index, stream in enumerate(reply.streams)]
        try:
            open_streams, failed = len(pumps), False
            while open_streams and not failed:
                index, out = await queue.get()
                if out is None:
                    open_streams -= 1
                elif out.error is not None:
                    m = mapping(out.error)
                    message = public_message(out.error, reply.request_id)
                    yield _sse(openai_error(message, m.openai_type, m.http_status))
                    failed = True
                elif chunk := choices[index].chunk(  # the RAG fields go with choice 0
                        out, chat, reply.grounding if index == 0 else None):
                    yield _sse({**head, **chunk})
            if include_usage and not failed:
                yield _sse({**head, "choices": [], "usage": _usage([c.last for c in choices])})
            yield "data: [DONE]\n\n"
        finally:
            for pump in pumps:
                pump.cancel()
            for choice, stream in zip(choices, reply.streams, strict=True):
                if choice.last is None or choice.last.finish_reason is None:
                    service.cancel(stream)  # the client disconnected, or a choice failed

    return StreamingResponse(events(), media_type="text/event-stream")


async def _pump(index: int, stream: TrackedStream, queue: asyncio.Queue) -> None:
    """Put a choice's outputs on the merged queue, then (index, None)."""
    try:
        async for out in stream:
            await queue.put((index, out))
    finally:
        queue.put_nowait((index, None))


class StreamedChoice:
    """One choice of a stream: whether its first chunk went out, its text so far (a RAG
    reply says at the end whether it declined), its last output and, with tools, its
    calls as they complete (`delta.tool_calls`, each whole in one fragment)."""

    def __init__(self, index: int, logprobs: "Logprobs", tools: ToolUse | None):
        self.index, self.logprobs = index, logprobs
        self.first, self.text, self.last = True, [], None
        self.calls = None if tools is None else CallStream(tools)
        self.called = 0  # calls sent so far

    def chunk(self, out: Output, chat: bool, grounding: Grounding | None) -> dict | None:
        """The chunk `out` makes (None: nothing to send), grounding in the first one."""
        self.last = out
        finish = FINISH[out.finish_reason] if out.finish_reason else None
        self.text.append(out.text)
        content, calls = out.text, []
        if chat and self.calls is not None:
            content, calls = self.calls.feed(out.text, final=finish is not None)
        if not (content or calls or out.logprobs or finish or self.first):
            return None
        extra = grounding_fields(grounding) if self.first else {}
        if finish and grounding is not None:  # known at the end only
            extra["rag"] = {**extra.get("rag", {}), "declined": declines("".join(self.text))}
        if finish == "stop" and (calls or self.called):
            finish = "tool_calls"
        delta = _delta(self.index, content, finish, chat, self.first,
                       self.logprobs(out.logprobs))
        if calls:
            delta["delta"]["tool_calls"] = [{"index": self.called + i, **call}
                                            for i, call in enumerate(calls)]
            self.called += len(calls)
        self.first = False
        return {"choices": [delta], **extra}


def grounding_fields(grounding: Grounding | None, text: str | None = None) -> dict:
    """lorag's RAG extension fields of a reply: the sources used and the counts, and with
    the answer's `text` whether it declined (retrieval/rag.py `declines`)."""
    if grounding is None:
        return {}
    rag = {"namespace": grounding.namespace, "retrieved": grounding.retrieved,
           "used": len(grounding.sources), "dropped": grounding.dropped,
           "reranker": grounding.reranker,
           "timing": {"search_ms": grounding.search_ms, "rerank_ms": grounding.rerank_ms}}
    if text is not None:
        rag["declined"] = declines(text)
    return {"sources": [asdict(source) for source in grounding.sources], "rag": rag}


class Logprobs:
    """Token logprobs in a chat's or a completion's shape; a completion's text offsets
    count on across the chunks of one stream."""

    def __init__(self, service: Service, chat: bool):
        self.service, self.chat, self.offset = service, chat, 0

    def __call__(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        tokens = self.service.logprobs(entries)
        if self.chat:
            return {"content": tokens, "refusal": None}
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token["token"])
        return {"tokens": [t["token"] for t in tokens],
                "token_logprobs": [t["logprob"] for t in tokens],
                "top_logprobs": [{top["token"]: top["logprob"] for top in t["top_logprobs"]}
                                 for t in tokens],
                "text_offset": offsets}


def _delta(index: int, text: str, finish: str | None, chat: bool, first: bool,
           logprobs: dict | None) -> dict:
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _usage(outs: list[Output]) -> dict:
    """OpenAI's usage of n choices: the prompt once, every choice's completion tokens."""
    prompt, completion = outs[0].prompt_tokens, sum(out.completion_tokens for out in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
