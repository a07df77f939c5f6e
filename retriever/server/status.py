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
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}
# Errors a retry can cure: their status carries RetryInfo. A full disk is RESOURCE_EXHAUSTED
# too, but no retry helps until space is freed, so it carries none.
RETRYABLE: tuple[type[errors.RetrieverError], ...] = (
    errors.Overloaded, errors.NotReady, errors.Unavailable)

# The final code of the RPC being handled, read by the metrics interceptor.
RPC_CODE: contextvars.ContextVar[str] = contextvars.ContextVar("rpc_code", default="OK")
# The id of the request being handled; sent back as a trailer on every response.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
REQUEST_ID_HEADER = "x-request-id"


def code_for(exc: errors.RetrieverError) -> grpc.StatusCode:
    if isinstance(exc, errors.Cancelled):
        return (grpc.StatusCode.DEADLINE_EXCEEDED if exc.deadline
                else grpc.StatusCode.CANCELLED)
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(code: grpc.StatusCode, message: str, field: str | None = None, *,
              retry: bool | None = None) -> grpc.Status:
    """``retry``: attach RetryInfo; by default for RESOURCE_EXHAUSTED and UNAVAILABLE."""
    if retry is None:
        retry = code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
    detail = any_pb2.Any()
    if code is grpc.StatusCode.INVALID_ARGUMENT and field:
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    elif retry:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(500)
        detail.Pack(info)
    else:
        detail.Pack(error_details_pb2.ErrorInfo(reason=code.name, domain="retriever.v1"))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                               details=[detail])
    return rpc_status.to_status(status)


async def abort_error(context: grpc.aio.ServicerContext, exc: errors.RetrieverError) -> None:
    """End the call with the status of a domain error."""
    code = code_for(exc)
    retry = isinstance(exc, RETRYABLE) if code in (
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) else False
    await abort(context, code, exc.message, exc.field, retry=retry)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                field: str | None = None, *, retry: bool | None = None) -> None:
    RPC_CODE.set(code.name)
    status = to_status(code, message, field, retry=retry)
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
