"""The HTTP API (FastAPI): OpenAI-compatible generation, adapters, retrieval, health.

Every route unpacks its body (server/openai_api.py), makes one Service call and packs the
answer. Errors are translated in one place (`lorag_error`, `validation_error`,
`internal_error`) into OpenAI's shape. Routes that read files, the database or wait for
the engine (adapters, retrieval, model lists) are plain `def`: FastAPI runs them in its
thread pool, so an adapter being read and validated, or a document being embedded, never
holds up the event loop that streams every other request's tokens.
"""

import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorag.errors import LoragError, NotFound, Overloaded, TooLarge
from lorag.server import tenancy
from lorag.server.batches import BatchBody, Batches, BatchRunner
from lorag.server.errors import INTERNAL, mapping, openai_error, public_message
from lorag.server.openai_api import (
    ERROR_RESPONSES,
    AdapterLoad,
    ChatBody,
    CompletionBody,
    DocumentsBody,
    EmbeddingsBody,
    LoadLora,
    NamespaceBody,
    RerankBody,
    RolloutBody,
    SearchBody,
    UnloadLora,
)
from lorag.server.openai_responses import collected, streamed
from lorag.server.responses_api import (
    Responses,
    ResponsesBody,
    collected_response,
    streamed_response,
)
from lorag.server.service import Service
from lorag.server.tenancy import Caller

MAX_BODY_BYTES = 16 * 1024 * 1024  # a JSON body (`lorag serve --max-body-mb`)


def create_app(service: Service, max_body_bytes: int = MAX_BODY_BYTES,
               batch_runner: BatchRunner | None = None) -> FastAPI:
    """The daemon's HTTP app over `service`; bodies over `max_body_bytes` get a 413
    (uploads: the service's limits on their files). It runs this replica's share of the
    batches while it serves (`batch_runner`, default: BatchRunner's defaults)."""
    runner = batch_runner or BatchRunner(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        try:
            yield
        finally:
            await run_in_threadpool(runner.stop)  # lines running here go back to pending

    app = FastAPI(title="lorag", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    limits = service.limits
    app.add_middleware(BodyLimit, limit=max_body_bytes,
                       upload_limit=limits.upload_files * limits.upload_file_bytes + (1 << 20),
                       header_limit=limits.header_kb << 10)
    app.add_exception_handler(LoragError, lorag_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    for router in (generation, batches, adapters, retrieval, operations, playground):
        app.include_router(router)
    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")
    return app


def _service(request: Request) -> Service:
    return request.app.state.service


# declares the scheme in the OpenAPI document; the service reads the header itself
bearer = HTTPBearer(auto_error=False, description="An API key of the daemon's --api-keys "
                    "file (none needed when the daemon runs without keys)")


def _caller(request: Request,
            _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    return _service(request).caller(request.headers.get("authorization"))


ServiceDep = Annotated[Service, Depends(_service)]
CallerDep = Annotated[Caller, Depends(_caller)]

# ---- errors: lorag's, the body's, and anything else ----


async def lorag_error(request: Request, error: LoragError) -> JSONResponse:
    """A LoragError in OpenAI's shape, with its status code."""
    m = mapping(error)
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Overloaded) else {}
    return JSONResponse(openai_error(error.message, m.openai_type, m.http_status, error.field),
                        status_code=m.http_status, headers=headers)


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body pydantic refused: 400 naming the first field at fault."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "unknown_field":  # raised by the body that holds the field
        loc.append(first["ctx"]["field"])
    where = ".".join(loc) or "body"
    message = f"{where}: {first['msg'].removeprefix('Value error, ')}" \
        if first["type"] != "json_invalid" else \
        f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
    return JSONResponse(openai_error(message, "invalid_request_error", 400, where),
                        status_code=400)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own answers (no such route, method not allowed, body too large) in
    OpenAI's shape."""
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    headers = dict(error.headers or {})
    if error.status_code == 405:  # Starlette's names one route's methods; the path has more
        path = request.url.path
        methods = {method for route in request.app.routes if isinstance(route, APIRoute)
                   and route.path_regex.match(path) for method in route.methods}
        headers["Allow"] = ", ".join(sorted(methods))
    return JSONResponse(openai_error(str(error.detail), kind, error.status_code),
                        status_code=error.status_code, headers=headers)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug or an infrastructure failure: a 500 that names an id the log has the
    traceback under, and nothing of the exception."""
    return JSONResponse(openai_error(public_message(error), INTERNAL.openai_type, 500),
                        status_code=500)


class BodyLimit:
    """ASGI middleware: headers over their limit get a 431, and a request body over the
    limit is refused with a 413 before it is read whole: at once by its Content-Length,
    else as its bytes arrive. An upload's limit is its files' (`upload_limit`: as many
    files as an upload takes, each as large as one may be, plus room for the form)."""

    def __init__(self, app, limit: int, upload_limit: int, header_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit
        self.header_limit = header_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"].endswith("/files")  # a namespace's, or /v1/files
        limit = self.upload_limit if upload else self.limit
        too_large = StarletteHTTPException(413, f"the request body is over {limit} bytes, the "
                                                "largest this daemon takes here")
        head = sum(len(name) + len(value) for name, value in scope["headers"])
        if head > self.header_limit:
            refused = StarletteHTTPException(431, f"the request's headers are {head} bytes, "
                                                  f"over the {self.header_limit} this daemon "
                                                  "takes (its --limit header_kb)")
            return await (await http_error(Request(scope), refused))(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = await http_error(Request(scope), too_large)
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large  # FastAPI passes an HTTPException from the body through
            return message

        await self.app(scope, counted, send)


# ---- generation ----

generation = APIRouter(responses=ERROR_RESPONSES)


@generation.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request, service: ServiceDep,
                           caller: CallerDep):
    """OpenAI chat completions (JSON or SSE), on the base model, an adapter (`model`) or a
    weighted composition (`adapters`), optionally grounded in a namespace (`rag`)."""
    reply = await run_in_threadpool(service.chat, caller, body.to_request())  # embeds, compiles
    if body.stream:
        return streamed(reply, body.model, True, body.include_usage(), service)
    return await collected(reply, body.model, True, request, service)


@generation.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, service: ServiceDep,
                      caller: CallerDep):
    """OpenAI completions: the prompt (text or token ids) as is, no chat template."""
    reply = await run_in_threadpool(service.complete, caller, body.to_request())  # compiles
    if body.stream:
        return streamed(reply, body.model, False, body.include_usage(), service)
    return await collected(reply, body.model, False, request, service)


@generation.post("/v1/responses")
async def create_response(body: ResponsesBody, request: Request, service: ServiceDep,
                          caller: CallerDep):
    """OpenAI's Responses API on the chat path (server/responses_api.py): JSON or the
    Responses events; stored per tenant unless `store: false`."""
    responses = Responses(service)
    reply, messages = await run_in_threadpool(responses.submit, caller, body)
    if body.stream:
        return streamed_response(body, reply, service,
                                 lambda done: responses.store(caller, body, done, messages))
    response = await collected_response(body, reply, request, service)
    await run_in_threadpool(responses.store, caller, body, response, messages)
    return response


@generation.get("/v1/responses/{response_id}")
def get_response(response_id: str, service: ServiceDep, caller: CallerDep):
    """A stored response, as it was sent."""
    return Responses(service).get(caller, response_id)


@generation.delete("/v1/responses/{response_id}")
def delete_response(response_id: str, service: ServiceDep, caller: CallerDep):
    """Forget a stored response (a conversation can no longer continue from it)."""
    Responses(service).delete(caller, response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@generation.post("/v1/embeddings")
def embeddings(body: EmbeddingsBody, service: ServiceDep, caller: CallerDep):
    """OpenAI embeddings, on the embedder retrieval indexes with (`/v1/server` names it)."""
    return service.embeddings.embed(body.to_request()).response()


@generation.post("/v1/rerank")
def rerank(body: RerankBody, service: ServiceDep, caller: CallerDep):
    """Documents ordered by relevance to a query (vLLM's and llama.cpp's shape), scored on
    the relevance adapter `model` as the probability it answers "yes"."""
    request = body.to_request()
    scored = service.rerank(caller, request)
    results = []
    for index in scored.order(request.top_n):
        result = {"index": index, "relevance_score": scored.scores[index]}
        if request.return_documents:
            result["document"] = {"text": request.documents[index]}
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.model,
            "usage": {"prompt_tokens": scored.prompt_tokens,
                      "total_tokens": scored.prompt_tokens},
            "results": results}


@generation.get("/v1/models")
def models(service: ServiceDep, caller: CallerDep):
    """The base model and the adapters the caller can use (vLLM's parent / root)."""
    now, base = int(time.time()), service.model_name
    data = [{"id": base, "object": "model", "created": now, "owned_by": "lorag",
             "root": base, "parent": None}]
    data += [{"id": a["name"], "object": "model", "created": now, "owned_by": a["owner"],
              "root": a["path"], "parent": base, "kind": a["kind"]}
             for a in service.adapters.visible(caller)]
    return {"object": "list", "data": data}


@generation.get("/v1/server")
def server_info(service: ServiceDep, caller: CallerDep):
    """The model, request defaults, limits and the caller's rights (a client's form)."""
    return service.info(caller)


# ---- the Batch API: files and batches (server/batches.py) ----

batches = APIRouter(responses=ERROR_RESPONSES)


@batches.post("/v1/files")
def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
                service: ServiceDep, caller: CallerDep):
    """A batch input file (OpenAI's multipart `file` and `purpose`), as large as one
    upload file may be (--limit upload_file_mb)."""
    limit = service.limits.upload_file_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{file.filename} is over {service.limits.upload_file_mb} MiB, the "
                       "largest file an upload takes (the daemon's --limit upload_file_mb)",
                       field="file")
    return Batches(service).upload(caller, file.filename or "", purpose, data)


@batches.get("/v1/files")
def list_files(service: ServiceDep, caller: CallerDep, purpose: str | None = None):
    """The caller's tenant's files: batch inputs, and batches' output and error files."""
    return {"object": "list", "data": service.batches.files(caller.tenant, purpose)}


@batches.get("/v1/files/{file_id}")
def get_file(file_id: str, service: ServiceDep, caller: CallerDep):
    return Batches(service).file(caller, file_id)


@batches.get("/v1/files/{file_id}/content")
def file_content(file_id: str, service: ServiceDep, caller: CallerDep):
    """The file's bytes as they were uploaded, or as the batch wrote them."""
    return Response(Batches(service).content(caller, file_id),
                    media_type="application/octet-stream")


@batches.delete("/v1/files/{file_id}")
def delete_file(file_id: str, service: ServiceDep, caller: CallerDep):
    if not service.batches.delete_file(caller.tenant, file_id):  # none, or another's
        raise NotFound(f"no file {file_id!r} (or it is another key's)", field="file_id")
    return {"id": file_id, "object": "file", "deleted": True}


@batches.post("/v1/batches")
def create_batch(body: BatchBody, service: ServiceDep, caller: CallerDep):
    """A batch of the input file's requests: in_progress, or failed naming its bad lines."""
    return Batches(service).create(caller, body)


@batches.get("/v1/batches")
def list_batches(service: ServiceDep, caller: CallerDep, limit: int = 20,
                 after: str | None = None):
    limit = max(1, min(limit, 100))
    data = service.batches.batches(caller.tenant, limit + 1, after)
    return {"object": "list", "data": data[:limit],
            "first_id": data[0]["id"] if data else None,
            "last_id": data[:limit][-1]["id"] if data else None,
            "has_more": len(data) > limit}


@batches.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, service: ServiceDep, caller: CallerDep):
    """The batch, its request counts and, once it ended, its output and error files."""
    return Batches(service).get(caller, batch_id)


@batches.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, service: ServiceDep, caller: CallerDep):
    return Batches(service).cancel(caller, batch_id)


# ---- adapters: vLLM's routes and lorag's own ----

adapters = APIRouter(responses=ERROR_RESPONSES)
PLAIN_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                    "description": "What was done, in vLLM's words"}}


@contextmanager
def vllm_fields():
    """An error from the block names vLLM's body fields for the service's name and path."""
    try:
        yield
    except LoragError as e:
        e.field = {"name": "lora_name", "path": "lora_path"}.get(e.field, e.field)
        raise


@adapters.post("/v1/load_lora_adapter", responses=PLAIN_TEXT)
def load_lora_adapter(body: LoadLora, service: ServiceDep, caller: CallerDep):
    """vLLM's route: register an adapter folder under a name (read and validated now)."""
    with vllm_fields():
        loaded = service.adapters.load(caller, body.lora_name, body.lora_path)
    verb = "loaded" if loaded else "was already loaded (refreshed)"
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb}.")


@adapters.post("/v1/unload_lora_adapter", responses=PLAIN_TEXT)
def unload_lora_adapter(body: UnloadLora, service: ServiceDep, caller: CallerDep):
    """vLLM's route: forget an adapter; running requests on it finish."""
    with vllm_fields():
        service.adapters.unload(caller, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed.")


@adapters.get("/v1/adapters")
def list_adapters(service: ServiceDep, caller: CallerDep):
    """The caller's adapters (and shared ones) with where each is: RAM, slot, pinned."""
    return {"object": "list", "data": service.adapters.visible(caller)}


@adapters.post("/v1/adapters")
def load_adapter(body: AdapterLoad, service: ServiceDep, caller: CallerDep):
    """Register an adapter folder under a name, optionally shared with every tenant."""
    loaded = service.adapters.load(caller, body.name, body.path, body.shared)
    return {**service.adapters.get(caller, body.name), "loaded": loaded}


@adapters.get("/v1/adapters/{name}")
def get_adapter(name: str, service: ServiceDep, caller: CallerDep):
    """One adapter's status."""
    return service.adapters.get(caller, name)


@adapters.delete("/v1/adapters/{name}")
def delete_adapter(name: str, service: ServiceDep, caller: CallerDep):
    """Forget an adapter; running requests on it finish."""
    service.adapters.unload(caller, name)
    return {"name": name, "unloaded": True}


@adapters.post("/v1/adapters/{name}/pin")
def pin_adapter(name: str, service: ServiceDep, caller: CallerDep):
    """Keep an adapter in a compute slot until unpinned."""
    service.adapters.pin(caller, name, pinned=True)
    return service.adapters.get(caller, name)


@adapters.post("/v1/adapters/{name}/rollout")
def rollout_adapter(name: str, body: RolloutBody, service: ServiceDep, caller: CallerDep):
    """Serve `name` by weighted versions (`name@version` adapters), sticky per API key, on
    every replica from its next request: a new rollout, a changed split, a promotion
    (`{v2: 100}`) or a rollback."""
    return service.adapters.rollout(caller, name, body.versions)


@adapters.get("/v1/adapters/{name}/rollout")
def get_rollout(name: str, service: ServiceDep, caller: CallerDep):
    versions = service.store.rollout(caller.tenant, name)
    if versions is None:
        raise NotFound(f"no rollout of {name!r}", field="name")
    return {"name": name, "versions": versions}


@adapters.delete("/v1/adapters/{name}/rollout")
def delete_rollout(name: str, service: ServiceDep, caller: CallerDep):
    """End a rollout: `name` means the adapter registered under it again (if any)."""
    tenancy.require_admin(caller, "roll out adapters")
    if not service.store.delete_rollout(caller.tenant, name):
        raise NotFound(f"no rollout of {name!r}", field="name")
    return {"name": name, "deleted": True}


@adapters.post("/v1/adapters/{name}/unpin")
def unpin_adapter(name: str, service: ServiceDep, caller: CallerDep):
    """Let a pinned adapter be evicted again."""
    service.adapters.pin(caller, name, pinned=False)
    return service.adapters.get(caller, name)


# ---- retrieval namespaces ----

retrieval = APIRouter(responses=ERROR_RESPONSES)


@retrieval.get("/v1/namespaces")
def list_namespaces(service: ServiceDep, caller: CallerDep):
    """The retrieval namespaces the caller can search."""
    return {"object": "list", "data": service.namespaces.list(caller)}


@retrieval.put("/v1/namespaces/{namespace}")
def create_namespace(namespace: str, body: NamespaceBody, service: ServiceDep,
                     caller: CallerDep):
    """Create a namespace (idempotent), or set its settings: shared with every tenant, and
    the relevance adapter its RAG chats rerank with by default."""
    created = service.set_namespace(caller, namespace, body.shared, body.reranker)
    return {"name": namespace, "shared": body.shared, "reranker": body.reranker,
            "created": created}


@retrieval.delete("/v1/namespaces/{namespace}")
def delete_namespace(namespace: str, service: ServiceDep, caller: CallerDep):
    """Delete a namespace with all its documents."""
    service.namespaces.drop(caller, namespace)
    return {"name": namespace, "deleted": True}


@retrieval.post("/v1/namespaces/{namespace}/documents")
def put_documents(namespace: str, body: DocumentsBody, service: ServiceDep,
                  caller: CallerDep):
    """Index documents (replacing any with the same id): chunked, embedded, searchable."""
    results = service.namespaces.put(caller, namespace, body.items())
    return {"namespace": namespace, "documents": results}


@retrieval.post("/v1/namespaces/{namespace}/files")
def upload_files(namespace: str, files: Annotated[list[UploadFile], File()],
                 service: ServiceDep, caller: CallerDep):
    """Files (multipart `files`) read as `lorag ingest` reads them; an outcome per file."""
    limits = service.limits
    limits.check_upload(len(files))
    contents = []
    for upload in files:
        data = upload.file.read(limits.upload_file_bytes + 1)
        if len(data) > limits.upload_file_bytes:
            raise TooLarge(f"{upload.filename} is over {limits.upload_file_mb} MiB, the "
                           "largest file an upload takes (the daemon's --limit "
                           "upload_file_mb)", field="files")
        contents.append((upload.filename, data))
    return {"namespace": namespace,
            "files": service.namespaces.ingest_files(caller, namespace, contents)}


@retrieval.delete("/v1/namespaces/{namespace}/documents/{document_id:path}")
def delete_document(namespace: str, document_id: str, service: ServiceDep,
                    caller: CallerDep):
    """Remove one document and its chunks."""
    service.namespaces.delete_document(caller, namespace, document_id)
    return {"namespace": namespace, "id": document_id, "deleted": True}


@retrieval.post("/v1/namespaces/{namespace}/search")
def search(namespace: str, body: SearchBody, service: ServiceDep, caller: CallerDep):
    """Hybrid (vector + BM25), vector or BM25 search over a namespace."""
    hits = service.namespaces.search(caller, namespace, body.query, body.top_k, body.mode,
                                     body.filter)
    return {"object": "list", "data": [asdict(hit) for hit in hits]}


# ---- operations: no API key needed (probes and scrapers have none) ----

operations = APIRouter()


@operations.get("/health", responses={503: {"description": "The engine stopped"}})
async def health(service: ServiceDep):
    """Liveness: 200 while the engine runs, draining or not."""
    body = service.health()
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@operations.get("/health/ready",
                responses={503: {"description": "The engine stopped, or draining"}})
async def ready(service: ServiceDep):
    """Readiness: 200 while this replica takes requests; 503 from the moment it drains."""
    body = service.health()
    if body["status"] == "ok" and body["draining"]:
        body["status"] = "draining"
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@operations.get("/metrics", responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "Prometheus' text format"},
    401: ERROR_RESPONSES[401]})
async def metrics(service: ServiceDep, caller: CallerDep):
    """Prometheus metrics: lorag's own and the vLLM families routers read. On a daemon
    with API keys, a key sees its own tenant's adapters only; the full exposition, for
    Prometheus and routers, is on `lorag serve --metrics-port`."""
    tenant = None if service.keys.open else caller.tenant
    return PlainTextResponse(service.metrics.exposition(tenant), media_type=CONTENT_TYPE_LATEST)


# ---- the playground: static files, no key needed to load them (it asks for one) ----

PLAYGROUND = Path(__file__).with_name("playground")
# nothing but this origin: no CDN, no inline script, no framing
PLAYGROUND_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                     "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                     "form-action 'none'; frame-ancestors 'none'")
playground = APIRouter()


@playground.get("/", include_in_schema=False)
async def playground_page():
    return FileResponse(PLAYGROUND / "index.html",
                        headers={"Content-Security-Policy": PLAYGROUND_POLICY,
                                 "Cache-Control": "no-cache"})
