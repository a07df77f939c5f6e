"""OpenTelemetry tracing of RPCs and pipeline stages; off unless ``otlp_endpoint`` is set.

``setup(settings)`` (by the server at start) builds a TracerProvider that exports to the
OTLP/gRPC collector in batches, and installs it behind the module-level ``tracer`` and
``span()``, which the core uses for its stage spans; ``Tracing.shutdown()`` (at server stop)
flushes what is queued and uninstalls it. Until then they are the API's no-op, and
``span()`` costs one check. The provider is this module's, not the process-global one
(``trace.set_tracer_provider`` can be set only once per process; a process can run more
than one server, e.g. in tests).

Lineage joins a response to the caller's trace: ``CALLER_TRACE_ID`` holds the trace id of
the request's W3C ``traceparent`` (set by the server's interceptor, whether tracing is on or
not), and ``current_trace_id()`` returns it, or the server's own sampled trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from retriever.config import Settings

__all__ = ["CALLER_TRACE_ID", "Tracing", "current_trace_id", "enabled", "parse_traceparent",
           "setup", "span", "tracer"]

log = logging.getLogger(__name__)

TRACEPARENT_HEADER = "traceparent"
# The trace id (32 lowercase hex) of the traceparent the request being handled carried;
# "" when it carried none or a malformed one.
CALLER_TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("caller_trace_id",
                                                                      default="")
_W3C = TraceContextTextMapPropagator()
_NOOP_TRACER = trace.NoOpTracer()
_NOOP_SPAN: AbstractContextManager[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)
INSTALL_HINT = ("tracing (otlp_endpoint) needs opentelemetry-sdk, "
                 "opentelemetry-exporter-otlp-proto-grpc and "
                 "opentelemetry-instrumentation-grpc: pip install the versions pyproject.toml "
                 "pins, or leave otlp_endpoint empty")


class _Tracer(trace.Tracer):
    """The tracer of the installed provider, or the no-op one while none is."""

    def __init__(self) -> None:
        self.delegate: trace.Tracer = _NOOP_TRACER

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self.delegate.start_span(*args, **kwargs)

    # The API types the result as its private _AgnosticContextManager.
    def start_as_current_span(  # type: ignore[override]
            self, *args: Any, **kwargs: Any) -> AbstractContextManager[trace.Span]:
        return self.delegate.start_as_current_span(*args, **kwargs)


tracer = _Tracer()
_installed: Tracing | None = None
_lock = threading.Lock()


def enabled() -> bool:
    return _installed is not None


def span(name: str, attributes: Mapping[str, AttributeValue] | None = None,
         ) -> AbstractContextManager[trace.Span]:
    """A span around the block, a child of the current one; a shared no-op context when
    tracing is off (its span ignores ``set_attribute``)."""
    if _installed is None:
        return _NOOP_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


def parse_traceparent(value: str | bytes | None) -> str:
    """The trace id of a W3C ``traceparent`` header value; "" for a missing or malformed one
    (parsed the way OpenTelemetry's propagator does, so both agree)."""
    if not value:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    ctx = trace.get_current_span(_W3C.extract({TRACEPARENT_HEADER: value})).get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else ""


def current_trace_id() -> str:
    """The trace the work in progress belongs to, as 32 lowercase hex: the caller's (from
    its traceparent); else, when tracing is on, the server's own if it is sampled (exported);
    else ""."""
    caller = CALLER_TRACE_ID.get()
    if caller:
        return caller
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid and ctx.trace_flags.sampled:
        return trace.format_trace_id(ctx.trace_id)
    return ""


class Tracing:
    """The installed tracing of one server: its provider (for the RPC interceptor)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export the ended spans now; False if that did not finish in time."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush the queued spans and stop exporting (blocks up to the export timeout when
        the collector is unreachable)."""
        global _installed
        with _lock:
            if _installed is self:
                _installed = None
                tracer.delegate = _NOOP_TRACER
        self.provider.shutdown()


def setup(settings: Settings) -> Tracing | None:
    """Tracing as configured, installed behind ``tracer``; None when ``otlp_endpoint`` is
    empty. Builds the exporter's channel but sends nothing until spans end."""
    global _installed
    if not settings.otlp_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    endpoint = settings.otlp_endpoint
    insecure = settings.otlp_insecure
    if insecure is None:
        insecure = not endpoint.startswith("https://")
    version = _version()
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: settings.otel_service_name,
                                  SERVICE_VERSION: version}),
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)))
    # A short export timeout: shutdown flushes, and a dead collector must not hold up a
    # drain for long (spans are then dropped, never the service).
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=5)))
    installed = Tracing(provider)
    with _lock:
        if _installed is not None:
            log.warning("tracing was already set up in this process: the newer server's "
                        "provider replaces it for the pipeline's spans")
        _installed = installed
        tracer.delegate = provider.get_tracer("retriever", version)
    log.info("tracing on: exporting spans to %s (sample ratio %g, %s)", endpoint,
             settings.trace_sample_ratio, "plaintext" if insecure else "TLS")
    return installed


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retriever")
    except PackageNotFoundError:
        return "unknown"
