"""The gRPC API (proto/lorag/v1/lorag.proto): a thin servicer, one error interceptor,
standard health checking and server reflection."""

import json
import re
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorag.errors import InvalidRequest, Overloaded
from lorag.retrieval import SEARCH_MODE, TOP_K
from lorag.server import requests
from lorag.server.engine.stream import Output, joined
from lorag.server.engine.structured import Constraint
from lorag.server.errors import mapping, public_message
from lorag.server.requests import Grounding, Reply, check_texts
from lorag.server.service import Service
from lorag.server.tenancy import Caller
from lorag.server.tools import CallStream, split_calls, template_messages, tool_use
from lorag.v1 import lorag_pb2, lorag_pb2_grpc

ENGINE_POLL_S = 0.5  # how often gRPC health looks at the engine
UNARY_WORKERS = 16  # gRPC worker threads beyond one per request the engine holds
SERVICE_NAME = lorag_pb2.DESCRIPTOR.services_by_name["LoragService"].full_name
FINISH = {"stop": lorag_pb2.FINISH_REASON_STOP, "length": lorag_pb2.FINISH_REASON_LENGTH,
          "cancelled": lorag_pb2.FINISH_REASON_CANCELLED}
MODES = {lorag_pb2.SEARCH_MODE_UNSPECIFIED: SEARCH_MODE, lorag_pb2.SEARCH_MODE_VECTOR: "vector",
         lorag_pb2.SEARCH_MODE_BM25: "bm25", lorag_pb2.SEARCH_MODE_HYBRID: "hybrid"}


FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name


class LoragServicer(lorag_pb2_grpc.LoragServiceServicer):
    """Unpacks a request, calls the Service, packs the response."""

    def __init__(self, service: Service):
        self.service = service

    def Generate(self, request, context):
        return self._whole(lorag_pb2.GenerateResponse, self._complete(request, context))

    def GenerateStream(self, request, context):
        yield from self._pieces(lorag_pb2.GenerateStreamResponse,
                                self._complete(request, context))

    def Chat(self, request, context):
        return self._whole(lorag_pb2.ChatResponse, self._chat(request, context))

    def ChatStream(self, request, context):
        yield from self._pieces(lorag_pb2.ChatStreamResponse, self._chat(request, context))

    def LoadAdapter(self, request, context):
        loaded = self.service.adapters.load(self._caller(context), request.name, request.path,
                                           request.shared)
        return lorag_pb2.LoadAdapterResponse(loaded=loaded)

    def UnloadAdapter(self, request, context):
        self.service.adapters.unload(self._caller(context), request.name)
        return lorag_pb2.UnloadAdapterResponse(unloaded=True)

    def ListAdapters(self, request, context):
        rows = self.service.adapters.visible(self._caller(context))
        return lorag_pb2.ListAdaptersResponse(adapters=[lorag_pb2.AdapterInfo(
            name=r["name"], path=r["path"], shared=r["shared"], in_ram=r["in_ram"],
            active=r["active"], pinned=r["pinned"], running_requests=r["running_requests"],
            kind=r["kind"])
            for r in rows])

    def Search(self, request, context):
        hits = self.service.namespaces.search(
            self._caller(context), request.namespace, request.query,
            request.top_k if request.HasField("top_k") else TOP_K, _mode(request.mode),
            _filter(request.filter))
        return lorag_pb2.SearchResponse(hits=[lorag_pb2.SearchHit(
            document_id=h.document_id, chunk_id=h.chunk_id, score=h.score, text=h.text,
            metadata=_struct(h.metadata)) for h in hits])

    def _whole(self, message: type, reply: Reply):
        """The whole answer as one `message` (a chat's with its grounding and calls)."""
        out = _collect(reply)
        text, calls = out.text, {}
        if reply.tools is not None:
            content, found = split_calls(out.text, reply.tools)
            text, calls = content or "", {"tool_calls": _calls(found)}
        return message(text=text, finish_reason=FINISH[out.finish_reason],
                       usage=_usage(out), logprobs=self._logprobs(out),
                       **_grounded(reply.grounding), **calls)

    def _pieces(self, message: type, reply: Reply):
        """The answer as it is generated, one `message` per output; the first carries the
        grounding (if any), the last the usage; with tools, each call once it is whole."""
        grounding = _grounded(reply.grounding)
        stream = None if reply.tools is None else CallStream(reply.tools)
        for out, finish in _deltas(reply):
            text, calls = out.text, {}
            if stream is not None:
                text, found = stream.feed(out.text, final=out.finish_reason is not None)
                calls = {"tool_calls": _calls(found)}
            yield message(text=text, finish_reason=finish,
                          usage=_usage(out) if finish else None,
                          logprobs=self._logprobs(out), **grounding, **calls)
            grounding = {}

    def _logprobs(self, out: Output) -> list[lorag_pb2.TokenLogprob]:
        def fields(entry: dict) -> dict:
            return {"token": entry["token"], "token_bytes": bytes(entry["bytes"]),
                    "logprob": entry["logprob"]}

        return [lorag_pb2.TokenLogprob(**fields(e), top_logprobs=[
            lorag_pb2.TopLogprob(**fields(top)) for top in e["top_logprobs"]])
            for e in self.service.logprobs(out.logprobs or [])]

    def _caller(self, context) -> Caller:
        metadata = dict(context.invocation_metadata())
        return self.service.caller(metadata.get("authorization"))

    def _complete(self, request, context) -> Reply:
        reply = self.service.complete(self._caller(context), requests.CompletionRequest(
            request.prompt, request.adapter or self.service.model_name,
            _composition(request.adapters), _sampling(request.sampling)))
        return self._cancel_at_end(reply, context)

    def _chat(self, request, context) -> Reply:
        parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") \
            else True
        tools = tool_use(_functions(request.tools), request.tool_choice or None, parallel,
                         where="tools.{i}")
        reply = self.service.chat(self._caller(context), requests.ChatRequest(
            template_messages(_messages(request.messages), tools),
            request.model or self.service.model_name, _composition(request.adapters),
            _sampling(request.sampling), _rag(request.rag) if request.HasField("rag") else None,
            tools))
        return self._cancel_at_end(reply, context)

    def _cancel_at_end(self, reply: Reply, context) -> Reply:
        # runs when the RPC ends for any reason; after a normal end it finds nothing to stop
        context.add_callback(lambda: self.service.cancel(reply.stream))
        return reply


def _messages(messages) -> list[dict]:
    """ChatMessages in OpenAI's shape (calls and their results included)."""
    out = []
    for i, m in enumerate(messages):
        message = {"role": m.role, "content": m.content}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest(f"messages[{i}]: only an assistant message carries "
                                     "tool_calls", field=f"messages.{i}.tool_calls")
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequest(f"messages[{i}] is a tool message: it needs the "
                                 "tool_call_id of the call it answers",
                                 field=f"messages.{i}.tool_call_id")
        out.append(message)
    return out


def _functions(tools) -> list[dict]:
    """FunctionTools as {"name", "description", "parameters"}, each checked."""
    functions = []
    for i, tool in enumerate(tools):
        if not FUNCTION_NAME.fullmatch(tool.name):
            raise InvalidRequest(f"tools[{i}].name must be 1-64 letters, digits, _ or -, "
                                 f"got {tool.name!r}", field=f"tools.{i}.name")
        function = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters:
            try:
                parameters = json.loads(tool.parameters)
            except ValueError as e:
                raise InvalidRequest(f"tools[{i}].parameters is not JSON: {e}",
                                     field=f"tools.{i}.parameters") from None
            if not isinstance(parameters, dict):
                raise InvalidRequest(f"tools[{i}].parameters must be a JSON schema object",
                                     field=f"tools.{i}.parameters")
            function["parameters"] = parameters
        functions.append(function)
    return functions


def _calls(calls: list[dict]) -> list[lorag_pb2.ToolCall]:
    return [lorag_pb2.ToolCall(id=c["id"], name=c["function"]["name"],
                               arguments=c["function"]["arguments"]) for c in calls]


def _collect(reply: Reply) -> Output:
    """A whole answer as one output; an engine error is raised."""
    out = joined(list(reply.stream))
    if out.error is not None:
        raise out.error
    return out


def _deltas(reply: Reply):
    """(output, finish reason enum) as the engine streams them; an error is raised."""
    for out in reply.stream:
        if out.error is not None:
            raise out.error
        yield out, FINISH.get(out.finish_reason, lorag_pb2.FINISH_REASON_UNSPECIFIED)


def _sampling(options) -> requests.Sampling:
    def get(name: str):
        return getattr(options, name) if options.HasField(name) else None

    numbers = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "logprobs")
    return requests.Sampling(**{name: get(name) for name in numbers}, stop=list(options.stop),
                             constraint=_constraint(options.response_format))


def _constraint(response_format) -> Constraint | None:
    kind = response_format.WhichOneof("format")
    if kind is None or kind == "json_object" and not response_format.json_object:
        return None
    return Constraint(kind, "" if kind == "json_object" else getattr(response_format, kind))


def _rag(options) -> requests.Rag:
    top_k = {"top_k": options.top_k} if options.HasField("top_k") else {}  # else the default
    return requests.Rag(options.namespace, mode=_mode(options.mode),
                        filter=_filter(options.filter), **top_k,
                        rerank=options.rerank if options.HasField("rerank") else None,
                        rerank_model=options.rerank_model or None,
                        cite=options.cite or None)


def _mode(value: int) -> str:
    """A SearchMode's name; an enum number the proto does not define is refused (proto3
    enums are open: any number arrives)."""
    if value not in MODES:
        known = ", ".join(lorag_pb2.SearchMode.Name(number) for number in MODES)
        raise InvalidRequest(f"mode {value} is not a SearchMode; one of {known}",
                             field="mode")
    return MODES[value]


def _composition(adapters) -> list[tuple[str, float]] | None:
    return [(a.name, a.weight) for a in adapters] or None


def _filter(values) -> dict | None:
    return {key: json_format.MessageToDict(value) for key, value in values.items()} or None


def _grounded(grounding: Grounding | None) -> dict:
    """A response's grounding field, if the answer was grounded (a completion never is)."""
    if grounding is None:
        return {}
    return {"grounding": lorag_pb2.Grounding(
        namespace=grounding.namespace, retrieved=grounding.retrieved,
        dropped=grounding.dropped, reranker=grounding.reranker or "",
        search_ms=grounding.search_ms, rerank_ms=grounding.rerank_ms, sources=[lorag_pb2.Source(
            document_id=s.document_id, chunk_id=s.chunk_id, score=s.score,
            metadata=_struct(s.metadata), text=s.text) for s in grounding.sources])}


def _struct(values: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def _usage(out: Output) -> lorag_pb2.Usage:
    return lorag_pb2.Usage(prompt_tokens=out.prompt_tokens,
                           completion_tokens=out.completion_tokens)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Translates lorag's errors into status codes, for every RPC, in one place; and
    refuses, as INVALID_ARGUMENT, a request whose bytes are no valid message (a string
    field of invalid UTF-8: grpcio would answer INTERNAL) or whose text no model input
    can hold (a NUL), before the RPC runs."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None and handler.unary_stream is None:
            return handler
        deserialize = handler.request_deserializer and _tolerant(
            handler.request_deserializer, handler_call_details.method)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                with _status_on_error(context):
                    _check_texts(request)
                    return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserialize,
                                                       handler.response_serializer)
        inner_stream = handler.unary_stream

        def streaming(request, context):
            with _status_on_error(context):
                _check_texts(request)
                yield from inner_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(streaming, deserialize,
                                                    handler.response_serializer)


class _Undecodable:
    """What a request's bytes decoded to when they are no valid message."""

    def __init__(self, problem: str):
        self.problem = problem


def _tolerant(deserialize, method: str):
    """`deserialize` that hands an undecodable request on as _Undecodable, for the RPC's
    wrapper to refuse with INVALID_ARGUMENT."""
    service, _, name = method.strip("/").rpartition("/")
    rpc = lorag_pb2.DESCRIPTOR.services_by_name["LoragService"].methods_by_name.get(name)
    expected = rpc.input_type.full_name if service == SERVICE_NAME and rpc else "message"

    def read(raw: bytes):
        try:
            return deserialize(raw)
        except DecodeError as e:
            return _Undecodable(f"the request is not a valid {expected} ({e}); string "
                                "fields must be UTF-8")

    return read


def _check_texts(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidRequest(request.problem)
    if isinstance(request, Message):  # health and reflection requests included
        try:
            fields = json_format.MessageToDict(request, preserving_proto_field_name=True)
        except json_format.Error as e:  # a google.protobuf.Value of NaN or infinity
            raise InvalidRequest(f"the request holds a value JSON cannot carry: {e}; "
                                 "filter values are strings, booleans, finite numbers or "
                                 "lists of them") from None
        check_texts(fields)


@contextmanager
def _status_on_error(context):
    """Any error in the block ends the RPC with its status code and public message."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every error gets a status code
        _abort(context, e)


def _abort(context, error: Exception):
    if isinstance(error, Overloaded):
        context.set_trailing_metadata((("retry-after", str(error.retry_after)),))
    context.abort(mapping(error).grpc_code, public_message(error))


def _follow_engine(service: Service, health_servicer: health.HealthServicer) -> None:
    """Every service NOT_SERVING within a second of the engine ceasing to serve (its step
    loop died, or it was shut down): a load balancer's health check sees it at once."""
    while service.engine.alive:
        time.sleep(ENGINE_POLL_S)
    health_servicer.enter_graceful_shutdown()


def start_grpc(service: Service, host: str, port: int, requests: int) -> grpc.Server:
    """Serve the API, health checking and reflection on host:port; returns the server.

    A call holds a worker thread while it runs, a stream for as long as it generates:
    `requests` (what the engine holds at once, running and waiting) workers for them and
    UNARY_WORKERS more, so that however many streams a tenant opens, health checks and
    other tenants' calls find a thread. Threads start as calls need them; past them all a
    call is refused at once (RESOURCE_EXHAUSTED), never left in a queue nobody sees."""
    workers = requests + UNARY_WORKERS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[ErrorInterceptor()], maximum_concurrent_rpcs=workers)
    lorag_pb2_grpc.add_LoragServiceServicer_to_server(LoragServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    service.on_drain.append(health_servicer.enter_graceful_shutdown)  # all NOT_SERVING
    threading.Thread(target=_follow_engine, args=(service, health_servicer),
                     name="lorag-grpc-health", daemon=True).start()
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:  # grpcio raises on a port in use; older releases returned 0
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}: the address is in use "
                           "or not this machine's; choose another with --grpc-port")
    server.start()
    return server
