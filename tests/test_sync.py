"""SyncSource and `retriever sync` against real git repositories, a real server and model.

Each repository is built here with commits at exact times (commit n at T0 + n minutes) and
driven through a sequence of changes; after each sync the namespace must hold exactly what
the repository holds at the synced commit: the same files, their content, the commit that
last changed each as its revision and that commit's time as its source time, and searches
that return only those chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from conftest import make_settings, running_server
from gitrepo import T0
from gitrepo import TimedRepo as _Repo
from typer.testing import CliRunner

from retriever.catalog import Catalog, SourceRecord, SyncRecord
from retriever.cli import app
from retriever.client import RetrieverClient
from retriever.domain import NamespaceRecord
from retriever.errors import InvalidArgument, NotFound, PermissionDenied
from retriever.freshness.sync import SYNC_HISTORY, check_location
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

runner = CliRunner()


def _function(name: str, topic: str, variant: str = "") -> str:
    """A Python function of ~120 tokens: a chunk of its own (two do not fit one chunk)."""
    lines = [f"def {name}(values, scale=1.0):",
             f'    """Compute the {topic} of the given values{variant}.',
             "",
             f"    The {topic} is computed step by step so that every intermediate result",
             "    can be inspected, logged and checked against the reference tables.",
             '    """']
    for i in range(3):
        lines.append(f"    step_{i} = sum(v * {i + 1} for v in values) * scale  # {topic} {i}")
    lines.append(f"    return step_0 + step_2{variant and ' + 1'}")
    return "\n".join(lines) + "\n"


GEOMETRY_FUNCS = [("area_of_polygon", "polygon area"), ("perimeter_length", "perimeter"),
                  ("centroid_point", "centroid"), ("bounding_box", "bounding box")]


def _geometry(changed: str = "") -> str:
    return "\n\n".join(_function(n, t, " (rounded)" if n == changed else "")
                       for n, t in GEOMETRY_FUNCS)


def _sync(client: RetrieverClient, ns: str, repo: str = "", *, wait: bool = True,
          timeout: float | None = 120.0, **kw: object) -> pb.SyncSourceResponse:
    return client.sync_source(ns, repo, wait=wait, timeout=timeout, **kw)  # type: ignore[arg-type]


def _assert_index(client: RetrieverClient, ns: str, repo: _Repo, commit: str,
                  paths: set[str]) -> None:
    """The namespace holds exactly ``paths`` at ``commit``, and searches agree."""
    docs = {d.doc_id: d for d in client.list_documents(ns, page_size=1000).documents}
    assert set(docs) == paths
    chunk_ids: set[str] = set()
    contents: dict[str, str] = {}
    for path in paths:
        got = client.get_document(ns, path)
        rev = repo.last_change(commit, path)
        contents[path] = repo.show(commit, path)
        assert got.document.content == contents[path], path
        assert got.document.revision == rev, path
        assert got.document.path == path
        assert got.document.source_updated_at.ToDatetime(tzinfo=UTC) == repo.times[rev], path
        assert not set(got.chunk_ids) & chunk_ids  # no chunk shared, none duplicated
        chunk_ids |= set(got.chunk_ids)
    status = client.status(ns)
    assert status.chunk_count == status.vector_count == len(chunk_ids)
    hits = client.stub.Search(pb.SearchRequest(namespace=ns, query="compute values", top_k=100,
                                               mode=pb.DENSE), timeout=60).hits
    assert len(chunk_ids) <= 100  # then a top_k of 100 returns every chunk
    assert {h.chunk.chunk_id for h in hits} == chunk_ids
    for h in hits:
        assert h.chunk.revision == repo.last_change(commit, h.chunk.doc_id)
        assert h.chunk.text in contents[h.chunk.doc_id]
        assert h.staleness.ToTimedelta() == timedelta(0)


def _lexical(client: RetrieverClient, ns: str, query: str) -> set[str]:
    hits = client.stub.Search(pb.SearchRequest(namespace=ns, query=query, top_k=20,
                                               mode=pb.LEXICAL), timeout=60).hits
    return {h.chunk.doc_id for h in hits}


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def server(roots: Path, embedder, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
           ) -> Iterator[object]:
    settings = make_settings(tmp_path_factory.mktemp("data"), sync_roots=[roots],
                             sync_url_prefixes=["file://"], sync_batch_documents=8)
    with running_server(settings, embedder) as st:
        yield st


@pytest.fixture(scope="module")
def client(server) -> Iterator[RetrieverClient]:  # noqa: ANN001
    with RetrieverClient(server.address) as c:
        yield c


# -- the life of a repository ------------------------------------------------------------------


def test_sync_follows_the_repository_commit_by_commit(client: RetrieverClient,
                                                      roots: Path) -> None:
    repo = _Repo(roots / "life")
    repo.write("src/geometry.py", _geometry())
    repo.write("src/helpers.py", "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n")
    repo.write("docs/guide.md", "# Guide\n\nHow to compute values.\n\n## Install\n\n"
               "Run the installer.\n")
    repo.write("notes/todo.txt", "Compute the values of the quarterly report.\n")
    repo.write("old/legacy.py", "def zanzibar_legacy():\n    return 'obsolete marmalade'\n")
    repo.write("assets/logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    c1 = repo.commit("first")
    files = {"src/geometry.py", "src/helpers.py", "docs/guide.md", "notes/todo.txt",
             "old/legacy.py"}

    # A first sync indexes the whole tree.
    first = _sync(client, "life", str(repo.root))
    assert first.state == pb.SYNC_STATE_SUCCEEDED and first.sync_id
    assert (first.commit, first.previous_commit, first.full_reconcile) == (c1, "", True)
    assert (first.files_added, first.files_modified, first.files_deleted) == (5, 0, 0)
    assert first.documents_upserted == 5 and first.chunks_reused == 0
    assert first.chunks_embedded >= 5 and dict(first.skipped) == {"binary": 1}
    assert first.duration.ToNanoseconds() > 0 and not first.error
    _assert_index(client, "life", repo, c1, files)

    # The same commit again: nothing to do (and the bound source is used without repo).
    again = _sync(client, "life")
    assert (again.commit, again.previous_commit, again.full_reconcile) == (c1, c1, False)
    assert again.documents_upserted == again.documents_deleted == again.chunks_embedded == 0

    # One function changes: only that file is upserted, only that function re-embedded.
    geometry_chunks = len(client.get_document("life", "src/geometry.py").chunk_ids)
    assert geometry_chunks >= 4
    repo.write("src/geometry.py", _geometry(changed="centroid_point"))
    c2 = repo.commit("round the centroid")
    edit = _sync(client, "life")
    assert (edit.previous_commit, edit.commit, edit.full_reconcile) == (c1, c2, False)
    assert (edit.files_added, edit.files_modified, edit.files_deleted) == (0, 1, 0)
    assert edit.documents_upserted == 1 and edit.documents_unchanged == 0
    assert edit.chunks_embedded == 1  # the edited function's chunk
    assert edit.chunks_reused == geometry_chunks - 1
    assert len(client.get_document("life", "src/geometry.py").chunk_ids) == geometry_chunks
    _assert_index(client, "life", repo, c2, files)
    assert client.get_document("life", "src/helpers.py").document.revision == c1

    # A file is deleted: its document and its chunks go.
    assert _lexical(client, "life", "zanzibar marmalade") == {"old/legacy.py"}
    repo.git("rm", "-q", "old/legacy.py")
    c3 = repo.commit("drop legacy")
    gone = _sync(client, "life")
    assert (gone.files_deleted, gone.documents_deleted, gone.documents_upserted) == (1, 1, 0)
    files.remove("old/legacy.py")
    _assert_index(client, "life", repo, c3, files)
    assert _lexical(client, "life", "zanzibar marmalade") == set()

    # A file moves to another directory: the document moves with it (its versions go on
    # under the new path; the old path's document is gone in the same commit).
    helpers_version = client.get_document("life", "src/helpers.py").version
    (repo.root / "lib").mkdir()
    repo.git("mv", "src/helpers.py", "lib/helpers.py")
    c4 = repo.commit("move helpers")
    moved = _sync(client, "life")
    assert (moved.files_renamed, moved.files_added, moved.files_deleted) == (1, 0, 0)
    assert (moved.documents_upserted, moved.documents_deleted) == (1, 0)
    assert moved.chunks_embedded == 1  # its one chunk's header names the new path
    files = (files - {"src/helpers.py"}) | {"lib/helpers.py"}
    _assert_index(client, "life", repo, c4, files)
    assert client.get_document("life", "lib/helpers.py").version == helpers_version + 1

    # A binary file and a submodule are skipped by rule (.gitmodules itself is text).
    child = _Repo(roots / "child")
    child.write("child.txt", "a child repository\n")
    child.commit()
    repo.write("assets/data.bin", b"\x00\x01\x02 binary")
    repo.git("submodule", "add", "-q", str(child.root), "deps/child")
    c5 = repo.commit("binary and submodule")
    skipped = _sync(client, "life")
    assert dict(skipped.skipped) == {"binary": 1, "submodule": 1}
    assert (skipped.files_added, skipped.documents_upserted) == (1, 1)
    files.add(".gitmodules")
    _assert_index(client, "life", repo, c5, files)

    # History is rewritten (a force-push): the whole tree is reconciled by content hash and
    # the namespace equals the new tree exactly.
    repo.git("reset", "-q", "--hard", c2)
    repo.write("notes/todo.txt", "Compute the values of the yearly report.\n")
    repo.write("src/new_module.py", "def brand_new_feature():\n    return 'fresh'\n")
    c6 = repo.commit("rewritten")
    rewritten = _sync(client, "life")
    assert (rewritten.previous_commit, rewritten.commit) == (c5, c6)
    assert rewritten.full_reconcile
    # Back: old/legacy.py; new: src/new_module.py; lib/helpers.py's text is back at
    # src/helpers.py: moved. Gone: .gitmodules. Changed: notes/todo.txt. The rest is
    # unchanged and re-embeds nothing.
    assert (rewritten.files_added, rewritten.files_modified, rewritten.files_deleted,
            rewritten.files_renamed) == (2, 1, 1, 1)
    assert rewritten.documents_unchanged == 2  # src/geometry.py, docs/guide.md
    files = {"src/geometry.py", "src/helpers.py", "docs/guide.md", "notes/todo.txt",
             "old/legacy.py", "src/new_module.py"}
    _assert_index(client, "life", repo, c6, files)
    assert _lexical(client, "life", "zanzibar marmalade") == {"old/legacy.py"}


# -- who may sync what ---------------------------------------------------------------------


def test_locations_outside_the_roots_are_permission_denied(client: RetrieverClient, roots: Path,
                                                           outside: Path) -> None:
    stranger = _Repo(outside / "stranger")
    stranger.write("secret.txt", "not for the index\n")
    stranger.commit()

    def denied(repo: str, *words: str) -> None:
        with pytest.raises(grpc.RpcError) as e:
            _sync(client, "perm", repo)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        for w in words:
            assert w in e.value.details(), (w, e.value.details())

    denied(str(stranger.root), "RETRIEVER_SYNC_ROOTS")
    link = roots / "link-to-stranger"
    link.symlink_to(stranger.root)
    denied(str(link), "RETRIEVER_SYNC_ROOTS", "symbolic links")
    denied(str(roots / ".." / outside.name / "stranger"), "RETRIEVER_SYNC_ROOTS")
    denied("https://example.com/org/repo.git", "RETRIEVER_SYNC_URL_PREFIXES")
    # A work tree inside the roots whose .git file points at a repository outside them.
    inner = roots / "inner"
    inner.mkdir()
    (inner / ".git").write_text(f"gitdir: {stranger.root / '.git'}\n")
    denied(str(inner), "outside RETRIEVER_SYNC_ROOTS")
    with pytest.raises(grpc.RpcError) as e:
        _sync(client, "perm", "relative/path")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        _sync(client, "perm", str(roots))  # inside the roots, but no repository
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repository" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _sync(client, "never-bound")  # no repo, and none bound
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    names = {n.name for n in client.list_namespaces().namespaces}
    assert "perm" not in names and "never-bound" not in names


def test_without_roots_or_prefixes_every_sync_is_denied(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    for location in (str(tmp_path), "/etc", "https://github.com/org/repo.git"):
        with pytest.raises(PermissionDenied) as e:
            check_location(location, settings)
        assert "RETRIEVER_SYNC_ROOTS" in e.value.message
        assert "RETRIEVER_SYNC_URL_PREFIXES" in e.value.message and "JSON list" in e.value.message
    only_urls = make_settings(tmp_path, sync_url_prefixes=["https://github.com/org/"])
    assert check_location("https://github.com/org/repo.git", only_urls)
    for bad in ("https://github.com/org/../other/repo.git", "https://github.com/organon/x"):
        with pytest.raises(PermissionDenied):
            check_location(bad, only_urls)
    with pytest.raises(PermissionDenied):
        check_location(str(tmp_path), only_urls)
    with pytest.raises(InvalidArgument):
        check_location("rel/path", make_settings(tmp_path, sync_roots=[tmp_path]))


def test_a_file_url_cannot_leave_its_prefix(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    """A file:// prefix allows the directory it names, as RETRIEVER_SYNC_ROOTS does: a
    percent-encoded '..' (which git decodes) and a symbolic link under the prefix to a
    repository outside it are refused, on a real server with real repositories."""
    allowed, private = tmp_path / "allowed", tmp_path / "private"
    allowed.mkdir()
    mine, secret = _Repo(allowed / "mine"), _Repo(private)
    mine.write("ok.py", "def fine():\n    return 1\n")
    mine.commit()
    secret.write("secret.py", "PASSWORD = 'hunter2'\n")
    secret.commit()
    (allowed / "link").symlink_to(private)
    for odd in ("a#", "b?"):  # directories git reads through in a URL's "fragment"/"query"
        (allowed / odd).mkdir()
    base = f"file://{allowed}/"
    settings = make_settings(tmp_path / "data", sync_url_prefixes=[base])
    escapes = [base + "%2e%2e/private", base + "%2E%2E/private", base + ".%2e/private",
               base + "%252e%252e/private", base + "mine/..%2fprivate", base + "link",
               f"file://elsewhere{allowed}/mine", base + "a#/../../private",
               base + "b?/../../private"]
    for bad in escapes:
        with pytest.raises(PermissionDenied):
            check_location(bad, settings)
    assert check_location(base + "mine", settings) == base + "mine"
    with pytest.raises(InvalidArgument):
        check_location(base + "mi%00ne", settings)
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as c:
        for i, bad in enumerate(escapes[:2] + escapes[5:6]):
            with pytest.raises(grpc.RpcError) as e:
                _sync(c, f"escape-{i}", bad)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        assert not {n.name for n in c.list_namespaces().namespaces} & {
            "escape-0", "escape-1", "escape-2"}
        _sync(c, "mine", base + "mine")
        assert _lexical(c, "mine", "fine") == {"ok.py"}


def test_a_url_with_credentials_is_refused_and_never_stored(tmp_path: Path) -> None:
    """Credentials in a source URL would sit in the catalog and in every status: they are
    refused with what to do instead (git's own credential configuration)."""
    prefixes = make_settings(tmp_path, sync_url_prefixes=["https://", "ssh://"])
    for bad in ("https://x-access-token:s3cret@github.com/org/repo.git",
                "https://s3cret@github.com/org/repo.git",
                "ssh://git:s3cret@example.com/repo.git"):
        with pytest.raises(InvalidArgument) as e:
            check_location(bad, prefixes)
        assert "s3cret" not in e.value.message and "credential" in e.value.message
    # A user name alone is no secret over SSH.
    assert check_location("ssh://git@example.com/org/repo.git", prefixes)


# -- long syncs: deadline, background, one at a time ---------------------------------------


def test_one_sync_at_a_time_in_the_background_resumed_after_a_deadline(
        client: RetrieverClient, roots: Path) -> None:
    repo = _Repo(roots / "big")
    for i in range(60):
        repo.write(f"pkg/module_{i:02d}.py",
                   f"def handler_{i}(request):\n    return 'response number {i}'\n")
    head = repo.commit("sixty modules")

    # Waiting with a deadline far too short: the sync stops between batches; what it
    # applied stays applied and nothing is marked synced.
    with pytest.raises(grpc.RpcError) as e:
        _sync(client, "big", str(repo.root), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # In the background: RUNNING at once (once the stopped sync has let go of the namespace).
    deadline = time.monotonic() + 30
    while True:
        try:
            started = _sync(client, "big", str(repo.root), wait=False, timeout=30)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert started.state == pb.SYNC_STATE_RUNNING and started.sync_id
    assert started.start_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)

    # A second sync of the namespace while it runs: ABORTED, naming the running one.
    with pytest.raises(grpc.RpcError) as e:
        _sync(client, "big", str(repo.root), wait=False, timeout=30)
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert started.sync_id in e.value.details() and "started at" in e.value.details()

    # Once it has finished, a sync to the same commit finds nothing left to do.
    deadline = time.monotonic() + 120
    while True:
        try:
            after = _sync(client, "big")
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert (after.previous_commit, after.commit, after.full_reconcile) == (head, head, False)
    assert after.documents_upserted == after.documents_deleted == after.chunks_embedded == 0
    docs = list(client.document_ids("big"))
    assert len(docs) == 60
    status = client.status("big")
    assert status.document_count == 60
    assert status.chunk_count == status.vector_count == 60  # one chunk each, none twice
    assert _lexical(client, "big", "handler_42") >= {"pkg/module_42.py"}


def test_a_namespace_deleted_during_a_sync_stays_deleted(client: RetrieverClient,
                                                        roots: Path) -> None:
    repo = _Repo(roots / "doomed")
    for i in range(60):
        repo.write(f"pkg/mod_{i:02d}.py", f"def fn_{i}():\n    return {i}\n")
    repo.commit("sixty modules")
    started = _sync(client, "doomed", str(repo.root), wait=False, timeout=30)
    assert started.state == pb.SYNC_STATE_RUNNING
    deadline = time.monotonic() + 30  # the sync creates the namespace on its thread
    while "doomed" not in {n.name for n in client.list_namespaces().namespaces}:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.delete_namespace("doomed")
    # The sync's later batches find no namespace: it ends, and nothing brings it back.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = {n.name for n in client.list_namespaces().namespaces}
        assert "doomed" not in names
        try:
            _sync(client, "doomed", wait=False, timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # unbound: the sync is over
                break
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
        time.sleep(0.2)
    else:
        pytest.fail("the sync did not end")
    time.sleep(0.5)
    assert "doomed" not in {n.name for n in client.list_namespaces().namespaces}


# -- URL sources -----------------------------------------------------------------------------


def test_a_file_url_source_is_mirrored_and_fetched(client: RetrieverClient,
                                                   outside: Path) -> None:
    upstream = _Repo(outside / "upstream")
    upstream.write("README.md", "# Upstream\n\nCompute values upstream.\n")
    upstream.write("src/app.py", "def serve():\n    return 'upstream app'\n")
    c1 = upstream.commit()
    url = f"file://{upstream.root}"
    first = _sync(client, "url", url)
    assert first.state == pb.SYNC_STATE_SUCCEEDED and first.commit == c1
    _assert_index(client, "url", upstream, c1, {"README.md", "src/app.py"})

    upstream.write("src/app.py", "def serve():\n    return 'upstream app, version two'\n")
    c2 = upstream.commit()
    second = _sync(client, "url")  # the bound URL, fetched again
    assert (second.previous_commit, second.commit, second.full_reconcile) == (c1, c2, False)
    assert second.files_modified == 1 and second.documents_upserted == 1
    _assert_index(client, "url", upstream, c2, {"README.md", "src/app.py"})


# -- the command line --------------------------------------------------------------------------


def test_cli_sync_wait_prints_a_summary_and_fails_non_zero(server, client: RetrieverClient,  # noqa: ANN001
                                                           roots: Path, outside: Path) -> None:
    repo = _Repo(roots / "cli")
    repo.write("a.md", "# A\n\nCompute values in the first file.\n")
    repo.write("b.txt", "Compute values in the second file.\n")
    c1 = repo.commit()
    result = runner.invoke(app, ["sync", "cli-ns", "--repo", str(repo.root), "--wait",
                                 "--address", server.address])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "SUCCEEDED" and summary["commit"] == c1
    assert summary["files"] == {"added": 2, "modified": 0, "deleted": 0, "renamed": 0}
    assert summary["full_reconcile"] is True and summary["error"] == ""
    assert summary["chunks_embedded"] >= 2 and summary["seconds"] > 0
    _assert_index(client, "cli-ns", repo, c1, {"a.md", "b.txt"})

    # The bound source, again: nothing to do.
    again = runner.invoke(app, ["sync", "cli-ns", "--wait", "-a", server.address])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["previous_commit"] == c1

    # A repository it may not read: non-zero, and the JSON says why.
    denied = runner.invoke(app, ["sync", "cli-ns", "--repo", str(outside), "--wait",
                                 "-a", server.address])
    assert denied.exit_code == 2  # refused before it started: as every refused call
    failure = json.loads(denied.stdout)
    assert failure["state"] == "FAILED" and failure["code"] == "PERMISSION_DENIED"
    assert "RETRIEVER_SYNC_ROOTS" in failure["error"]

    # Deleting the namespace unbinds its source.
    client.delete_namespace("cli-ns")
    unbound = runner.invoke(app, ["sync", "cli-ns", "--wait", "-a", server.address])
    assert unbound.exit_code == 1
    assert json.loads(unbound.stdout)["code"] == "NOT_FOUND"


# -- the catalog's part --------------------------------------------------------------------------


def test_catalog_keeps_the_binding_and_the_last_syncs(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    cat = Catalog(path)
    cat.open()
    # A catalog from before sources existed gets the tables when opened.
    with cat._writer() as db:
        db.execute("DROP TABLE sources")
        db.execute("DROP TABLE syncs")
    cat.close()
    cat = Catalog(path)
    cat.open()
    cat.create_namespace(NamespaceRecord(
        name="ns", backend="faiss", embedder="mini", embedder_revision="r", dimension=4,
        metric="cosine", index_generation=1, index_version=0, created_at=T0))
    assert cat.get_source("ns") is None
    with pytest.raises(NotFound):  # no binding without its namespace
        cat.put_source(SourceRecord("gone", "/srv/repos/app", "main", (), (), 1000))
    assert cat.get_source("gone") is None
    cat.put_source(SourceRecord("ns", "/srv/repos/app", "main", ("src/",), ("*.md",), 1000,
                                last_commit="a" * 40, pending_commit="b" * 40,
                                pending_full=True))
    src = cat.get_source("ns")
    assert src is not None
    assert (src.location, src.ref, src.include, src.exclude, src.max_file_bytes) == (
        "/srv/repos/app", "main", ("src/",), ("*.md",), 1000)
    assert (src.last_commit, src.pending_commit, src.pending_full) == ("a" * 40, "b" * 40, True)
    # A sync attempt re-states the binding before it begins: when nothing of it changed,
    # the bound time (what a never-synced source's staleness counts from) stays put.
    bound = src.updated_at
    time.sleep(0.01)
    cat.put_source(SourceRecord("ns", "/srv/repos/app", "main", ("src/",), ("*.md",), 1000,
                                last_commit="a" * 40, pending_commit="c" * 40))
    src = cat.get_source("ns")
    assert src is not None and src.updated_at == bound and src.pending_commit == "c" * 40
    cat.put_source(SourceRecord("ns", "/srv/repos/app", "release", ("src/",), ("*.md",), 1000,
                                last_commit="a" * 40, pending_commit="b" * 40,
                                pending_full=True))
    src = cat.get_source("ns")
    assert src is not None and bound is not None and src.updated_at is not None
    assert src.updated_at > bound  # a new ref is a new binding
    cat.source_synced("ns", "b" * 40)
    src = cat.get_source("ns")
    assert src is not None
    assert (src.last_commit, src.pending_commit, src.pending_full) == ("b" * 40, "", False)

    for i in range(SYNC_HISTORY + 5):
        sync_id = f"s{i:03d}"
        cat.add_sync(sync_id, "ns", T0 + timedelta(seconds=i))
        cat.finish_sync(SyncRecord(sync_id, "ns", "succeeded", T0 + timedelta(seconds=i),
                                   T0 + timedelta(seconds=i + 1), "c" * 40,
                                   {"files_added": i}, ""), keep=SYNC_HISTORY)
    kept = cat.list_syncs("ns", 100)
    assert len(kept) == SYNC_HISTORY
    assert kept[0].sync_id == f"s{SYNC_HISTORY + 4:03d}" and kept[0].summary == {
        "files_added": SYNC_HISTORY + 4}
    cat.add_sync("s-running", "ns", T0 + timedelta(hours=1))
    assert cat.fail_running_syncs("interrupted") == 1
    latest = cat.list_syncs("ns", 1)[0]
    assert (latest.sync_id, latest.state, latest.error) == ("s-running", "failed",
                                                             "interrupted")
    # Deleting the namespace unbinds it and forgets its syncs, in the same transaction.
    cat.delete_namespace("ns")
    assert cat.get_source("ns") is None and cat.list_syncs("ns", 100) == []
    cat.close()


def test_binding_a_namespace_of_upserted_documents_is_refused_not_a_wipe(
        client: RetrieverClient, roots: Path) -> None:
    """A sync makes the namespace hold exactly the repository's files: on a namespace that
    holds documents of its own (a mistyped name is enough) it would delete them all."""
    repo = _Repo(roots / "handbook-repo")
    repo.write("README.md", "# The handbook\n")
    repo.commit("init")
    client.upsert("handbook", [pb.Document(doc_id=f"note{i}", content=f"hand-written note {i}")
                               for i in range(3)])
    with pytest.raises(grpc.RpcError) as refused:
        client.sync_source("handbook", str(repo.root), wait=True, timeout=120)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds 3 documents" in refused.value.details()
    assert client.status("handbook").document_count == 3  # nothing deleted
    assert not client.status("handbook").HasField("source")  # nor bound
    # An empty namespace (created ahead, as a deployment may) is bound as usual.
    client.create_namespace("handbook-empty")
    done = client.sync_source("handbook-empty", str(repo.root), wait=True, timeout=120)
    assert done.state == pb.SYNC_STATE_SUCCEEDED


def test_the_poller_warns_once_about_a_source_that_stays_broken(
        tmp_path: Path, embedder, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    import logging
    import shutil

    from retriever.errors import FailedPrecondition, InvalidArgument
    from retriever.freshness.sync import SyncRequest
    from retriever.service import RetrieverService

    roots = tmp_path / "roots"
    repo = _Repo(roots / "app")
    repo.write("a.md", "# A\n")
    repo.commit("init")
    svc = RetrieverService(make_settings(tmp_path / "data", sync_roots=[roots]),
                           embedder=embedder)
    svc.start()
    try:
        svc.sync_source("polled", SyncRequest(location=str(repo.root)), wait=True)
        assert svc.syncer is not None
        shutil.move(str(repo.root), str(roots / "moved"))
        caplog.set_level(logging.DEBUG, logger="retriever.freshness.sync")
        for _ in range(3):
            assert svc.syncer.poll_once() == []
        said = [r for r in caplog.records if "polling the source of polled" in r.message]
        assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
        # A sync of the bound source now fails on the binding, not on the request (which
        # named nothing): FAILED_PRECONDITION; naming the missing directory is the caller's.
        with pytest.raises(FailedPrecondition, match="is bound to .* give repo"):
            svc.sync_source("polled", SyncRequest(), wait=True)
        with pytest.raises(InvalidArgument, match="is not a directory"):
            svc.sync_source("polled", SyncRequest(location=str(repo.root)), wait=True)
        shutil.move(str(roots / "moved"), str(repo.root))
        caplog.clear()
        svc.syncer.poll_once()
        assert any("readable again" in r.message for r in caplog.records)
    finally:
        svc.close()


def test_git_data_outside_the_allowed_directory_is_refused(embedder, tmp_path: Path  # noqa: ANN001
                                                          ) -> None:
    """Everything git reads of a repository must lie inside what the settings allow, for a
    local path and a file:// URL alike: a `.git` file or link to a repository outside, git's
    own `X.git` look-up, an object store borrowed from one (alternates) or reached through a
    symbolic link inside `.git`. Each was synced, and the outside secret indexed."""
    allowed, private = tmp_path / "allowed", tmp_path / "private"
    allowed.mkdir()
    secret = _Repo(private)
    secret.write("secret.py", "PASSWORD = 'hunter2'\n")
    head = secret.commit()
    outside_git = private / ".git"

    gitfile = allowed / "gitfile"  # a work tree whose .git file points outside
    gitfile.mkdir()
    (gitfile / ".git").write_text(f"gitdir: {outside_git}\n")
    symgit = allowed / "symgit"  # its .git a link to the outside one
    symgit.mkdir()
    (symgit / ".git").symlink_to(outside_git)
    (allowed / "plainfile").write_text(f"gitdir: {outside_git}\n")
    (allowed / "sfx.git").symlink_to(outside_git)  # git tries "sfx.git" for "sfx"
    (allowed / "plaindir").mkdir()  # ... also when "plaindir" is no repository
    (allowed / "plaindir.git").symlink_to(outside_git)

    def git(repo: Path, *args: str) -> None:
        import subprocess
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    alt = _Repo(allowed / "alt")  # objects borrowed from the outside repository
    (alt.root / ".git" / "objects" / "info").mkdir(parents=True, exist_ok=True)
    (alt.root / ".git" / "objects" / "info" / "alternates").write_text(
        f"{outside_git / 'objects'}\n")
    git(alt.root, "update-ref", "refs/heads/main", head)
    symobj = _Repo(allowed / "symobj")  # objects and refs directories linked outside
    for name in ("objects", "refs"):
        target = symobj.root / ".git" / name
        import shutil
        shutil.rmtree(target)
        target.symlink_to(outside_git / name)
    mine = _Repo(allowed / "mine")
    mine.write("ok.py", "def fine():\n    return 1\n")
    mine.commit()

    base = f"file://{allowed}/"
    settings = make_settings(tmp_path / "data", sync_roots=[allowed],
                             sync_url_prefixes=[base])
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as c:
        refused = []
        for name in ("gitfile", "symgit", "plainfile", "sfx", "plaindir", "alt", "symobj"):
            for kind, repo in (("path", str(allowed / name)), ("url", base + name)):
                with pytest.raises(grpc.RpcError) as e:
                    _sync(c, f"{name}-{kind}", repo)
                assert e.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                          grpc.StatusCode.INVALID_ARGUMENT), (name, kind)
                refused.append(f"{name}-{kind}")
                if name in ("alt", "symobj", "gitfile", "symgit"):
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (
                        name, kind, e.value.details())
                    assert "outside" in e.value.details()
        assert not {n.name for n in c.list_namespaces().namespaces} & set(refused)
        assert str(private) not in e.value.details()  # nor named
        for kind, repo in (("path", str(mine.root)), ("url", base + "mine")):
            _sync(c, f"mine-{kind}", repo)
            assert _lexical(c, f"mine-{kind}", "fine") == {"ok.py"}


def test_a_source_that_cannot_be_resolved_is_refused_and_stops_no_other(
        tmp_path: Path, embedder) -> None:  # noqa: ANN001
    """A symlink loop or an over-long name was INTERNAL (RuntimeError / OSError out of the
    location check); bound, it failed GetIndexStatus and ended every poll round before the
    namespaces after it."""
    from retriever.freshness.sync import SyncRequest
    from retriever.service import RetrieverService

    roots = tmp_path / "roots"
    roots.mkdir()
    (roots / "loop1").symlink_to(roots / "loop2")
    (roots / "loop2").symlink_to(roots / "loop1")
    settings = make_settings(tmp_path / "data", sync_roots=[roots],
                             sync_url_prefixes=[f"file://{roots}/"])
    for bad in (str(roots / "loop1"), str(roots / "loop1" / "x"), f"file://{roots}/loop1"):
        with pytest.raises(InvalidArgument):
            check_location(bad, settings)
    first, later = _Repo(roots / "aaa"), _Repo(roots / "zzz")
    for repo in (first, later):
        repo.write("a.md", "# A\n")
        repo.commit("init")
    svc = RetrieverService(settings, embedder=embedder)
    svc.start()
    try:
        for bad in (str(roots / "loop1"), str(roots / ("b" * 300))):
            with pytest.raises(InvalidArgument):
                svc.sync_source("loop", SyncRequest(location=bad), wait=True)
        svc.sync_source("aaa", SyncRequest(location=str(first.root)), wait=True)
        svc.sync_source("zzz", SyncRequest(location=str(later.root)), wait=True)
        import shutil
        shutil.rmtree(first.root)
        first.root.symlink_to(roots / "loop1")  # "aaa" now leads into the loop
        later.write("b.md", "# B\n")
        later.commit("more")
        assert svc.syncer is not None
        assert svc.syncer.poll_once() == ["zzz"]  # polled past the broken one
        status = svc.index_status("aaa")
        assert status.source is not None and status.source.error
    finally:
        svc.close()


def test_an_alternate_store_in_a_symlink_loop_is_outside_not_a_crash(tmp_path: Path) -> None:
    """Resolving it raised RuntimeError past the check (INTERNAL)."""
    from retriever.freshness.sync import _git_data_outside

    repo = _Repo(tmp_path / "r")
    repo.write("a.md", "# A\n")
    repo.commit()
    objects = repo.root / ".git" / "objects"
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    (objects / "info").mkdir(exist_ok=True)
    (objects / "info" / "alternates").write_text(f"{tmp_path / 'l1'}\n")
    git_dir = repo.root / ".git"
    assert _git_data_outside([git_dir, git_dir, objects], [tmp_path]) is not None
