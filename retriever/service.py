"""The core service: composes catalog, embedder, chunkers, indexes and pipelines.

Constructing it is cheap; ``start()`` loads the model, opens the catalog and every
namespace's index and reconciles them; ``close()`` flushes and releases everything. All
methods are blocking and thread-safe; the gRPC layer runs them off its event loop.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence

import numpy as np

from retriever import validation
from retriever.catalog import Catalog
from retriever.config import Settings
from retriever.domain import (
    ChunkRecord,
    DeleteResult,
    Document,
    DocumentRecord,
    IndexStatus,
    NamespaceRecord,
    Page,
    SearchQuery,
    SearchResult,
    UpsertResult,
)
from retriever.errors import InvalidArgument, NotFound, NotReady
from retriever.ingest.chunking import ChunkerSet, WindowChunker
from retriever.ingest.pipeline import HEADER_TOKENS, Ingestor
from retriever.models.batcher import MicroBatcher
from retriever.models.embedder import Embedder
from retriever.namespaces import Namespaces
from retriever.search.pipeline import Searcher
from retriever.slo.metrics import Metrics


class RetrieverService:
    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 embedder: Embedder | None = None) -> None:
        """``embedder`` may be shared, already loaded, between services in one process."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.embedder = embedder or Embedder(settings)
        self.catalog = Catalog(settings.data_dir / "catalog.sqlite3")
        self.namespaces = Namespaces(
            self.catalog, self.embedder, settings.data_dir / "indexes", settings.index_backend,
            self.metrics, backend_options={"faiss": {"omp_threads": settings.faiss_omp_threads}})
        self._batcher = MicroBatcher(
            # A batch of queries is one forward pass (document slices are already cut).
            lambda texts: self.embedder.embed(texts, batch_size=max(1, len(texts))),
            settings.query_batch_size,
            settings.query_batch_wait_ms / 1000.0,
            on_batch=self.metrics.query_batch_size.observe,
            on_depth=self.metrics.embed_queue.set,
        )
        self.chunkers: ChunkerSet | None = None
        self.ingestor: Ingestor | None = None
        self.searcher: Searcher | None = None
        self.reconcile_report: dict[str, dict[str, int]] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.embedder.loaded:
            self.embedder.load()
        self.catalog.open()
        budget = min(s.chunk_tokens, self.embedder.max_tokens) - (
            self.embedder.special_tokens + HEADER_TOKENS)
        if budget <= s.overlap_tokens:
            raise ValueError(
                f"chunk budget of {budget} text tokens (chunk_tokens {s.chunk_tokens}, model "
                f"max {self.embedder.max_tokens}, header {HEADER_TOKENS}) must exceed "
                f"overlap_tokens {s.overlap_tokens}")
        self.chunkers = ChunkerSet(WindowChunker(
            self.embedder.count_tokens, self.embedder.token_offsets, budget, s.overlap_tokens))
        self.reconcile_report = self.namespaces.open_all()
        self._batcher.doc_batch = self.embedder.default_batch_size
        self._batcher.start()
        self.ingestor = Ingestor(s, self.catalog, self.namespaces, self.embedder,
                                 self._embed_documents, self.chunkers, self.metrics)
        self.searcher = Searcher(s, self.catalog, self.namespaces, self.embedder,
                                 self._batcher.submit, self.metrics)
        self._flusher = threading.Thread(target=self._flush_loop, name="index-flusher",
                                         daemon=True)
        self._flusher.start()
        self._ready.set()
        self.metrics.model_loaded.set(1)

    def close(self) -> None:
        self._ready.clear()
        self.metrics.model_loaded.set(0)
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=30)
        self._batcher.stop()
        self.namespaces.close()  # closing an index writes its last snapshot
        self.catalog.close()

    def _embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._batcher.submit_documents(texts).result()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.index_flush_interval_s):
            self.namespaces.flush_all()  # logs and skips a failed snapshot; retried next time

    def _require_ready(self) -> None:
        if not self._ready.is_set():
            raise NotReady("the service is loading its models and indexes, or shutting down; "
                           "retry shortly")

    # -- namespaces ------------------------------------------------------------------------
    def create_namespace(self, name: str, backend: str = "") -> NamespaceRecord:
        self._require_ready()
        validation.namespace_name(name, "name")
        handle = self.namespaces.create(name, backend)
        return self.get_namespace(handle.name)

    def get_namespace(self, name: str) -> NamespaceRecord:
        self._require_ready()
        return self._namespace_record(name, "name")

    def _namespace_record(self, name: str, field: str) -> NamespaceRecord:
        """The catalog's record with current counts; ``field`` names the request field."""
        validation.namespace_name(name, field)
        record = self.catalog.get_namespace(name)
        if record is None:
            raise NotFound(f"namespace {name!r} does not exist", field=field)
        return record

    def list_namespaces(self, page_size: int, page_token: str) -> Page[NamespaceRecord]:
        self._require_ready()
        size = validation.page_size(page_size, self.settings)
        after = _decode_token(page_token)
        items = self.catalog.list_namespaces(after, size + 1)
        more = len(items) > size
        items = items[:size]
        token = _encode_token(items[-1].name) if more else ""
        return Page(items=tuple(items), next_page_token=token)

    def delete_namespace(self, name: str) -> tuple[int, int]:
        self._require_ready()
        validation.namespace_name(name, "name")
        return self.namespaces.delete(name)

    # -- documents -------------------------------------------------------------------------
    def upsert(self, namespace: str, docs: Sequence[Document]) -> UpsertResult:
        self._require_ready()
        assert self.ingestor is not None
        return self.ingestor.upsert(namespace, docs)

    def delete_documents(self, namespace: str, doc_ids: Sequence[str]) -> DeleteResult:
        self._require_ready()
        assert self.ingestor is not None
        return self.ingestor.delete(namespace, doc_ids)

    def get_document(self, namespace: str, doc_id: str) -> DocumentRecord:
        self._require_ready()
        self._existing(namespace)
        validation.doc_id(doc_id)
        record = self.catalog.get_document(namespace, doc_id)
        if record is None:
            raise NotFound(f"document {doc_id!r} is not in namespace {namespace!r}",
                           field="doc_id")
        return record

    def list_documents(self, namespace: str, page_size: int, page_token: str,
                       path_prefix: str = "") -> Page[DocumentRecord]:
        self._require_ready()
        self._existing(namespace)
        size = validation.page_size(page_size, self.settings)
        after = _decode_token(page_token)
        items, total = self.catalog.list_documents(namespace, after, size + 1, path_prefix)
        more = len(items) > size
        items = items[:size]
        token = _encode_token(items[-1].doc_id) if more else ""
        return Page(items=tuple(items), next_page_token=token, total_size=total)

    def get_chunk(self, namespace: str, chunk_id: str) -> ChunkRecord:
        self._require_ready()
        self._existing(namespace)
        validation.chunk_id(chunk_id)
        chunk = self.catalog.get_chunk(namespace, chunk_id)
        if chunk is None:
            raise NotFound(
                f"chunk {chunk_id!r} is not part of any current document in namespace "
                f"{namespace!r}", field="chunk_id")
        return chunk

    def _existing(self, namespace: str) -> None:
        validation.namespace_name(namespace)
        self.namespaces.get(namespace)

    # -- search ----------------------------------------------------------------------------
    def search(self, query: SearchQuery, request_id: str) -> SearchResult:
        self._require_ready()
        assert self.searcher is not None
        return self.searcher.search([query], request_id)[0]

    def batch_search(self, queries: Sequence[SearchQuery], request_id: str) -> list[SearchResult]:
        self._require_ready()
        assert self.searcher is not None
        if not queries:
            raise InvalidArgument("requests is empty: send at least one search",
                                  field="requests")
        if len(queries) > self.settings.max_batch_queries:
            raise InvalidArgument(
                f"requests has {len(queries)} searches; at most "
                f"{self.settings.max_batch_queries} (max_batch_queries)", field="requests")
        return self.searcher.search(queries, request_id, batch=True)

    # -- status ----------------------------------------------------------------------------
    def index_status(self, namespace: str) -> IndexStatus:
        self._require_ready()
        record = self._namespace_record(namespace, "namespace")
        handle = self.namespaces.get(namespace)
        assert self.chunkers is not None
        with handle.visibility.read():
            handle.require_live()
            vector_count = handle.index.count()
        return IndexStatus(
            namespace=record, vector_count=vector_count, device=self.embedder.device,
            precision=self.embedder.precision,
            chunk_tokens=min(self.settings.chunk_tokens, self.embedder.max_tokens),
            overlap_tokens=self.settings.overlap_tokens,
            chunker=",".join(self.chunkers.names))


_TOKEN_PREFIX = "after:"


def _encode_token(last: str) -> str:
    """An opaque page token: the last key of the page, so pages stay stable under writes."""
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last).encode("utf-8")).decode("ascii")


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        text = raw.decode("utf-8")
    except (ValueError, UnicodeError):
        text = ""
    if not text.startswith(_TOKEN_PREFIX):
        raise InvalidArgument("page_token is not a token this server issued; pass the "
                              "next_page_token of the previous page", field="page_token")
    return text[len(_TOKEN_PREFIX):]
