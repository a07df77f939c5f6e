"""Cross-cutting concerns of every RPC: request ids, metrics, authentication."""

from __future__ import annotations

import contextvars
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from retriever.server.status import RPC_CODE, abort
from retriever.slo.metrics import Metrics

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
REQUEST_ID_HEADER = "x-request-id"


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value and len(value) <= 128:
            return str(value)
    return uuid.uuid4().hex


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        rpc = details.method.rsplit("/", 1)[-1]
        return _wrap_handler(handler, lambda behavior: self._wrap(rpc, behavior))

    def _wrap(self, rpc: str, behavior: Callable[..., Awaitable[Any]]
              ) -> Callable[..., Awaitable[Any]]:
        m = self._metrics

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = _request_id(context)
            REQUEST_ID.set(rid)
            RPC_CODE.set("OK")
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            m.inflight.labels(rpc).inc()
            t0 = time.perf_counter()
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except BaseException:
                RPC_CODE.set(grpc.StatusCode.INTERNAL.name
                             if RPC_CODE.get() == "OK" else RPC_CODE.get())
                raise
            finally:
                m.inflight.labels(rpc).dec()
                m.request_duration.labels(rpc).observe(time.perf_counter() - t0)
                m.requests.labels(rpc, RPC_CODE.get()).inc()

        return wrapped


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC of the given services; health
    checks and reflection stay open so probes and grpcurl's discovery work."""

    def __init__(self, token: str, services: tuple[str, ...]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if not details.method.startswith(self._prefixes):
            return handler
        return _wrap_handler(handler, self._guard)

    def _guard(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
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


def _wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]],
) -> grpc.RpcMethodHandler | None:
    """The handler with its unary or client-streaming behavior wrapped; handlers that stream
    responses (health Watch, reflection) pass through."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return handler
