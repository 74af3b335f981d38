"""The OpenAI-compatible HTTP API (FastAPI). Routes unpack, call the Service, pack.

Errors are translated in one place (`_lorag_error`, `_validation_error`) into OpenAI's
shape; the request bodies are pydantic models in server/openai_api.py.
"""

import json
import logging
import time
import uuid
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from lorag.server.auth import Caller
from lorag.server.errors import INTERNAL, mapping, openai_error
from lorag.server.openai_api import (
    AdapterLoad,
    ChatRequest,
    CompletionRequest,
    DocumentsBody,
    LoadLora,
    NamespaceBody,
    SearchBody,
    UnloadLora,
)
from lorag.server.service import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from lorag.errors import LoragError

log = logging.getLogger("lorag.http")
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def create_app(service: Service) -> FastAPI:
    """The daemon's HTTP app over `service`."""
    app = FastAPI(title="lorag", version="0.1.0")

    def caller(request: Request) -> Caller:
        return service.keys.caller(request.headers.get("authorization"))

    @app.exception_handler(LoragError)
    async def _lorag_error(request: Request, error: LoragError) -> JSONResponse:
        m = mapping(error)
        return JSONResponse(openai_error(error.message, m.openai_type, m.http_status,
                                         error.field), status_code=m.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        message = f"{where}: {first['msg']}" if first["type"] != "json_invalid" else \
            f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        return JSONResponse(openai_error(message, "invalid_request_error", 400, where),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(openai_error(f"internal error: {error}", INTERNAL.openai_type,
                                         500), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        stream = service.generate(caller(request), body.prompt, body.sampling(), body.model,
                                  body.composition(), f"cmpl-{uuid.uuid4().hex}")
        return await _respond(stream, body, request, service, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        who = caller(request)
        messages, extra = body.plain_messages(), {}
        if body.rag is not None:  # retrieval embeds the question: off the event loop
            rag = body.rag
            grounded = await run_in_threadpool(
                service.rag_messages, who, messages, rag.namespace, rag.top_k, rag.mode,
                rag.filter, body.max_completion_tokens or body.max_tokens)
            messages = grounded["messages"]
            extra = {"sources": grounded["sources"],
                     "rag": {"namespace": rag.namespace, "retrieved": grounded["retrieved"],
                             "used": len(grounded["sources"]),
                             "dropped": grounded["dropped"]}}
        prompt = service.template(messages)
        stream = service.generate(who, prompt, body.sampling(len(prompt),
                                  service.engine.config.max_model_len), body.model,
                                  body.composition(), f"chatcmpl-{uuid.uuid4().hex}")
        return await _respond(stream, body, request, service, chat=True, extra=extra)

    @app.get("/v1/models")
    async def models(request: Request):
        now = int(time.time())
        data = [{"id": service.model_name, "object": "model", "created": now,
                 "owned_by": "lorag", "root": service.model_name, "parent": None}]
        data += [{"id": a["name"], "object": "model", "created": now, "owned_by": a["owner"],
                  "root": a["path"], "parent": service.model_name}
                 for a in service.list_adapters(caller(request))]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLora, request: Request):
        loaded = service.load_adapter(caller(request), body.lora_name, body.lora_path)
        verb = "loaded" if loaded else "was already loaded (refreshed)"
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb}.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLora, request: Request):
        service.unload_adapter(caller(request), body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed.")

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        return {"object": "list", "data": service.list_adapters(caller(request))}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad, request: Request):
        who = caller(request)
        loaded = service.load_adapter(who, body.name, body.path, body.shared)
        return {**service.get_adapter(who, body.name), "loaded": loaded}

    @app.get("/v1/adapters/{name}")
    async def get_adapter(name: str, request: Request):
        return service.get_adapter(caller(request), name)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request):
        service.unload_adapter(caller(request), name)
        return {"name": name, "unloaded": True}

    @app.post("/v1/adapters/{name}/pin")
    async def pin_adapter(name: str, request: Request):
        who = caller(request)
        service.pin_adapter(who, name, pinned=True)
        return service.get_adapter(who, name)

    @app.post("/v1/adapters/{name}/unpin")
    async def unpin_adapter(name: str, request: Request):
        who = caller(request)
        service.pin_adapter(who, name, pinned=False)
        return service.get_adapter(who, name)

    # ---- retrieval namespaces (plain `def`: embedding runs in FastAPI's thread pool) ----

    @app.get("/v1/namespaces")
    def list_namespaces(request: Request):
        return {"object": "list", "data": service.namespaces.list(caller(request))}

    @app.put("/v1/namespaces/{namespace}")
    def create_namespace(namespace: str, body: NamespaceBody, request: Request):
        created = service.namespaces.create(caller(request), namespace, body.shared)
        return {"name": namespace, "shared": body.shared, "created": created}

    @app.delete("/v1/namespaces/{namespace}")
    def delete_namespace(namespace: str, request: Request):
        service.namespaces.drop(caller(request), namespace)
        return {"name": namespace, "deleted": True}

    @app.post("/v1/namespaces/{namespace}/documents")
    def put_documents(namespace: str, body: DocumentsBody, request: Request):
        results = service.namespaces.put(caller(request), namespace, body.items())
        return {"namespace": namespace, "documents": results}

    @app.delete("/v1/namespaces/{namespace}/documents/{document_id:path}")
    def delete_document(namespace: str, document_id: str, request: Request):
        service.namespaces.delete_document(caller(request), namespace, document_id)
        return {"namespace": namespace, "id": document_id, "deleted": True}

    @app.post("/v1/namespaces/{namespace}/search")
    def search(namespace: str, body: SearchBody, request: Request):
        hits = service.namespaces.search(caller(request), namespace, body.query, body.top_k,
                                         body.mode, body.filter)
        return {"object": "list", "data": [asdict(hit) for hit in hits]}

    @app.get("/health")
    async def health():
        alive = service.engine.thread is not None and service.engine.thread.is_alive()
        stats = service.engine.stats()  # counters only: a probe need not list adapters
        body = {"status": "ok" if alive else "engine stopped", "model": service.model_name,
                "running": stats["running"], "waiting": stats["waiting"]}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(service.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


async def _respond(stream, body, request: Request, service: Service, chat: bool,
                   extra: dict | None = None):
    """A whole response, or SSE chunks when `stream` is set; `extra` (RAG sources) goes
    into the response, or the first chunk. A client that goes away cancels its request
    in the engine."""
    extra = extra or {}
    kind = "chat.completion" if chat else "text_completion"
    created = int(time.time())
    base = {"id": stream.request_id, "created": created, "model": body.model}

    def choice(text: str, finish: str | None, first: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def usage(out) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    if not body.stream:
        parts, last = [], None
        try:
            async for last in stream:
                parts.append(last.text)
                if await request.is_disconnected():
                    service.cancel(stream)
        finally:
            if last is None or last.finish_reason is None:
                service.cancel(stream)
        if last.error is not None:
            raise last.error
        text = "".join(parts)
        result = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": None, "finish_reason": FINISH[last.finish_reason]} if chat
                  else choice(text, FINISH[last.finish_reason]))
        return {**base, "object": kind, "choices": [result], "usage": usage(last), **extra}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        first, finished = True, False
        try:
            async for out in stream:
                if out.error is not None:
                    m = mapping(out.error)
                    yield _sse(openai_error(str(out.error), m.openai_type, m.http_status))
                    break
                finish = FINISH[out.finish_reason] if out.finish_reason else None
                if out.text or finish or first:
                    yield _sse({**base, "object": chunk_kind,
                                "choices": [choice(out.text, finish, first)],
                                **(extra if first else {})})
                    first = False
                if finish and include_usage:
                    yield _sse({**base, "object": chunk_kind, "choices": [],
                                "usage": usage(out)})
                finished = out.finish_reason is not None
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client disconnected (or the send failed)
                service.cancel(stream)

    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
