"""Domain objects shared by the core. Frozen dataclasses; no protobuf, no grpc."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from retriever.ingest.chunking.languages import normalize_language

T = TypeVar("T")


def sha256(text: str) -> str:
    """A document's (or a chunk's) content hash: sha256 of its UTF-8 text, in hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def moved_candidates(hashes: Mapping[str, str], present: Container[str]
                     ) -> dict[str, list[str]]:
    """Documents (id -> content hash) whose ids are not ``present``, by content hash (ids
    sorted): a new path with one of those texts is that document, moved."""
    gone: dict[str, list[str]] = {}
    for doc_id, content_hash in sorted(hashes.items()):
        if doc_id not in present:
            gone.setdefault(content_hash, []).append(doc_id)
    return gone


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    content: str
    path: str = ""
    revision: str = ""
    source_updated_at: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    language: str = ""
    # A move: the document (of this namespace) this one replaces, in the same commit. Its
    # version history continues here (when ``doc_id`` is new), its chunks go, and vectors
    # of embedded texts that stay the same are reused, not embedded again.
    moved_from: str = ""

    @property
    def effective_path(self) -> str:
        return self.path or self.doc_id


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk of one document version as the catalog holds it."""

    chunk_id: str
    vector_id: int
    namespace: str
    doc_id: str
    ordinal: int
    text: str
    content_hash: str
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int
    token_count: int
    language: str
    chunker: str
    # Of the document version the chunk belongs to:
    path: str
    revision: str
    document_version: int
    document_hash: str
    indexed_at: datetime | None  # None: the stored time is unreadable
    source_updated_at: datetime | None
    metadata: dict[str, str]
    # What the chunk is (symbol or heading path, kind) and, when the document's chunker fell
    # back to windows, why.
    symbol: str = ""
    kind: str = ""
    fallback: str = ""


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    namespace: str
    doc_id: str
    path: str
    revision: str
    content_hash: str
    language: str
    version: int
    size_bytes: int
    chunk_count: int
    indexed_at: datetime | None  # None: the stored time is unreadable
    source_updated_at: datetime | None
    metadata: dict[str, str]
    content: str | None = None  # filled when asked for
    chunk_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    backend: str
    embedder: str
    embedder_revision: str
    dimension: int
    metric: str
    index_generation: int
    index_version: int
    created_at: datetime | None  # None: the stored time is unreadable
    document_count: int = 0
    chunk_count: int = 0
    content_bytes: int = 0
    last_indexed_at: datetime | None = None
    # The embedder's pipeline around its weights when the namespace was created (JSON of
    # `retriever.models.embedder.pipeline_of`); "" for namespaces of older releases.
    embedder_pipeline: str = ""


class DocStatus(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class DocResult:
    doc_id: str
    status: DocStatus
    version: int
    chunk_count: int
    chunks_embedded: int
    chunks_reused: int
    content_hash: str
    moved_from: str = ""  # the document this one replaced (removed in the same commit)


@dataclass(frozen=True, slots=True)
class UpsertResult:
    results: tuple[DocResult, ...]
    chunks_deleted: int
    index_version: int
    # The namespace written (its created_at): later writes of the same stream or sync must
    # find this one, not one created again under its name.
    incarnation: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    documents_deleted: int
    chunks_deleted: int
    not_found: tuple[str, ...]
    index_version: int


class SearchMode(enum.Enum):
    DEFAULT = "default"
    DENSE = "dense"
    LEXICAL = "lexical"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class SearchFilter:
    doc_ids: tuple[str, ...] = ()
    path_prefix: str = ""
    languages: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    kinds: tuple[str, ...] = ()  # chunk kinds ("function", "section"...)

    def __post_init__(self) -> None:
        # Languages as documents store them ("Python", "py" -> "python"), for every engine
        # and the catalog alike.
        if self.languages:
            object.__setattr__(self, "languages",
                               tuple(normalize_language(x) for x in self.languages))

    @property
    def empty(self) -> bool:
        return not (self.doc_ids or self.path_prefix or self.languages or self.metadata
                    or self.kinds)


@dataclass(frozen=True, slots=True)
class SearchQuery:
    namespace: str
    query: str
    top_k: int
    filter: SearchFilter = SearchFilter()
    mode: SearchMode = SearchMode.DEFAULT
    rerank: bool = False
    dense_weight: float | None = None  # HYBRID; None: the server's setting
    rerank_candidates: int = 0  # 0: the server's default
    collapse: bool = False
    min_score: float | None = None
    max_hits_per_path: int = 0
    # Bound on hit staleness (seconds; None: no bound): drop staler hits, or flag them.
    max_staleness_s: float | None = None
    flag_stale: bool = False


@dataclass(frozen=True, slots=True)
class Hit:
    chunk: ChunkRecord
    score: float
    rank: int
    staleness_s: float | None
    # Each stage's score; None where that stage did not score the hit.
    dense_score: float | None = None
    lexical_score: float | None = None
    fused_score: float | None = None
    rerank_score: float | None = None
    staleness_basis: str = ""  # "source" or "document" (retriever.freshness.staleness)
    stale: bool = False  # beyond the query's max_staleness (when it asked to flag)


@dataclass(frozen=True, slots=True)
class Lineage:
    request_id: str
    namespace: str
    embedder: str
    embedder_revision: str
    reranker: str
    backend: str
    index_generation: int
    index_version: int
    device: str
    reranker_revision: str = ""
    mode: SearchMode = SearchMode.DENSE
    analyzer: str = ""
    # The caller's W3C trace id (traceparent), or the server's own when tracing is on.
    trace_id: str = ""


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Seconds per stage; None where a stage did not run."""

    embed: float | None = None
    ann: float | None = None
    lexical: float | None = None
    rerank: float | None = None
    fetch: float | None = None
    total: float | None = None
    fuse: float | None = None


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: tuple[Hit, ...]
    lineage: Lineage
    timings: StageTimings


@dataclass(frozen=True, slots=True)
class IndexStatus:
    namespace: NamespaceRecord
    vector_count: int
    device: str
    precision: str
    chunk_tokens: int
    overlap_tokens: int
    chunker: str
    # The bound git source's lag (retriever.freshness.staleness.SourceLag) and the running
    # and last finished syncs (retriever.freshness.sync.SyncState); None when none.
    source: Any = None
    running_sync: Any = None
    last_sync: Any = None
    last_evaluation: EvaluationRecord | None = None
    # The latest SLO run of each golden set, by set name.
    slo_evaluations: tuple[EvaluationRecord, ...] = ()
    serving_embedder_revision: str = ""


# -- golden sets and evaluations (retriever.slo.golden) -------------------------------------
@dataclass(frozen=True, slots=True)
class GoldenQuery:
    """One golden query: its text and graded judgements of documents, by doc id and by
    path (a grade > 0 is relevant)."""

    id: str
    text: str
    doc_grades: dict[str, int] = field(default_factory=dict)
    path_grades: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GoldenSet:
    """One stored version of a named golden set of a namespace."""

    namespace: str
    name: str
    version: int
    created_at: datetime | None
    origin: str  # "request" or "git-history"
    queries: tuple[GoldenQuery, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EvalMetric:
    name: str  # "precision", "recall", "ndcg", "mrr"
    k: int
    value: float


@dataclass(frozen=True, slots=True)
class EvaluationRecord:
    """One run of a golden set through the search path, as the catalog keeps it."""

    evaluation_id: str
    namespace: str
    golden_set: str
    version: int
    started_at: datetime | None
    seconds: float
    mode: SearchMode
    rerank: bool
    query_count: int
    trigger: str  # "request" or "schedule"
    metrics: tuple[EvalMetric, ...]
    # Run as the scheduled evaluator runs it (the latest version, the default mode and
    # cut-offs, no re-ranking): only such runs feed the SLO gauges (retriever_eval_*).
    slo: bool = True


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str
    total_size: int = 0
