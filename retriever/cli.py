"""The `retriever` command: serve, index, sync, search, status, namespaces."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

# gRPC's fork handlers are for children that use gRPC; none of this process's do. With them
# on, each fork a library makes while the server is up logs "Other threads are currently
# calling into gRPC, skipping fork() handlers": 47 lines while a first start built the
# OpenVINO int8 model. Read by gRPC's core when it starts, so set before the import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from retriever._retry import RetryPolicy, retry_delay
from retriever.config import Settings

if TYPE_CHECKING:
    from retriever.client import RetrieverClient

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Retrieval as a service: index files, search them, serve the API.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

AddressOpt = Annotated[str | None, typer.Option(
    "--address", "-a", help="host:port of the server [default: from RETRIEVER_GRPC_* settings]")]
NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="namespace to use")]


def _address(address: str | None) -> str:
    if address:
        return address
    s = Settings()
    return f"{s.grpc_host}:{s.grpc_port}"


def _client(address: str | None, *, retry: bool = False,
            wait_loading: bool = True) -> RetrieverClient:
    """A client for ``address``, with the token of RETRIEVER_AUTH_TOKEN when set;
    ``retry``: retry UNAVAILABLE and RESOURCE_EXHAUSTED with RetryInfo (long-lived users
    such as the MCP server; a one-shot command shows the error instead); ``wait_loading``:
    wait (up to LOAD_WAIT_S) for a server still loading before returning."""
    from retriever.client import NO_RETRY, RetrieverClient, RetryPolicy

    token = Settings().auth_token
    client = RetrieverClient(_address(address),
                             token=token.get_secret_value() if token is not None else None,
                             retry=RetryPolicy() if retry else NO_RETRY)
    if not wait_loading:
        return client
    try:
        _await_loading(client)
    except BaseException:
        client.close()
        raise
    return client


# A batch the server sheds (RESOURCE_EXHAUSTED with RetryInfo: it is busy, and committed
# nothing of it) is sent again after the delay it asks for, growing, for up to ~10 minutes:
# an index is batch work that waits its turn rather than fail on a busy server.
INDEX_RETRY = RetryPolicy(max_attempts=80, initial_backoff=0.5, max_backoff=10.0)


def _upsert_batch(client: RetrieverClient, namespace: str,
                  batch: list[Any]) -> Any:
    """One UpsertDocuments call of one message; retried while the server sheds it."""
    from grpc_status import rpc_status

    from retriever.v1 import retriever_pb2 as pb

    attempt = 0
    while True:
        try:
            return client.upsert_stream(iter([
                pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)]))
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise  # (UNAVAILABLE: a server down fails at once, as other commands do)
            attempt += 1
            delay = retry_delay(INDEX_RETRY, exc.code(), rpc_status.from_call(exc), attempt,
                                None)
            if delay is None:
                raise
            if attempt == 1:
                err.print(f"the server is busy ({exc.details()}); retrying until it "
                          "takes the batch")
            time.sleep(delay)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    """Text for a terminal: control characters (an escape sequence in an indexed file could
    recolour or rewrite the screen) shown as escapes, newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _visible_name(name: str) -> str:
    """A path or id on one terminal line: every control character (newlines too) shown as an
    escape."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", name)


# How `retriever serve` logs (load-tests/loadgen.py reads the level from it).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOAD_WAIT_S = 600.0  # a first start builds and calibrates the int8 model: minutes


def _await_loading(client: RetrieverClient, timeout: float = LOAD_WAIT_S) -> None:
    """While the server answers but is not serving yet (it binds its port first, then loads
    its models and indexes), wait for it, saying so once; a server that does not answer
    returns at once, and the command's own call then fails with its status. A command run
    right after ``retriever serve`` (a script, a CI job) otherwise failed with UNAVAILABLE."""
    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            status = client.health(timeout=5)
        except grpc.RpcError:
            return
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        if time.monotonic() > deadline:
            return  # the call that follows says what the server answers
        if not said:
            err.print(f"waiting for the server at {client.address} to load its models and "
                      "indexes ...")
            said = True
        time.sleep(0.25)


def _fail(exc: grpc.RpcError, as_json: bool = False) -> typer.Exit:
    """The service refused or could not be reached: the status on stderr (and, with --json,
    as {"error": {"code", "message"}} on stdout, so a script reads one JSON answer either
    way); exit code 2."""
    err.print(f"[red]error[/red] {exc.code().name}: {escape(exc.details() or '')}")
    if as_json:
        print(json.dumps({"error": {"code": exc.code().name, "message": exc.details() or ""}}),
              flush=True)
    return typer.Exit(2)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="gRPC port [default: 50051]")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="metrics port [default: 9464]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory [default: ./data]")] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Serve retriever.v1.Retriever until SIGTERM/SIGINT, then drain and exit 0."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    overrides: dict[str, Any] = {k: v for k, v in {
        "grpc_port": port, "metrics_port": metrics_port, "data_dir": data_dir}.items()
        if v is not None}
    from pydantic import ValidationError

    from retriever.server.app import run

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # one line per bad setting, not a traceback
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"]) or "settings"
            err.print(f"retriever serve: {where}: {e['msg']} (RETRIEVER_{where.upper()}, "
                      f"got {e.get('input')!r})", markup=False, highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(run(settings))


@app.command()
def index(
    path: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="directory")],
    namespace: NamespaceOpt,
    address: AddressOpt = None,
    batch_size: Annotated[int, typer.Option(help="documents per stream message")] = 32,
    max_bytes: Annotated[int, typer.Option(help="skip larger files")] = 1024 * 1024,
    prune: Annotated[bool, typer.Option(
        help="also delete documents of the namespace that are no longer in the directory; "
        "a new file with the exact text of one of them is that document, moved")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Index a directory: every text file git would track (respecting .gitignore)."""
    from retriever.domain import moved_candidates, sha256
    from retriever.ingest.walk import WalkReport, list_files, read_sources
    from retriever.v1 import retriever_pb2 as pb
    from retriever.validation import MAX_SOURCE_TIME, MIN_SOURCE_TIME

    root = path.resolve()
    listed = list_files(root)[0]
    total = len(listed)
    report = WalkReport()
    moved = 0
    totals = pb.UpsertDocumentsResponse(namespace=namespace)
    sent: set[str] = set()
    with _client(address) as client, Progress(
        TextColumn("[bold]indexing[/bold]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("files · {task.fields[chunks]} chunks, {task.fields[embedded]} embedded"),
        TimeElapsedColumn(), console=err, disable=as_json,
    ) as progress:
        t0 = time.perf_counter()  # after any wait for a loading server
        task = progress.add_task("index", total=total, chunks=0, embedded=0)
        skipped_seen = 0

        def acknowledged(docs: int) -> None:
            """Advance by documents the server committed, and files skipped meanwhile."""
            nonlocal skipped_seen
            skipped = sum(len(v) for v in report.skipped.values())
            progress.update(task, advance=docs + skipped - skipped_seen,
                            chunks=totals.chunks_total, embedded=totals.chunks_embedded)
            skipped_seen = skipped

        def send(batch: list[pb.Document]) -> None:
            # One call per batch: its response is the server's word that these documents
            # are committed, so the bar moves only as the server gets through them.
            while batch:
                try:
                    resp = _upsert_batch(client, namespace, batch)
                except grpc.RpcError as exc:
                    # A file past the server's own limit (--max-bytes above it): skipped
                    # and listed, and the rest of its batch sent (the refused message
                    # committed nothing).
                    big = (_TOO_LARGE.match(exc.details() or "")
                           if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else None)
                    if big is None or int(big.group(1)) >= len(batch):
                        raise
                    report.skip("over the server's max_document_bytes",
                                batch.pop(int(big.group(1))).doc_id)
                    continue
                _accumulate(totals, resp)
                acknowledged(resp.documents_received)
                return

        try:
            # Created up front so that even an empty directory leaves a namespace that
            # status and search can answer for.
            _ensure_namespace(client, namespace)
            known = _content_hashes(client, namespace) if prune else {}
            gone = moved_candidates(known, set(listed))
            batch: list[pb.Document] = []
            for f in read_sources(root, max_bytes, report):
                sent.add(f.rel_path)
                doc = pb.Document(doc_id=f.rel_path, path=f.rel_path, content=f.content,
                                  revision=f.revision)
                if f.rel_path not in known and (ids := gone.get(sha256(f.content))):
                    doc.moved_from = ids.pop(0)  # a move: its history follows the file
                    moved += 1
                if MIN_SOURCE_TIME <= f.modified_at < MAX_SOURCE_TIME:  # else: unknown
                    doc.source_updated_at.FromDatetime(f.modified_at)
                batch.append(doc)
                if len(batch) >= batch_size:
                    send(batch)
                    batch = []
            if batch:
                send(batch)
            acknowledged(0)
            pruned = _prune(client, namespace, sent, _unknown(report)) if prune else 0
        except grpc.RpcError as exc:
            raise _fail(exc, as_json) from None
        except KeyboardInterrupt:
            progress.stop()
            err.print(f"interrupted: {totals.documents_received} documents acknowledged "
                      "(the batch in flight may have been committed too); run it again to "
                      "finish: unchanged files are not re-embedded", markup=False,
                      highlight=False)
            raise typer.Exit(130) from None
    seconds = time.perf_counter() - t0
    summary = {
        "namespace": namespace, "docs": int(totals.documents_received),
        "created": int(totals.documents_created), "updated": int(totals.documents_updated),
        "unchanged": int(totals.documents_unchanged), "chunks": int(totals.chunks_total),
        "chunks_embedded": int(totals.chunks_embedded),
        "chunks_reused": int(totals.chunks_reused), "chunks_deleted": int(totals.chunks_deleted),
        "skipped": {k: len(v) for k, v in report.skipped.items()},
        "pruned": pruned, "moved": moved, "bytes": report.bytes,
        "seconds": round(seconds, 3),
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(
        f"indexed {summary['docs']} docs into [bold]{namespace}[/bold] "
        f"({summary['created']} new, {summary['updated']} changed, "
        f"{summary['unchanged']} unchanged): {summary['chunks']} chunks, "
        f"{summary['chunks_embedded']} embedded, {summary['chunks_reused']} reused, "
        f"{summary['chunks_deleted']} removed in {seconds:.1f}s")
    if prune:
        out.print(f"pruned {pruned} documents no longer in {escape(str(path))}"
                  + (f"; {moved} moved to a new path" if moved else ""))
    for reason, paths in report.skipped.items():
        out.print(f"skipped {len(paths)} ({reason}): "
                  f"{escape(', '.join(_visible_name(p) for p in paths[:5]))}"
                  + (" ..." if len(paths) > 5 else ""))


_COUNTS = ("documents_received", "documents_created", "documents_updated",
           "documents_unchanged", "chunks_total", "chunks_embedded", "chunks_reused",
           "chunks_deleted")


def _accumulate(totals: Any, resp: Any) -> None:
    """Add the counts of one UpsertDocuments response to ``totals``."""
    for name in _COUNTS:
        setattr(totals, name, getattr(totals, name) + getattr(resp, name))
    totals.index_version = max(totals.index_version, resp.index_version)


def _ensure_namespace(client: RetrieverClient, namespace: str) -> None:
    try:
        client.create_namespace(namespace)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def _content_hashes(client: RetrieverClient, namespace: str) -> dict[str, str]:
    """The namespace's documents: id -> content hash."""
    known: dict[str, str] = {}
    token = ""
    while True:
        page = client.list_documents(namespace, page_size=1000, page_token=token)
        known.update((d.doc_id, d.content_hash) for d in page.documents)
        if not (token := page.next_page_token):
            return known


# The server's refusal of a document over its max_document_bytes (retriever.validation).
_TOO_LARGE = re.compile(r"documents\[(\d+)\]\.content is \d+ bytes; the limit is")


def _unknown(report: Any) -> tuple[set[str], tuple[str, ...]]:
    """Files that exist but could not be read, and directories that could not be listed:
    their documents are not gone, so --prune must keep them."""
    return (set(report.skipped.get("unreadable", ())),
            tuple(report.skipped.get("unreadable directory", ())))


def _prune(client: RetrieverClient, namespace: str, keep: set[str],
           unknown: tuple[set[str], tuple[str, ...]] = (set(), ())) -> int:
    """Delete the namespace's documents whose ids are not in ``keep`` (nor in ``unknown``:
    unreadable files, and anything under an unreadable directory)."""
    files, dirs = unknown
    keep = keep | files
    try:
        client.get_namespace(namespace)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    gone = [d for d in client.document_ids(namespace)
            if d not in keep and not d.startswith(dirs)]
    for i in range(0, len(gone), 256):
        client.delete(namespace, gone[i : i + 256])
    return len(gone)


@app.command()
def sync(
    namespace: Annotated[str, typer.Argument(help="namespace to sync into")],
    repo: Annotated[str, typer.Option(
        help="git repository: a local path (under the server's RETRIEVER_SYNC_ROOTS) or a "
             "URL (under RETRIEVER_SYNC_URL_PREFIXES) [default: the namespace's bound source]")
    ] = "",
    ref: Annotated[str, typer.Option(help="branch, tag or commit [default: HEAD]")] = "",
    include: Annotated[list[str] | None, typer.Option(
        help="only files matching this gitignore-style glob (repeatable)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="leave out files matching this glob (repeatable)")] = None,
    max_file_bytes: Annotated[int, typer.Option(
        help="skip larger files [default: the server's max_document_bytes]")] = 0,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="block until the sync has finished")] = False,
    address: AddressOpt = None,
) -> None:
    """Sync a namespace with a git repository: the server fetches it and indexes what changed
    since the last synced commit. Prints a JSON summary; exits 1 when the sync fails."""
    from retriever.freshness.git import is_url

    location = repo
    if location and not is_url(location):
        location = str(Path(location).absolute())  # the server wants absolute paths
    with _client(address) as client:
        try:
            call = functools.partial(client.sync_source, namespace, location, ref,
                                     include or (), exclude or (), max_file_bytes, wait=wait)
            resp = _with_progress(client, namespace, call) if wait else call()
        except grpc.RpcError as exc:
            failed = {"namespace": namespace, "state": "FAILED", "code": exc.code().name,
                      "error": exc.details()}
            out.print_json(json.dumps(failed))
            refused = exc.code() in _REFUSED
            err.print(f"[red]sync {'refused' if refused else 'failed'}[/red] "
                      f"{exc.code().name}: {escape(exc.details() or '')}", highlight=False)
            # Refused before it started: a usage error (2); else the sync failed (1).
            raise typer.Exit(2 if refused else 1) from None
    out.print_json(json.dumps(_sync_summary(namespace, resp)))
    from retriever.v1 import retriever_pb2 as pb

    if resp.state == pb.SYNC_STATE_FAILED:  # (a failed sync is normally an error status)
        raise typer.Exit(1)


# Statuses SyncSource answers only before a sync starts (those of a sync that ran and
# failed, e.g. NOT_FOUND for a ref that went, UNAVAILABLE for a fetch, can be either).
_REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
                      grpc.StatusCode.UNAUTHENTICATED})


def _with_progress(client: RetrieverClient, namespace: str, call: Callable[[], Any]) -> Any:
    """Run the blocking ``call`` (a SyncSource with wait); on a terminal, show the running
    sync's counts (GetIndexStatus) on stderr meanwhile."""
    if not err.is_terminal:
        return call()
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import SpinnerColumn

    with ThreadPoolExecutor(1) as pool, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=err, transient=True) as bar:
        task = bar.add_task(f"syncing {namespace}", total=None)
        fut = pool.submit(call)
        while True:
            try:
                return fut.result(timeout=0.5)
            except TimeoutError:
                pass
            try:
                run = client.status(namespace).running_sync
            except grpc.RpcError:
                continue
            if run.sync_id:
                files = run.files_added + run.files_modified + run.files_deleted
                bar.update(task, description=(
                    f"syncing {namespace} to {run.commit[:12] or '...'}: {files} files, "
                    f"{run.chunks_embedded} chunks embedded, {run.chunks_reused} reused"))


def _sync_summary(namespace: str, resp: Any) -> dict[str, Any]:
    from retriever.v1 import retriever_pb2 as pb

    return {
        "namespace": namespace, "sync_id": resp.sync_id,
        "state": pb.SyncState.Name(resp.state).removeprefix("SYNC_STATE_"),
        "commit": resp.commit, "previous_commit": resp.previous_commit,
        "full_reconcile": resp.full_reconcile,
        "files": {"added": resp.files_added, "modified": resp.files_modified,
                  "deleted": resp.files_deleted, "renamed": resp.files_renamed},
        "documents_upserted": resp.documents_upserted,
        "documents_deleted": resp.documents_deleted,
        "documents_unchanged": resp.documents_unchanged,
        "chunks_embedded": resp.chunks_embedded, "chunks_reused": resp.chunks_reused,
        "skipped": dict(sorted(resp.skipped.items())),
        "seconds": round(resp.duration.ToNanoseconds() / 1e9, 3), "error": resp.error,
    }


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for")],
    namespace: NamespaceOpt,
    top_k: Annotated[int, typer.Option("--top-k", "-k", max=2**31 - 1,
                                       help="hits to return")] = 10,
    path_prefix: Annotated[str, typer.Option(help="only paths starting with this")] = "",
    address: AddressOpt = None,
    show_text: Annotated[bool, typer.Option("--text", help="print each chunk's text")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
) -> None:
    """Ranked hits: path:lines, score, chunk id."""
    from retriever.v1 import retriever_pb2 as pb

    flt = pb.SearchFilter(path_prefix=path_prefix) if path_prefix else None
    with _client(address) as client:
        try:
            resp = client.search(namespace, query, top_k=top_k, filter=flt)
        except grpc.RpcError as exc:
            raise _fail(exc, as_json) from None
    if as_json:
        out.print_json(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True)))
        return
    if not resp.hits:
        out.print("no hits")
    for h in resp.hits:
        c = h.chunk
        out.print(f"{h.rank:>3}. [bold]{escape(_visible_name(c.path))}:{c.start_line}-"
                  f"{c.end_line}[/bold]  "
                  f"score {h.score:.4f}  chunk {c.chunk_id}", highlight=False)
        if show_text:
            out.print(_visible(c.text.rstrip()), markup=False, highlight=False)
            out.print()
    lin = resp.lineage
    out.print(f"[dim]request {lin.request_id} · {lin.embedder}@{lin.embedder_revision} · "
              f"{lin.backend} gen {lin.index_generation} v{lin.index_version} · "
              f"{resp.timings.total.ToMilliseconds()} ms[/dim]")


@app.command()
def status(namespace: NamespaceOpt, address: AddressOpt = None) -> None:
    """Counts, models, backend and device of a namespace."""
    with _client(address) as client:
        try:
            resp = client.status(namespace)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    out.print_json(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True)))


@app.command()
def reindex(namespace: NamespaceOpt,
            backend: Annotated[str, typer.Option(
                help="backend of the new generation (faiss, milvus, chroma); default: the "
                     "namespace's own")] = "",
            address: AddressOpt = None) -> None:
    """Rebuild a namespace's index from the catalog into a new generation (on another
    backend if given) while the old one keeps serving; then swap and drop the old one."""
    from retriever.v1 import retriever_pb2 as pb

    with _client(address) as client:
        try:
            resp = client.stub.ReindexNamespace(
                pb.ReindexNamespaceRequest(name=namespace, backend=backend), timeout=None)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    out.print_json(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True)))


@app.command()
def namespaces(address: AddressOpt = None) -> None:
    """List namespaces with their counts."""
    with _client(address) as client:
        token = ""
        while True:
            try:
                page = client.list_namespaces(page_token=token)
            except grpc.RpcError as exc:
                raise _fail(exc) from None
            for n in page.namespaces:
                out.print(f"{n.name}\t{n.document_count} docs\t{n.chunk_count} chunks\t"
                          f"{n.backend}\t{n.embedder}")
            token = page.next_page_token
            if not token:
                break


@app.command("mcp")
def mcp_server(
    address: AddressOpt = None,
    transport: Annotated[Literal["stdio", "http"], typer.Option(
        help="stdio (the agent starts this command) or http (streamable HTTP at "
             "http://HOST:PORT/mcp)")] = "stdio",
    host: Annotated[str, typer.Option(help="http: interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="http: port")] = 8765,
    log_level: Annotated[str, typer.Option(help="logging level (to stderr)")] = "WARNING",
) -> None:
    """Serve search to agents over MCP: tools search, get_chunk, get_document,
    list_namespaces, index_status, sync and feedback, each a call to the server at
    --address (with RETRIEVER_AUTH_TOKEN when set). Needs the mcp extra."""
    from retriever.integrations.mcp_server import serve as serve_mcp

    # An MCP host expects `initialize` answered at once: a server still loading answers
    # each tool call UNAVAILABLE ("loading"), which the tool reports, instead.
    with _client(address, retry=True, wait_loading=False) as client:
        serve_mcp(client, transport=transport, host=host, port=port, log_level=log_level)


DataDirOpt = Annotated[Path | None, typer.Option(
    help="data directory [default: RETRIEVER_DATA_DIR, else ./data]")]


def _existing_data_dir(data_dir: Path | None) -> Path:
    """--data-dir (else the settings'), which must be a directory: a typo is an error, not
    a "healthy" verdict on nothing (check) or a new empty directory (repair)."""
    path = Path(data_dir or Settings().data_dir)
    if not path.is_dir():
        err.print(f"error: data directory {path} "
                  + ("is not a directory" if path.exists() else "does not exist"),
                  markup=False, highlight=False)
        raise typer.Exit(2)
    return path


@app.command()
def check(data_dir: DataDirOpt = None) -> None:
    """Check the catalog (SQLite integrity_check) and every index's files, offline; say
    what is damaged and what can be recovered. Exits 0 when healthy, 1 when not."""
    from retriever.repair import check as run_check
    from retriever.repair import render_check

    report = run_check(_existing_data_dir(data_dir))
    for line in render_check(report):
        out.print(line, markup=False, highlight=False)
    raise typer.Exit(0 if report.healthy else 1)


@app.command()
def repair(data_dir: DataDirOpt = None) -> None:
    """Rebuild a damaged catalog from every row that can still be read (with the server
    stopped). Whole documents only: those that lost chunks are dropped and listed. The
    damaged files are kept under <data-dir>/quarantine/."""
    from retriever.errors import RetrieverError
    from retriever.repair import RepairError, render_repair
    from retriever.repair import repair as run_repair

    try:
        report = run_repair(_existing_data_dir(data_dir))
    except (RepairError, RetrieverError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    for line in render_repair(report):
        out.print(line, markup=False, highlight=False)


@app.command("eval")
def evaluate(
    namespace: NamespaceOpt,
    beir: Annotated[Path | None, typer.Option(
        file_okay=False, exists=True, help="a BEIR dataset directory")] = None,
    split: Annotated[str, typer.Option(help="BEIR qrels split")] = "test",
    git: Annotated[Path | None, typer.Option(
        file_okay=False, exists=True, help="a git repository: queries from its history")] = None,
    commits: Annotated[int, typer.Option(help="query commits to take (--git)")] = 100,
    rev_range: Annotated[str, typer.Option(help="revision or range to take them from")] = "HEAD",
    path_filter: Annotated[list[str] | None, typer.Option(
        "--path", help="only files under this prefix (repeatable; --git)")] = None,
    ext: Annotated[str, typer.Option(
        help="source extensions, comma-separated, e.g. py,go [default: common languages]")] = "",
    index_first: Annotated[bool, typer.Option(
        "--index/--no-index", help="index the corpus into the namespace first")] = True,
    prune: Annotated[bool, typer.Option(
        help="delete the namespace's documents that are not in the corpus")] = False,
    modes: Annotated[str | None, typer.Option(
        help="search modes, comma-separated [default: dense,lexical,hybrid; with "
             "--golden-set: the server's default mode]")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", max=2**31 - 1,
                                       help="hits per search")] = 100,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="also write the results as JSON to this file ('-': stdout)")] = None,
    golden_set: Annotated[str | None, typer.Option(
        "--golden-set", help="a golden set stored in the namespace: run it server-side "
                             "(Evaluate) instead of a client-side set")] = None,
    version: Annotated[int, typer.Option(
        help="version of the golden set (--golden-set) [default: the latest]")] = 0,
    cutoffs: Annotated[str, typer.Option(
        help="k values of the metrics, comma-separated (--golden-set)")] = "1,5,10",
    rerank: Annotated[bool, typer.Option(
        help="re-rank with the server's cross-encoder (--golden-set)")] = False,
    address: AddressOpt = None,
) -> None:
    """Retrieval quality through the real Search: nDCG, precision, recall, MRR, latency.

    With --beir or --git the set is built here and its corpus indexed first; with
    --golden-set a set stored in the namespace (`retriever golden-set register`) is run by
    the server (Evaluate), which keeps the result and exports it as metrics."""
    from collections.abc import Sequence

    from rich import box
    from rich.table import Table

    from retriever.errors import InvalidArgument
    from retriever.slo.evaluation import (
        DEFAULT_SOURCE_EXTENSIONS,
        build_git_history_set,
        load_beir,
    )
    from retriever.slo.runner import MODES, client_search, evaluate_modes, index_corpus

    if sum(x is not None for x in (beir, git, golden_set)) != 1:
        raise typer.BadParameter("give exactly one of --beir DIR, --git REPO and "
                                 "--golden-set NAME")
    if golden_set is not None:
        _evaluate_golden_set(namespace, golden_set, version, cutoffs, modes, rerank,
                             json_path, address)
        return
    mode_list = [m.strip().lower() for m in (modes or "dense,lexical,hybrid").split(",")
                 if m.strip()]
    if not mode_list or any(m not in MODES for m in mode_list):
        raise typer.BadParameter(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    try:
        if beir is not None:
            qs = load_beir(beir, split)
        else:
            assert git is not None
            exts = ({e if e.startswith(".") else f".{e}" for e in ext.split(",") if e.strip()}
                    or DEFAULT_SOURCE_EXTENSIONS)
            qs = build_git_history_set(git, commits=commits, rev_range=rev_range,
                                       paths=path_filter or (), extensions=exts)
    except InvalidArgument as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    ks = (1, 5, 10, 100)
    indexed: dict[str, int] | None = None
    with _client(address) as client:
        try:
            if index_first:
                with Progress(TextColumn("[bold]indexing[/bold]"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
                    task = bar.add_task("index", total=len(qs.corpus) if isinstance(
                        qs.corpus, Sequence) else None)
                    indexed = index_corpus(client, namespace, qs, prune=prune,
                                           on_batch=lambda n: bar.advance(task, n))
                if indexed["foreign"] and not prune:
                    err.print(f"warning: {namespace} holds {indexed['foreign']} documents "
                              "outside the corpus; they can be hits (--prune deletes them)",
                              markup=False, highlight=False)
            with Progress(TextColumn("[bold]searching[/bold] {task.description}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
                tasks = {m: bar.add_task(m, total=len(qs.qrels)) for m in mode_list}
                results = evaluate_modes(qs, client_search(client, namespace), mode_list,
                                         top_k=top_k, ks=ks,
                                         on_query=lambda m: bar.advance(tasks[m]))
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        except InvalidArgument as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
    scored = max((r.queries for r in results if r.available), default=0)
    counted = (f"{len(qs.queries)} queries" if scored == len(qs.queries) else
               f"{scored} of {len(qs.queries)} queries scored (the rest judge no document "
               "relevant)")
    table = Table(title=f"{qs.name} · {namespace} · {counted} · top_k {top_k}",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)  # fits 80 columns
    columns = ["nDCG@10", "P@1", "P@5", "P@10", "R@10", "R@100", "MRR"]
    for c in ["mode", *columns, "p50 ms", "p99 ms"]:
        table.add_column(c, justify="left" if c == "mode" else "right", no_wrap=True)
    for r in results:
        if r.available:
            table.add_row(r.mode, *(f"{r.metrics[c]:.3f}" for c in columns),
                          f"{r.latency_p50_s * 1e3:.1f}", f"{r.latency_p99_s * 1e3:.1f}")
        else:
            table.add_row(r.mode, *["—"] * (len(columns) + 2))
    shown = err if json_path is not None and str(json_path) == "-" else out
    shown.print(table)
    for r in results:
        if not r.available:
            shown.print(f"{r.mode}: unavailable: {r.reason}", markup=False, highlight=False)
    if json_path is not None:
        doc = {"set": {"name": qs.name, "queries": len(qs.queries), "metadata": qs.metadata},
               "namespace": namespace, "address": _address(address), "top_k": top_k,
               "ks": list(ks), "index": indexed, "modes": [r.to_dict() for r in results]}
        _write_json(json.dumps(doc, indent=2), json_path)
    if not any(r.available for r in results):
        raise typer.Exit(1)


def _evaluate_golden_set(namespace: str, name: str, version: int, cutoffs: str,
                         modes: str | None, rerank: bool, json_path: Path | None,
                         address: str | None) -> None:
    """`retriever eval --golden-set`: one Evaluate per mode (none: the server's default)."""
    from rich import box
    from rich.table import Table

    from retriever.client import pb
    from retriever.slo.runner import MODES

    try:
        ks = [int(k) for k in cutoffs.split(",") if k.strip()]
    except ValueError:
        raise typer.BadParameter("--cutoffs takes comma-separated integers, e.g. 1,5,10"
                                 ) from None
    mode_list = [m.strip().lower() for m in (modes or "").split(",") if m.strip()]
    if any(m not in MODES for m in mode_list):
        raise typer.BadParameter(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    runs = []
    with _client(address) as client:
        for mode in mode_list or [""]:
            request = pb.EvaluateRequest(
                namespace=namespace, golden_set=name, version=version, k=ks, rerank=rerank,
                mode=pb.SearchMode.Value(mode.upper()) if mode else pb.SEARCH_MODE_UNSPECIFIED)
            try:
                # An evaluation searches every query of the set: no short deadline.
                runs.append(client.stub.Evaluate(request, timeout=max(client.timeout or 0, 3600)))
            except grpc.RpcError as exc:
                raise _fail(exc) from None
    first = runs[0].evaluation
    ks_run = sorted({m.k for m in first.metrics if m.name != "mrr"})
    table = Table(title=f"{name} v{first.version} · {namespace} · {first.query_count} queries",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for c in ["mode", "metric", *(f"@{k}" for k in ks_run)]:
        table.add_column(c, justify="left" if c in ("mode", "metric") else "right",
                         no_wrap=True)
    for r in runs:
        e = r.evaluation
        mode = (pb.SearchMode.Name(e.mode).lower() + (" +rerank" if e.rerank else "")
                + (" (SLO run)" if e.slo else ""))
        values = {(m.name, m.k): m.value for m in e.metrics}
        for metric, label in (("precision", "P"), ("recall", "R"), ("ndcg", "nDCG")):
            table.add_row(mode, label, *(f"{values[(metric, k)]:.3f}" for k in ks_run))
            mode = ""
        mrr = next(m for m in e.metrics if m.name == "mrr")
        table.add_row("", "MRR", *(f"{mrr.value:.3f}" if k == mrr.k else "" for k in ks_run))
        table.add_row("", "seconds", f"{e.duration.ToTimedelta().total_seconds():.2f}",
                      *([""] * (len(ks_run) - 1)))
    (err if json_path is not None and str(json_path) == "-" else out).print(table)
    if json_path is not None:
        _write_json(json.dumps({"evaluations": [
            MessageToDict(r.evaluation, always_print_fields_with_no_presence=True)
            for r in runs]}, indent=2), json_path)


def _write_json(text: str, json_path: Path) -> None:
    """``text`` to stdout ('-') or to the file ``json_path``; a file that cannot be written
    is an error that names it (exit 2), not a traceback."""
    if str(json_path) == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        json_path.write_text(text + "\n")
    except OSError as exc:
        err.print(f"error: cannot write {json_path}: {exc.strerror}", markup=False,
                  highlight=False)
        raise typer.Exit(2) from None


golden_app = typer.Typer(no_args_is_help=True,
                         help="Golden query sets stored in a namespace (Evaluate runs them).")
app.add_typer(golden_app, name="golden-set")


@golden_app.command("register")
def golden_register(
    namespace: Annotated[str, typer.Argument(help="namespace")],
    name: Annotated[str, typer.Argument(help="name of the set (again: a new version)")],
    beir: Annotated[Path | None, typer.Option(
        file_okay=False, exists=True, help="a BEIR dataset directory: its queries and qrels "
                                           "(corpus ids are the namespace's doc ids)")] = None,
    split: Annotated[str, typer.Option(help="BEIR qrels split")] = "test",
    from_history: Annotated[int | None, typer.Option(
        "--from-history", help="build N queries from the history of the namespace's git "
                               "source (server-side)")] = None,
    path_filter: Annotated[list[str] | None, typer.Option(
        "--path", help="only files under this prefix (repeatable; --from-history)")] = None,
    address: AddressOpt = None,
) -> None:
    """Store a golden set in NAMESPACE under NAME: from a BEIR directory (read here), or
    built by the server from the namespace's git source history."""
    from retriever.client import pb
    from retriever.errors import InvalidArgument
    from retriever.slo.evaluation import load_beir

    if (beir is None) == (from_history is None):
        raise typer.BadParameter("give exactly one of --beir DIR and --from-history N")
    request = pb.RegisterGoldenSetRequest(namespace=namespace, name=name)
    if beir is not None:
        try:
            qs = load_beir(beir, split)
        except InvalidArgument as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        # Queries with no relevant document score nothing (and the server refuses them).
        request.queries.extend(pb.GoldenQuery(id=q.id, query=q.text, doc_grades=qs.qrels[q.id])
                               for q in qs.queries
                               if any(g > 0 for g in qs.qrels[q.id].values()))
    else:
        assert from_history is not None
        request.from_source_history.commits = from_history
        request.from_source_history.paths.extend(path_filter or [])
    with _client(address) as client:
        try:
            resp = client.stub.RegisterGoldenSet(request, timeout=max(client.timeout or 0, 600))
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    where = f" (corpus {resp.corpus_revision[:12]})" if resp.corpus_revision else ""
    out.print(f"{namespace}: golden set {resp.name} version {resp.version}, "
              f"{resp.query_count} queries from {resp.origin}{where}",
              markup=False, highlight=False)


def main() -> None:
    from pydantic_settings import SettingsError

    try:
        app()
    except SettingsError as exc:  # a setting that cannot be read at all: one line
        err.print(f"retriever: {exc}", markup=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
