"""An MCP server in front of a running retriever service (``retriever mcp``).

Tools: ``search``, ``get_chunk``, ``get_document``, ``list_namespaces``, ``index_status``,
``sync`` and ``feedback``. Every tool is one or a few gRPC calls through the typed client
(:class:`retriever.client.RetrieverClient`, run in a worker thread), so the MCP server holds
no state of its own and any number of them can front one service. A failed call comes back
as a tool error (``isError``) whose text is the service's status code and message, e.g.
``NOT_FOUND: namespace 'x' does not exist``; never a stack trace.

Transports: stdio (an agent starts ``retriever mcp`` itself) and streamable HTTP
(``retriever mcp --transport http --port 8765``, at ``http://HOST:PORT/mcp``). The HTTP
endpoint has no authentication of its own: it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import grpc

try:
    import anyio.to_thread
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("the MCP server needs the mcp extra: pip install 'retriever[mcp]'") from exc
from pydantic import BaseModel, Field

from retriever.client import RetrieverClient
from retriever.integrations._common import (
    chunk_record,
    hit_record,
    lineage_record,
    search_request,
    seconds,
    timestamp_iso,
)
from retriever.v1 import retriever_pb2 as pb

__all__ = ["create_server", "serve"]

T = TypeVar("T")
Transport = Literal["stdio", "http"]

INSTRUCTIONS = """\
Semantic and keyword search over the code and documents indexed in a retriever service.
Typical use: list_namespaces (once) to see what is indexed, then search with a natural
language question or identifiers; narrow with path_prefix, languages or kinds. Each hit names
a chunk: path, start_line-end_line, text, chunk_id, doc_id and the revision it came from.
Cite hits as path:start_line-end_line. get_document reads more of a file around a hit;
get_chunk re-reads one chunk by id. After using results, report which chunks helped with
feedback (request_id from the search's lineage)."""

NamespaceArg = Annotated[str, Field(
    description="Namespace (index) to use; list_namespaces shows the available ones.")]
_READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)


# -- results ---------------------------------------------------------------------------------
class Lineage(BaseModel):
    """Which request, models and index produced the answer."""

    request_id: str = Field(description="Id of this search; pass it to feedback.")
    namespace: str
    embedder: str = Field(description="Embedding model name.")
    embedder_revision: str = Field(description="Hash of the embedder's files.")
    reranker: str = Field(description="Cross-encoder that re-ranked the hits; empty if none.")
    reranker_revision: str
    backend: str = Field(description="Vector index engine.")
    index_generation: int
    index_version: int = Field(description="Namespace commit counter the search saw.")
    mode: str = Field(description="Mode that ran: dense, lexical or hybrid.")
    device: str


class ChunkFields(BaseModel):
    chunk_id: str = Field(description="Stable id of the chunk (for get_chunk and feedback).")
    doc_id: str = Field(description="Document id (for get_document).")
    path: str
    start_line: int = Field(description="First line of the chunk, 1-based.")
    end_line: int = Field(description="Last line of the chunk, inclusive.")
    revision: str = Field(description="Source revision (e.g. git commit) of the document.")
    document_version: int
    content_hash: str
    language: str
    kind: str = Field(description="function, method, class, section, window...")
    symbol: str = Field(description="Symbol or heading path, e.g. 'class Session > def get'.")
    indexed_at: str | None
    source_updated_at: str | None


class SearchHit(ChunkFields):
    rank: int
    score: float = Field(description="Higher is better; comparable only within one search.")
    staleness_seconds: float | None = Field(
        description="How far this version lags its source; null when unknown.")
    text: str | None = Field(description="The chunk's text (null when include_text=false).")


class SearchResult(BaseModel):
    hits: list[SearchHit]
    lineage: Lineage
    took_ms: float = Field(description="Server-side time of the search.")


class ChunkResult(ChunkFields):
    text: str
    staleness_seconds: float | None
    metadata: dict[str, str] = Field(description="The document's metadata labels.")


class DocumentResult(BaseModel):
    doc_id: str
    path: str
    revision: str
    version: int
    language: str
    content_hash: str
    indexed_at: str | None
    source_updated_at: str | None
    metadata: dict[str, str]
    total_lines: int
    start_line: int = Field(description="First line returned in content, 1-based.")
    end_line: int = Field(description="Last line returned in content, inclusive.")
    truncated: bool = Field(description="True when content was cut at max_chars.")
    content: str
    chunk_ids: list[str] = Field(description="The document's chunks in order.")


class NamespaceInfo(BaseModel):
    name: str
    document_count: int
    chunk_count: int
    backend: str
    embedder: str
    embedder_revision: str
    index_generation: int
    index_version: int


class NamespaceList(BaseModel):
    namespaces: list[NamespaceInfo]


class IndexStatus(BaseModel):
    namespace: str
    document_count: int
    chunk_count: int
    vector_count: int
    content_bytes: int
    embedder: str
    embedder_revision: str
    backend: str
    device: str
    precision: str
    dimension: int
    metric: str
    index_generation: int
    index_version: int
    last_indexed_at: str | None
    chunker: str
    chunk_tokens: int
    overlap_tokens: int


class SyncResult(BaseModel):
    namespace: str
    sync_id: str
    state: str = Field(description="RUNNING (started, not waited for), SUCCEEDED or FAILED.")
    commit: str
    previous_commit: str
    full_reconcile: bool
    files_added: int
    files_modified: int
    files_deleted: int
    files_renamed: int
    documents_upserted: int
    documents_deleted: int
    documents_unchanged: int
    chunks_embedded: int
    chunks_reused: int
    skipped: dict[str, int]
    seconds: float
    error: str


class FeedbackResult(BaseModel):
    recorded: int = Field(description="Judgements the service recorded.")


# -- the server ------------------------------------------------------------------------------
async def _rpc(call: Callable[[], T]) -> T:
    """Run one blocking client call in a worker thread; a gRPC error becomes a tool error
    carrying the service's status and message."""
    try:
        return await anyio.to_thread.run_sync(call)
    except grpc.RpcError as exc:
        raise ToolError(f"{exc.code().name}: {exc.details()}") from None


def create_server(client: RetrieverClient, *, log_level: str = "WARNING") -> MCPServer:
    """The MCP server whose tools call the service through ``client``."""
    server: MCPServer = MCPServer(
        "retriever", instructions=INSTRUCTIONS,
        log_level=log_level.upper(),  # type: ignore[arg-type]
    )

    @server.tool(annotations=_READ)
    async def search(
        namespace: NamespaceArg,
        query: Annotated[str, Field(description=(
            "What to look for: a natural-language question, or code identifiers and "
            "error messages (lexical matching catches exact names)."))],
        top_k: Annotated[int, Field(ge=1, le=10_000, description=(
            "How many hits to return, from 1 to the service's max_top_k (100 by default)."
            ))] = 10,
        mode: Annotated[Literal["dense", "lexical", "hybrid"] | None, Field(description=(
            "dense: meaning (embeddings); lexical: exact terms (BM25 over code-aware "
            "tokens); hybrid: both fused. Omit for the service's default (hybrid)."))] = None,
        path_prefix: Annotated[str, Field(description=(
            "Only files whose path starts with this, e.g. 'src/api/'."))] = "",
        languages: Annotated[list[str] | None, Field(description=(
            "Only these languages, e.g. ['python', 'markdown']."))] = None,
        kinds: Annotated[list[str] | None, Field(description=(
            "Only chunks of these kinds, e.g. ['function', 'class', 'section']."))] = None,
        doc_ids: Annotated[list[str] | None, Field(description=(
            "Only these documents (doc_id values from earlier hits)."))] = None,
        rerank: Annotated[bool, Field(description=(
            "Re-rank with the service's cross-encoder (slower, more precise; an error if "
            "the service has none)."))] = False,
        collapse: Annotated[bool, Field(description=(
            "One hit per document (its best chunk): use to find which files matter."
            ))] = False,
        include_text: Annotated[bool, Field(description=(
            "Return each chunk's text; false returns locations only."))] = True,
    ) -> SearchResult:
        """Search a namespace for the chunks of code or text most relevant to a query.

        Returns ranked hits, each with path, start_line-end_line, text, score, chunk_id,
        doc_id, revision and staleness_seconds, plus the lineage of the search (request_id,
        embedder, index generation). Filters combine (all must hold)."""
        try:
            req = search_request(namespace, query, top_k=top_k, mode=mode,
                                 path_prefix=path_prefix, languages=languages or (),
                                 kinds=kinds or (), doc_ids=doc_ids or (), rerank=rerank,
                                 collapse=collapse)
        except ValueError as exc:
            raise ToolError(f"INVALID_ARGUMENT: {exc}") from None
        resp = await _rpc(lambda: client.stub.Search(req, timeout=client.timeout))
        hits = []
        for h in resp.hits:
            rec = hit_record(h, resp.lineage)
            rec["text"] = h.chunk.text if include_text else None
            hits.append(SearchHit.model_validate(rec))
        return SearchResult(hits=hits, lineage=Lineage(**lineage_record(resp.lineage)),
                            took_ms=round(seconds(resp.timings.total) * 1e3, 3))

    @server.tool(annotations=_READ)
    async def get_chunk(
        namespace: NamespaceArg,
        chunk_id: Annotated[str, Field(description="chunk_id from a search hit.")],
    ) -> ChunkResult:
        """Look up one chunk by id: its current text, location, revision and staleness.
        NOT_FOUND when no current version of its document holds it any more (the file
        changed): search again."""
        resp = await _rpc(lambda: client.get_chunk(namespace, chunk_id))
        return ChunkResult(
            **chunk_record(resp.chunk), text=resp.chunk.text,
            staleness_seconds=seconds(resp.staleness) if resp.HasField("staleness") else None,
            metadata=dict(resp.chunk.metadata))

    @server.tool(annotations=_READ)
    async def get_document(
        namespace: NamespaceArg,
        doc_id: Annotated[str, Field(description="doc_id from a search hit.")],
        start_line: Annotated[int, Field(ge=1, description=(
            "First line to return, 1-based (e.g. a hit's start_line minus some context)."
            ))] = 1,
        end_line: Annotated[int | None, Field(ge=1, description=(
            "Last line to return, inclusive; omit for the end of the file."))] = None,
        max_chars: Annotated[int, Field(ge=1, le=1_000_000, description=(
            "Cut the returned content at this many characters (truncated=true)."
            ))] = 20_000,
    ) -> DocumentResult:
        """Read the indexed version of a document (a whole file or a line range of it),
        with its revision and chunk ids."""
        if end_line is not None and end_line < start_line:
            raise ToolError(f"INVALID_ARGUMENT: end_line {end_line} is before start_line "
                            f"{start_line}")
        resp = await _rpc(lambda: client.get_document(namespace, doc_id))
        doc = resp.document
        lines = doc.content.splitlines(keepends=True)
        if start_line > max(len(lines), 1):
            raise ToolError(f"INVALID_ARGUMENT: start_line {start_line} is past the end of "
                            f"{doc.path or doc.doc_id} ({len(lines)} lines)")
        last = len(lines) if end_line is None else min(end_line, len(lines))
        content = "".join(lines[start_line - 1 : last])
        truncated = len(content) > max_chars
        return DocumentResult(
            doc_id=doc.doc_id, path=doc.path, revision=doc.revision, version=resp.version,
            language=resp.language, content_hash=resp.content_hash,
            indexed_at=timestamp_iso(resp, "indexed_at"),
            source_updated_at=timestamp_iso(doc, "source_updated_at"),
            metadata=dict(doc.metadata), total_lines=len(lines), start_line=start_line,
            end_line=max(last, start_line - 1), truncated=truncated,
            content=content[:max_chars], chunk_ids=list(resp.chunk_ids))

    @server.tool(annotations=_READ)
    async def list_namespaces() -> NamespaceList:
        """List the namespaces (separate indexes) of the service with their document and
        chunk counts, embedder and backend. Start here to learn what can be searched."""
        def all_pages() -> list[Any]:
            out: list[Any] = []
            token = ""
            while True:
                page = client.list_namespaces(page_size=1000, page_token=token)
                out.extend(page.namespaces)
                token = page.next_page_token
                if not token:
                    return out

        namespaces = await _rpc(all_pages)
        return NamespaceList(namespaces=[NamespaceInfo(
            name=n.name, document_count=n.document_count, chunk_count=n.chunk_count,
            backend=n.backend, embedder=n.embedder, embedder_revision=n.embedder_revision,
            index_generation=n.index_generation, index_version=n.index_version)
            for n in namespaces])

    @server.tool(annotations=_READ)
    async def index_status(namespace: NamespaceArg) -> IndexStatus:
        """Counts, embedder, backend, device and last index time of one namespace: check
        how complete and fresh an index is."""
        r = await _rpc(lambda: client.status(namespace))
        return IndexStatus(
            namespace=r.namespace, document_count=r.document_count, chunk_count=r.chunk_count,
            vector_count=r.vector_count, content_bytes=r.content_bytes, embedder=r.embedder,
            embedder_revision=r.embedder_revision, backend=r.backend, device=r.device,
            precision=r.precision, dimension=r.dimension, metric=r.metric,
            index_generation=r.index_generation, index_version=r.index_version,
            last_indexed_at=timestamp_iso(r, "last_indexed_at"), chunker=r.chunker,
            chunk_tokens=r.chunk_tokens, overlap_tokens=r.overlap_tokens)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=True, open_world_hint=False))
    async def sync(
        namespace: NamespaceArg,
        wait: Annotated[bool, Field(description=(
            "false: start the sync and return at once (state RUNNING). true: return when "
            "it has finished, with its counts (up to wait_timeout_s)."))] = False,
        wait_timeout_s: Annotated[float, Field(gt=0, le=3600, description=(
            "With wait: give up waiting after this many seconds; what was applied stays "
            "applied and the next sync finishes the job."))] = 300,
    ) -> SyncResult:
        """Bring a namespace up to date with the git repository it is bound to: the service
        pulls it and re-indexes only what changed since the last synced commit. Use it when
        index_status or staleness_seconds says the index lags the code. NOT_FOUND when the
        namespace has no configured source (an operator binds one with `retriever sync`);
        FAILED_PRECONDITION when its repository can no longer be read; ABORTED while another
        sync of it runs."""
        try:
            r = await anyio.to_thread.run_sync(lambda: client.sync_source(
                namespace, wait=wait, timeout=wait_timeout_s if wait else client.timeout))
        except grpc.RpcError as exc:
            said = ToolError(f"{exc.code().name}: {exc.details()}")
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise said from None
            # Unbound, the service asks for a repository to bind: this tool has none to give.
            status = await _rpc(lambda: client.status(namespace))  # the namespace's NOT_FOUND
            if status.HasField("source"):  # bound: what went wrong is the service's to say
                raise said from None
            raise ToolError(
                f"NOT_FOUND: namespace {namespace!r} is bound to no git repository, so there "
                f"is nothing to sync; an operator binds one with `retriever sync {namespace} "
                "--repo <path or URL>`") from None
        return SyncResult(
            namespace=namespace, sync_id=r.sync_id,
            state=pb.SyncState.Name(r.state).removeprefix("SYNC_STATE_"), commit=r.commit,
            previous_commit=r.previous_commit, full_reconcile=r.full_reconcile,
            files_added=r.files_added, files_modified=r.files_modified,
            files_deleted=r.files_deleted, files_renamed=r.files_renamed,
            documents_upserted=r.documents_upserted, documents_deleted=r.documents_deleted,
            documents_unchanged=r.documents_unchanged, chunks_embedded=r.chunks_embedded,
            chunks_reused=r.chunks_reused, skipped=dict(r.skipped),
            seconds=round(seconds(r.duration), 3), error=r.error)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=True, open_world_hint=False))
    async def feedback(
        namespace: NamespaceArg,
        request_id: Annotated[str, Field(description="lineage.request_id of the search.")],
        relevant: Annotated[list[str] | None, Field(description=(
            "chunk_ids of hits that were useful for the task."))] = None,
        not_relevant: Annotated[list[str] | None, Field(description=(
            "chunk_ids of hits that were returned but did not help."))] = None,
    ) -> FeedbackResult:
        """Report which chunks of a search were used, so the service can track its
        precision. Call once per search whose results you acted on."""
        judged = [pb.ChunkFeedback(chunk_id=c, relevant=True) for c in relevant or ()]
        judged += [pb.ChunkFeedback(chunk_id=c, relevant=False) for c in not_relevant or ()]
        if not judged:
            raise ToolError("INVALID_ARGUMENT: give at least one chunk id in relevant or "
                            "not_relevant")
        await _rpc(lambda: client.record_feedback(namespace, request_id, judged))
        return FeedbackResult(recorded=len(judged))

    return server


def serve(client: RetrieverClient, *, transport: Transport = "stdio", host: str = "127.0.0.1",
          port: int = 8765, log_level: str = "WARNING") -> None:
    """Run the MCP server until its transport closes (stdio) or SIGINT/SIGTERM (HTTP)."""
    server = create_server(client, log_level=log_level)
    if transport == "stdio":
        server.run("stdio")
    elif transport == "http":
        server.run("streamable-http", host=host, port=port)
    else:
        raise ValueError(f"transport must be stdio or http, got {transport!r}")
