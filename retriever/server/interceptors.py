"""Cross-cutting concerns of every RPC: request ids, trace ids, metrics, authentication."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from retriever import tracing
from retriever.server.status import REQUEST_ID, REQUEST_ID_HEADER, RPC_CODE, abort
from retriever.slo.metrics import Metrics

# A call cancelled with at most this long left counts as its deadline passing (below): the
# server's deadline runs from when the call reached it, so when the caller's own deadline
# fires (and cancels the call) the server can still read the request's transit time left.
_DEADLINE_SLACK_S = 0.1

# Codes that mark a server span as an error (OpenTelemetry's gRPC conventions); the others
# are the caller's doing and leave the span's status unset.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL",
                            "UNAVAILABLE", "DATA_LOSS"})


def _request_ids(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """The request id (the caller's x-request-id, else a new one) and the caller's trace id
    (from its traceparent; "" when none or malformed, which is ignored)."""
    rid = trace_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value and len(value) <= 128:
            rid = str(value)
        elif key == tracing.TRACEPARENT_HEADER:
            trace_id = tracing.parse_traceparent(value)
    return rid or uuid.uuid4().hex, trace_id


def _end_span(rid: str, code: str) -> None:
    """The final status and the request id on the RPC's server span (when traced): the
    OpenTelemetry interceptor does not see aborts made with ``abort_with_status``."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("retriever.request_id", rid)
    value = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN).value[0]
    span.set_attribute("rpc.grpc.status_code", value)
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code))


Behavior = Callable[..., Awaitable[Any]]


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behavior of each unary and client-streaming RPC it applies to."""

    def applies(self, method: str) -> bool:
        return True

    def _wrap(self, rpc: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.applies(details.method):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(rpc, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(rpc, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # streaming responses (health Watch, reflection) pass through


class ObservabilityInterceptor(_WrappingInterceptor):
    """Request ids (x-request-id in, trailer out), the caller's trace id (traceparent in),
    per-RPC latency, in-flight and codes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _wrap(self, rpc: str, behavior: Behavior) -> Behavior:
        m = self._metrics

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid, trace_id = _request_ids(context)
            REQUEST_ID.set(rid)
            tracing.CALLER_TRACE_ID.set(trace_id)
            RPC_CODE.set("OK")
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            m.inflight.labels(rpc).inc()
            t0 = time.perf_counter()
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:  # the client cancelled or its deadline passed
                # gRPC cancels the handler when the deadline passes, and the time left it
                # reads then can still be a hair above zero (half of the misses were
                # counted CANCELLED, which the availability SLI leaves out).
                remaining = context.time_remaining()
                RPC_CODE.set("DEADLINE_EXCEEDED"
                             if remaining is not None and remaining <= _DEADLINE_SLACK_S
                             else "CANCELLED")
                raise
            except BaseException:
                RPC_CODE.set(grpc.StatusCode.INTERNAL.name
                             if RPC_CODE.get() == "OK" else RPC_CODE.get())
                raise
            finally:
                m.inflight.labels(rpc).dec()
                elapsed = time.perf_counter() - t0
                m.request_duration.labels(rpc).observe(elapsed)
                if RPC_CODE.get() == "RESOURCE_EXHAUSTED":
                    m.refusal_duration.labels(rpc).observe(elapsed)
                m.requests.labels(rpc, RPC_CODE.get()).inc()
                _end_span(rid, RPC_CODE.get())

        return wrapped


class AuthInterceptor(_WrappingInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC of the given services; health
    checks and reflection stay open so probes and grpcurl's discovery work."""

    def __init__(self, token: str, services: tuple[str, ...]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{s}/" for s in services)

    def applies(self, method: str) -> bool:
        return method.startswith(self._prefixes)

    def _wrap(self, rpc: str, behavior: Behavior) -> Behavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            sent = b""
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    sent = value.encode() if isinstance(value, str) else bytes(value)
            if not hmac.compare_digest(sent, self._expected):
                await abort(context, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong credentials: send metadata 'authorization: "
                            "Bearer <token>' with the token this server is configured with")
            return await behavior(request, context)

        return guarded
