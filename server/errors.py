"""lorag's errors -> what each transport says: the one table both transports read.

HTTP answers in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; gRPC
with a status code and the message. Anything not a LoragError is a bug or an
infrastructure failure: logged with its traceback under an id, answered as a 500 /
INTERNAL that says "internal error (request id ...)" and nothing of the exception (its
text can hold paths, tensor shapes, another tenant's names).
"""

import logging
import uuid
from dataclasses import dataclass

import grpc

from lorag.errors import (
    AdapterChanged,
    InvalidRequest,
    LoragError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RequestFailed,
    TooLarge,
    Unauthenticated,
    Unavailable,
)


@dataclass(frozen=True)
class Mapping:
    """How one error class reads on the wire."""

    http_status: int
    openai_type: str
    grpc_code: grpc.StatusCode


MAPPINGS: dict[type[LoragError], Mapping] = {
    InvalidRequest: Mapping(400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    Unauthenticated: Mapping(401, "authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: Mapping(403, "permission_error", grpc.StatusCode.PERMISSION_DENIED),
    NotFound: Mapping(404, "not_found_error", grpc.StatusCode.NOT_FOUND),
    TooLarge: Mapping(413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    AdapterChanged: Mapping(409, "conflict_error", grpc.StatusCode.FAILED_PRECONDITION),
    Overloaded: Mapping(429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    Unavailable: Mapping(503, "service_unavailable_error", grpc.StatusCode.UNAVAILABLE),
}
INTERNAL = Mapping(500, "internal_error", grpc.StatusCode.INTERNAL)
MAPPINGS[RequestFailed] = INTERNAL  # lorag's own words about a bug: safe to show
log = logging.getLogger("lorag.errors")


def mapping(error: Exception) -> Mapping:
    """The wire mapping of `error`: the nearest LoragError class, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in MAPPINGS:
            return MAPPINGS[cls]
    return INTERNAL


def openai_error(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """The JSON body OpenAI clients parse."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def public_message(error: Exception, request_id: str | None = None) -> str:
    """What a caller may read of `error`: a LoragError's own message; for anything else,
    "internal error (request id ...)", with the traceback logged under that id."""
    if isinstance(error, LoragError):
        return error.message
    request_id = request_id or f"error-{uuid.uuid4().hex[:16]}"
    log.error("internal error (request id %s)", request_id, exc_info=error)
    return f"internal error (request id {request_id})"
