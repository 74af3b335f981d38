"""A service Reply packed as OpenAI packs it: one JSON object, or server-sent events.

Both paths cancel the request in the engine when the client goes away before the end,
and both carry a RAG reply's grounding (`sources`, `rag`): in the object, or in the
first chunk of the stream.
"""

import json
import time
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import StreamingResponse

from lorag.server.engine.stream import Output
from lorag.server.errors import mapping, openai_error
from lorag.server.requests import Grounding, Reply
from lorag.server.service import Service

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


async def collected(reply: Reply, model: str, chat: bool, request: Request,
                    service: Service) -> dict:
    """The whole completion as one `chat.completion` / `text_completion` object."""
    parts, last = [], None
    try:
        async for last in reply.stream:
            parts.append(last.text)
            if await request.is_disconnected():
                service.cancel(reply.stream)
    finally:
        if last is None or last.finish_reason is None:
            service.cancel(reply.stream)
    if last.error is not None:
        raise last.error
    text, finish = "".join(parts), FINISH[last.finish_reason]
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "logprobs": None, "finish_reason": finish} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": reply.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(last), **grounding_fields(reply.grounding)}


def streamed(reply: Reply, model: str, chat: bool, include_usage: bool,
             service: Service) -> StreamingResponse:
    """The completion as SSE chunks, `data: [DONE]` last; an error mid-stream is one
    event in OpenAI's error shape."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": reply.request_id, "object": kind, "created": int(time.time()),
            "model": model}

    async def events():
        first, finished = True, False
        try:
            async for out in reply.stream:
                if out.error is not None:
                    m = mapping(out.error)
                    yield _sse(openai_error(str(out.error), m.openai_type, m.http_status))
                    break
                finish = FINISH[out.finish_reason] if out.finish_reason else None
                if out.text or finish or first:
                    extra = grounding_fields(reply.grounding) if first else {}
                    yield _sse({**head, "choices": [_delta(out, finish, chat, first)], **extra})
                    first = False
                if finish and include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(out)})
                finished = out.finish_reason is not None
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client disconnected (or the send failed)
                service.cancel(reply.stream)

    return StreamingResponse(events(), media_type="text/event-stream")


def grounding_fields(grounding: Grounding | None) -> dict:
    """lorag's RAG extension fields of a reply: the sources used and the counts."""
    if grounding is None:
        return {}
    return {"sources": [asdict(source) for source in grounding.sources],
            "rag": {"namespace": grounding.namespace, "retrieved": grounding.retrieved,
                    "used": len(grounding.sources), "dropped": grounding.dropped}}


def _delta(out: Output, finish: str | None, chat: bool, first: bool) -> dict:
    if not chat:
        return {"index": 0, "text": out.text, "logprobs": None, "finish_reason": finish}
    delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
