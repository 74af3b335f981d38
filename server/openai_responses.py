"""A service Reply packed as OpenAI packs it: one JSON object, or server-sent events.

Both paths cancel the request in the engine when the client goes away before the end,
and both carry a RAG reply's grounding (`sources`, `rag`): in the object, or in the
first chunk of the stream, with `rag.declined` (whether the answer declined, by
retrieval/rag.py `declines`) in the object or the stream's finishing chunk. Logprobs,
when asked, come in OpenAI's two shapes: a chat's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` and a completion's
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, per chunk when streamed.
"""

import json
import time
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import StreamingResponse

from lorag.retrieval.rag import declines
from lorag.server.engine.stream import Output, TokenLogprob, joined
from lorag.server.errors import mapping, openai_error, public_message
from lorag.server.requests import Grounding, Reply
from lorag.server.service import Service

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


async def collected(reply: Reply, model: str, chat: bool, request: Request,
                    service: Service) -> dict:
    """The whole completion as one `chat.completion` / `text_completion` object."""
    outputs = []
    try:
        async for out in reply.stream:
            outputs.append(out)
            if await request.is_disconnected():
                service.cancel(reply.stream)
    finally:
        if not outputs or outputs[-1].finish_reason is None:
            service.cancel(reply.stream)
    whole = joined(outputs)
    if whole.error is not None:
        raise whole.error
    finish, logprobs = FINISH[whole.finish_reason], _Logprobs(service, chat)(whole.logprobs)
    choice = ({"index": 0, "message": {"role": "assistant", "content": whole.text},
               "logprobs": logprobs, "finish_reason": finish} if chat else
              {"index": 0, "text": whole.text, "logprobs": logprobs, "finish_reason": finish})
    return {"id": reply.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(whole), **grounding_fields(reply.grounding, whole.text)}


def streamed(reply: Reply, model: str, chat: bool, include_usage: bool,
             service: Service) -> StreamingResponse:
    """The completion as SSE chunks, `data: [DONE]` last; an error mid-stream is one
    event in OpenAI's error shape."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": reply.request_id, "object": kind, "created": int(time.time()),
            "model": model}

    async def events():
        first, finished, shape, text = True, False, _Logprobs(service, chat), []
        try:
            async for out in reply.stream:
                if out.error is not None:
                    m = mapping(out.error)
                    message = public_message(out.error, reply.request_id)
                    yield _sse(openai_error(message, m.openai_type, m.http_status))
                    break
                finish = FINISH[out.finish_reason] if out.finish_reason else None
                if out.text or out.logprobs or finish or first:
                    text.append(out.text)
                    extra = grounding_fields(reply.grounding) if first else {}
                    if finish and reply.grounding is not None:  # known at the end only
                        extra["rag"] = {**extra.get("rag", {}),
                                        "declined": declines("".join(text))}
                    delta = _delta(out, finish, chat, first, shape(out.logprobs))
                    yield _sse({**head, "choices": [delta], **extra})
                    first = False
                if finish and include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(out)})
                finished = out.finish_reason is not None
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client disconnected (or the send failed)
                service.cancel(reply.stream)

    return StreamingResponse(events(), media_type="text/event-stream")


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


class _Logprobs:
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


def _delta(out: Output, finish: str | None, chat: bool, first: bool,
           logprobs: dict | None) -> dict:
    if not chat:
        return {"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": finish}
    delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
