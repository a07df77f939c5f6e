"""Domain errors -> gRPC status, in one table, with google.rpc details."""

from __future__ import annotations

import contextvars

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from retriever import errors

CODES: dict[type[errors.RetrieverError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

# The final code of the RPC being handled, read by the metrics interceptor.
RPC_CODE: contextvars.ContextVar[str] = contextvars.ContextVar("rpc_code", default="OK")
# The id of the request being handled; sent back as a trailer on every response.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
REQUEST_ID_HEADER = "x-request-id"


def code_for(exc: errors.RetrieverError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(code: grpc.StatusCode, message: str, field: str | None = None) -> grpc.Status:
    detail = any_pb2.Any()
    if code is grpc.StatusCode.INVALID_ARGUMENT and field:
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED or code is grpc.StatusCode.UNAVAILABLE:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(500)
        detail.Pack(retry)
    else:
        detail.Pack(error_details_pb2.ErrorInfo(reason=code.name, domain="retriever.v1"))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                               details=[detail])
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                field: str | None = None) -> None:
    RPC_CODE.set(code.name)
    status = to_status(code, message, field)
    rid = REQUEST_ID.get()
    if rid:  # abort replaces the trailers set earlier: keep the request id among them
        status = _Status(status.code, status.details,
                         (*status.trailing_metadata, (REQUEST_ID_HEADER, rid)))
    await context.abort_with_status(status)


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
