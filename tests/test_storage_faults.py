"""Storage faults with real files and real faults: damaged index files and catalogs (bytes
overwritten, files cut short), `retriever check` / `retriever repair`, and a full disk (a
small tmpfs as the data directory)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_settings
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from indexers import CollectionSpec, SelfRepairing, Verifiable
from indexers.faiss_index import FaissBackend
from retriever.catalog import Catalog, NewChunk
from retriever.cli import app
from retriever.client import RetrieverClient
from retriever.domain import NamespaceRecord
from retriever.server.app import ServerThread
from retriever.v1 import retriever_pb2 as pb

NS = "faults"
DIM = 8
runner = CliRunner()


# -- helpers -----------------------------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``: a disk that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("disk-full tests mount a tmpfs, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write ``path`` until the disk it is on is full (to the last byte)."""
    with open(path, "ab", buffering=0) as fh:
        for block in (1 << 20, 64 << 10, 4096, 512, 1):
            try:
                while True:
                    fh.write(b"\xff" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return path


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def docs(n: int, prefix: str = "doc", lines: int = 12) -> list[pb.Document]:
    """Small documents of distinct text, one or two chunks each."""
    topics = ["bread", "rivers", "compilers", "violins", "glaciers", "chess", "tides",
              "beetles", "lanterns", "orchards", "comets", "ferries"]
    out = []
    for i in range(n):
        t = topics[i % len(topics)]
        body = "\n".join(f"Note {j} of {prefix} {i} about {t}: {t} number {i * 31 + j} "
                         f"behaves in its own way." for j in range(lines))
        out.append(pb.Document(doc_id=f"{prefix}-{i:03d}.md", path=f"{prefix}-{i:03d}.md",
                               content=f"# {prefix} {i} on {t}\n{body}\n"))
    return out


def metric(port: int, name: str, **labels: str) -> float:
    """A sample's value from the server's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                   if labels else "")
    for line in text.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def assert_whole(c: RetrieverClient, ns: str, expected: dict[str, str]) -> None:
    """Exactly these documents (doc_id -> content), each whole and found by search."""
    listed = {d.doc_id for d in c.list_documents(ns, page_size=1000).documents}
    assert listed == set(expected)
    status = c.status(ns)
    assert status.vector_count == status.chunk_count
    ids = sorted(expected)
    found = c.batch_search([  # one forward pass for all the queries
        pb.SearchRequest(namespace=ns, query=expected[d][:300], top_k=20,
                         filter=pb.SearchFilter(doc_ids=[d])) for d in ids]).responses
    for doc_id, resp in zip(ids, found, strict=True):
        doc = c.get_document(ns, doc_id)
        assert doc.document.content == expected[doc_id]
        assert {h.chunk.chunk_id for h in resp.hits} == set(doc.chunk_ids), doc_id
        assert resp.hits[0].score > 0.5  # its own text: the restored vectors are the right ones


def retry_info(exc: grpc.RpcError) -> list[error_details_pb2.RetryInfo]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    return [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]


def smash_page(catalog: Path, table: str) -> None:
    """Overwrite the middle leaf page of ``table`` with garbage, as a bad sector would."""
    db = sqlite3.connect(catalog)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [r[0] for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,))]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    assert pages, f"{table} has no leaf page"
    with open(catalog, "r+b") as fh:
        fh.seek((pages[len(pages) // 2] - 1) * size)
        fh.write(bytes(range(256)) * (size // 256))


# -- index files, no server (fast) -------------------------------------------------------------
def test_damaged_snapshot_is_moved_aside_and_the_collection_opens_empty(tmp_path: Path) -> None:
    spec = CollectionSpec("c", DIM, "cosine")
    first = FaissBackend(tmp_path)
    first.open(spec).upsert(range(50), unit_vectors(50))
    first.close()
    snapshot = tmp_path / "c" / "index.faiss"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\x00" * 16  # inside the vectors: FAISS
    snapshot.write_bytes(bytes(data))                         # alone would load it silently
    (tmp_path / "c" / "index.tmp").write_bytes(b"")  # a snapshot write cut short

    backend = FaissBackend(tmp_path)
    assert isinstance(backend, Verifiable)
    assert "SHA-256" in backend.verify("c", spec)[0]
    index = backend.open(spec)
    assert isinstance(index, SelfRepairing)
    (q,) = index.quarantined
    assert (q.kind, q.path) == ("faiss_snapshot", snapshot)
    assert q.moved_to.exists() and q.moved_to.name.startswith("index.faiss.corrupt-")
    assert index.count() == 0
    assert not list((tmp_path / "c").glob("*.tmp"))
    index.upsert(range(3), unit_vectors(3))
    backend.close()
    assert backend.verify("c", spec) == []
    assert FaissBackend(tmp_path).open(spec).count() == 3


@pytest.mark.parametrize("content", [b"\x00\xffnot json", b'{"dimension": "eight"}', b"[1, 2]",
                                     b'{"dimension": 8, "met'])
def test_damaged_meta_moves_both_files_aside(tmp_path: Path, content: bytes) -> None:
    spec = CollectionSpec("c", DIM, "ip")
    first = FaissBackend(tmp_path)
    first.open(spec).upsert(range(5), unit_vectors(5))
    first.close()
    (tmp_path / "c" / "meta.json").write_bytes(content)
    index = FaissBackend(tmp_path).open(spec)
    assert isinstance(index, SelfRepairing)
    # The snapshot cannot be verified without the checksum meta.json held: it goes too.
    assert [q.kind for q in index.quarantined] == ["faiss_meta", "faiss_snapshot"]
    assert index.count() == 0
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["dimension"] == DIM


@pytest.mark.parametrize("bytes_changed", [False, True])
def test_a_meta_listing_no_checksum_does_not_vouch_for_a_current_snapshot(
        tmp_path: Path, bytes_changed: bool) -> None:
    """Snapshots of the current format are always written with their checksum; a meta.json
    edited (or damaged) to list none loaded the snapshot unchecked, changed vectors
    included. Only the format written before checksums existed loads without one (the
    previous-version test in test_faiss_scale.py)."""
    spec = CollectionSpec("c", DIM, "cosine")
    first = FaissBackend(tmp_path)
    first.open(spec).upsert(range(50), unit_vectors(50))
    first.close()
    coll = tmp_path / "c"
    meta = json.loads((coll / "meta.json").read_text())
    assert meta["sha256"]
    meta["sha256"] = []
    (coll / "meta.json").write_text(json.dumps(meta))
    snapshot = coll / "index.faiss"
    if bytes_changed:
        data = bytearray(snapshot.read_bytes())
        data[len(data) // 2: len(data) // 2 + 16] = b"\x00" * 16
        snapshot.write_bytes(bytes(data))

    problems = FaissBackend(tmp_path).verify("c", spec)  # `retriever check` says so
    assert problems and "lists no checksum" in problems[0]
    index = FaissBackend(tmp_path).open(spec)
    assert isinstance(index, SelfRepairing)
    (q,) = index.quarantined
    assert (q.kind, q.path) == ("faiss_snapshot", snapshot) and q.moved_to.exists()
    assert index.count() == 0  # refilled from the catalog by the caller
    index.upsert(range(3), unit_vectors(3))
    index.close()
    assert json.loads((coll / "meta.json").read_text())["sha256"]  # checked from now on
    assert FaissBackend(tmp_path).open(spec).count() == 3


@pytest.mark.parametrize("fault", ["meta gone", "meta a directory", "snapshot a directory",
                                   "collection a file"])
def test_files_of_the_wrong_kind_are_moved_aside_not_fatal(tmp_path: Path, fault: str) -> None:
    """Each stopped start-up with a traceback (FileExistsError, IsADirectoryError), or, with
    meta.json gone, loaded the snapshot unchecked (and wrote a meta.json without its
    checksum, so it was never checked again)."""
    spec = CollectionSpec("c", DIM, "cosine")
    first = FaissBackend(tmp_path)
    first.open(spec).upsert(range(5), unit_vectors(5))
    first.close()
    coll = tmp_path / "c"
    if fault == "meta gone":
        (coll / "meta.json").unlink()
    elif fault == "meta a directory":
        (coll / "meta.json").unlink()
        (coll / "meta.json").mkdir()
    elif fault == "snapshot a directory":
        (coll / "index.faiss").unlink()
        (coll / "index.faiss").mkdir()
    else:
        shutil.rmtree(coll)
        coll.write_text("x\n")
    assert FaissBackend(tmp_path).verify("c", spec)  # `retriever check` says so
    index = FaissBackend(tmp_path).open(spec)
    assert isinstance(index, SelfRepairing)
    assert index.quarantined and all(q.moved_to.exists() for q in index.quarantined)
    assert index.count() == 0  # refilled from the catalog by the caller
    index.upsert(range(3), unit_vectors(3))
    index.close()
    assert json.loads((coll / "meta.json").read_text())["sha256"]  # checked from now on
    assert FaissBackend(tmp_path).open(spec).count() == 3


def _chroma_seeded(root: Path) -> CollectionSpec:
    """An embedded Chroma collection past its HNSW sync threshold (its segment files are
    written), cleanly closed."""
    from indexers.chroma_index import ChromaBackend

    spec = CollectionSpec("big.g1", 16, "cosine")
    backend = ChromaBackend(root)
    rng = np.random.default_rng(0)
    backend.open(spec).upsert(list(range(2000)),
                              rng.standard_normal((2000, 16)).astype(np.float32))
    backend.close()
    return spec


@pytest.mark.parametrize("damage", ["hnsw data", "hnsw header, after a crash", "sqlite page"])
def test_damaged_embedded_chroma_files_say_so_instead_of_crashing(tmp_path: Path,
                                                                  damage: str) -> None:
    """Bytes overwritten in the HNSW data crashed the process on the next search (SIGSEGV
    in Chroma's Rust bindings), in its header or a sqlite page stopped start-up with an
    InternalError or a Rust panic (no Exception). Now each is StoreDamaged, which start-up
    answers by moving the files aside and refilling them from the catalog: found at open
    against the checksums a clean stop recorded, or (with no record, after a crash) when
    the engine itself fails to read them."""
    from indexers import StoreDamaged
    from indexers.chroma_index import ChromaBackend

    spec = _chroma_seeded(tmp_path)
    assert (tmp_path / "retriever-checksums.json").is_file()
    (segment,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    if damage == "hnsw data":
        with open(segment / "data_level0.bin", "r+b") as fh:
            fh.seek(10_000)
            fh.write(b"\x7f" * 80_000)
    elif damage == "hnsw header, after a crash":
        with open(segment / "header.bin", "r+b") as fh:
            fh.write(b"\x7f" * 64)
        (tmp_path / "retriever-checksums.json").unlink()  # a crash leaves no record
    else:
        with open(tmp_path / "chroma.sqlite3", "r+b") as fh:
            fh.seek(4096)
            fh.write(b"\xde\xad" * 4096)
    backend = ChromaBackend(tmp_path)
    with pytest.raises(StoreDamaged, match="restart|changed since|cannot open"):
        backend.collections()
        backend.open(spec).count()
    backend.close()


def test_an_undamaged_embedded_chroma_opens_after_a_clean_stop_and_after_a_crash(
        tmp_path: Path) -> None:
    from indexers.chroma_index import ChromaBackend

    spec = _chroma_seeded(tmp_path)
    backend = ChromaBackend(tmp_path)
    assert backend.open(spec).count() == 2000
    assert not (tmp_path / "retriever-checksums.json").exists()  # checked, then dropped
    backend.close()
    assert (tmp_path / "retriever-checksums.json").exists()
    (tmp_path / "retriever-checksums.json").unlink()  # as after a crash: nothing to check
    again = ChromaBackend(tmp_path)
    assert again.open(spec).count() == 2000
    again.close()


def test_snapshot_on_a_full_disk_leaves_no_temp_file_and_keeps_the_last_one(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        spec = CollectionSpec("c", DIM, "cosine")
        backend = FaissBackend(disk)
        index = backend.open(spec)
        index.upsert(range(10), unit_vectors(10))
        index.flush()
        fill(disk / "filler")
        index.upsert(range(10, 2010), unit_vectors(2000, seed=1))  # ~64 KB more to write
        with pytest.raises(OSError) as exc:
            index.flush()
        assert exc.value.errno == errno.ENOSPC
        assert not list(disk.rglob("*.tmp"))
        with pytest.raises(OSError):
            backend.close()  # the last snapshot fails too, and still closes
        assert not list(disk.rglob("*.tmp"))
        reopened = FaissBackend(disk).open(spec)
        assert reopened.quarantined == () and reopened.count() == 10


# -- catalog on a full disk, no server (fast) --------------------------------------------------
def test_catalog_write_fails_cleanly_when_the_disk_is_full(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    with tmpfs(tmp_path / "disk", "2m") as disk:
        catalog = Catalog(disk / "catalog.sqlite3")
        catalog.open()
        catalog.create_namespace(NamespaceRecord(
            name=NS, backend="faiss", embedder="e", embedder_revision="r", dimension=DIM,
            metric="cosine", index_generation=1, index_version=0,
            created_at=datetime.now(UTC)))

        def chunk(i: int) -> NewChunk:
            return NewChunk(chunk_id=f"c{i}", doc_id=f"d{i}", ordinal=0, text="x" * 3000,
                            content_hash="h", start_line=1, end_line=1, start_byte=0,
                            end_byte=3000, token_count=1, chunker="w",
                            vector=unit_vectors(1)[0])

        staged = catalog.stage_chunks(NS, [chunk(i) for i in range(20)])
        filler = fill(disk / "filler")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            catalog.stage_chunks(NS, [chunk(i) for i in range(1000, 1400)])
        # Rolled back whole: no row of the failed write; reads go on.
        assert catalog.vectors(NS, staged, DIM)[0].size == 0  # pending rows are not active
        reader = sqlite3.connect(disk / "catalog.sqlite3")
        rows = [r[0] for r in reader.execute("SELECT vector_id FROM chunks ORDER BY 1")]
        reader.close()
        assert rows == sorted(staged)
        # The connection is not stuck in the failed transaction: with space, writes work.
        filler.unlink()
        assert sorted(catalog.drop_pending()[NS]) == sorted(staged)
        assert len(catalog.stage_chunks(NS, [chunk(2000)])) == 1
        catalog.close()


# -- index files, real server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, embedder) -> tuple[Path, dict[str, str]]:  # noqa: ANN001
    """A data directory with one namespace of 8 one-chunk documents, written by a real
    server (2 chunk rows fit a catalog page: several leaf pages)."""
    data_dir = tmp_path_factory.mktemp("built") / "data"
    corpus = docs(8, lines=4)
    st = ServerThread(make_settings(data_dir), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert(NS, corpus)
    finally:
        st.stop()
    return data_dir, {d.doc_id: d.content for d in corpus}


def copy_of(built: tuple[Path, dict[str, str]], tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    shutil.copytree(built[0], data_dir)
    return data_dir


# name: (file, metric kind, damage, restart once more to check the rebuilt files load)
CORRUPTIONS = {
    "snapshot-bytes-overwritten": ("index.faiss", "faiss_snapshot",
                                   lambda b: b[:200] + b"\x7f" * 64 + b[264:], True),
    "snapshot-truncated": ("index.faiss", "faiss_snapshot", lambda b: b[: len(b) // 3], False),
    "snapshot-garbage": ("index.faiss", "faiss_snapshot", lambda b: os.urandom(len(b)), False),
    "meta-garbage": ("meta.json", "faiss_meta", lambda b: b"\x93\x00garbage", True),
    "meta-wrong-json": ("meta.json", "faiss_meta", lambda b: b'{"dim": 384}', False),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_server_rebuilds_a_damaged_index_file_from_the_catalog(
        built: tuple[Path, dict[str, str]], tmp_path: Path, embedder, case: str) -> None:  # noqa: ANN001
    name, kind, damage, restart = CORRUPTIONS[case]
    data_dir = copy_of(built, tmp_path)
    coll = data_dir / "indexes" / "faiss" / f"{NS}.g1"
    target = coll / name
    target.write_bytes(damage(target.read_bytes()))
    (coll / "index.tmp").write_bytes(b"")  # a snapshot write cut short by a crash

    st = ServerThread(make_settings(data_dir), embedder).start()
    try:
        restored = st.info["reconciled"][NS]["vectors_restored"]
        with RetrieverClient(st.address) as c:
            assert restored == c.status(NS).chunk_count > 0
            assert_whole(c, NS, built[1])
        assert metric(st.info["metrics_port"], "retriever_derived_files_rebuilt_total",
                      kind=kind) == 1
    finally:
        st.stop()
    moved = list(coll.glob(f"{name}.corrupt-*"))
    assert len(moved) == 1 and not list(coll.glob("*.tmp"))
    if not restart:
        return
    again = ServerThread(make_settings(data_dir), embedder).start()  # the rebuilt files load
    try:
        assert again.info["reconciled"][NS]["vectors_restored"] == 0
        assert metric(again.info["metrics_port"], "retriever_derived_files_rebuilt_total",
                      kind=kind) == 0
    finally:
        again.stop()


@pytest.mark.integration
def test_a_collection_that_disagrees_with_the_catalog_is_rebuilt_not_fatal(
        built: tuple[Path, dict[str, str]], tmp_path: Path, embedder) -> None:  # noqa: ANN001
    """A well-formed meta.json of another dimension stopped the whole server (the catalog
    says what the namespace holds: the collection is derived data, rebuilt from it)."""
    data_dir = copy_of(built, tmp_path)
    meta = data_dir / "indexes" / "faiss" / f"{NS}.g1" / "meta.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "dimension": doc["dimension"] + 1}))
    st = ServerThread(make_settings(data_dir), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            assert st.info["reconciled"][NS]["vectors_restored"] == c.status(NS).chunk_count
            assert_whole(c, NS, built[1])
        assert metric(st.info["metrics_port"], "retriever_derived_files_rebuilt_total",
                      kind="faiss_collection") == 1
    finally:
        st.stop()


# -- damaged catalog ---------------------------------------------------------------------------
def serve_process(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RETRIEVER_DATA_DIR=str(data_dir), RETRIEVER_GRPC_PORT="0",
               RETRIEVER_METRICS_PORT="0")
    return subprocess.run([sys.executable, "-m", "retriever.cli", "serve", "--log-level",
                           "WARNING"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["page", "header"])
def test_damaged_catalog_stops_startup_with_one_clear_line(
        built: tuple[Path, dict[str, str]], tmp_path: Path, damage: str) -> None:
    data_dir = copy_of(built, tmp_path)
    catalog = data_dir / "catalog.sqlite3"
    if damage == "page":
        smash_page(catalog, "chunks")
    else:
        with open(catalog, "r+b") as fh:
            fh.write(b"this is no database header")
    proc = serve_process(data_dir)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(catalog) in lines[0] and "damaged" in lines[0]
    assert "retriever check" in lines[0] and "retriever repair" in lines[0]


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["deleted", "emptied"])
def test_a_missing_catalog_beside_indexes_stops_startup_and_keeps_them(
        built: tuple[Path, dict[str, str]], tmp_path: Path, loss: str) -> None:
    """A catalog deleted or emptied (or the wrong volume mounted) beside the indexes of its
    namespaces was created anew: `check` said healthy, and the server dropped every index
    as "of no namespace" and served nothing. Now start-up stops with one line naming the
    file and what to do, check reports it, repair refuses, and nothing is dropped."""
    data_dir = copy_of(built, tmp_path)
    catalog = data_dir / "catalog.sqlite3"
    for suffix in ("-wal", "-shm"):
        (data_dir / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
    if loss == "deleted":
        catalog.unlink()
    else:
        catalog.write_bytes(b"")
    indexes = sorted(p.relative_to(data_dir) for p in (data_dir / "indexes").rglob("*"))
    proc = serve_process(data_dir)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(catalog) in lines[0] and ("missing" if loss == "deleted" else "empty") in lines[0]
    assert "indexes/" in lines[0] and "move indexes/ and lexical/ out of" in lines[0]
    checked = runner.invoke(app, ["check", "--data-dir", str(data_dir)])
    assert checked.exit_code == 1 and "MISSING" in checked.stdout, checked.output
    assert "CATALOG MISSING: restore it" in checked.stdout
    assert "run `retriever repair`" not in checked.stdout  # it would refuse
    repaired = runner.invoke(app, ["repair", "--data-dir", str(data_dir)])
    assert repaired.exit_code != 0 and "source of truth" in repaired.output, repaired.output
    assert sorted(p.relative_to(data_dir) for p in (data_dir / "indexes").rglob("*")) == indexes
    assert (catalog.exists() and catalog.stat().st_size == 0) or not catalog.exists()
    # Moved out as the message says, the server starts empty.
    for top in ("indexes", "lexical"):
        shutil.move(data_dir / top, tmp_path / f"kept-{top}")
    assert runner.invoke(app, ["check", "--data-dir", str(data_dir)]).exit_code == 0


@pytest.mark.integration
def test_a_directory_in_place_of_the_catalog_stops_startup_with_one_line(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    data_dir = copy_of(built, tmp_path)
    catalog = data_dir / "catalog.sqlite3"
    catalog.rename(tmp_path / "kept.sqlite3")
    catalog.mkdir()
    proc = serve_process(data_dir)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(catalog) in lines[0] and "is a directory" in lines[0]


@pytest.mark.integration
def test_check_and_repair_recover_every_whole_document(
        built: tuple[Path, dict[str, str]], tmp_path: Path, embedder) -> None:  # noqa: ANN001
    data_dir = copy_of(built, tmp_path)
    healthy = runner.invoke(app, ["check", "--data-dir", str(data_dir)])
    assert healthy.exit_code == 0, healthy.output
    assert "healthy" in healthy.stdout

    smash_page(data_dir / "catalog.sqlite3", "chunks")
    checked = runner.invoke(app, ["check", "--data-dir", str(data_dir)])
    assert checked.exit_code == 1, checked.output
    assert "DAMAGED" in checked.stdout and "would recover" in checked.stdout

    repaired = runner.invoke(app, ["repair", "--data-dir", str(data_dir)])
    assert repaired.exit_code == 0, repaired.output
    lost = {line.strip().split("/", 1)[1] for line in repaired.stdout.splitlines()
            if line.startswith(f"    {NS}/")}
    # One page of chunks holds a row or two: those documents go, whole; the rest stay.
    assert 1 <= len(lost) <= 3 and lost <= set(built[1])
    assert lost == {line.strip().split("/", 1)[1] for line in checked.stdout.splitlines()
                    if line.startswith(f"    {NS}/")}  # check said so beforehand
    (quarantine,) = (data_dir / "quarantine").iterdir()
    assert (quarantine / "catalog.sqlite3").exists() and (quarantine / "indexes").is_dir()
    assert (quarantine / "lost-documents.tsv").read_text().count("\n") == len(lost)
    assert runner.invoke(app, ["check", "--data-dir", str(data_dir)]).exit_code == 0

    st = ServerThread(make_settings(data_dir), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            assert_whole(c, NS, {k: v for k, v in built[1].items() if k not in lost})
            for doc_id in lost:
                with pytest.raises(grpc.RpcError) as e:
                    c.get_document(NS, doc_id)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            c.upsert(NS, [pb.Document(doc_id=d, content=built[1][d]) for d in lost])
            assert_whole(c, NS, built[1])  # indexed again, all is back
    finally:
        st.stop()


@pytest.mark.integration
def test_repair_of_an_older_catalog_keeps_the_source_binding_as_never_synced(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A catalog from before chunk symbols (schema 2: columns the current schema fills by
    default are missing) repairs; a namespace's git source binding survives the repair, as
    never synced, so the next sync reconciles in full and brings back what the repair
    dropped. Its sync history and golden sets survive too."""
    from datetime import UTC, datetime

    from retriever.catalog import Catalog, SourceRecord
    from retriever.domain import GoldenQuery, GoldenSet

    data_dir = copy_of(built, tmp_path)
    path = data_dir / "catalog.sqlite3"
    cat = Catalog(path)
    cat.open()
    cat.put_source(SourceRecord(NS, "/srv/repos/app", "main", ("src/**",), (), 1 << 20,
                                last_commit="a" * 40))
    cat.add_sync("s1", NS, datetime.now(UTC))
    cat.add_golden_set(GoldenSet(NS, "smoke", 0, None, "request",
                                 (GoldenQuery("q1", "knead", {"a": 1}),)))
    cat.close()
    with sqlite3.connect(path) as db:
        for col in ("symbol", "kind", "fallback", "header"):
            db.execute(f"ALTER TABLE chunks DROP COLUMN {col}")
    smash_page(path, "chunks")
    repaired = runner.invoke(app, ["repair", "--data-dir", str(data_dir)])
    assert repaired.exit_code == 0, repaired.output
    assert "sources 1" in repaired.stdout
    cat = Catalog(path)
    cat.open()
    try:
        source = cat.get_source(NS)
        assert source is not None and source.location == "/srv/repos/app"
        assert source.include == ("src/**",)
        assert (source.last_commit, source.pending_full) == ("", True)
        assert [s.sync_id for s in cat.list_syncs(NS, 10)] == ["s1"]
        golden = cat.get_golden_set(NS, "smoke")
        assert golden is not None and golden.queries[0].doc_grades == {"a": 1}
    finally:
        cat.close()


@pytest.mark.integration
def test_repair_refuses_while_a_server_uses_the_directory(tmp_path: Path, embedder) -> None:  # noqa: ANN001
    st = ServerThread(make_settings(tmp_path / "data"), embedder).start()
    try:
        result = runner.invoke(app, ["repair", "--data-dir", str(tmp_path / "data")])
        assert result.exit_code == 1
        assert "in use by another retriever process" in result.output
    finally:
        st.stop()


# -- full disk, real server --------------------------------------------------------------------
def heavy_docs(n: int) -> list[pb.Document]:
    """Empty documents (nothing to embed) that take ~66 KB of catalog each in metadata:
    space to free on a small disk, quickly."""
    return [pb.Document(doc_id=f"heavy-{i}", content="",
                        metadata={f"k{j:02d}": f"{i}-{j}-" + "m" * 1000 for j in range(64)})
            for i in range(n)]


@pytest.mark.integration
def test_full_disk_refuses_writes_keeps_deletes_and_loses_nothing(tmp_path: Path,
                                                                  embedder) -> None:  # noqa: ANN001
    reserve = 512 * 1024
    with tmpfs(tmp_path / "disk", "12m") as disk:
        data_dir = disk / "data"
        settings = make_settings(data_dir, storage_reserve_bytes=reserve,
                                 index_flush_interval_s=3600)
        kept = docs(4, "kept", lines=3)
        acked = {d.doc_id: d.content for d in kept}
        st = ServerThread(settings, embedder).start()
        try:
            assert (data_dir / "space-reserve").stat().st_size == reserve
            with RetrieverClient(st.address) as c:
                c.upsert(NS, kept)
                c.upsert("bulk", heavy_docs(32))
        finally:
            st.stop()  # as in a long-running server, most of the catalog is checkpointed

        st = ServerThread(settings, embedder).start()
        try:
            with RetrieverClient(st.address) as c:
                filler = fill(disk / "filler")
                with pytest.raises(grpc.RpcError) as e:
                    c.upsert(NS, docs(2, "late", lines=3))
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "disk is full" in (e.value.details() or "")
                assert retry_info(e.value) == []  # no retry helps until space is freed
                assert not (data_dir / "space-reserve").exists()  # released for deletes
                port = st.info["metrics_port"]
                assert metric(port, "retriever_storage_full") == 1
                with pytest.raises(grpc.RpcError) as e:  # refused at once now
                    c.upsert(NS, docs(1, "later"))
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert retry_info(e.value) == []
                assert c.search(NS, "glaciers", top_k=3).hits  # reads still work

                assert c.delete(NS, [kept[0].doc_id]).documents_deleted == 1
                del acked[kept[0].doc_id]
                # Deleting enough gives the disk room back: the reserve returns, writes work.
                assert c.delete_namespace("bulk").documents_deleted == 32
                assert metric(port, "retriever_storage_full") == 0
                assert (data_dir / "space-reserve").stat().st_size == reserve
                again = docs(2, "again", lines=3)
                c.upsert(NS, again)
                acked.update({d.doc_id: d.content for d in again})
                assert_whole(c, NS, acked)
                fill(disk / "filler2")  # full again, so the last snapshot at shutdown fails
        finally:
            st.stop()
        # No litter: the failed snapshot's temp file is gone.
        assert not list(data_dir.rglob("*.tmp")), list(data_dir.rglob("*"))
        filler.unlink()
        (disk / "filler2").unlink()

        st = ServerThread(settings, embedder).start()
        try:
            with RetrieverClient(st.address) as c:
                assert_whole(c, NS, acked)  # every acknowledged document, nothing else
                assert [n.name for n in c.list_namespaces().namespaces] == [NS]
        finally:
            st.stop()
