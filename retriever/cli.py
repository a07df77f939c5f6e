"""The `retriever` command: serve, index, search, status, namespaces."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


def _client(address: str | None) -> RetrieverClient:
    """A client for ``address``, with the token of RETRIEVER_AUTH_TOKEN when set."""
    from retriever.client import RetrieverClient  # grpc stubs load only when needed

    token = Settings().auth_token
    return RetrieverClient(_address(address),
                           token=token.get_secret_value() if token is not None else None)


def _fail(exc: grpc.RpcError) -> typer.Exit:
    err.print(f"[red]error[/red] {exc.code().name}: {exc.details()}")
    return typer.Exit(2)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="gRPC port [default: 50051]")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="metrics port [default: 9464]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory [default: ./data]")] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Serve retriever.v1.Retriever until SIGTERM/SIGINT, then drain and exit 0."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {k: v for k, v in {
        "grpc_port": port, "metrics_port": metrics_port, "data_dir": data_dir}.items()
        if v is not None}
    from retriever.server.app import run

    raise typer.Exit(run(Settings(**overrides)))


@app.command()
def index(
    path: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="directory")],
    namespace: NamespaceOpt,
    address: AddressOpt = None,
    batch_size: Annotated[int, typer.Option(help="documents per stream message")] = 32,
    max_bytes: Annotated[int, typer.Option(help="skip larger files")] = 1024 * 1024,
    prune: Annotated[bool, typer.Option(
        help="also delete documents of the namespace that are no longer in the directory")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Index a directory: every text file git would track (respecting .gitignore)."""
    from retriever.ingest.walk import WalkReport, list_files, read_sources
    from retriever.v1 import retriever_pb2 as pb

    root = path.resolve()
    total = len(list_files(root)[0])
    report = WalkReport()
    t0 = time.perf_counter()
    with _client(address) as client, Progress(
        TextColumn("[bold]indexing[/bold]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("files"), TimeElapsedColumn(), console=err, disable=as_json,
    ) as progress:
        task = progress.add_task("index", total=total)

        sent: set[str] = set()

        def requests():  # noqa: ANN202
            batch: list[pb.Document] = []
            for f in read_sources(root, max_bytes, report):
                sent.add(f.rel_path)
                doc = pb.Document(doc_id=f.rel_path, path=f.rel_path, content=f.content,
                                  revision=f.revision)
                doc.source_updated_at.FromDatetime(f.modified_at)
                batch.append(doc)
                if len(batch) >= batch_size:
                    yield pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)
                    progress.advance(task, len(batch))
                    batch = []
                progress.update(task, total=total)
            if batch:
                yield pb.UpsertDocumentsRequest(namespace=namespace, documents=batch)
                progress.advance(task, len(batch))
            skipped = sum(len(v) for v in report.skipped.values())
            progress.advance(task, skipped)

        try:
            resp = client.upsert_stream(requests())
            pruned = _prune(client, namespace, sent) if prune else 0
        except grpc.RpcError as exc:
            raise _fail(exc) from None
    seconds = time.perf_counter() - t0
    summary = {
        "namespace": namespace, "docs": int(resp.documents_received),
        "created": int(resp.documents_created), "updated": int(resp.documents_updated),
        "unchanged": int(resp.documents_unchanged), "chunks": int(resp.chunks_total),
        "chunks_embedded": int(resp.chunks_embedded), "chunks_reused": int(resp.chunks_reused),
        "chunks_deleted": int(resp.chunks_deleted),
        "skipped": {k: len(v) for k, v in report.skipped.items()},
        "pruned": pruned, "bytes": report.bytes, "seconds": round(seconds, 3),
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
        out.print(f"pruned {pruned} documents no longer in {path}")
    for reason, paths in report.skipped.items():
        out.print(f"skipped {len(paths)} ({reason}): {', '.join(paths[:5])}"
                  + (" ..." if len(paths) > 5 else ""))


def _prune(client: RetrieverClient, namespace: str, keep: set[str]) -> int:
    """Delete the namespace's documents whose ids are not in ``keep``."""
    try:
        client.get_namespace(namespace)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    gone: list[str] = []
    token = ""
    while True:
        page = client.list_documents(namespace, page_size=1000, page_token=token)
        gone += [d.doc_id for d in page.documents if d.doc_id not in keep]
        token = page.next_page_token
        if not token:
            break
    for i in range(0, len(gone), 256):
        client.delete(namespace, gone[i : i + 256])
    return len(gone)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for")],
    namespace: NamespaceOpt,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="hits to return")] = 10,
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
            raise _fail(exc) from None
    if as_json:
        out.print_json(json.dumps(MessageToDict(resp)))
        return
    if not resp.hits:
        out.print("no hits")
    for h in resp.hits:
        c = h.chunk
        out.print(f"{h.rank:>3}. [bold]{c.path}:{c.start_line}-{c.end_line}[/bold]  "
                  f"score {h.score:.4f}  chunk {c.chunk_id}", highlight=False)
        if show_text:
            out.print(c.text.rstrip(), markup=False, highlight=False)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
