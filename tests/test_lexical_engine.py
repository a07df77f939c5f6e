"""The tantivy lexical index (retriever/lexical.py): filter semantics against the reference,
BM25 ranking, idle writers, and through the real service: entries the catalog does not show
are skipped, damage is rebuilt from the catalog, a failing index falls back to FTS5."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from conftest import make_settings
from test_storage_faults import metric
from typer.testing import CliRunner

from indexers import Filter, Payload
from retriever import lexical
from retriever.cli import app
from retriever.client import RetrieverClient
from retriever.domain import Document, SearchMode, SearchQuery
from retriever.lexical import LexicalIndex, prefix_regex
from retriever.namespaces import lexical_dir
from retriever.server.app import ServerThread
from retriever.service import RetrieverService
from retriever.v1 import retriever_pb2 as pb

# Paths with every character tantivy's regular expressions treat specially, non-ASCII,
# a newline, and prefixes of one another.
PATHS = ["src/a.py", "src/a.pyx", "src/ab/c.py", "a.b/c(1).py", "[x]/y^$.rs", "é/ü+x.go",
         "a\nb/x.md", "docs/$HOME|{x}~#&-.txt", "src", "s", "", "src/a\\b.py", "x*?.c",
         # Longer than one regular expression may be (~980 bytes): the engine matches the
         # first PREFIX_REGEX_BYTES and the rest is checked on the hits.
         "深/" * 400 + "x.py", "深/" * 400 + "y.py", "a" * 1500 + ".py", "a" * 1500 + ".rs"]


def _payloads(rng: random.Random, n: int) -> list[Payload]:
    out = []
    for i in range(n):
        meta = tuple(sorted({k: rng.choice(["1", "2", "ä b"]) for k in
                             rng.sample(["team", "tier", "k=v"], rng.randint(0, 2))}.items()))
        out.append(Payload(doc_id=f"d{i % 17}", path=rng.choice(PATHS),
                           language=rng.choice(["python", "go", ""]),
                           kind=rng.choice(["function", "class", ""]), metadata=meta))
    return out


def _filters(rng: random.Random, payloads: list[Payload]) -> list[Filter]:
    out = [Filter()]
    for _ in range(300):
        p = rng.choice(payloads)
        f = Filter(
            doc_ids=tuple(rng.sample([p.doc_id, "d1", "d99"], rng.randint(0, 2))),
            path_prefix=(p.path[: rng.randint(0, len(p.path))] if rng.random() < 0.6
                         else rng.choice(PATHS)),
            languages=tuple(rng.sample([p.language, "rust"], rng.randint(0, 2))),
            kinds=tuple(rng.sample([p.kind, "section"], rng.randint(0, 1))),
            metadata=tuple(rng.sample(list(p.metadata) + [("team", "9")],
                                      rng.randint(0, min(2, len(p.metadata) + 1)))))
        out.append(f)
    return out


def test_filters_select_exactly_what_the_reference_semantics_select(tmp_path: Path) -> None:
    rng = random.Random(5)
    payloads = _payloads(rng, 400)
    lex = LexicalIndex(tmp_path / "lx")
    try:
        ids = list(range(1000, 1400))
        lex.add(ids, [f"shared w{i % 9}" for i in range(400)], payloads)
        tried = 0
        for f in _filters(rng, payloads):
            want = {vid for vid, p in zip(ids, payloads, strict=True) if f.matches(p)}
            got = lex.search(["shared"], f, 1000)
            assert {vid for vid, _ in got} == want, f
            tried += bool(want)
        assert tried > 50  # many filters select something: the check is not vacuous
    finally:
        lex.close()


def test_prefix_regex_escapes_what_the_engine_would_read_as_syntax() -> None:
    assert prefix_regex("a.b(") == "(?s)a\\.b\\(.*"
    assert prefix_regex("é/x") == "(?s)é/x.*"


def test_bm25_ranks_rare_terms_first_and_keeps_every_query_term(tmp_path: Path) -> None:
    """Unlike the FTS5 path, no query term is dropped (the engine skips what cannot reach
    the top k): a term in every chunk still matches, below the rare one."""
    lex = LexicalIndex(tmp_path / "lx")
    try:
        rare = {7, 42, 99}
        lex.add(list(range(240)), [f"zzcommon entry {i}" + (" zzrare" if i in rare else "")
                                   for i in range(240)],
                [Payload(f"d{i}", f"n/{i}") for i in range(240)])
        got = lex.search(["zzcommon", "zzrare"], Filter(), 100)
        assert {v for v, _ in got[:3]} == rare
        assert len(got) == 100 and got[3][1] < got[2][1]
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        # Deletes leave the statistics of what remains; deleted ids never come back.
        lex.delete([7] + list(range(100, 240)))
        got = lex.search(["zzcommon", "zzrare"], Filter(), 300)
        assert {v for v, _ in got[:2]} == {42, 99} and 7 not in {v for v, _ in got}
        assert len(got) == 99
        assert lex.fingerprint() == (99, sum(i for i in range(100) if i != 7))
        assert lex.ids() == [i for i in range(100) if i != 7]
    finally:
        lex.close()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_an_idle_writer_is_closed_and_a_later_write_reopens_it(tmp_path: Path) -> None:
    before = _threads()
    lex = LexicalIndex(tmp_path / "lx", idle_close_s=0.3)
    try:
        lex.add([1], ["alpha"], [Payload("d", "p")])
        assert _threads() > before  # the writer's threads
        deadline = time.monotonic() + 10
        while _threads() > before + 1 and time.monotonic() < deadline:  # (+1: its timer)
            time.sleep(0.05)
        assert _threads() <= before + 1
        lex.add([2], ["alpha beta"], [Payload("d", "p")])
        assert {v for v, _ in lex.search(["alpha"], Filter(), 10)} == {1, 2}
    finally:
        lex.close()
    reopened = LexicalIndex(tmp_path / "lx")  # committed: persisted
    try:
        assert reopened.damaged is None and reopened.fingerprint() == (2, 3)
    finally:
        reopened.close()


@pytest.mark.parametrize("races", [1, 1000])
def test_a_segment_file_a_merge_deletes_meanwhile_does_not_fail_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        races: int) -> None:
    """A merge ending on the writer's threads deletes the segment files it replaced
    whenever it ends; one listed for the checksum record just before was gone when read,
    and the committed write answered FileNotFoundError (under load-tests' mixed load: "could
    not remove 14 chunks from the lexical index ... .del'"). The listing is taken again; a
    record that cannot be made is logged, and the write stands."""
    lex = LexicalIndex(tmp_path / "lx")
    real = lexical._committed_files
    left = [races]

    def racing(path: Path) -> list[str]:  # listed, then deleted by a merge before read
        names = real(path)
        if left[0] > 0:
            left[0] -= 1
            names.append("0123456789abcdef0123456789abcdef.7.del")
        return names

    try:
        lex.add([1, 2], ["alpha", "alpha beta"], [Payload("d", "p")] * 2)
        monkeypatch.setattr(lexical, "_committed_files", racing)
        lex.delete([1])
        lex.add([3], ["alpha gamma"], [Payload("e", "q")])
        assert {v for v, _ in lex.search(["alpha"], Filter(), 10)} == {2, 3}
        monkeypatch.setattr(lexical, "_committed_files", real)
        recorded = json.loads((tmp_path / "lx" / lexical._CHECKSUMS).read_text())
        assert not any(n.startswith("0123456789abcdef") for n in recorded)
        assert not list((tmp_path / "lx").glob("*.tmp"))
        warned = [r for r in caplog.records if "could not record" in r.getMessage()]
        assert bool(warned) == (races > 1)
    finally:
        lex.close()
    reopened = LexicalIndex(tmp_path / "lx")
    try:
        assert reopened.damaged is None and reopened.fingerprint() == (2, 5)
    finally:
        reopened.close()


def _flip_bytes(path: Path) -> None:
    """Overwrite bytes in the middle of the file in place (no truncation: a mapped file
    stays valid to read)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 4)
        block = f.read(max(1, size // 4))
        f.seek(size // 4)
        f.write(bytes(b ^ 0x5A for b in block))


CORPUS = {f"n{i:02d}.md": f"note {i}: the {word} protocol handles {word}_frames and retries"
          for i, word in enumerate(["gossip", "raft", "paxos", "quic", "tcp", "udp", "sctp",
                                    "mqtt", "amqp", "grpc", "http", "smtp"])}


def _lexical_ids(c: RetrieverClient, ns: str, query: str) -> list[str]:
    resp = c.stub.Search(pb.SearchRequest(namespace=ns, query=query, top_k=5,
                                          mode=pb.LEXICAL), timeout=60)
    return [h.chunk.doc_id for h in resp.hits]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, embedder) -> Path:  # noqa: ANN001
    data = tmp_path_factory.mktemp("lexical") / "data"
    st = ServerThread(make_settings(data), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("lex", [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()])
            assert _lexical_ids(c, "lex", "paxos_frames")[0] == "n02.md"
    finally:
        st.stop()
    return data


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["segment-bytes", "meta-garbage", "removed", "root-a-file"])
def test_a_damaged_or_missing_lexical_index_is_rebuilt_from_the_catalog(
        built: Path, tmp_path: Path, embedder, damage: str) -> None:  # noqa: ANN001
    data = tmp_path / "data"
    shutil.copytree(built, data)
    lx = data / "lexical" / lexical_dir("lex")
    if damage == "segment-bytes":
        _flip_bytes(next(lx.glob("*.idx")))
    elif damage == "meta-garbage":
        (lx / "meta.json").write_text("{garbage")
    elif damage == "removed":
        shutil.rmtree(lx)
    else:  # a file where the directory of every namespace's lexical index should be
        shutil.rmtree(lx.parent)
        lx.parent.write_text("not a directory")
    if damage == "root-a-file":  # (check lists the namespaces' indexes under lexical/ only)
        st = ServerThread(make_settings(data), embedder).start()
        try:
            assert st.info["reconciled"]["lex"]["lexical_entries_added"] == len(CORPUS)
            assert metric(st.info["metrics_port"], "retriever_derived_files_rebuilt_total",
                          kind="lexical_index") == 1
            with RetrieverClient(st.address) as c:
                assert _lexical_ids(c, "lex", "paxos_frames")[0] == "n02.md"
        finally:
            st.stop()
        assert [p.read_text() for p in data.glob("lexical.damaged-*")] == ["not a directory"]
        return
    checked = CliRunner().invoke(app, ["check", "--data-dir", str(data)])
    line = next(ln for ln in checked.stdout.splitlines() if ln.startswith("index lexical/"))
    assert "namespace lex" in line, checked.stdout
    if damage == "removed":
        assert checked.exit_code == 0 and "not built yet" in line, checked.stdout
    else:
        assert checked.exit_code == 1 and "DAMAGED" in line, checked.stdout
        assert "starting the server repairs them" in checked.stdout
    st = ServerThread(make_settings(data), embedder).start()
    try:
        assert st.info["reconciled"]["lex"]["lexical_entries_added"] == len(CORPUS)
        rebuilt = metric(st.info["metrics_port"], "retriever_derived_files_rebuilt_total",
                         kind="lexical_index")
        assert rebuilt == (0 if damage == "removed" else 1)
        with RetrieverClient(st.address) as c:
            assert _lexical_ids(c, "lex", "paxos_frames")[0] == "n02.md"
            assert _lexical_ids(c, "lex", "quic protocol")[0] == "n03.md"
    finally:
        st.stop()
    assert len(list(lx.parent.glob(lx.name + ".damaged-*"))) == (damage != "removed")
    again = ServerThread(make_settings(data), embedder).start()  # the rebuilt index loads
    try:
        assert again.info["reconciled"]["lex"]["lexical_entries_added"] == 0
    finally:
        again.stop()
    healthy = CliRunner().invoke(app, ["check", "--data-dir", str(data)])
    assert healthy.exit_code == 0 and "healthy" in healthy.stdout, healthy.stdout


@pytest.mark.integration
def test_a_search_the_index_fails_falls_back_to_fts5_and_the_next_start_rebuilds(
        built: Path, tmp_path: Path, embedder) -> None:  # noqa: ANN001
    data = tmp_path / "data"
    shutil.copytree(built, data)
    lx = data / "lexical" / lexical_dir("lex")
    st = ServerThread(make_settings(data), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            # The postings, read by every search (before any search: the engine caches what
            # it decoded). A search reads its hits' ids from the fast field, not the stored
            # documents.
            for postings in lx.glob("*.idx"):
                _flip_bytes(postings)
            # Answered all the same (from the catalog's FTS5 table), and marked for rebuild.
            assert _lexical_ids(c, "lex", "raft_frames")[0] == "n01.md"
            assert (lx / "retriever-failed").exists()
            assert _lexical_ids(c, "lex", "mqtt protocol")[0] == "n07.md"
    finally:
        st.stop()
    again = ServerThread(make_settings(data), embedder).start()
    try:
        assert again.info["reconciled"]["lex"]["lexical_entries_added"] == len(CORPUS)
        with RetrieverClient(again.address) as c:
            assert _lexical_ids(c, "lex", "raft_frames")[0] == "n01.md"
    finally:
        again.stop()


@pytest.mark.integration
def test_entries_the_catalog_does_not_show_are_skipped_however_many(
        tmp_path: Path, embedder) -> None:  # noqa: ANN001
    """Entries left in the index for chunks that were never committed (a crash between the
    lexical write and the commit) or were superseded can outscore every visible chunk: the
    search asks for more until it has enough visible ones."""
    svc = RetrieverService(make_settings(tmp_path / "data"), embedder=embedder)
    svc.start()
    try:
        svc.upsert("ns", [Document(doc_id=k, content=v) for k, v in CORPUS.items()])
        handle = svc.namespaces.get("ns")
        assert handle.lexical is not None
        ghosts = list(range(10**9, 10**9 + 3000))
        handle.lexical.add(ghosts, ["grpc_frames grpc grpc_frames grpc"] * len(ghosts),
                           [Payload("n09.md", "n09.md")] * len(ghosts))
        result = svc.search(SearchQuery(namespace="ns", query="grpc_frames", top_k=3,
                                        mode=SearchMode.LEXICAL), "r1")
        assert [h.chunk.doc_id for h in result.hits][:1] == ["n09.md"]
        assert len(result.hits) == 3  # every chunk has "frames": all three are real
        assert all(h.chunk.vector_id < 10**9 and h.chunk.chunk_id for h in result.hits)
    finally:
        svc.close()


@pytest.mark.integration
def test_deleting_a_namespace_removes_its_lexical_index_and_a_new_one_starts_empty(
        tmp_path: Path, embedder) -> None:  # noqa: ANN001
    data = tmp_path / "data"
    st = ServerThread(make_settings(data), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("gone", [pb.Document(doc_id="a.md", content="zebra crossing rules")])
            lx = data / "lexical" / lexical_dir("gone")
            assert lx.is_dir()
            c.stub.DeleteNamespace(pb.DeleteNamespaceRequest(name="gone"), timeout=60)
            assert not lx.exists()
            c.upsert("gone", [pb.Document(doc_id="b.md", content="giraffe feeding times")])
            assert _lexical_ids(c, "gone", "zebra") == []
            assert _lexical_ids(c, "gone", "giraffe") == ["b.md"]
    finally:
        st.stop()


@pytest.mark.integration
def test_a_lexical_answer_read_before_the_lock_is_used_only_if_no_commit_came_between(
        tmp_path: Path, embedder) -> None:  # noqa: ANN001
    """A hybrid search asks the lexical index while its query is embedded, before it takes
    the visibility lock; under the lock it uses that answer only if the lock's generation
    has not moved (no commit since), and asks again otherwise."""
    from retriever.search.pipeline import _Early

    svc = RetrieverService(make_settings(tmp_path / "data"), embedder=embedder)
    svc.start()
    try:
        svc.upsert("ns", [Document(doc_id=k, content=v) for k, v in CORPUS.items()])
        handle, searcher = svc.namespaces.get("ns"), svc.searcher
        assert searcher is not None
        q = SearchQuery(namespace="ns", query="zeppelin_frames protocol", top_k=3,
                        mode=SearchMode.HYBRID)
        vec = searcher._embed_queries([q.query]).result()[0]

        def top(early: _Early | None) -> object:
            return searcher._one(q, SearchMode.HYBRID, handle, vec, "r", None,
                                 time.perf_counter(), early).hits[0]

        before = searcher._early_lexical(q, handle)  # read before z.md exists
        assert before is not None
        svc.upsert("ns", [Document(doc_id="z.md", content="zeppelin_frames: the zeppelin "
                                   "protocol handles zeppelin_frames")])
        assert before.generation != handle.visibility.generation
        hit = top(before)  # stale: asked again, so z.md is found lexically too
        assert hit.chunk.doc_id == "z.md" and hit.lexical_score is not None
        current = searcher._early_lexical(q, handle)
        assert current is not None and current.generation == handle.visibility.generation
        assert top(current).lexical_score == hit.lexical_score
        # An answer of the current generation is used as it is (here: one with no match,
        # so the lexical side contributes nothing).
        empty = _Early(handle.visibility.generation, current.terms, current.k, [], 0.0)
        assert top(empty).lexical_score is None
    finally:
        svc.close()


def _eight_commits(path: Path) -> LexicalIndex:
    """An index of eight one-chunk commits: enough for tantivy to merge segments."""
    lex = LexicalIndex(path)
    for i in range(8):
        lex.add([i], [f"zz{i}q some words here number {i}"], [Payload(f"f{i}.md", f"f{i}.md")])
    return lex


def test_segments_a_merge_publishes_after_the_last_commit_are_recorded_at_close(
        tmp_path: Path) -> None:
    """A merge ending after the last commit (close waits for it) published segment files
    no checksum record covered: damage to them passed `retriever check` and the start-up
    check, and the index served wrong hits. They are recorded when the writer ends; a
    committed file with no record (a kill between a merge and the next record) is taken as
    damaged, and the index rebuilt."""
    lx = tmp_path / "lx"
    _eight_commits(lx).close()
    recorded = json.loads((lx / lexical._CHECKSUMS).read_text())
    assert set(lexical._committed_files(lx)) <= set(recorded)
    assert lexical.verify(lx) == []
    # What a kill right after a merge leaves: a committed file the record does not name.
    name = next(n for n in lexical._committed_files(lx) if n.endswith(".idx"))
    del recorded[name]
    (lx / lexical._CHECKSUMS).write_text(json.dumps(recorded))
    assert any("has no recorded checksum" in p for p in lexical.verify(lx))
    lex = LexicalIndex(lx)
    try:
        assert lex.damaged is not None and "has no recorded checksum" in lex.damaged.reason
        assert lex.ids() == []  # empty: the reconcile refills it from the catalog
    finally:
        lex.close()
    # A record that is gone altogether: nothing can be verified, so it is rebuilt too.
    _eight_commits(tmp_path / "lx2").close()
    (tmp_path / "lx2" / lexical._CHECKSUMS).unlink()
    assert any("checksums" in p for p in lexical.verify(tmp_path / "lx2"))


def test_a_file_where_the_index_directory_should_be_is_moved_aside(tmp_path: Path) -> None:
    lx = tmp_path / "lx"
    lx.write_text("not a directory")
    assert lexical.verify(lx) != []  # `retriever check` reports it
    lex = LexicalIndex(lx)
    try:
        assert lex.damaged is not None and lx.is_dir()
        assert [p.read_text() for p in tmp_path.glob("lx.damaged-*")] == ["not a directory"]
        lex.add([1], ["paxos"], [Payload("a", "a")])
        assert [v for v, _ in lex.search(["paxos"], Filter(), 5)] == [1]
    finally:
        lex.close()
    lx2 = tmp_path / "lx2"  # two moves in the same second keep both
    for _ in range(2):
        shutil.rmtree(lx2, ignore_errors=True)
        lx2.write_text("x")
        LexicalIndex(lx2).close()
    assert len(list(tmp_path.glob("lx2.damaged-*"))) == 2


def test_damage_that_panics_the_engine_is_a_damaged_index_not_a_crash(tmp_path: Path) -> None:
    """Damage its checksums cannot see (made before they were recorded) can make tantivy
    panic; a Rust panic reaches Python as a BaseException, which start-up and `retriever
    check` let through: the server and the check died with a traceback."""
    from indexers._files import file_crc32

    lx = tmp_path / "lx"
    _eight_commits(lx).close()
    recorded = json.loads((lx / lexical._CHECKSUMS).read_text())
    for name in lexical._committed_files(lx):
        if name.endswith(".fast"):
            data = bytearray((lx / name).read_bytes())
            at = len(data) // 4
            data[at:at + 16] = bytes(b ^ 1 for b in data[at:at + 16])
            (lx / name).write_bytes(bytes(data))
            recorded[name] = file_crc32(lx / name)
    (lx / lexical._CHECKSUMS).write_text(json.dumps(recorded))
    assert any("PanicException" in p for p in lexical.verify(lx))
    lex = LexicalIndex(lx)
    try:
        assert lex.damaged is not None and "PanicException" in lex.damaged.reason
        assert lex.ids() == []
    finally:
        lex.close()


@pytest.mark.integration
def test_a_lexical_write_on_a_full_disk_is_storage_full_and_recovers(tmp_path: Path) -> None:
    """tantivy reports a full disk as a ValueError ("An index writer was killed ...
    io::Error"): it reached callers as INTERNAL, and the service's full-disk state
    (RESOURCE_EXHAUSTED, no RetryInfo, deletes still possible) was not entered; the dead
    writer was kept, failing every write after. Once space is freed the index writes
    again."""
    from test_storage_faults import fill, tmpfs

    from retriever.errors import StorageFull, translate

    with tmpfs(tmp_path / "disk", "8m") as disk:
        lex = LexicalIndex(disk / "lx", idle_close_s=0)
        try:
            def add(batch: int, n: int = 200) -> None:
                ids = list(range(batch * n, batch * n + n))
                lex.add(ids, [f"w{v} " + "lorem ipsum dolor " * 50 for v in ids],
                        [Payload(f"d{v}", f"p{v}") for v in ids])

            add(0)
            filler = fill(disk / "filler")
            with pytest.raises(BaseException) as e:  # noqa: PT011 - the engine's own type
                for batch in range(1, 50):
                    add(batch)
            assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
            assert isinstance(translate(e.value), StorageFull), repr(e.value)
            filler.unlink()
            add(60)
            assert [v for v, _ in lex.search(["w12000"], Filter(), 1)] == [12000]
        finally:
            lex.close()


@pytest.mark.parametrize("loss", [".pos", "meta.json"])
def test_a_lost_segment_file_or_segment_list_is_damage(tmp_path: Path, loss: str) -> None:
    """A committed segment file that is gone (its checksum recorded) was dropped from the
    check as "not committed", and a lost meta.json reopened as an empty index with no word:
    both are damage (moved aside, rebuilt from the catalog, counted)."""
    lx = tmp_path / "lx"
    _eight_commits(lx).close()
    if loss == "meta.json":
        (lx / "meta.json").unlink()
    else:
        next(lx / n for n in lexical._committed_files(lx) if n.endswith(loss)).unlink()
    assert any("missing" in p for p in lexical.verify(lx))
    lex = LexicalIndex(lx)
    try:
        assert lex.damaged is not None and "missing" in lex.damaged.reason
    finally:
        lex.close()
