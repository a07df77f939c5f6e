"""Client-side retries, shared by the sync and the async client.

What is retried, and nothing else:

- ``UNAVAILABLE`` (the server is loading, draining, or not reachable yet);
- ``RESOURCE_EXHAUSTED`` only when its status carries ``google.rpc.RetryInfo``: the server
  says a retry can cure it (an in-flight limit). Without RetryInfo (a full disk) it cannot.

The wait before retry ``n`` (1-based) is ``base * multiplier**(n-1)`` capped at
``max_backoff``, where ``base`` is the server's RetryInfo delay when it sent one (never
less), else ``initial_backoff``; a random ``0..jitter`` share of it is added on top, so
clients shed together do not come back together. A retry never starts past the call's
deadline: when the wait would end after it, the last error is returned as is. Each attempt
runs with the time left to the original deadline.

Only unary calls are retried: a client-streaming call (``UpsertDocuments``) consumes its
request iterator, which cannot be replayed. A call that changes state (creating or deleting a
namespace or documents, re-indexing, syncing, registering a golden set, evaluating,
recording feedback) is retried only when the *server* refused it with RetryInfo (it was
loading, draining, over its limits: nothing was applied). An ``UNAVAILABLE`` from the
transport (a connection reset) may come after the server applied the call, so repeating it
could apply it twice (a second golden-set version) or report a false error (ALREADY_EXISTS
for the namespace the lost attempt created); only reads (``READ_ONLY_METHODS``) are retried
then.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["READ_ONLY_METHODS", "RetryPolicy", "retry_delay", "retry_info_delay"]

# Methods that change nothing: any failure a retry may cure is retried for them.
READ_ONLY_METHODS = frozenset({
    "Search", "BatchSearch", "GetNamespace", "ListNamespaces", "GetDocument",
    "ListDocuments", "GetChunk", "GetIndexStatus", "Check", "Watch",
})

# Called before each retry with (method, code of the failed attempt, attempt number that
# failed (1-based), seconds until the next one).
OnRetry = Callable[[str, grpc.StatusCode, int, float], None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` counts the first call: 1 disables retries."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise ValueError("backoffs and jitter must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_info_delay(status: status_pb2.Status | None) -> float | None:
    """The delay a ``google.rpc.RetryInfo`` detail of ``status`` asks for, in seconds; None
    when the status carries no RetryInfo."""
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(0.0, info.retry_delay.ToNanoseconds() / 1e9)
    return None


def retry_delay(policy: RetryPolicy, code: grpc.StatusCode | None,
                status: status_pb2.Status | None, attempt: int,
                time_left: float | None, rng: random.Random | None = None, *,
                read_only: bool = True) -> float | None:
    """Seconds to wait before retrying a call whose attempt number ``attempt`` (1-based)
    failed with ``code`` and rich ``status``; None: do not retry. ``time_left``: seconds to
    the call's deadline (None: no deadline). ``read_only``: the call changes nothing (else
    it is retried only when the server refused it with RetryInfo)."""
    if code is None or attempt >= policy.max_attempts:
        return None
    hint = retry_info_delay(status)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if hint is None:
            return None
    elif code is not grpc.StatusCode.UNAVAILABLE or (hint is None and not read_only):
        return None  # (a state change without RetryInfo may have been applied already)
    base = max(hint or 0.0, policy.initial_backoff)
    # The cap never cuts below what the server asked for.
    delay = min(base * policy.multiplier ** (attempt - 1), max(policy.max_backoff, hint or 0.0))
    delay += (rng or random).uniform(0.0, policy.jitter) * delay
    if time_left is not None and delay >= time_left:
        return None
    return delay


class SyncRetryInterceptor(grpc.UnaryUnaryClientInterceptor):
    """The policy as a ``grpc`` (sync) client interceptor, for unary-unary calls."""

    def __init__(self, policy: RetryPolicy, on_retry: OnRetry | None = None) -> None:
        self.policy = policy
        self.on_retry = on_retry

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                              request: Any) -> Any:
        deadline = (None if client_call_details.timeout is None
                    else time.monotonic() + client_call_details.timeout)
        attempt = 1
        details = client_call_details
        while True:
            outcome = continuation(details, request)
            code = outcome.code()
            if code is grpc.StatusCode.OK:
                return outcome
            time_left = None if deadline is None else deadline - time.monotonic()
            try:
                status = rpc_status.from_call(outcome)
            except ValueError:  # details inconsistent with the call's code: treat as absent
                status = None
            delay = retry_delay(self.policy, code, status, attempt, time_left,
                                read_only=_read_only(details.method))
            if delay is None:
                return outcome
            if self.on_retry is not None:
                self.on_retry(_method_name(details.method), code, attempt, delay)
            time.sleep(delay)
            attempt += 1
            if deadline is not None:
                details = _SyncCallDetails(details, max(0.0, deadline - time.monotonic()))


class AsyncRetryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """The policy as a ``grpc.aio`` client interceptor, for unary-unary calls."""

    def __init__(self, policy: RetryPolicy, on_retry: OnRetry | None = None) -> None:
        self.policy = policy
        self.on_retry = on_retry

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = (None if client_call_details.timeout is None
                    else loop.time() + client_call_details.timeout)
        attempt = 1
        details = client_call_details
        while True:
            call = await continuation(details, request)
            code = await call.code()
            if code is grpc.StatusCode.OK or self.policy.max_attempts <= attempt:
                return call
            try:
                status = await rpc_status.aio.from_call(call)
            except ValueError:
                status = None
            time_left = None if deadline is None else deadline - loop.time()
            delay = retry_delay(self.policy, code, status, attempt, time_left,
                                read_only=_read_only(details.method))
            if delay is None:
                return call
            if self.on_retry is not None:
                self.on_retry(_method_name(details.method), code, attempt, delay)
            await asyncio.sleep(delay)
            attempt += 1
            if deadline is not None:
                details = details._replace(timeout=max(0.0, deadline - loop.time()))


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _read_only(method: str | bytes) -> bool:
    """Whether "/package.Service/Method" changes nothing."""
    return _method_name(method).rsplit("/", 1)[-1] in READ_ONLY_METHODS


class _SyncCallDetails(grpc.ClientCallDetails):
    def __init__(self, d: Any, timeout: float | None) -> None:
        self.method = d.method
        self.timeout = timeout
        self.metadata = d.metadata
        self.credentials = d.credentials
        self.wait_for_ready = d.wait_for_ready
        self.compression = d.compression
