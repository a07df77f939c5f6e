"""`retriever index` and `retriever search` against the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from corpus import CORPUS
from typer.testing import CliRunner

from retriever.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def _repo(root: Path) -> Path:
    for rel, content in CORPUS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "build").mkdir()
    (root / "build" / "generated.py").write_text("def generated():\n    pass\n")
    (root / "debug.log").write_text("a log line about bread\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-qm", "init")
    (root / "untracked.md").write_text("# Untracked but not ignored\nIt counts.\n")
    return root


def test_index_then_search(server, tmp_path: Path) -> None:  # noqa: ANN001
    repo = _repo(tmp_path / "repo")
    result = runner.invoke(app, ["index", str(repo), "--namespace", "cli", "--address",
                                 server.address, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # CORPUS + .gitignore + untracked.md; build/ and *.log ignored; binary and non-UTF-8 skipped.
    assert summary["docs"] == len(CORPUS) + 2
    assert summary["created"] == summary["docs"]
    assert summary["chunks"] >= summary["docs"] and summary["chunks_reused"] == 0
    assert summary["skipped"] == {"binary": 1, "not UTF-8": 1}

    again = runner.invoke(app, ["index", str(repo), "-n", "cli", "-a", server.address])
    assert again.exit_code == 0, again.output
    assert f"{summary['docs']} unchanged" in again.stdout
    assert "0 embedded" in again.stdout
    assert "skipped 1 (binary): logo.png" in again.stdout

    found = runner.invoke(app, ["search", "how long should I knead the dough", "-n", "cli",
                                "-a", server.address, "-k", "3"])
    assert found.exit_code == 0, found.output
    first = found.stdout.splitlines()[0]
    assert first.startswith("  1. docs/bread.md:1-")
    assert "score " in first and "chunk " in first
    chunk_id = first.rsplit("chunk ", 1)[1].strip()
    assert len(chunk_id) == 32

    as_json = runner.invoke(app, ["search", "load a TOML config", "-n", "cli", "-a",
                                  server.address, "--json"])
    body = json.loads(as_json.stdout)
    assert body["hits"][0]["chunk"]["docId"] == "src/config.py"
    assert body["lineage"]["embedder"] == "all-MiniLM-L6-v2"
    ignored = runner.invoke(app, ["search", "generated", "-n", "cli", "-a", server.address,
                                  "--json", "-k", "20"])
    paths = {h["chunk"]["path"] for h in json.loads(ignored.stdout)["hits"]}
    assert "build/generated.py" not in paths and "debug.log" not in paths
    assert "untracked.md" in paths


def test_cli_reports_errors_with_status_code(server) -> None:  # noqa: ANN001
    result = runner.invoke(app, ["search", "x", "-n", "missing", "-a", server.address])
    assert result.exit_code == 2
    assert "NOT_FOUND" in result.output and "missing" in result.output
    # With --json the answer on stdout is JSON either way.
    result = runner.invoke(app, ["search", "x", "-n", "missing", "-k", "0", "--json", "-a",
                                 server.address])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "top_k" in error["message"]


def test_index_prune_removes_documents_gone_from_the_directory(server, tmp_path: Path) -> None:  # noqa: ANN001
    root = tmp_path / "tree"
    root.mkdir()
    (root / "keep.md").write_text("# Keep\nThis stays.\n")
    (root / "drop.md").write_text("# Drop\nThis goes away.\n")
    args = ["index", str(root), "-n", "prune", "-a", server.address, "--json"]
    assert json.loads(runner.invoke(app, args).stdout)["docs"] == 2
    (root / "drop.md").unlink()
    without = json.loads(runner.invoke(app, args).stdout)
    assert without["pruned"] == 0  # without --prune nothing is deleted
    pruned = json.loads(runner.invoke(app, [*args, "--prune"]).stdout)
    assert pruned["pruned"] == 1 and pruned["unchanged"] == 1
    from retriever.client import RetrieverClient

    with RetrieverClient(server.address) as c:
        assert [d.doc_id for d in c.list_documents("prune").documents] == ["keep.md"]


def test_index_prune_moves_a_renamed_file(server, tmp_path: Path) -> None:  # noqa: ANN001
    """With --prune, a new path holding the exact text of a document gone from the
    directory is that document, moved: its versions go on, the old id is gone at once."""
    from retriever.client import RetrieverClient

    root = tmp_path / "tree"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text("# Guide\nKnead the dough until smooth.\n")
    (root / "other.md").write_text("# Other\nUnrelated.\n")
    args = ["index", str(root), "-n", "moves", "-a", server.address, "--json", "--prune"]
    assert json.loads(runner.invoke(app, args).stdout)["created"] == 2
    (root / "manual").mkdir()
    (root / "docs" / "guide.md").rename(root / "manual" / "guide.md")
    summary = json.loads(runner.invoke(app, args).stdout)
    assert (summary["moved"], summary["pruned"], summary["created"],
            summary["updated"], summary["unchanged"]) == (1, 0, 0, 1, 1)
    with RetrieverClient(server.address) as c:
        assert [d.doc_id for d in c.list_documents("moves").documents] == [
            "manual/guide.md", "other.md"]
        assert c.get_document("moves", "manual/guide.md").version == 2
    # Without --prune nothing is removed, so nothing moves.
    (root / "manual" / "guide.md").rename(root / "guide.md")
    plain = json.loads(runner.invoke(app, args[:-1]).stdout)
    assert (plain["moved"], plain["created"]) == (0, 1)


def test_index_of_an_empty_directory_creates_the_namespace(server, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "empty").mkdir()
    args = ["index", str(tmp_path / "empty"), "-n", "e", "-a", server.address, "--json"]
    for _ in range(2):  # and again: an existing namespace is fine
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["docs"] == 0
    status = runner.invoke(app, ["status", "-n", "e", "-a", server.address])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["documentCount"] == "0"
    found = runner.invoke(app, ["search", "anything", "-n", "e", "-a", server.address])
    assert found.exit_code == 0, found.output
    assert "no hits" in found.stdout


def test_index_progress_moves_only_on_acknowledgement(server, tmp_path: Path,  # noqa: ANN001
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar advances by what each UpsertDocuments response reports, after it arrives."""
    from rich.progress import Progress

    from retriever.client import RetrieverClient

    root = tmp_path / "tree"
    root.mkdir()
    for i in range(5):
        (root / f"doc{i}.md").write_text(f"# Note {i}\nBread number {i} needs flour.\n")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    events: list[tuple] = []
    upsert, update = RetrieverClient.upsert_stream, Progress.update

    def recording_upsert(self, requests):  # noqa: ANN001, ANN202
        reqs = list(requests)
        events.append(("sent", sum(len(r.documents) for r in reqs)))
        resp = upsert(self, iter(reqs))
        events.append(("acked", resp.documents_received, resp.chunks_total))
        return resp

    def recording_update(self, task, **kw):  # noqa: ANN001, ANN202, ANN003
        if "chunks" in kw:
            events.append(("bar", kw.get("advance", 0), kw["chunks"]))
        return update(self, task, **kw)

    monkeypatch.setattr(RetrieverClient, "upsert_stream", recording_upsert)
    monkeypatch.setattr(Progress, "update", recording_update)
    result = runner.invoke(app, ["index", str(root), "-n", "progress", "-a", server.address,
                                 "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["docs"] == 5 and summary["skipped"] == {"binary": 1}
    # Three calls of 2, 2 and 1 documents, each followed by the bar moving by what it acked.
    assert [e[1] for e in events if e[0] == "sent"] == [2, 2, 1]
    assert events[:2] == [("sent", 2), ("acked", 2, events[1][2])]  # nothing moved before
    chunks = 0
    for i, e in enumerate(events):
        if e[0] == "acked":
            chunks += e[2]
            assert events[i + 1][0] == "bar" and events[i + 1][2] == chunks
    assert sum(e[1] for e in events if e[0] == "bar") == 6  # every file, the skipped one too
    assert chunks == summary["chunks"] > 0


def test_a_command_waits_for_a_server_still_loading(tmp_path: Path) -> None:
    """The server binds its port, then loads its model with health NOT_SERVING: a command
    run then waits, says so once, and succeeds; against no server it fails at once."""
    import socket
    import threading
    import time

    from conftest import make_settings

    from retriever.server.app import ServerThread

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No embedder given: the server loads its own (torch: no model build) after binding.
    st = ServerThread(make_settings(tmp_path / "data", grpc_port=port,
                                    embedder_backend="torch"))
    starter = threading.Thread(target=st.start, daemon=True)
    starter.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # until the port is bound
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the server never bound its port"
            time.sleep(0.02)
        result = runner.invoke(app, ["namespaces", "-a", f"127.0.0.1:{port}"])
        assert result.exit_code == 0, result.output
        assert result.output.count("waiting for the server") == 1
        assert st.info.get("grpc_port") == port  # it was loading, and is serving now
    finally:
        starter.join(120)
        st.stop()
    t0 = time.monotonic()
    gone = runner.invoke(app, ["namespaces", "-a", f"127.0.0.1:{port}"])
    assert gone.exit_code == 2 and "UNAVAILABLE" in gone.output
    assert time.monotonic() - t0 < 30


def test_index_waits_out_a_server_that_sheds_its_batches(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    """A batch refused with RESOURCE_EXHAUSTED and RetryInfo (the server busy: here its one
    upsert slot held by another stream) committed nothing and is sent again after the
    delay the server asks for: the index says so once and completes."""
    import threading

    from conftest import make_settings

    from retriever.client import RetrieverClient
    from retriever.server.app import ServerThread
    from retriever.v1 import retriever_pb2 as pb

    st = ServerThread(make_settings(tmp_path / "data", max_inflight_upserts=1),
                      embedder).start()
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(3):
        (root / f"doc{i}.md").write_text(f"# Note {i}\nRye bread number {i}.\n")
    release = threading.Event()
    holder = RetrieverClient(st.address)

    def held():  # noqa: ANN202 - one stream that keeps the only slot until released
        yield pb.UpsertDocumentsRequest(namespace="other", documents=[
            pb.Document(doc_id="x", content="held open")])
        release.wait(30)

    try:
        holding = holder.stub.UpsertDocuments.future(held(), timeout=60)
        # The slot is taken once the stream's first message is committed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                holder.get_document("other", "x")
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            time.sleep(0.05)
        else:
            raise AssertionError("the held stream's first message never committed")
        threading.Timer(1.5, release.set).start()
        t0 = time.monotonic()
        result = runner.invoke(app, ["index", str(root), "-n", "shed", "-a", st.address,
                                     "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["created"] == 3
        assert result.output.count("the server is busy") == 1
        assert "upsert streams in flight" in result.output
        assert time.monotonic() - t0 >= 1.0  # it waited for the slot
        assert holding.result(60).documents_created == 1
    finally:
        release.set()
        holder.close()
        st.stop()


def test_paths_that_look_like_markup_are_printed_as_they_are(server, tmp_path: Path) -> None:  # noqa: ANN001
    """A file name is not console markup: "[/]..." crashed index and every search of the
    namespace, "[bold]x" lost its brackets."""
    root = tmp_path / "tree"
    (root / "[").mkdir(parents=True)
    (root / "[" / "]zebra.txt").write_text("zebra stripes are black and white\n")
    (root / "[bold]x.bin").write_bytes(b"\x00\x01binary")
    indexed = runner.invoke(app, ["index", str(root), "-n", "markup", "-a", server.address])
    assert indexed.exit_code == 0, indexed.output
    assert "skipped 1 (binary): [bold]x.bin" in indexed.stdout
    found = runner.invoke(app, ["search", "zebra stripes", "-n", "markup", "-a",
                                server.address])
    assert found.exit_code == 0, found.output
    assert "[/]zebra.txt:1-1" in found.stdout


def test_search_text_shows_control_characters_as_escapes(server) -> None:  # noqa: ANN001
    """An indexed file's escape sequence must not reach the terminal (it could recolour or
    rewrite the screen): shown as an escape, like other control characters."""
    from retriever.client import RetrieverClient, pb

    with RetrieverClient(server.address) as c:
        c.upsert("ctl", [pb.Document(doc_id="evil.txt", content=(
            "zebra \x1b[31mRED\x1b[0m bell\x07 feed\x0c end\n"))])
    found = runner.invoke(app, ["search", "zebra", "-n", "ctl", "-a", server.address,
                                "--text"])
    assert found.exit_code == 0, found.output
    assert "\x1b" not in found.stdout and "\x07" not in found.stdout
    assert "zebra \\x1b[31mRED\\x1b[0m bell\\x07 feed\\x0c end" in found.stdout
    # ... and so must a path's (it set the window title), and a newline in one (it split
    # the path:lines line in two).
    with RetrieverClient(server.address) as c:
        c.upsert("ctl", [pb.Document(doc_id="title\x1b]0;PWNED\x07\nline.md",
                                     content="quokka on an island\n")])
    found = runner.invoke(app, ["search", "quokka", "-n", "ctl", "-a", server.address,
                                "-k", "1"])
    assert found.exit_code == 0, found.output
    assert "\x1b" not in found.stdout and "\x07" not in found.stdout
    assert "title\\x1b]0;PWNED\\x07\\x0aline.md:1-1" in found.stdout


def test_check_and_repair_refuse_a_data_dir_that_is_not_there(tmp_path: Path) -> None:
    typo = tmp_path / "no-such-dir"
    (tmp_path / "a-file").write_text("x")
    for command, path in (("check", typo), ("check", tmp_path / "a-file"), ("repair", typo)):
        result = runner.invoke(app, [command, "--data-dir", str(path)])
        assert result.exit_code == 2, result.output
        assert "does not exist" in result.output or "is not a directory" in result.output
        assert "healthy" not in result.output
    assert not typo.exists()  # repair did not create it


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="as root, needs setpriv to drop the powers that ignore file modes")
def test_index_prune_keeps_the_documents_of_a_directory_it_could_not_read(
        server, tmp_path: Path) -> None:  # noqa: ANN001
    from retriever.client import RetrieverClient

    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("top level notes about apples\n")
    (root / "sub" / "b.txt").write_text("the secret recipe for pears\n")
    first = runner.invoke(app, ["index", str(root), "-n", "unreadable", "-a", server.address])
    assert first.exit_code == 0, first.output
    prefix = (["setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])
    (root / "sub").chmod(0)
    try:
        pruned = subprocess.run(
            [*prefix, sys.executable, "-m", "retriever.cli", "index", str(root), "-n",
             "unreadable", "-a", server.address, "--prune"],
            capture_output=True, text=True, timeout=120)
    finally:
        (root / "sub").chmod(0o755)
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 0 documents" in pruned.stdout
    assert "skipped 1 (unreadable directory): sub/" in pruned.stdout
    with RetrieverClient(server.address) as c:
        assert sorted(c.document_ids("unreadable")) == ["a.txt", "sub/b.txt"]


def test_an_interrupted_index_says_what_was_acknowledged(server, tmp_path: Path,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from retriever.client import RetrieverClient

    root = tmp_path / "tree"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.md").write_text(f"# Note {i}\nBread number {i}.\n")
    upsert = RetrieverClient.upsert_stream
    calls = []

    def interrupted_on_the_second_batch(self, requests):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is in flight
        return upsert(self, requests)

    monkeypatch.setattr(RetrieverClient, "upsert_stream", interrupted_on_the_second_batch)
    result = runner.invoke(app, ["index", str(root), "-n", "interrupted", "-a",
                                 server.address, "--batch-size", "2"])
    assert result.exit_code == 130, result.output
    assert "interrupted: 2 documents acknowledged" in result.stderr
    assert "Traceback" not in result.output


def test_python_dash_m_retriever_is_the_cli() -> None:
    got = subprocess.run([sys.executable, "-m", "retriever", "serve", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert "Serve retriever.v1.Retriever" in got.stdout


@pytest.mark.parametrize(("env", "said"), [
    ({"RETRIEVER_CONFIG_FILE": "/nonexistent/retriever.toml"}, "is not a file"),
    ({"RETRIEVER_SYNC_ROOTS": "notjson"}, "sync_roots")])
def test_settings_that_cannot_be_read_stop_serve_in_one_line(tmp_path: Path,
                                                             env: dict[str, str],
                                                             said: str) -> None:
    """A config file path naming no file was ignored (the server started on defaults: no
    auth token); a setting that is not JSON printed a traceback."""
    got = subprocess.run([sys.executable, "-m", "retriever", "serve"],
                         env={**os.environ, "RETRIEVER_DATA_DIR": str(tmp_path), **env},
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 2, got.stderr[-2000:]
    assert said in got.stderr and "Traceback" not in got.stderr


def test_index_skips_a_file_over_the_servers_limit_and_sends_the_rest(server,  # noqa: ANN001
                                                                      tmp_path: Path) -> None:
    """--max-bytes above the server's max_document_bytes: the refused message aborted the
    run (nothing indexed, the file unnamed); the file is now listed and the rest sent."""
    from retriever.client import RetrieverClient

    root = tmp_path / "big"
    root.mkdir()
    (root / "big.txt").write_text("word " * 260_000)  # 1.3 MB, over the 1 MiB default
    (root / "small.txt").write_text("a small note about otters\n")
    result = runner.invoke(app, ["index", str(root), "-n", "limits", "-a", server.address,
                                 "--max-bytes", "5000000", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "max_document_bytes" in result.stdout and "big.txt" in result.stdout
    with RetrieverClient(server.address) as c:
        ids = {d.doc_id for d in c.list_documents("limits").documents}
    assert ids == {"small.txt"}
