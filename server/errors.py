"""lorag's errors -> what each transport says: the one table both transports read.

HTTP answers in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; gRPC
with a status code and the message. Anything not a LoragError is a bug or an
infrastructure failure: logged with its traceback, answered as a 500 / INTERNAL.
"""

from dataclasses import dataclass

import grpc

from lorag.errors import (
    InvalidRequest,
    LoragError,
    NotFound,
    Overloaded,
    PermissionDenied,
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
    Overloaded: Mapping(429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    Unavailable: Mapping(503, "service_unavailable_error", grpc.StatusCode.UNAVAILABLE),
}
INTERNAL = Mapping(500, "internal_error", grpc.StatusCode.INTERNAL)


def mapping(error: Exception) -> Mapping:
    """The wire mapping of `error`: the nearest LoragError class, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in MAPPINGS:
            return MAPPINGS[cls]
    return INTERNAL


def openai_error(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """The JSON body OpenAI clients parse."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
