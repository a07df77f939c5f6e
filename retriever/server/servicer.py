"""The thin gRPC servicer: protobuf in, core call off the event loop, protobuf out.

Blocking core work runs in thread pools (reads and searches in one, upserts in another),
bounded by in-flight limits beyond which calls fail fast with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from retriever import errors
from retriever._priority import lower_priority
from retriever.cancel import CallToken
from retriever.domain import GoldenSet
from retriever.server import convert
from retriever.server.status import REQUEST_ID, abort, abort_error
from retriever.service import RetrieverService
from retriever.slo.metrics import collect_stages
from retriever.v1 import retriever_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retriever"].full_name


class Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. non-UTF-8 in a string)."""

    def __init__(self, message_type: str, error: str) -> None:
        self.message_type = message_type
        self.error = error


def safe_deserializer(cls: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(cls.__name__, str(exc))

    return deserialize


class _Limiter:
    """Counts calls in flight; beyond the limit a call is refused, never queued."""

    def __init__(self, limit: int, what: str) -> None:
        self._limit = limit
        self._what = what
        self._n = 0
        self._lock = threading.Lock()

    def acquire(self, n: int = 1) -> None:
        with self._lock:
            if self._n + n > self._limit:
                raise errors.Overloaded(
                    f"{self._n} {self._what} in flight (limit {self._limit}); retry with "
                    "backoff")
            self._n += n

    def release(self, n: int = 1) -> None:
        with self._lock:
            self._n -= n


class _SearchGate:
    """Admission of searches: at most ``limit`` in flight, and none while the oldest search
    in flight has been running longer than ``shed_after_s``.

    A count alone queues far more than a small machine can clear (searches then wait many
    seconds, then time out); the age of the oldest search says directly that the service is
    behind, so beyond saturation new searches are refused at once with RESOURCE_EXHAUSTED
    and RetryInfo, and the latency of admitted ones stays bounded. The age falls as soon as
    the backlog drains, so admission resumes by itself."""

    def __init__(self, limit: int, shed_after_s: float) -> None:
        self._limit = limit
        self._shed_after = shed_after_s
        self._inflight: dict[int, tuple[float, int]] = {}  # key -> (start, searches)
        self._n = 0
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self, n: int = 1) -> int:
        now = time.monotonic()
        with self._lock:
            if self._n + n > self._limit:
                raise errors.Overloaded(
                    f"{self._n} searches in flight (limit {self._limit}, "
                    "max_inflight_searches); retry with backoff")
            if self._inflight:
                oldest = now - next(iter(self._inflight.values()))[0]
                if oldest > self._shed_after:
                    raise errors.Overloaded(
                        f"the service is behind: a search has been running {oldest:.1f} s "
                        f"(shedding beyond {self._shed_after:g} s, search_shed_after_s); "
                        "retry with backoff")
            key = self._next
            self._next += 1
            self._inflight[key] = (now, n)
            self._n += n
            return key

    def release(self, key: int) -> None:
        with self._lock:
            _, n = self._inflight.pop(key)
            self._n -= n


class _PeerLimiter:
    """Open upsert streams per client host, so one client cannot hold every slot."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, peer: str) -> None:
        with self._lock:
            n = self._open.get(peer, 0)
            if n >= self._limit:
                raise errors.Overloaded(
                    f"this client ({peer}) already has {n} upsert streams open (limit "
                    f"{self._limit}, max_upsert_streams_per_peer): finish or close one, "
                    "or send more documents per message on an open stream")
            self._open[peer] = n + 1

    def release(self, peer: str) -> None:
        with self._lock:
            n = self._open.get(peer, 0) - 1
            if n > 0:
                self._open[peer] = n
            else:
                self._open.pop(peer, None)


# How long, and how many bytes of messages, refusing a client stream may spend reading what
# the client is still sending (0.25 s was too short for 300 refused 50-message streams at once).
_REFUSAL_DRAIN_S = 2.0
_REFUSAL_DRAIN_BYTES = 16 << 20


class _DrainingContext:
    """A client-streaming call's context whose abort first reads the rest of the request
    stream (for at most _REFUSAL_DRAIN_S and _REFUSAL_DRAIN_BYTES). Ending the call while
    the client is still writing makes grpc's asyncio client report INTERNAL ("Internal
    error from Core", a failed SendMessageOperation) in place of the status sent
    (grpc/grpc#36066): once among 1348 refused upserts in a load report, ~4 % of refused
    50-message streams. Read to its end first, the client's writes are done when the
    status arrives, and it sees the status."""

    def __init__(self, context: Any, messages: AsyncIterator[Any]) -> None:
        self._context = context
        self._messages = messages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort_with_status(self, status: grpc.Status) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _REFUSAL_DRAIN_S
        read = 0
        try:
            while (left := deadline - loop.time()) > 0 and read < _REFUSAL_DRAIN_BYTES:
                message = await asyncio.wait_for(anext(self._messages), left)
                read += message.ByteSize() if isinstance(message, pb.UpsertDocumentsRequest) else 1
        except (StopAsyncIteration, TimeoutError):
            pass
        except Exception:  # noqa: BLE001 - a broken stream: the status is all that is left
            log.debug("draining a refused upsert stream failed", exc_info=True)
        await self._context.abort_with_status(status)


def _caller(context: Any, header: str) -> str:
    """Who the caller is for the per-peer stream cap: the value of ``header`` when the
    setting names one and the call carries it (x-forwarded-for: its first address), else
    the connection's host."""
    if header:
        for key, value in context.invocation_metadata() or ():
            if key == header and isinstance(value, str):
                name = (value.split(",", 1)[0] if header == "x-forwarded-for" else value).strip()
                if name:
                    return f"{header} {name[:128]}"
    return _peer_host(context.peer())


def _peer_host(peer: str | None) -> str:
    """The client host of a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678",
    "unix:/path"), without the port: one host's connections share its allowance."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host or rest
    return peer


class RetrieverServicer:
    def __init__(self, service: RetrieverService) -> None:
        self._svc = service
        s = service.settings
        self._read_pool = ThreadPoolExecutor(max_workers=s.rpc_read_threads,
                                             thread_name_prefix="rpc-read")
        # Upserts are the batch class: their threads give way to the request path.
        self._write_pool = ThreadPoolExecutor(max_workers=s.max_inflight_upserts,
                                              thread_name_prefix="rpc-write",
                                              initializer=lower_priority,
                                              initargs=(s.write_thread_nice,))
        # SyncSource calls: one waiting for its sync holds a thread for the whole sync (the
        # sync itself runs on a thread of the core's), so they get their own pool rather
        # than block upserts or searches.
        self._sync_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpc-sync")
        self._searches = _SearchGate(s.max_inflight_searches, s.search_shed_after_s)
        self._upserts = _Limiter(s.max_inflight_upserts, "upsert streams")
        self._peer_streams = _PeerLimiter(s.max_upsert_streams_per_peer)

    def close(self) -> None:
        """Drop queued work and wait for running work, so the core is idle when it closes
        (an upsert cut short here is not acknowledged; start-up reconcile clears it)."""
        self._read_pool.shutdown(wait=True, cancel_futures=True)
        self._write_pool.shutdown(wait=True, cancel_futures=True)
        self._sync_pool.shutdown(wait=True, cancel_futures=True)

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any,
                   pool: ThreadPoolExecutor | None = None, token: CallToken | None = None) -> T:
        """Run blocking core work off the loop and map its errors to status codes. When the
        caller cancels, ``token`` tells the core, which then commits nothing. The work runs
        in a copy of the RPC's context, so its spans are children of the RPC's span and it
        sees the caller's trace id (retriever.tracing)."""
        try:
            for a in args:
                if isinstance(a, Undecodable):
                    raise errors.InvalidArgument(_undecodable_message(a))
            loop = asyncio.get_running_loop()
            work = functools.partial(contextvars.copy_context().run, fn, *args)
            try:
                return await loop.run_in_executor(pool or self._read_pool, work)
            except asyncio.CancelledError:
                if token is not None:
                    token.cancel()
                raise
        except errors.RetrieverError as exc:
            await abort_error(context, exc)
        except Exception as exc:
            domain = errors.translate(exc)
            if domain is not None:
                log.warning("%s: %s (%s)", getattr(fn, "__name__", fn), domain.message, exc)
                await abort_error(context, domain)
            # A bug: say so without leaking internals, keep serving.
            log.exception("internal error in %s (request id %s)",
                          getattr(fn, "__name__", fn), REQUEST_ID.get())
            await abort(context, grpc.StatusCode.INTERNAL,
                        f"internal error (request id {REQUEST_ID.get()}); the server log has "
                        "the details")
        raise AssertionError("unreachable")

    @staticmethod
    def _token(context: grpc.aio.ServicerContext) -> CallToken:
        """The call's cancellation token, with its deadline."""
        return CallToken(context.time_remaining())

    # -- namespaces ------------------------------------------------------------------------
    async def CreateNamespace(self, request: pb.CreateNamespaceRequest, context: Any):  # noqa: N802
        ns = await self._run(context, lambda r: self._svc.create_namespace(r.name, r.backend),
                             request)
        return pb.CreateNamespaceResponse(namespace=convert.namespace_to_pb(ns))

    async def GetNamespace(self, request: pb.GetNamespaceRequest, context: Any):  # noqa: N802
        ns = await self._run(context, lambda r: self._svc.get_namespace(r.name), request)
        return pb.GetNamespaceResponse(namespace=convert.namespace_to_pb(ns))

    async def ListNamespaces(self, request: pb.ListNamespacesRequest, context: Any):  # noqa: N802
        page = await self._run(
            context, lambda r: self._svc.list_namespaces(r.page_size, r.page_token), request)
        return pb.ListNamespacesResponse(
            namespaces=[convert.namespace_to_pb(n) for n in page.items],
            next_page_token=page.next_page_token)

    async def DeleteNamespace(self, request: pb.DeleteNamespaceRequest, context: Any):  # noqa: N802
        token = self._token(context)
        docs, chunks = await self._run(
            context, lambda r: self._svc.delete_namespace(r.name, token), request,
            pool=self._write_pool, token=token)
        return pb.DeleteNamespaceResponse(documents_deleted=docs, chunks_deleted=chunks)

    async def ReindexNamespace(self, request: pb.ReindexNamespaceRequest, context: Any):  # noqa: N802
        token = self._token(context)
        record, result = await self._run(
            context, lambda r: self._svc.reindex_namespace(r.name, r.backend, token), request,
            pool=self._write_pool, token=token)
        return convert.reindex_to_pb(record, result)

    # -- documents -------------------------------------------------------------------------
    async def UpsertDocuments(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.UpsertDocumentsRequest], context: Any
    ) -> pb.UpsertDocumentsResponse:
        t0 = time.perf_counter()
        stages = collect_stages()  # the work below runs in copies of this task's context
        results = []
        namespace = None
        messages = aiter(request_iterator)
        context = _DrainingContext(context, messages)
        peer = _caller(context, self._svc.settings.upsert_peer_header)
        shed = self._svc.settings.upsert_shed_after_s
        waited = self._svc.document_backlog_age()
        if shed and waited > shed:
            await abort_error(context, errors.Overloaded(
                f"the model is behind on documents: an upsert has waited {waited:.1f} s for "
                f"its first pass (shedding beyond {shed:g} s, upsert_shed_after_s); retry "
                "with backoff"))
        try:
            self._upserts.acquire()
        except errors.Overloaded as exc:
            await abort_error(context, exc)
        try:
            self._peer_streams.acquire(peer)
        except errors.Overloaded as exc:
            self._upserts.release()
            await abort_error(context, exc)
        token = self._token(context)
        idle = self._svc.settings.upsert_stream_idle_timeout_s
        # The namespace the stream's first message wrote (its created_at): later messages
        # write that one only. One deleted meanwhile is not created again by them (and one
        # created again under its name is not theirs): NOT_FOUND.
        incarnation = None
        try:
            i = -1
            while True:
                try:
                    request = await asyncio.wait_for(anext(messages), idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    await abort(
                        context, grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the upsert stream sent nothing for {idle:g} s after {i + 1} "
                        "message(s) (upsert_stream_idle_timeout_s) and was closed to free its "
                        "slot; messages before were committed. Send messages without long "
                        "pauses, or close the stream and open one per batch", retry=False)
                i += 1
                # Only a stream's first message may be shed (see CallToken.shed_delay_s).
                token.shed_delay_s = self._svc.settings.upsert_shed_delay_s if i == 0 else 0.0

                def one(r: Any, i: int = i, submitted: float = time.perf_counter()) -> Any:
                    nonlocal namespace, incarnation
                    self._svc.metrics.observe_stage("queued", time.perf_counter() - submitted)
                    if isinstance(r, Undecodable):
                        raise errors.InvalidArgument(
                            f"message {i} of the stream: {_undecodable_message(r)}"
                            + ("; the messages before it were committed" if i else ""))
                    if namespace is not None and r.namespace != namespace:
                        raise errors.InvalidArgument(
                            f"message {i} names namespace {r.namespace!r} but the stream "
                            f"began with {namespace!r}: one namespace per stream",
                            field="namespace")
                    namespace = r.namespace
                    docs = [convert.document_from_pb(d, f"documents[{j}].")
                            for j, d in enumerate(r.documents)]
                    if incarnation is None:
                        result = self._svc.upsert(r.namespace, docs, token)
                        incarnation = result.incarnation
                        return result
                    try:
                        return self._svc.upsert(r.namespace, docs, token, create=False,
                                                incarnation=incarnation)
                    except errors.NotFound as exc:
                        if exc.field != "namespace":
                            raise
                        raise errors.NotFound(
                            f"message {i} of the stream: namespace {namespace!r} was deleted "
                            f"while this upsert stream was open (its messages before were "
                            "committed to the namespace then deleted); nothing of this "
                            "message was written. Open a new stream to write into a namespace "
                            "of that name", field="namespace") from None

                # The request inside the work (not an argument _run checks first), so that
                # an undecodable one is reported with its index in the stream.
                results.append(await self._run(context, functools.partial(one, request),
                                               pool=self._write_pool, token=token))
        finally:
            self._peer_streams.release(peer)
            self._upserts.release()
        # An empty stream (e.g. a directory with nothing to index) changes nothing.
        return convert.upsert_to_pb(namespace or "", results, time.perf_counter() - t0,
                                    stages,
                                    max_bytes=self._svc.settings.grpc_max_message_bytes)

    async def DeleteDocuments(self, request: pb.DeleteDocumentsRequest, context: Any):  # noqa: N802
        token = self._token(context)
        result = await self._run(
            context, lambda r: self._svc.delete_documents(r.namespace, list(r.doc_ids), token),
            request, pool=self._write_pool, token=token)
        return convert.delete_to_pb(result)

    async def GetDocument(self, request: pb.GetDocumentRequest, context: Any):  # noqa: N802
        doc = await self._run(
            context, lambda r: self._svc.get_document(r.namespace, r.doc_id), request)
        return convert.document_to_pb(doc)

    async def ListDocuments(self, request: pb.ListDocumentsRequest, context: Any):  # noqa: N802
        built: dict[str, pb.DocumentInfo] = {}  # each entry converted once

        def entry_bytes(d: Any) -> int:
            built[d.doc_id] = entry = convert.document_info_to_pb(d)
            return convert.entry_bytes(entry)
        page = await self._run(
            context, lambda r: self._svc.list_documents(
                r.namespace, r.page_size, r.page_token, r.path_prefix,
                item_bytes=entry_bytes), request)
        return pb.ListDocumentsResponse(
            documents=[built[d.doc_id] for d in page.items],
            next_page_token=page.next_page_token, total_size=page.total_size)

    async def GetChunk(self, request: pb.GetChunkRequest, context: Any):  # noqa: N802
        def get(r: pb.GetChunkRequest) -> pb.GetChunkResponse:
            chunk = self._svc.get_chunk(r.namespace, r.chunk_id)
            staleness, _basis = self._svc.chunk_staleness(chunk)
            resp = pb.GetChunkResponse(chunk=convert.chunk_to_pb(chunk))
            if staleness is not None:
                resp.staleness.FromNanoseconds(int(staleness * 1e9))
            return resp
        return await self._run(context, get, request)

    # -- search ----------------------------------------------------------------------------
    async def _limited(self, context: grpc.aio.ServicerContext, n: int) -> int:
        """Admit ``n`` searches, or refuse: checked on the event loop, before any work is
        queued, so excess load is refused rather than queued without bound."""
        try:
            return self._searches.acquire(n)
        except errors.Overloaded as exc:
            await abort_error(context, exc)
        raise AssertionError("unreachable")

    async def Search(self, request: pb.SearchRequest, context: Any):  # noqa: N802
        rid = REQUEST_ID.get()
        admitted = await self._limited(context, 1)
        try:
            # The response is built in the worker too: the event loop, which admits and
            # refuses every call, stays free for that (a refusal waits for nothing else).
            return await self._run(
                context, lambda r: convert.search_result_to_pb(
                    self._svc.search(convert.search_from_pb(r), rid)), request)
        finally:
            self._searches.release(admitted)

    async def BatchSearch(self, request: pb.BatchSearchRequest, context: Any):  # noqa: N802
        rid = REQUEST_ID.get()
        n = max(1, len(request.requests)) if isinstance(request, pb.BatchSearchRequest) else 1
        s = self._svc.settings
        limit, name = min((s.max_batch_queries, "max_batch_queries"),
                          (s.max_inflight_searches, "max_inflight_searches"))
        if n > limit:  # no retry could succeed: refuse it as bad input, before counting it
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"requests has {n} searches; at most {limit} ({name}): split the "
                        "batch", "requests")
        admitted = await self._limited(context, n)

        def batch(r: pb.BatchSearchRequest) -> pb.BatchSearchResponse:
            results = self._svc.batch_search(
                [convert.search_from_pb(q, f"requests[{i}].") for i, q in
                 enumerate(r.requests)], rid)
            return pb.BatchSearchResponse(
                responses=[convert.search_result_to_pb(x) for x in results])
        try:
            return await self._run(context, batch, request)
        finally:
            self._searches.release(admitted)

    # -- status ----------------------------------------------------------------------------
    async def GetIndexStatus(self, request: pb.GetIndexStatusRequest, context: Any):  # noqa: N802
        status = await self._run(context, lambda r: self._svc.index_status(r.namespace),
                                 request)
        return convert.status_to_pb(status)

    # -- sources -------------------------------------------------------------------------
    async def SyncSource(self, request: pb.SyncSourceRequest, context: Any):  # noqa: N802
        token = self._token(context)
        state = await self._run(
            context, lambda r: self._svc.sync_source(
                r.namespace, convert.sync_request_from_pb(r), wait=r.wait, token=token),
            request, pool=self._sync_pool, token=token)
        return convert.sync_to_pb(state)

    # -- quality -------------------------------------------------------------------------
    async def RecordFeedback(self, request: pb.RecordFeedbackRequest, context: Any):  # noqa: N802
        recorded, relevant = await self._run(
            context, lambda r: self._svc.record_feedback(
                r.namespace, r.request_id, [(f.chunk_id, f.relevant) for f in r.feedback]),
            request)
        return pb.RecordFeedbackResponse(recorded=recorded, relevant=relevant)

    async def RegisterGoldenSet(self, request: pb.RegisterGoldenSetRequest,  # noqa: N802
                                context: Any):
        def register(r: pb.RegisterGoldenSetRequest) -> Any:
            history = None
            if r.HasField("from_source_history"):
                h = r.from_source_history
                history = (h.commits, list(h.paths))
            return self._svc.register_golden_set(
                r.namespace, r.name, [convert.golden_query_from_pb(q, f"queries[{i}].")
                                     for i, q in enumerate(r.queries)],
                history, check_reply=self._check_golden_reply)

        gs = await self._run(context, register, request)
        return convert.golden_set_to_pb(gs)

    def _check_golden_reply(self, gs: GoldenSet) -> None:
        """The reply echoes the set: one that would not fit a message is refused before it
        is stored (stored and then answered RESOURCE_EXHAUSTED, a retry stored it again)."""
        limit = self._svc.settings.grpc_max_message_bytes
        # Room for what storing adds to the echo: the version and the creation time.
        size = convert.golden_set_to_pb(gs).ByteSize() + 64
        if size > limit:
            what = ("build it from fewer commits (from_source_history.commits)"
                    if gs.origin == "git-history" else
                    "send fewer or shorter queries, or split them into several sets")
            raise errors.InvalidArgument(
                f"golden set {gs.name!r} would be echoed in a reply of about {size} bytes, "
                f"over the message limit of {limit} bytes (grpc_max_message_bytes): {what}; "
                "nothing was stored", field="queries")

    async def Evaluate(self, request: pb.EvaluateRequest, context: Any):  # noqa: N802
        token = self._token(context)
        rec = await self._run(
            context, lambda r: self._svc.evaluate(
                r.namespace, r.golden_set, r.version, list(r.k), convert.mode_from_pb(r.mode),
                r.rerank, token=token), request, token=token)
        return pb.EvaluateResponse(evaluation=convert.evaluation_to_pb(rec))


def _undecodable_message(u: Undecodable) -> str:
    return (f"the {u.message_type} could not be parsed ({u.error}); string fields such as "
            "Document.content must hold valid UTF-8 text")


def method_handlers(servicer: RetrieverServicer) -> grpc.GenericRpcHandler:
    """Handlers for every RPC of the service descriptor, with deserializers that turn
    unparseable requests into INVALID_ARGUMENT instead of an opaque INTERNAL."""
    service = pb.DESCRIPTOR.services_by_name["Retriever"]
    handlers = {}
    for method in service.methods:
        req = getattr(pb, method.input_type.name)
        resp = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        factory = (grpc.stream_unary_rpc_method_handler if method.client_streaming
                   else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = factory(behavior, request_deserializer=safe_deserializer(req),
                                        response_serializer=resp.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
