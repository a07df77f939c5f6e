"""Server lifecycle: bind, load, serve, drain.

The gRPC port is bound first with health NOT_SERVING (RPCs answer UNAVAILABLE while the
model and indexes load); health flips to SERVING once the core has started. On SIGTERM or
SIGINT, health flips back, in-flight RPCs get ``shutdown_grace_s`` to finish, the indexes
are flushed, queued trace spans are exported, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from retriever import tracing
from retriever._gc import PauseWatch, freeze_startup
from retriever._malloc import limit_arenas
from retriever.config import Settings
from retriever.errors import RetrieverError
from retriever.models.embedder import Embedder, preflight
from retriever.server.interceptors import AuthInterceptor, ObservabilityInterceptor
from retriever.server.servicer import SERVICE_NAME, RetrieverServicer, method_handlers
from retriever.service import RetrieverService

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start as configured (e.g. a port is taken); the message says why."""


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: RetrieverServicer
    service: RetrieverService


def _trace_interceptor(traces: tracing.Tracing) -> grpc.aio.ServerInterceptor:
    """A server span per RPC (health checks aside), a child of the caller's span when the
    call carries a W3C traceparent."""
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
    except ImportError as exc:
        raise StartupError(tracing.INSTALL_HINT) from exc
    return aio_server_interceptor(tracer_provider=traces.provider,
                                  filter_=filters.negate(filters.health_check()))


async def create_server(service: RetrieverService, settings: Settings,
                        traces: tracing.Tracing | None = None) -> RunningServer:
    """Build and bind (not start) the server; returns it with the bound port. ``traces``:
    the tracing to record each RPC's span with (None: no RPC spans)."""
    opts = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    interceptors: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(service.metrics)]
    if traces is not None:  # outermost, so the other interceptors run inside the RPC's span
        interceptors.insert(0, _trace_interceptor(traces))
    if settings.auth_token is not None:
        interceptors.append(AuthInterceptor(settings.auth_token.get_secret_value(),
                                            (SERVICE_NAME,)))
    server = grpc.aio.server(interceptors=interceptors, options=opts)
    servicer = RetrieverServicer(service)
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind ...")
        raise StartupError(f"cannot listen for gRPC on {address} ({exc}): is another server "
                           "running there? Set RETRIEVER_GRPC_PORT") from exc
    if port == 0:
        raise StartupError(f"cannot listen for gRPC on {address}: set RETRIEVER_GRPC_PORT")
    return RunningServer(server, port, health_servicer, servicer, service)


async def serve(settings: Settings, stop: asyncio.Event | None = None,
                on_ready: Callable[[dict], None] | None = None,
                embedder: Embedder | None = None, own_process: bool = False) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).
    ``own_process``: the process is the server's (`retriever serve`), so process-wide
    settings such as ``gc_freeze_at_start`` apply."""
    try:
        traces = tracing.setup(settings)
    except ImportError as exc:
        raise StartupError(str(exc)) from exc
    try:
        await _serve(settings, traces, stop, on_ready, embedder, own_process)
    finally:
        if traces is not None:  # after the drain: the last RPCs' spans go out too
            await asyncio.get_running_loop().run_in_executor(None, traces.shutdown)


async def _serve(settings: Settings, traces: tracing.Tracing | None,
                 stop: asyncio.Event | None, on_ready: Callable[[dict], None] | None,
                 embedder: Embedder | None, own_process: bool = False) -> None:
    service = RetrieverService(settings, embedder=embedder)
    service.metrics.set_objectives(settings)
    running = await create_server(service, settings, traces)
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    metrics_port = 0
    metrics_server = None
    if settings.metrics_enabled:
        try:
            metrics_server, _ = start_http_server(settings.metrics_port, settings.metrics_host,
                                                  registry=service.metrics.registry)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
                f"({exc}): set RETRIEVER_METRICS_PORT, or RETRIEVER_METRICS_ENABLED=false"
            ) from exc
        metrics_port = metrics_server.server_port
    await running.server.start()
    log.info("gRPC bound on %s:%d; loading models and indexes", settings.grpc_host,
             running.port)
    lag = asyncio.ensure_future(watch_loop_lag(service.metrics.loop_lag.observe))
    pauses = {g: service.metrics.gc_pause.labels(str(g)) for g in range(3)}
    gc_watch = PauseWatch(lambda generation, s: pauses[generation].observe(s)).install()
    try:
        start: asyncio.Future[None] = loop.run_in_executor(None, service.start)
        stopped: asyncio.Future[None] = asyncio.ensure_future(_wait(stop))
        done, _ = await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            try:
                start.result()
            except BaseException:
                # e.g. a damaged catalog: stop listening before the error goes up, so the
                # process ends with the one line run() logs, not grpc's complaints.
                await running.server.stop(0)
                raise
            frozen = gc.get_freeze_count()
            if own_process and settings.gc_freeze_at_start:  # before callers are let in
                t0 = loop.time()
                frozen = freeze_startup()
                log.info("moved %d start-up objects into the permanent GC generation in "
                         "%.2fs", frozen, loop.time() - t0)
            service.metrics.gc_frozen.set(frozen)
            for name in ("", SERVICE_NAME):
                await running.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            info = {"event": "serving", "grpc_port": running.port, "metrics_port": metrics_port,
                    "data_dir": str(settings.data_dir), "device": service.embedder.device,
                    "reconciled": service.reconcile_report}
            log.info("serving: %s", json.dumps(info))
            if on_ready is not None:
                on_ready(info)
            await stop.wait()
        log.info("draining (grace %.1fs)", settings.shutdown_grace_s)
        await running.health.enter_graceful_shutdown()
        await running.server.stop(settings.shutdown_grace_s)
        if not start.done():
            # Not cut short: the load may be rebuilding an index from the catalog.
            log.warning("stop requested during start-up: stopping once models and indexes "
                        "are loaded (SIGKILL is safe: nothing acknowledged is lost)")
            await start
    finally:
        lag.cancel()
        gc_watch.remove()
        await loop.run_in_executor(None, running.servicer.close)
        await loop.run_in_executor(None, service.close)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    log.info("stopped")


LOOP_LAG_PERIOD_S = 0.1


async def watch_loop_lag(observe: Callable[[float], None],
                         period_s: float = LOOP_LAG_PERIOD_S) -> None:
    """Observe, every ``period_s``, how late the event loop ran a callback due then: how long
    any call waits before the loop admits or refuses it (the loop needs the GIL, and a
    thread that keeps it, or a burst of calls, makes everyone wait)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        observe(max(0.0, loop.time() - due))


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


def run(settings: Settings) -> int:
    """Blocking entry point of `retriever serve`; prints one JSON line when serving."""

    def ready(info: dict) -> None:
        print(json.dumps(info), flush=True)

    try:
        preflight(settings)
    except ValueError as exc:  # a backend/device/precision that cannot run: say what to set
        log.error("cannot start: %s", exc)
        return 1
    limit_arenas(settings.malloc_arena_max)  # the process is the server's: before any thread
    try:
        with contextlib.suppress(KeyboardInterrupt):  # normally the signal handler's job
            asyncio.run(serve(settings, on_ready=ready, own_process=True))
    except (StartupError, RetrieverError) as exc:  # e.g. a catalog from a newer release
        log.error("%s", exc)
        return 1
    return 0


class ServerThread:
    """The real server on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.info: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="grpc-server", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.settings.grpc_host}:{self.info['grpc_port']}"

    def start(self, timeout: float = 120) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(info: dict) -> None:
                self.info = info
                self._ready.set()

            await serve(self.settings, self._stop, ready, self.embedder)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            print(f"server thread failed: {exc!r}", file=sys.stderr)
