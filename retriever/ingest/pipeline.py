"""The upsert and delete paths.

Upsert, per message of a stream (all its documents commit together):
  unchanged content -> refresh revision/time/metadata only;
  else chunk -> chunk ids -> embed only ids the document did not have -> stage rows
  (pending) -> write vectors to the index -> one catalog transaction flips the documents to
  their new chunks -> remove superseded vectors from the index.
Only after that transaction is a document acknowledged. A crash at any point leaves either
the old version or the new one; start-up reconcile clears the leftovers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

from indexers import Payload
from retriever import analyzer, validation
from retriever.cancel import NEVER, CallToken
from retriever.catalog import (
    Catalog,
    ChunkPlacement,
    DocHead,
    DocumentRefresh,
    DocumentWrite,
    NewChunk,
    StoredChunk,
)
from retriever.config import Settings
from retriever.domain import (
    DeleteResult,
    DocResult,
    DocStatus,
    Document,
    UpsertResult,
    sha256,
)
from retriever.errors import NotFound, translate
from retriever.ingest.chunking import (
    ChunkerSet,
    ChunkSpan,
    TokenCounter,
    build_chunkers,
    detect_language,
    normalize_language,
)
from retriever.models.embedder import Embedder
from retriever.namespaces import NamespaceHandle, Namespaces
from retriever.slo.metrics import Metrics

log = logging.getLogger(__name__)

# Embeds document texts (with their token counts) for a caller who may go away.
EmbedDocuments = Callable[[Sequence[str], Sequence[int], CallToken], np.ndarray]

# Points of the write path where a test may make the process die (Settings.fault_points):
# durability is proven by crashing at each, not argued.
FAULT_POINTS = ("upsert.after_stage", "upsert.after_index_write",
                "upsert.after_lexical_write", "upsert.before_commit", "upsert.after_commit")


def _crash_if_armed(armed: frozenset[str], point: str) -> None:
    if point in armed:
        log.error("fault point %s reached: killing the process", point)
        os.kill(os.getpid(), signal.SIGKILL)

# Tokens reserved for the header embedded in front of every chunk, and of them for its path.
HEADER_TOKENS = 48
PATH_TOKENS = 24
# Changes whenever the header's format does: part of every document's chunking signature.
HEADER_FORMAT = "h3"


def text_budget(settings: Settings, embedder: Embedder) -> int:
    """Text tokens a chunk may hold: the model's window (or chunk_tokens, if smaller) less
    its special tokens and the header's share. ValueError when that leaves no more than the
    overlap (settings no chunker can work with)."""
    budget = min(settings.chunk_tokens, embedder.max_tokens) - (embedder.special_tokens
                                                                + HEADER_TOKENS)
    if budget <= settings.overlap_tokens:
        raise ValueError(
            f"chunk budget of {budget} text tokens (chunk_tokens {settings.chunk_tokens}, "
            f"model max {embedder.max_tokens}, header {HEADER_TOKENS}) must exceed "
            f"overlap_tokens {settings.overlap_tokens}")
    return budget


def service_chunkers(settings: Settings, embedder: Embedder,
                     structured: bool | None = None) -> ChunkerSet:
    """The chunkers a server builds from these settings for this embedder (``structured``:
    instead of settings.chunking)."""
    if structured is None:
        structured = settings.chunking == "structured"
    return build_chunkers(embedder.count_tokens, embedder.token_offsets,
                          text_budget(settings, embedder), settings.overlap_tokens,
                          settings.chunk_max_chars, structured=structured,
                          whitespace_split=embedder.whitespace_split,
                          word_positions=embedder.word_positions)


def _meta_json(d: Document) -> str:
    """A document's metadata as the catalog stores it."""
    return json.dumps(dict(d.metadata), sort_keys=True)


def _payload(d: Document, path: str, language: str, kind: str) -> Payload:
    return Payload(doc_id=d.doc_id, path=path, language=language, kind=kind,
                   metadata=tuple(sorted(dict(d.metadata).items())))


def chunk_headers(path: str, language: str, items: Sequence[tuple[str, str]],
                  count_tokens: TokenCounter) -> list[tuple[str, int]]:
    """What is embedded in front of each chunk of one document, for its (symbol, context):

        <path> (<language>)
        <symbol>     the symbol or heading path, when there is one
        <context>    the enclosing signature of a piece of a split definition, when any

    within HEADER_TOKENS tokens: the path is cut from the left to PATH_TOKENS (the file name
    matters most); a piece with a context keeps it (the symbol's outer levels go first, then
    the symbol, then the context's end), one without drops the symbol's outer levels. Returns
    (header, tokens) per item."""
    def first_line(p: str) -> str:  # plain text says nothing by its language
        return f"{p} ({language})\n" if language not in ("", "text") else f"{p}\n"

    head, p = first_line(path), path
    n = count_tokens([head])[0]
    while n > PATH_TOKENS and "/" in p:
        p = p.split("/", 1)[1]
        head = first_line(p)
        n = count_tokens([head])[0]
    if n > PATH_TOKENS:
        head = f"({language})\n" if language not in ("", "text") else ""
        n = count_tokens([head])[0] if head else 0
    room = HEADER_TOKENS - n
    pairs = sorted({(s, c) for s, c in items if s or c})
    lines = sorted({x for s, c in pairs for x in (s, c) if x})
    counts = dict(zip(lines, count_tokens([x + "\n" for x in lines]), strict=True))
    done: dict[tuple[str, str], tuple[str, int]] = {}
    for symbol, context in pairs:
        sym, sym_n = symbol, counts.get(symbol, 0)
        ctx, ctx_n = (context, counts.get(context, 0)) if context != symbol else ("", 0)
        # A split piece carries its enclosing signature (ctx): the symbol's outer levels
        # go first (the innermost names it), then the symbol (its last level names what the
        # signature says), then the signature's end.
        while sym_n + ctx_n > room and " > " in sym:
            sym = sym.split(" > ", 1)[1]
            sym_n = count_tokens([sym + "\n"])[0]
        if sym_n + ctx_n > room:
            sym, sym_n = "", 0
        if ctx_n > room:
            ctx, ctx_n = _cut_to_tokens(ctx, room, count_tokens)
        text = head + (sym + "\n" if sym else "") + (ctx + "\n" if ctx else "")
        done[(symbol, context)] = (text, n + sym_n + ctx_n)
    return [done.get((s, c), (head, n)) for s, c in items]


def _cut_to_tokens(line: str, room: int, count_tokens: TokenCounter) -> tuple[str, int]:
    """The longest prefix of ``line`` ending at a word whose line ("prefix\\n") counts at
    most ``room`` tokens, and its count; ("", 0) when not even one word fits."""
    line = line.strip()
    ends = [m.start() for m in re.finditer(r"\s+", line)] + [len(line)]
    best, best_n = "", 0
    lo, hi = 0, len(ends) - 1
    while lo <= hi:  # counts grow with the prefix
        mid = (lo + hi) // 2
        cand = line[:ends[mid]]
        c = count_tokens([cand + "\n"])[0]
        if c <= room:
            best, best_n, lo = cand, c, mid + 1
        else:
            hi = mid - 1
    return best, best_n


def make_chunk_id(chunker: str, namespace: str, doc_id: str, path: str, text: str,
                  occurrence: int) -> str:
    """Stable identity: the same embedded text (header and chunk text) of the same document
    keeps its id wherever it moves in the file, so an edit elsewhere re-embeds nothing.
    ``occurrence`` tells apart identical texts within one document."""
    h = hashlib.sha256()
    for part in (chunker, namespace, doc_id, path, str(occurrence), text):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _plan_key(p: _Planned) -> tuple[str, str, str, str, str]:
    return (p.doc.doc_id, p.content_hash, p.path, p.language, p.signature)


@dataclass(slots=True)
class _Planned:
    doc: Document
    path: str
    language: str
    content_hash: str
    chunker: str
    signature: str
    spans: list[ChunkSpan]
    chunk_ids: list[str]
    embed_texts: list[str]
    headers: list[str]
    token_counts: list[int]
    old_version: int  # 0 when new


@dataclass(slots=True)
class _Prefetched:
    """What an upsert chunked and embedded before taking its namespace's write lock."""

    plans: dict[tuple[str, str, str, str, str], _Planned]
    vectors: dict[str, np.ndarray]  # embedded text -> its vector


class Ingestor:
    def __init__(self, settings: Settings, catalog: Catalog, namespaces: Namespaces,
                 embedder: Embedder, embed_documents: EmbedDocuments,
                 chunkers: ChunkerSet, metrics: Metrics) -> None:
        """``embed_documents`` computes vectors (the service routes it through its one
        model thread); ``embedder`` is used for its tokenizer."""
        self._settings = settings
        self._catalog = catalog
        self._namespaces = namespaces
        self._embedder = embedder
        self._embed_documents = embed_documents
        self._chunkers = chunkers
        self._metrics = metrics
        self._faults = frozenset(settings.fault_points)
        if unknown := self._faults - set(FAULT_POINTS):
            raise ValueError(f"unknown fault_points {sorted(unknown)}; known: {FAULT_POINTS}")

    def upsert(self, namespace: str, docs: Sequence[Document],
               token: CallToken = NEVER, *, create: bool = True,
               incarnation: datetime | None = None) -> UpsertResult:
        """Commit ``docs`` as one unit. Nothing commits once ``token`` says the caller is
        gone (checked while waiting for the namespace and the model, and right before the
        commit). A missing namespace is created, unless ``create`` is False (a sync's later
        batches: a namespace deleted meanwhile stays deleted): then NotFound, as when
        ``incarnation`` (a namespace's ``created_at``) is not the namespace's now."""
        validation.namespace_name(namespace)
        validation.documents(docs, self._settings)
        pre = self._prefetch(namespace, docs, token, create)
        while True:
            token.check("the upsert started")
            handle = (self._namespaces.get_or_create(namespace) if create
                      else self._namespaces.get(namespace))
            self._namespaces.require_compatible(handle)
            with self._metrics.stage("lock_wait"):
                token.acquire(handle.write_lock, "the upsert started")
            try:
                _require_incarnation(handle, incarnation)
                if not handle.deleted:  # else deleted meanwhile: upsert re-creates it
                    return self._upsert_locked(handle, docs, token, pre)
                if not create:
                    handle.require_live()
            finally:
                handle.write_lock.release()

    def _prefetch(self, ns: str, docs: Sequence[Document], token: CallToken,
                  create: bool) -> _Prefetched | None:
        """Chunk and embed, before taking the namespace's write lock, what the namespace has
        no vector for as it stands now. Upserts of one namespace then overlap (their slices
        take turns at the model thread) instead of each waiting for the whole of the ones
        ahead of it, and the lock is held only to check the plan and commit. What changed
        meanwhile (another upsert of the same document) is planned again under the lock;
        vectors computed here for texts no longer needed are dropped."""
        if not self._settings.upsert_prefetch:
            return None
        try:
            self._namespaces.require_compatible(self._namespaces.get(ns))
        except NotFound:
            if not create:
                return None  # the locked path says NotFound
            # new: created under the lock, as before; its documents are all new
        heads = self._catalog.document_heads(ns, _head_ids(docs))
        with self._metrics.stage("chunk"):
            planned, _, _ = self._plan_docs(ns, docs, heads, None)
        existing = self._catalog.active_chunks(ns, [p.doc.doc_id for p in planned])
        moves = _moves(docs, heads)
        movable = self._catalog.embedded_vectors(ns, moves) if moves else {}
        todo: dict[str, int] = {}
        for p in planned:
            for cid, text, n in zip(p.chunk_ids, p.embed_texts, p.token_counts, strict=True):
                if cid not in existing and text not in movable:
                    todo.setdefault(text, n)
        texts = list(todo)
        vectors: dict[str, np.ndarray] = {}
        if texts:
            with self._metrics.stage("embed"):
                rows = self._embed_documents(texts, [todo[t] for t in texts], token)
            vectors = dict(zip(texts, rows, strict=True))
        return _Prefetched({_plan_key(p): p for p in planned}, vectors)

    def _plan_docs(self, ns: str, docs: Sequence[Document], heads: dict[str, DocHead],
                   pre: _Prefetched | None,
                   ) -> tuple[list[_Planned], list[DocumentRefresh], set[str]]:
        """Documents to (re)chunk, documents unchanged but for their revision or metadata,
        and those whose metadata changed. Plans made by ``pre`` for the same content, path,
        language and chunking are reused."""
        planned: list[_Planned] = []
        refreshes: list[DocumentRefresh] = []
        new_metadata: set[str] = set()
        for d in docs:
            path = d.effective_path
            language = (normalize_language(d.language) if d.language.strip() else
                        detect_language(path, d.content))
            content_hash = sha256(d.content)
            head = heads.get(d.doc_id)
            moved = heads.get(d.moved_from) if d.moved_from else None
            signature = self.chunking_signature(language)
            if head is not None and head.metadata != _meta_json(d):
                new_metadata.add(d.doc_id)
            if head is not None and (head.content_hash, head.path, head.language,
                                     head.chunker) == (content_hash, path, language,
                                                       signature):
                refreshes.append(DocumentRefresh(d.doc_id, d.revision, d.source_updated_at,
                                                 dict(d.metadata)))
                continue
            # A move into a new id continues the moved document's versions.
            old_version = head.version if head else moved.version if moved else 0
            plan = (pre.plans.get((d.doc_id, content_hash, path, language, signature))
                    if pre is not None else None)
            if plan is None or plan.doc is not d:
                plan = self._plan(ns, d, path, language, content_hash, old_version, signature)
            elif plan.old_version != old_version:  # another upsert of it committed meanwhile
                plan = replace(plan, old_version=old_version)
            planned.append(plan)
        return planned, refreshes, new_metadata

    def _upsert_locked(self, handle: NamespaceHandle, docs: Sequence[Document],
                       token: CallToken, pre: _Prefetched | None = None) -> UpsertResult:
        ns = handle.name
        heads = self._catalog.document_heads(ns, _head_ids(docs))
        removes = _moves(docs, heads)
        results: dict[str, DocResult] = {}
        if pre is None:
            with self._metrics.stage("chunk"):
                planned, refreshes, new_metadata = self._plan_docs(ns, docs, heads, None)
        else:
            planned, refreshes, new_metadata = self._plan_docs(ns, docs, heads, pre)

        existing = self._catalog.active_chunks(
            ns, [p.doc.doc_id for p in planned]
            + [r.doc_id for r in refreshes if r.doc_id in new_metadata] + removes)
        # (planned index, chunk index) of chunks this namespace has no vector for. Chunk ids
        # are unique across the message (doc_id and occurrence are in them).
        to_embed = [(pi, ci) for pi, p in enumerate(planned)
                    for ci, cid in enumerate(p.chunk_ids) if cid not in existing]
        texts = [planned[pi].embed_texts[ci] for pi, ci in to_embed]
        ready = pre.vectors if pre is not None else {}
        # What a moved document had embedded already (the same header and text)
        movable = self._catalog.embedded_vectors(ns, removes) if removes else {}
        missing = [row for row, text in enumerate(texts)
                   if text not in ready and text not in movable]
        vectors = np.empty((len(texts), self._embedder.dimension), dtype=np.float32)
        carried: set[int] = set()  # rows whose vector a moved document had
        for row, text in enumerate(texts):
            if text in movable:
                vectors[row] = movable[text]
                carried.add(row)
            elif text in ready:
                vectors[row] = ready[text]
        if missing:
            with self._metrics.stage("embed"):
                vectors[missing] = self._embed_documents(
                    [texts[row] for row in missing],
                    [planned[to_embed[row][0]].token_counts[to_embed[row][1]]
                     for row in missing], token)

        new_rows = [
            NewChunk(
                chunk_id=planned[pi].chunk_ids[ci], doc_id=planned[pi].doc.doc_id, ordinal=ci,
                text=planned[pi].spans[ci].text, content_hash=sha256(planned[pi].spans[ci].text),
                start_line=planned[pi].spans[ci].start_line,
                end_line=planned[pi].spans[ci].end_line,
                start_byte=planned[pi].spans[ci].start_byte,
                end_byte=planned[pi].spans[ci].end_byte,
                token_count=planned[pi].token_counts[ci],
                chunker=planned[pi].spans[ci].chunker or planned[pi].chunker,
                vector=vectors[row],
                terms=analyzer.chunk_terms(planned[pi].path, planned[pi].spans[ci].symbol,
                                           planned[pi].spans[ci].text),
                symbol=planned[pi].spans[ci].symbol, kind=planned[pi].spans[ci].kind,
                fallback=planned[pi].spans[ci].fallback,
                header=planned[pi].headers[ci],
            )
            for row, (pi, ci) in enumerate(to_embed)
        ]
        # What the engine stores beside each vector (indexers.Payload) never changes under
        # a vector id: the kept chunks of a document whose metadata changed are moved to
        # staged copies with the new payload, and the old rows dropped at the commit.
        new_ids: dict[str, set[str]] = {d: set() for d in removes}  # all their chunks go
        new_ids.update({p.doc.doc_id: set(p.chunk_ids) for p in planned})
        new_ids.update({r.doc_id: {c.chunk_id for c in existing.values()
                                   if c.doc_id == r.doc_id} for r in refreshes})
        drops: dict[str, list[int]] = {}
        rekey_old: list[int] = []
        for old in existing.values():
            if old.chunk_id not in new_ids[old.doc_id]:
                drops.setdefault(old.doc_id, []).append(old.vector_id)
            elif old.doc_id in new_metadata:
                rekey_old.append(old.vector_id)
        dropped_all = [vid for vids in drops.values() for vid in vids]
        # A removed document's chunks are deleted with it by the commit, in no write's drops
        for d in removes:
            drops.pop(d, None)
        by_doc = {d.doc_id: d for d in docs}
        token.check("the commit")
        staged = self._catalog.stage_chunks(ns, new_rows) if new_rows else []
        copies: list[int] = []
        try:
            # (path, language) of each document as it will be committed
            where = {p.doc.doc_id: (p.path, p.language) for p in planned}
            where.update({r.doc_id: (heads[r.doc_id].path, heads[r.doc_id].language)
                          for r in refreshes})
            payloads = [_payload(by_doc[r.doc_id], *where[r.doc_id], r.kind) for r in new_rows]
            if rekey_old:
                copies, copy_vectors, kinds = self._catalog.stage_copies(ns, rekey_old)
                owner = {c.vector_id: c.doc_id for c in existing.values()}
                payloads += [_payload(by_doc[owner[old]], *where[owner[old]], kind)
                             for old, kind in zip(rekey_old, kinds, strict=True)]
                vectors = (np.concatenate([vectors, copy_vectors]) if len(vectors)
                           else copy_vectors)
            _crash_if_armed(self._faults, "upsert.after_stage")
            with self._metrics.stage("index_write"):
                if staged or copies:
                    handle.index.upsert(staged + copies, vectors, payloads)
            _crash_if_armed(self._faults, "upsert.after_index_write")
            if handle.lexical is not None and (staged or copies):
                # Searchable before the flip, like the vectors: a search never sees a
                # document's new vectors without its new terms.
                terms = [r.terms for r in new_rows]
                if copies:
                    copied = self._catalog.terms(ns, copies)
                    terms += [copied.get(v, "") for v in copies]
                with self._metrics.stage("lexical_write"):
                    handle.lexical.add(staged + copies, terms, payloads)
            _crash_if_armed(self._faults, "upsert.after_lexical_write")
            staged_by_cid = {r.chunk_id: vid for r, vid in zip(new_rows, staged, strict=True)}
            moved = dict(zip(rekey_old, copies, strict=True))
            writes = [self._write(p, existing, staged_by_cid, drops.get(p.doc.doc_id, []),
                                  moved) for p in planned]
            with self._metrics.stage("commit"), handle.visibility.write():
                # The last moment to give up: past it, the documents are acknowledged.
                token.check("the commit")
                _crash_if_armed(self._faults, "upsert.before_commit")
                version = self._catalog.commit_documents(ns, writes, refreshes,
                                                         rekeys=list(moved.items()),
                                                         removes=removes)
            _crash_if_armed(self._faults, "upsert.after_commit")
        except BaseException:
            # Nothing was committed: take the staged rows back out of index and catalog.
            if staged or copies:
                _discard_staged(handle, self._catalog, staged + copies)
            raise
        if dropped_all or rekey_old:
            _drop_vectors(handle, dropped_all + rekey_old)
            _drop_lexical(handle, dropped_all + rekey_old)

        embedded_by_doc: dict[str, int] = {}
        for row, (pi, _) in enumerate(to_embed):
            if row not in carried:
                doc_id = planned[pi].doc.doc_id
                embedded_by_doc[doc_id] = embedded_by_doc.get(doc_id, 0) + 1
        gone = set(removes)
        moved_from = {d.doc_id: d.moved_from for d in docs if d.moved_from in gone}
        for p in planned:
            n_emb = embedded_by_doc.get(p.doc.doc_id, 0)
            results[p.doc.doc_id] = DocResult(
                doc_id=p.doc.doc_id,
                status=DocStatus.UPDATED if p.old_version else DocStatus.CREATED,
                version=p.old_version + 1, chunk_count=len(p.spans), chunks_embedded=n_emb,
                chunks_reused=len(p.spans) - n_emb, content_hash=p.content_hash,
                moved_from=moved_from.get(p.doc.doc_id, ""))
        for r in refreshes:
            h = heads[r.doc_id]
            results[r.doc_id] = DocResult(
                doc_id=r.doc_id, status=DocStatus.UNCHANGED, version=h.version,
                chunk_count=h.chunk_count, chunks_embedded=0, chunks_reused=0,
                content_hash=h.content_hash, moved_from=moved_from.get(r.doc_id, ""))
        ordered = tuple(results[d.doc_id] for d in docs)
        self._count(ns, ordered)
        return UpsertResult(results=ordered, chunks_deleted=len(dropped_all),
                            index_version=version, incarnation=handle.record.created_at)

    @staticmethod
    def _write(p: _Planned, existing: dict[str, StoredChunk], staged_by_cid: dict[str, int],
               drop: list[int], moved: dict[int, int]) -> DocumentWrite:
        keep, activate = [], []
        for ci, (cid, span) in enumerate(zip(p.chunk_ids, p.spans, strict=True)):
            old = existing.get(cid)
            if old is not None:
                keep.append(ChunkPlacement(moved.get(old.vector_id, old.vector_id), ci,
                                           span.start_line, span.end_line,
                                           span.start_byte, span.end_byte))
            else:
                activate.append(staged_by_cid[cid])
        return DocumentWrite(
            doc_id=p.doc.doc_id, path=p.path, revision=p.doc.revision,
            content_hash=p.content_hash, language=p.language, version=p.old_version + 1,
            content=p.doc.content, chunk_count=len(p.spans),
            source_updated_at=p.doc.source_updated_at, metadata=dict(p.doc.metadata),
            chunker=p.signature, keep=tuple(keep), activate=tuple(activate), drop=tuple(drop),
        )

    def chunking_signature(self, language: str) -> str:
        """What a document's chunks depend on besides its content, path and language: the
        chunker (name, version, budgets), the header format and the embedder's weights (not
        its float precision: vectors of one class, see `compatibility_key`). A document
        whose signature changed is re-chunked on its next upsert, never left UNCHANGED."""
        c = self._chunkers.chunker_for(language)
        weights = self._embedder.compatibility_class
        return f"{c.name} {self._chunkers.config} {HEADER_FORMAT} {weights}"

    def _plan(self, ns: str, d: Document, path: str, language: str, content_hash: str,
              old_version: int, signature: str) -> _Planned:
        chunker = self._chunkers.chunker_for(language)
        spans = chunker.chunk(d.content, path=path, language=language)
        headers = chunk_headers(path, language, [(s.symbol, s.context) for s in spans],
                                self._embedder.count_tokens)
        texts = [h + s.text for (h, _), s in zip(headers, spans, strict=True)]
        ids: list[str] = []
        occurrences: dict[str, int] = {}
        for s, text in zip(spans, texts, strict=True):
            occ = occurrences.get(text, 0)
            occurrences[text] = occ + 1
            ids.append(make_chunk_id(s.chunker or chunker.name, ns, d.doc_id, path, text, occ))
        return _Planned(
            doc=d, path=path, language=language, content_hash=content_hash,
            chunker=chunker.name, signature=signature, spans=spans, chunk_ids=ids,
            embed_texts=texts, headers=[h for h, _ in headers],
            token_counts=[s.token_count + n for (_, n), s in zip(headers, spans, strict=True)],
            old_version=old_version,
        )

    def _count(self, ns: str, results: Sequence[DocResult]) -> None:
        m = self._metrics
        label = m.namespace_label(ns)  # capped: namespaces past the cap count as "_other"
        for r in results:
            m.documents.labels(label, r.status.value).inc()
            m.chunks_embedded.labels(label).inc(r.chunks_embedded)
            m.chunks_reused.labels(label).inc(r.chunks_reused)

    def delete(self, namespace: str, doc_ids: Sequence[str],
               token: CallToken = NEVER, *, incarnation: datetime | None = None) -> DeleteResult:
        validation.namespace_name(namespace)
        validation.doc_ids(doc_ids, self._settings)
        handle = self._namespaces.get(namespace)
        with self._metrics.stage("lock_wait"):
            token.acquire(handle.write_lock, "the delete started")
        try:
            handle.require_live()
            _require_incarnation(handle, incarnation)
            with handle.visibility.write():
                token.check("the delete")
                deleted, vector_ids, version = self._catalog.delete_documents(namespace, doc_ids)
            if vector_ids:
                _drop_vectors(handle, vector_ids)
                _drop_lexical(handle, vector_ids)
        finally:
            handle.write_lock.release()
        gone = set(deleted)
        unique_ids = list(dict.fromkeys(doc_ids))
        return DeleteResult(documents_deleted=len(deleted), chunks_deleted=len(vector_ids),
                            not_found=tuple(d for d in unique_ids if d not in gone),
                            index_version=version)


def _head_ids(docs: Sequence[Document]) -> list[str]:
    """The documents whose heads an upsert reads: its own and those they move from."""
    return [d.doc_id for d in docs] + [d.moved_from for d in docs if d.moved_from]


def _moves(docs: Sequence[Document], heads: dict[str, DocHead]) -> list[str]:
    """The documents these move from that exist: removed by the upsert's commit."""
    return [d.moved_from for d in docs if d.moved_from and d.moved_from in heads]


def _require_incarnation(handle: NamespaceHandle, incarnation: datetime | None) -> None:
    """NotFound when ``incarnation`` is given and ``handle`` is not that namespace (it was
    deleted and created again under its name)."""
    if incarnation is not None and handle.record.created_at != incarnation:
        raise NotFound(f"namespace {handle.name!r} was deleted (and created again) while this "
                       "sync ran; the new namespace is not this sync's", field="namespace")


def _discard_staged(handle: NamespaceHandle, catalog: Catalog, vector_ids: list[int]) -> None:
    """Take the rows of an upsert that will not commit out of the index, the lexical index
    and the catalog, each whatever the others do: an engine that is down (the likely reason
    the upsert failed) must not leave the catalog's rows pending, or the caller's retry of
    the same chunks collides with them. What an engine keeps is skipped by searches (the
    catalog does not show it) and removed at the next start, or overwritten when the ids
    are staged again."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("index", lambda: handle.index.delete(vector_ids))]
    if handle.lexical is not None:
        lexical = handle.lexical
        steps.append(("lexical index", lambda: lexical.delete(vector_ids)))
    steps.append(("catalog", lambda: catalog.discard(vector_ids)))
    for where, undo in steps:
        try:
            undo()
        except Exception as exc:
            log.warning("namespace %s: could not take %d staged chunks out of the %s (%s); "
                        "searches skip them, the next start removes them", handle.name,
                        len(vector_ids), where, exc, exc_info=translate(exc) is None)


def _drop_vectors(handle: NamespaceHandle, vector_ids: list[int]) -> None:
    """Remove superseded or deleted chunks' vectors from the index, after the commit that
    made them invisible: a failure (an engine down) is logged, not raised, since the
    commit stands and the caller must hear so; searches skip ids the catalog does not
    show, and the next start's reconcile (or a rebuild) removes them."""
    try:
        handle.index.delete(vector_ids)
    except Exception as exc:
        log.warning("namespace %s: could not remove %d superseded vectors from the index "
                    "(%s); searches skip them, the next start removes them", handle.name,
                    len(vector_ids), exc, exc_info=translate(exc) is None)


def _drop_lexical(handle: NamespaceHandle, vector_ids: list[int]) -> None:
    """Remove superseded or deleted chunks from the lexical index, after the commit that
    made them invisible. A failure (e.g. a full disk) loses nothing: searches skip ids the
    catalog does not show, and the next start's reconcile removes them."""
    if handle.lexical is None:
        return
    try:
        handle.lexical.delete(vector_ids)
    except Exception as exc:
        log.warning("namespace %s: could not remove %d chunks from the lexical index (%s); "
                    "searches skip them, the next start removes them", handle.name,
                    len(vector_ids), exc)
