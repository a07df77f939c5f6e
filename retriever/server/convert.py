"""protobuf <-> domain objects. Protobuf types never leave the server layer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from retriever.config import RESPONSE_ROOM_BYTES
from retriever.domain import (
    ChunkRecord,
    DeleteResult,
    DocStatus,
    Document,
    DocumentRecord,
    EvaluationRecord,
    GoldenQuery,
    GoldenSet,
    Hit,
    IndexStatus,
    Lineage,
    NamespaceRecord,
    SearchFilter,
    SearchMode,
    SearchQuery,
    SearchResult,
    StageTimings,
    UpsertResult,
)
from retriever.errors import InvalidArgument
from retriever.freshness.staleness import SourceLag
from retriever.freshness.sync import SyncRequest, SyncState, SyncStatus
from retriever.namespaces import ReindexResult
from retriever.v1 import retriever_pb2 as pb

log = logging.getLogger(__name__)
_MODES = {
    pb.SEARCH_MODE_UNSPECIFIED: SearchMode.DEFAULT,
    pb.DENSE: SearchMode.DENSE,
    pb.LEXICAL: SearchMode.LEXICAL,
    pb.HYBRID: SearchMode.HYBRID,
}
_MODE_PB = {v: k for k, v in _MODES.items()}
_SYNC_STATES = {
    SyncStatus.RUNNING: pb.SYNC_STATE_RUNNING,
    SyncStatus.SUCCEEDED: pb.SYNC_STATE_SUCCEEDED,
    SyncStatus.FAILED: pb.SYNC_STATE_FAILED,
}
_STATUS = {
    DocStatus.CREATED: pb.DocumentResult.CREATED,
    DocStatus.UPDATED: pb.DocumentResult.UPDATED,
    DocStatus.UNCHANGED: pb.DocumentResult.UNCHANGED,
}


def _ts(value: datetime | None) -> Timestamp | None:
    """``value`` as a Timestamp; unset (None) when there is none or it cannot be one, so a
    single odd stored time never fails a whole response."""
    if value is None:
        return None
    ts = Timestamp()
    try:
        ts.FromDatetime(value)
    except (ValueError, OverflowError, TypeError):
        log.warning("time %r cannot be a Timestamp; it is left unset", value)
        return None
    return ts


def _dur(seconds: float | None) -> Duration | None:
    if seconds is None:
        return None
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _from_ts(msg: pb.Document, field: str) -> datetime | None:
    if not msg.HasField("source_updated_at"):
        return None
    try:
        return msg.source_updated_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        ts = msg.source_updated_at
        raise InvalidArgument(
            f"{field}source_updated_at (seconds={ts.seconds}, nanos={ts.nanos}) is not a valid "
            "Timestamp: years 1-9999, nanos 0-999999999", field=f"{field}source_updated_at"
        ) from None


# -- requests ------------------------------------------------------------------------------
def document_from_pb(msg: pb.Document, field: str = "") -> Document:
    """``field`` prefixes names in error messages, e.g. "documents[3]."."""
    return Document(
        doc_id=msg.doc_id, content=msg.content, path=msg.path, revision=msg.revision,
        source_updated_at=_from_ts(msg, field), metadata=dict(msg.metadata),
        language=msg.language, moved_from=msg.moved_from,
    )


def search_from_pb(msg: pb.SearchRequest, field: str = "") -> SearchQuery:
    if msg.mode not in _MODES:
        raise InvalidArgument(
            f"{field}mode {msg.mode} is not a SearchMode: use DENSE (1), LEXICAL (2), HYBRID "
            "(3), or leave it unset for the server's default", field=f"{field}mode")
    f = msg.filter
    return SearchQuery(
        namespace=msg.namespace, query=msg.query, top_k=msg.top_k,
        filter=SearchFilter(
            doc_ids=tuple(f.doc_ids), path_prefix=f.path_prefix, languages=tuple(f.languages),
            metadata=tuple(sorted(f.metadata.items())), kinds=tuple(f.kinds),
        ),
        mode=_MODES.get(msg.mode, SearchMode.DEFAULT), rerank=msg.rerank,
        dense_weight=msg.dense_weight if msg.HasField("dense_weight") else None,
        rerank_candidates=msg.rerank_candidates, collapse=msg.collapse,
        min_score=msg.min_score if msg.HasField("min_score") else None,
        max_hits_per_path=msg.max_hits_per_path,
        max_staleness_s=_max_staleness(msg, field), flag_stale=msg.flag_stale,
    )


def _max_staleness(msg: pb.SearchRequest, field: str) -> float | None:
    if not msg.HasField("max_staleness"):
        return None
    d = msg.max_staleness
    if d.seconds < 0 or d.nanos < 0:
        raise InvalidArgument(f"{field}max_staleness must not be negative",
                              field=f"{field}max_staleness")
    if d.nanos > 999_999_999:
        raise InvalidArgument(f"{field}max_staleness.nanos is {d.nanos}; a Duration's nanos "
                              "must be below 1e9 (carry whole seconds in seconds)",
                              field=f"{field}max_staleness")
    seconds = d.seconds + d.nanos / 1e9
    return seconds or None


def mode_from_pb(value: int, field: str = "mode") -> SearchMode:
    if value not in _MODES:
        raise InvalidArgument(
            f"{field} {value} is not a SearchMode: use DENSE (1), LEXICAL (2), HYBRID (3), or "
            "leave it unset for the server's default", field=field)
    return _MODES[value]  # type: ignore[index]  # an int checked against the enum's values


def golden_query_from_pb(msg: pb.GoldenQuery, field: str = "") -> GoldenQuery:
    """Binary judgements (relevant_doc_ids, relevant_paths) count grade 1; an explicit grade
    in doc_grades / path_grades wins. ``field``: the query's place, e.g. "queries[2]."."""
    for name, values in (("relevant_doc_ids", msg.relevant_doc_ids),
                         ("relevant_paths", msg.relevant_paths)):
        for j, value in enumerate(values):
            if not value:
                raise InvalidArgument(f"{field}{name}[{j}] is empty: name a document "
                                      f"{'id' if name == 'relevant_doc_ids' else 'path'}",
                                      field=f"{field}{name}[{j}]")
    docs = dict.fromkeys(msg.relevant_doc_ids, 1)
    docs.update(msg.doc_grades)
    paths = dict.fromkeys(msg.relevant_paths, 1)
    paths.update(msg.path_grades)
    return GoldenQuery(id=msg.id, text=msg.query, doc_grades=docs, path_grades=paths)


def golden_query_to_pb(q: GoldenQuery) -> pb.GoldenQuery:
    return pb.GoldenQuery(id=q.id, query=q.text, doc_grades=q.doc_grades,
                          path_grades=q.path_grades)


def sync_request_from_pb(msg: pb.SyncSourceRequest) -> SyncRequest:
    return SyncRequest(location=msg.repo, ref=msg.ref, include=tuple(msg.include),
                       exclude=tuple(msg.exclude), max_file_bytes=msg.max_file_bytes)


# -- responses -----------------------------------------------------------------------------
def chunk_to_pb(c: ChunkRecord) -> pb.Chunk:
    return pb.Chunk(
        chunk_id=c.chunk_id, doc_id=c.doc_id, revision=c.revision, path=c.path,
        start_line=c.start_line, end_line=c.end_line, text=c.text, content_hash=c.content_hash,
        start_byte=c.start_byte, end_byte=c.end_byte, ordinal=c.ordinal, language=c.language,
        document_version=c.document_version, document_hash=c.document_hash,
        indexed_at=_ts(c.indexed_at), source_updated_at=_ts(c.source_updated_at),
        metadata=c.metadata, token_count=c.token_count, chunker=c.chunker,
        namespace=c.namespace, symbol=c.symbol, kind=c.kind, fallback_reason=c.fallback,
    )


def hit_to_pb(h: Hit) -> pb.Hit:
    return pb.Hit(chunk=chunk_to_pb(h.chunk), score=h.score, rank=h.rank,
                  staleness=_dur(h.staleness_s), dense_score=h.dense_score,
                  lexical_score=h.lexical_score, fused_score=h.fused_score,
                  rerank_score=h.rerank_score, staleness_basis=h.staleness_basis,
                  stale=h.stale)


def lineage_to_pb(lin: Lineage) -> pb.Lineage:
    return pb.Lineage(
        request_id=lin.request_id, embedder=lin.embedder, reranker=lin.reranker,
        backend=lin.backend, index_generation=lin.index_generation,
        embedder_revision=lin.embedder_revision, namespace=lin.namespace,
        index_version=lin.index_version, device=lin.device,
        reranker_revision=lin.reranker_revision, mode=_MODE_PB[lin.mode],
        analyzer=lin.analyzer, trace_id=lin.trace_id,
    )


def timings_to_pb(t: StageTimings) -> pb.StageTimings:
    return pb.StageTimings(embed=_dur(t.embed), ann=_dur(t.ann), lexical=_dur(t.lexical),
                           rerank=_dur(t.rerank), fetch=_dur(t.fetch), total=_dur(t.total),
                           fuse=_dur(t.fuse))


def search_result_to_pb(r: SearchResult) -> pb.SearchResponse:
    return pb.SearchResponse(hits=[hit_to_pb(h) for h in r.hits],
                             lineage=lineage_to_pb(r.lineage), timings=timings_to_pb(r.timings))


def golden_set_to_pb(gs: GoldenSet) -> pb.RegisterGoldenSetResponse:
    return pb.RegisterGoldenSetResponse(
        query_count=len(gs.queries), version=gs.version, name=gs.name,
        create_time=_ts(gs.created_at), origin=gs.origin,
        corpus_revision=str(gs.metadata.get("corpus_revision", "")),
        queries=[golden_query_to_pb(q) for q in gs.queries])


def evaluation_to_pb(e: EvaluationRecord | None) -> pb.Evaluation | None:
    if e is None:
        return None
    return pb.Evaluation(
        evaluation_id=e.evaluation_id, namespace=e.namespace, golden_set=e.golden_set,
        version=e.version, start_time=_ts(e.started_at), duration=_dur(e.seconds),
        mode=_MODE_PB[e.mode], rerank=e.rerank, query_count=e.query_count, trigger=e.trigger,
        slo=e.slo, metrics=[pb.EvalMetric(name=m.name, k=m.k, value=m.value) for m in e.metrics])


def reindex_to_pb(n: NamespaceRecord, r: ReindexResult) -> pb.ReindexNamespaceResponse:
    return pb.ReindexNamespaceResponse(namespace=namespace_to_pb(n), vectors=r.vectors,
                                       caught_up=r.caught_up, elapsed=_dur(r.seconds))


def namespace_to_pb(n: NamespaceRecord) -> pb.Namespace:
    return pb.Namespace(
        name=n.name, backend=n.backend, embedder=n.embedder,
        embedder_revision=n.embedder_revision, dimension=n.dimension, metric=n.metric,
        index_generation=n.index_generation, document_count=n.document_count,
        chunk_count=n.chunk_count, create_time=_ts(n.created_at),
        index_version=n.index_version,
    )


def entry_bytes(entry: Message) -> int:
    """What ``entry`` adds to a response as an element of a repeated field: its bytes, its
    tag and its length (at most 6 bytes: a one-byte tag, a varint of up to 5)."""
    return entry.ByteSize() + 6


def upsert_to_pb(namespace: str, results: list[UpsertResult], elapsed_s: float,
                 stages: Mapping[str, float] | None = None, *,
                 max_bytes: int | None = None) -> pb.UpsertDocumentsResponse:
    """The stream's response; ``stages``: its seconds per stage (UpsertTimings). Per-document
    results stop where the next would take the response past ``max_bytes`` (a long stream
    of many documents: its messages all committed, a response over the limit would tell the
    caller it failed): ``results_truncated`` then says so, and the counts stay whole."""
    resp = pb.UpsertDocumentsResponse(namespace=namespace, elapsed=_dur(elapsed_s))
    for field in pb.UpsertTimings.DESCRIPTOR.fields:
        if stages and field.name in stages:
            getattr(resp.timings, field.name).CopyFrom(_dur(stages[field.name]))
    room = (max_bytes - RESPONSE_ROOM_BYTES - len(namespace.encode()) if max_bytes is not None
            else None)
    for r in results:
        resp.chunks_deleted += r.chunks_deleted
        resp.index_version = max(resp.index_version, r.index_version)
        for d in r.results:
            resp.documents_received += 1
            if d.status is DocStatus.CREATED:
                resp.documents_created += 1
            elif d.status is DocStatus.UPDATED:
                resp.documents_updated += 1
            else:
                resp.documents_unchanged += 1
            resp.chunks_total += d.chunk_count
            resp.chunks_embedded += d.chunks_embedded
            resp.chunks_reused += d.chunks_reused
            if resp.results_truncated:
                continue
            entry = pb.DocumentResult(
                doc_id=d.doc_id, status=_STATUS[d.status], version=d.version,
                chunk_count=d.chunk_count, chunks_embedded=d.chunks_embedded,
                chunks_reused=d.chunks_reused, content_hash=d.content_hash,
                moved_from=d.moved_from)
            if room is not None:
                room -= entry_bytes(entry)
                if room < 0:
                    resp.results_truncated = True
                    continue
            resp.results.append(entry)
    return resp


def delete_to_pb(r: DeleteResult) -> pb.DeleteDocumentsResponse:
    return pb.DeleteDocumentsResponse(
        documents_deleted=r.documents_deleted, chunks_deleted=r.chunks_deleted,
        not_found_doc_ids=list(r.not_found), index_version=r.index_version)


def document_to_pb(d: DocumentRecord) -> pb.GetDocumentResponse:
    return pb.GetDocumentResponse(
        document=pb.Document(
            doc_id=d.doc_id, content=d.content or "", path=d.path, revision=d.revision,
            source_updated_at=_ts(d.source_updated_at), metadata=d.metadata,
            language=d.language),
        chunk_ids=list(d.chunk_ids), indexed_at=_ts(d.indexed_at), version=d.version,
        content_hash=d.content_hash, language=d.language,
    )


def document_info_to_pb(d: DocumentRecord) -> pb.DocumentInfo:
    return pb.DocumentInfo(
        doc_id=d.doc_id, path=d.path, revision=d.revision,
        source_updated_at=_ts(d.source_updated_at), indexed_at=_ts(d.indexed_at),
        version=d.version, content_hash=d.content_hash, chunk_count=d.chunk_count,
        size_bytes=d.size_bytes, language=d.language, metadata=d.metadata,
    )


def status_to_pb(s: IndexStatus) -> pb.GetIndexStatusResponse:
    n = s.namespace
    return pb.GetIndexStatusResponse(
        namespace=n.name, document_count=n.document_count, chunk_count=n.chunk_count,
        embedder=n.embedder, backend=n.backend, device=s.device,
        embedder_revision=n.embedder_revision, dimension=n.dimension, metric=n.metric,
        index_generation=n.index_generation, index_version=n.index_version,
        vector_count=s.vector_count, last_indexed_at=_ts(n.last_indexed_at),
        precision=s.precision, chunk_tokens=s.chunk_tokens, overlap_tokens=s.overlap_tokens,
        chunker=s.chunker, content_bytes=n.content_bytes,
        source=_source_to_pb(s.source), running_sync=_sync_run_to_pb(s.running_sync),
        last_sync=_sync_run_to_pb(s.last_sync),
        last_evaluation=evaluation_to_pb(s.last_evaluation),
        slo_evaluations=[e for e in map(evaluation_to_pb, s.slo_evaluations) if e is not None],
        serving_embedder_revision=s.serving_embedder_revision,
    )


def _source_to_pb(lag: SourceLag | None) -> pb.SourceStatus | None:
    if lag is None:
        return None
    return pb.SourceStatus(
        repo=lag.location, ref=lag.ref, indexed_commit=lag.indexed_commit,
        head_commit=lag.head_commit, commits_behind=lag.commits_behind,
        staleness=_dur(lag.staleness_s(datetime.now(UTC))), checked_at=_ts(lag.checked_at),
        error=lag.error, never_synced=lag.never_synced)


def _sync_run_to_pb(s: SyncState | None) -> pb.SyncRun | None:
    if s is None:
        return None
    return pb.SyncRun(
        sync_id=s.sync_id, state=_SYNC_STATES[s.status], commit=s.commit,
        previous_commit=s.previous_commit, full_reconcile=s.full_reconcile,
        files_added=s.files_added, files_modified=s.files_modified,
        files_deleted=s.files_deleted, files_renamed=s.files_renamed,
        chunks_embedded=s.chunks_embedded, chunks_reused=s.chunks_reused,
        start_time=_ts(s.started_at), duration=_dur(s.seconds), error=s.error)


def sync_to_pb(s: SyncState) -> pb.SyncSourceResponse:
    return pb.SyncSourceResponse(
        commit=s.commit, documents_upserted=s.documents_upserted,
        documents_deleted=s.documents_deleted, sync_id=s.sync_id, state=_SYNC_STATES[s.status],
        files_added=s.files_added, files_modified=s.files_modified,
        files_deleted=s.files_deleted, files_renamed=s.files_renamed,
        documents_unchanged=s.documents_unchanged, chunks_embedded=s.chunks_embedded,
        chunks_reused=s.chunks_reused, duration=_dur(s.seconds), error=s.error,
        previous_commit=s.previous_commit, full_reconcile=s.full_reconcile,
        skipped=s.skipped, start_time=_ts(s.started_at),
    )
