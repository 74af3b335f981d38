"""The gRPC API (proto/lorag/v1/lorag.proto): a thin servicer, one error interceptor,
standard health checking and server reflection."""

import logging
import uuid
from concurrent import futures

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lorag.server.auth import Caller
from lorag.server.engine import SamplingParams
from lorag.server.errors import INTERNAL, mapping
from lorag.server.service import Service

from lorag.errors import InvalidRequest, LoragError
from lorag.v1 import lorag_pb2, lorag_pb2_grpc

log = logging.getLogger("lorag.grpc")
SERVICE_NAME = lorag_pb2.DESCRIPTOR.services_by_name["LoragService"].full_name
FINISH = {"stop": lorag_pb2.FINISH_REASON_STOP, "length": lorag_pb2.FINISH_REASON_LENGTH,
          "cancelled": lorag_pb2.FINISH_REASON_CANCELLED}
MODES = {lorag_pb2.SEARCH_MODE_UNSPECIFIED: "hybrid", lorag_pb2.SEARCH_MODE_VECTOR: "vector",
         lorag_pb2.SEARCH_MODE_BM25: "bm25", lorag_pb2.SEARCH_MODE_HYBRID: "hybrid"}


class LoragServicer(lorag_pb2_grpc.LoragServiceServicer):
    """Unpacks a request, calls the Service, packs the response."""

    def __init__(self, service: Service):
        self.service = service

    def Generate(self, request, context):
        stream = self._submit(request, context)
        text, last = [], None
        for last in stream:
            text.append(last.text)
        if last.error is not None:
            raise last.error
        return lorag_pb2.GenerateResponse(text="".join(text), finish_reason=FINISH[
            last.finish_reason], usage=_usage(last))

    def GenerateStream(self, request, context):
        for out in self._submit(request, context):
            if out.error is not None:
                raise out.error
            finish = FINISH.get(out.finish_reason, lorag_pb2.FINISH_REASON_UNSPECIFIED)
            yield lorag_pb2.GenerateStreamResponse(
                text=out.text, finish_reason=finish,
                usage=_usage(out) if out.finish_reason else None)

    def LoadAdapter(self, request, context):
        loaded = self.service.load_adapter(self._caller(context), request.name, request.path,
                                           request.shared)
        return lorag_pb2.LoadAdapterResponse(loaded=loaded)

    def UnloadAdapter(self, request, context):
        self.service.unload_adapter(self._caller(context), request.name)
        return lorag_pb2.UnloadAdapterResponse(unloaded=True)

    def ListAdapters(self, request, context):
        rows = self.service.list_adapters(self._caller(context))
        return lorag_pb2.ListAdaptersResponse(adapters=[lorag_pb2.AdapterInfo(
            name=r["name"], path=r["path"], shared=r["shared"], in_ram=r["in_ram"],
            active=r["active"], pinned=r["pinned"], running_requests=r["running_requests"])
            for r in rows])

    def Search(self, request, context):
        filters = {key: json_format.MessageToDict(value)
                   for key, value in request.filter.items()} or None
        hits = self.service.namespaces.search(
            self._caller(context), request.namespace, request.query,
            request.top_k if request.HasField("top_k") else 5, MODES[request.mode], filters)
        return lorag_pb2.SearchResponse(hits=[lorag_pb2.SearchHit(
            document_id=h.document_id, chunk_id=h.chunk_id, score=h.score, text=h.text,
            metadata=_struct(h.metadata)) for h in hits])

    def _caller(self, context) -> Caller:
        metadata = dict(context.invocation_metadata())
        return self.service.keys.caller(metadata.get("authorization"))

    def _submit(self, request, context):
        if not request.prompt:
            raise InvalidRequest("prompt is empty", field="prompt")
        stream = self.service.generate(
            self._caller(context), request.prompt, _sampling(request.sampling),
            request.adapter or self.service.model_name,
            [(a.name, a.weight) for a in request.adapters] or None,
            f"grpc-{uuid.uuid4().hex}")
        # runs when the RPC ends for any reason; after a normal end it finds nothing to stop
        context.add_callback(lambda: self.service.cancel(stream))
        return stream


def _sampling(options) -> SamplingParams:
    has = options.HasField
    return SamplingParams(
        max_tokens=options.max_tokens if has("max_tokens") else 256,
        temperature=options.temperature if has("temperature") else 1.0,
        top_p=options.top_p if has("top_p") else 1.0,
        top_k=options.top_k if has("top_k") else 0,
        seed=options.seed if has("seed") else None, stop=list(options.stop))


def _struct(values: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def _usage(out) -> lorag_pb2.Usage:
    return lorag_pb2.Usage(prompt_tokens=out.prompt_tokens,
                           completion_tokens=out.completion_tokens)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Translates lorag's errors into status codes, for every RPC, in one place."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None and handler.unary_stream is None:
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                try:
                    return inner(request, context)
                except Exception as e:  # noqa: BLE001 - every error gets a status code
                    _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        inner_stream = handler.unary_stream

        def streaming(request, context):
            try:
                yield from inner_stream(request, context)
            except Exception as e:  # noqa: BLE001
                _abort(context, e)

        return grpc.unary_stream_rpc_method_handler(
            streaming, handler.request_deserializer, handler.response_serializer)


def _abort(context, error: Exception):
    m = mapping(error)
    if m is INTERNAL:
        log.exception("internal error in a gRPC call", exc_info=error)
    message = error.message if isinstance(error, LoragError) else f"internal error: {error}"
    context.abort(m.grpc_code, message)


def start_grpc(service: Service, host: str, port: int, workers: int = 32) -> grpc.Server:
    """Serve the API, health checking and reflection on host:port; returns the server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[ErrorInterceptor()])
    lorag_pb2_grpc.add_LoragServiceServicer_to_server(LoragServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port} (in use?)")
    server.start()
    return server
