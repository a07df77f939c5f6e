"""Search modes through the real server: dense, lexical, hybrid, re-ranking and shaping."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_settings, running_server
from corpus import CORPUS

from retriever.catalog import Catalog, _terms_table
from retriever.client import RetrieverClient
from retriever.models.embedder import Embedder, default_model_path
from retriever.server.app import ServerThread
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration
NS = "modes"


def build_cross_encoder(directory: Path) -> Path:
    """A small, randomly initialised BERT cross-encoder saved where a real one would be
    (no weights can be downloaded here): it exercises the real loading and scoring code."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                     num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("tiny-ce"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder,
           cross_encoder: Path) -> Iterator[ServerThread]:
    data = Path(tmp_path_factory.mktemp("modes")) / "data"
    with running_server(make_settings(data, reranker_model=str(cross_encoder)),
                        embedder) as st:
        with RetrieverClient(st.address) as c:
            c.upsert(NS, [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()])
        yield st


@pytest.fixture
def client(server: ServerThread) -> Iterator[RetrieverClient]:
    with RetrieverClient(server.address) as c:
        yield c


def _search(client: RetrieverClient, query: str, **kw: object) -> pb.SearchResponse:
    kw.setdefault("top_k", 5)
    return client.stub.Search(pb.SearchRequest(namespace=NS, query=query, **kw), timeout=60)


def test_each_mode_fills_its_own_scores_and_names_itself(client: RetrieverClient) -> None:
    dense = _search(client, "parse_config toml settings", mode=pb.DENSE)
    assert dense.lineage.mode == pb.DENSE and dense.lineage.analyzer == ""
    for h in dense.hits:
        assert h.HasField("dense_score") and not h.HasField("lexical_score")
        assert h.score == pytest.approx(h.dense_score)
    assert dense.timings.HasField("ann") and not dense.timings.HasField("lexical")

    lexical = _search(client, "parse_config toml settings", mode=pb.LEXICAL)
    assert lexical.lineage.mode == pb.LEXICAL and lexical.lineage.analyzer == "code-v1"
    assert lexical.hits and lexical.hits[0].chunk.path == "src/config.py"
    for h in lexical.hits:
        assert h.HasField("lexical_score") and not h.HasField("dense_score")
        assert h.score == pytest.approx(h.lexical_score) and h.score > 0
    assert not lexical.timings.HasField("embed") and lexical.timings.HasField("lexical")

    hybrid = _search(client, "parse_config toml settings", mode=pb.HYBRID)
    assert hybrid.lineage.mode == pb.HYBRID and hybrid.timings.HasField("fuse")
    assert hybrid.hits[0].chunk.path == "src/config.py"
    assert all(h.HasField("fused_score") and h.score == pytest.approx(h.fused_score)
               for h in hybrid.hits)
    assert [h.score for h in hybrid.hits] == sorted((h.score for h in hybrid.hits),
                                                    reverse=True)
    # The default mode is hybrid (the setting's default).
    assert _search(client, "parse_config").lineage.mode == pb.HYBRID


def test_a_hybrid_search_reads_both_sides_heads_in_one_catalog_statement(
        tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lexical answer read while the query is embedded has its candidates' heads read
    with the dense side's: one statement (each one gives up the interpreter lock and waits
    to win it back behind a loaded server's threads), though most lexical candidates are
    not among the dense ones here (10 dense candidates, 40 documents with the term)."""
    calls: list[int] = []
    heads = Catalog.chunk_heads

    def counted(self: Catalog, namespace: str, ids: list[int]) -> dict:
        calls.append(len(ids))
        return heads(self, namespace, ids)

    topics = ("tides and the moon", "baking sourdough bread", "compiling a kernel",
              "migrating birds", "tax forms", "chess openings", "volcanic islands",
              "jazz harmony")
    docs = [pb.Document(doc_id=f"d{i}", content=f"Notes {i} on {topics[i % 8]}: the "
                        f"frobnicator{'' if i % 3 else ' frobnicator'} appears here.")
            for i in range(40)]
    with running_server(make_settings(tmp_path / "data", hybrid_candidates=1),
                        embedder) as st, RetrieverClient(st.address) as c:
        c.upsert(NS, docs)
        q = pb.SearchRequest(namespace=NS, query="frobnicator", top_k=1, mode=pb.HYBRID,
                             dense_weight=0.0)
        monkeypatch.setattr(Catalog, "chunk_heads", counted)
        hybrid = c.stub.Search(q, timeout=60)
        monkeypatch.undo()
        assert len(calls) == 1 and calls[0] > 10, calls
        # dense_weight 0: ranked by the lexical side, whose best (a document naming the
        # term twice; there are several, equal) ranks first.
        lexical = c.stub.Search(pb.SearchRequest(namespace=NS, query="frobnicator", top_k=1,
                                                 mode=pb.LEXICAL), timeout=60)
        assert hybrid.hits[0].lexical_score == pytest.approx(lexical.hits[0].score)
        assert hybrid.hits[0].chunk.text.count("frobnicator") == 2


def test_lexical_matches_identifiers_the_analyzer_splits(client: RetrieverClient) -> None:
    for query in ("RetryingClient", "retrying client", "urllib.request", "urlopen"):
        hits = _search(client, query, mode=pb.LEXICAL).hits
        assert hits and hits[0].chunk.path == "src/http_client.py", query


def test_dense_weight_moves_hybrid_between_its_sides(client: RetrieverClient) -> None:
    q = "exponential backoff for failed requests"
    only_dense = _search(client, q, mode=pb.HYBRID, dense_weight=1.0, top_k=3)
    dense = _search(client, q, mode=pb.DENSE, top_k=3)
    assert [h.chunk.chunk_id for h in only_dense.hits] == [h.chunk.chunk_id for h in dense.hits]
    with pytest.raises(grpc.RpcError) as info:
        _search(client, q, mode=pb.HYBRID, dense_weight=1.5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dense_weight" in info.value.details()


def test_collapse_min_score_and_cap_per_path(client: RetrieverClient) -> None:
    hits = _search(client, "the", mode=pb.DENSE, top_k=20).hits
    collapsed = _search(client, "the", mode=pb.DENSE, top_k=20, collapse=True).hits
    assert len({h.chunk.doc_id for h in collapsed}) == len(collapsed)
    assert {h.chunk.doc_id for h in collapsed} == {h.chunk.doc_id for h in hits}
    capped = _search(client, "the", mode=pb.DENSE, top_k=20, max_hits_per_path=1).hits
    assert len({h.chunk.path for h in capped}) == len(capped)
    cut = hits[len(hits) // 2].score
    above = _search(client, "the", mode=pb.DENSE, top_k=20, min_score=cut).hits
    assert above and all(h.score >= cut for h in above)


def test_rerank_reorders_by_the_cross_encoders_scores(client: RetrieverClient,
                                                      cross_encoder: Path) -> None:
    from sentence_transformers import CrossEncoder

    q = "how do I configure the server"
    resp = _search(client, q, mode=pb.HYBRID, rerank=True, rerank_candidates=8, top_k=8)
    assert resp.lineage.reranker == cross_encoder.name and resp.lineage.reranker_revision
    assert resp.timings.HasField("rerank")
    model = CrossEncoder(str(cross_encoder), device="cpu", local_files_only=True)
    expected = model.predict([(q, f"{h.chunk.path}\n{h.chunk.text}") for h in resp.hits])
    got = np.array([h.rerank_score for h in resp.hits])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert list(got) == sorted(got, reverse=True)
    assert all(h.HasField("fused_score") and h.score == h.rerank_score for h in resp.hits)
    # Plain searches name no reranker.
    assert _search(client, q).lineage.reranker == ""


def test_rerank_without_a_reranker_is_a_failed_precondition(client: object, tmp_path: Path,
                                                            embedder: Embedder) -> None:
    st = ServerThread(make_settings(tmp_path / "data"), embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("x", [pb.Document(doc_id="a.md", content="hello")])
            with pytest.raises(grpc.RpcError) as info:
                c.stub.Search(pb.SearchRequest(namespace="x", query="hi", top_k=1,
                                               rerank=True), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "reranker_model" in info.value.details()
    finally:
        st.stop()


def test_lexical_index_follows_replacements_and_deletes(client: RetrieverClient) -> None:
    client.upsert(NS, [pb.Document(doc_id="swap.md", content="# Zanzibar\nquokkas live here")])
    assert _search(client, "quokkas", mode=pb.LEXICAL).hits[0].chunk.doc_id == "swap.md"
    client.upsert(NS, [pb.Document(doc_id="swap.md", content="# Zanzibar\nwombats now")])
    assert not _search(client, "quokkas", mode=pb.LEXICAL).hits
    assert _search(client, "wombats", mode=pb.LEXICAL).hits[0].chunk.doc_id == "swap.md"
    client.stub.DeleteDocuments(pb.DeleteDocumentsRequest(namespace=NS, doc_ids=["swap.md"]))
    assert not _search(client, "wombats", mode=pb.LEXICAL).hits


def test_lexical_scores_of_a_namespace_ignore_other_namespaces(client: RetrieverClient
                                                               ) -> None:
    """BM25's statistics (document frequency, lengths) are the namespace's own: another
    tenant's documents move neither the scores nor the order."""
    def scores() -> list[tuple[str, float]]:
        return [(h.chunk.chunk_id, h.lexical_score) for h in _search(
            client, "bread dough oven", mode=pb.LEXICAL, top_k=10).hits]

    before = scores()
    assert before
    client.upsert("other-tenant", [pb.Document(doc_id=f"b{i}", content="bread " * (i + 1))
                                   for i in range(30)])
    try:
        assert scores() == before
    finally:
        client.delete_namespace("other-tenant")
    assert scores() == before


def test_restart_rebuilds_a_lexical_index_that_disagrees_with_the_catalog(
        tmp_path: Path, embedder: Embedder) -> None:
    data = tmp_path / "data"
    st = ServerThread(make_settings(data), embedder).start()
    with RetrieverClient(st.address) as c:
        c.upsert("lex", [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()])
        before = [h.chunk.chunk_id for h in c.stub.Search(pb.SearchRequest(
            namespace="lex", query="bread dough", top_k=5, mode=pb.LEXICAL)).hits]
    st.stop()
    db = sqlite3.connect(data / "catalog.sqlite3")
    terms = _terms_table("lex")
    lost = db.execute(f"DELETE FROM {terms} WHERE rowid IN (SELECT rowid FROM {terms}"
                      " LIMIT 3)").rowcount
    db.execute(f"INSERT INTO {terms} (rowid, terms) VALUES (999999, 'bread')")
    db.commit()
    db.close()
    st = ServerThread(make_settings(data), embedder).start()
    try:
        report = st.info["reconciled"]["lex"]
        assert report["lexical_rows_restored"] == lost == 3
        assert report["lexical_rows_removed"] == 1
        with RetrieverClient(st.address) as c:
            after = [h.chunk.chunk_id for h in c.stub.Search(pb.SearchRequest(
                namespace="lex", query="bread dough", top_k=5, mode=pb.LEXICAL)).hits]
        assert after == before
    finally:
        st.stop()


def test_a_lost_term_row_is_restored_even_when_a_stray_one_keeps_the_count(
        tmp_path: Path, embedder: Embedder) -> None:
    """The start-up check compares (count, sum of ids) of chunks and term rows before it
    looks for the rows that differ: one lost and one stray row keep the count, not the
    sum."""
    data = tmp_path / "data"
    with running_server(make_settings(data), embedder) as st, RetrieverClient(st.address) as c:
        c.upsert("lex", [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()])
    db = sqlite3.connect(data / "catalog.sqlite3")
    terms = _terms_table("lex")
    assert db.execute(f"DELETE FROM {terms} WHERE rowid IN (SELECT rowid FROM {terms}"
                      " LIMIT 1)").rowcount == 1
    db.execute(f"INSERT INTO {terms} (rowid, terms) VALUES (999999, 'bread')")
    db.commit()
    db.close()
    with running_server(make_settings(data), embedder) as st:
        report = st.info["reconciled"]["lex"]
        assert report["lexical_rows_restored"] == 1 and report["lexical_rows_removed"] == 1
    with running_server(make_settings(data), embedder) as st:  # and now they agree
        report = st.info["reconciled"]["lex"]
        assert report["lexical_rows_restored"] == 0 and report["lexical_rows_removed"] == 0


def test_a_catalog_with_one_shared_lexical_table_moves_to_one_per_namespace(
        tmp_path: Path, embedder: Embedder) -> None:
    """Releases before schema 4 kept all namespaces' terms in one table (mixed BM25
    statistics): at open it is dropped and each namespace's terms are rebuilt in its own."""
    data = tmp_path / "data"
    docs = [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()]
    with running_server(make_settings(data), embedder) as st, RetrieverClient(st.address) as c:
        c.upsert("lex", docs)
        before = [h.chunk.chunk_id for h in c.stub.Search(pb.SearchRequest(
            namespace="lex", query="bread dough", top_k=5, mode=pb.LEXICAL)).hits]
        chunks = c.status("lex").chunk_count
    db = sqlite3.connect(data / "catalog.sqlite3")  # as schema 3 left it
    terms = _terms_table("lex")
    db.execute(f"DROP TRIGGER {terms}_follow")
    db.execute(f"DROP TABLE {terms}")
    db.execute("CREATE VIRTUAL TABLE chunk_terms USING fts5(ns, terms)")
    db.execute("INSERT INTO chunk_terms (rowid, ns, terms) VALUES (1, 'lex', 'bread')")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    with running_server(make_settings(data), embedder) as st, RetrieverClient(st.address) as c:
        assert st.info["reconciled"]["lex"]["lexical_rows_restored"] == chunks
        after = [h.chunk.chunk_id for h in c.stub.Search(pb.SearchRequest(
            namespace="lex", query="bread dough", top_k=5, mode=pb.LEXICAL)).hits]
        assert after == before
    db = sqlite3.connect(data / "catalog.sqlite3")
    assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunk_terms'").fetchall()
    db.close()


def test_the_embedding_cache_makes_a_reindex_embed_nothing(tmp_path: Path,
                                                           embedder: Embedder) -> None:
    cache = tmp_path / "cache"
    docs = [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()]
    import urllib.request

    embedded, slices = [], []
    for run in range(2):  # two fresh data dirs sharing one cache
        st = ServerThread(make_settings(tmp_path / f"data{run}", embed_cache_dir=cache),
                          embedder).start()
        try:
            with RetrieverClient(st.address) as c:
                embedded.append(c.upsert("cached", docs).chunks_embedded)
                url = f"http://127.0.0.1:{st.info['metrics_port']}/metrics"
                text = urllib.request.urlopen(url, timeout=10).read().decode()
                slices.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                  if line.startswith("retriever_model_wait_seconds_count")
                                  and 'class="document"' in line))
                top = c.stub.Search(pb.SearchRequest(namespace="cached", query="knead dough",
                                                     top_k=1, mode=pb.DENSE)).hits[0]
                assert top.chunk.doc_id == "docs/bread.md"
        finally:
            st.stop()
    # "embedded" counts chunks new to the namespace; the cache saved the model the work.
    assert embedded[0] == embedded[1] > 0
    assert slices[0] > 0 and slices[1] == 0  # the second run never ran the model on them
    import sqlite3 as sq

    n = sq.connect(cache / "embeddings.sqlite3").execute("SELECT count(*) FROM vectors")
    assert n.fetchone()[0] == embedded[0]


def test_a_damaged_embedding_cache_never_reaches_the_catalog(tmp_path: Path,
                                                            embedder: Embedder) -> None:
    """Entries overwritten in place (NaN, not of unit length, cut short) are misses: the
    texts are embedded again and the catalog holds unit vectors; a cache file that is not
    SQLite is moved aside, and one that cannot be made leaves the service without a cache.
    None of it fails the start or an upsert."""
    import sqlite3 as sq

    cache = tmp_path / "cache"
    docs = [pb.Document(doc_id=k, content=v) for k, v in CORPUS.items()]

    def run(data: str, cache_dir: Path) -> list[float]:
        st = ServerThread(make_settings(tmp_path / data, embed_cache_dir=cache_dir),
                          embedder).start()
        try:
            with RetrieverClient(st.address) as c:
                assert c.upsert("cached", docs).chunks_embedded > 0
                hits = c.stub.Search(pb.SearchRequest(namespace="cached", query="knead dough",
                                                      top_k=3, mode=pb.DENSE)).hits
                assert hits[0].chunk.doc_id == "docs/bread.md"
                return [h.score for h in hits]
        finally:
            st.stop()

    run("data0", cache)
    db = sq.connect(cache / "embeddings.sqlite3")
    keys = [k for (k,) in db.execute("SELECT key FROM vectors ORDER BY key")]
    assert len(keys) >= 3
    rng = np.random.default_rng(0)
    damage = [np.full(384, np.nan, np.float32).tobytes(),
              (rng.standard_normal(384) * 7).astype(np.float32).tobytes(),
              np.ones(100, np.float32).tobytes()]
    for i, k in enumerate(keys):
        db.execute("UPDATE vectors SET vector = ? WHERE key = ?", (damage[i % 3], k))
    db.commit()
    db.close()
    scores = run("data1", cache)
    assert all(-1.0 <= s <= 1.0 for s in scores), scores
    cat = sq.connect(tmp_path / "data1" / "catalog.sqlite3")
    norms = [float(np.linalg.norm(np.frombuffer(v, np.float32))) for (v,) in
             cat.execute("SELECT vector FROM chunks WHERE vector IS NOT NULL")]
    cat.close()
    assert norms and all(abs(n - 1) < 1e-3 for n in norms), norms
    db = sq.connect(cache / "embeddings.sqlite3")  # the damaged entries were replaced
    stored = [np.frombuffer(v, np.float32) for (v,) in db.execute("SELECT vector FROM vectors")]
    db.close()
    assert stored and all(v.size == 384 and abs(np.linalg.norm(v) - 1) < 1e-3
                          for v in stored)

    (cache / "embeddings.sqlite3").write_bytes(rng.bytes(4096))  # not a database at all
    for suffix in ("-wal", "-shm"):
        (cache / f"embeddings.sqlite3{suffix}").unlink(missing_ok=True)
    run("data2", cache)
    assert list(cache.glob("embeddings.sqlite3.damaged-*"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    run("data3", blocked)  # no cache at all: the upsert embeds and commits


def test_near_ubiquitous_query_terms_are_left_out_of_the_fts5_lexical_query(
        tmp_path: Path, embedder: Embedder) -> None:
    """On the FTS5 engine (which scores every match), a term in more than
    COMMON_TERM_SHARE of the namespace's chunks is left out of a query that has other terms
    while those fill the page (it would match, and cost scoring, nearly everything); a page
    they leave short, and a filtered query (where the common term may be the only one that
    matches), ask with every term, as tantivy does (it skips what cannot reach the top k, so
    it keeps every term: test_lexical_engine.py)."""
    from retriever.catalog import COMMON_TERM_SHARE

    n = 240
    rare = {"d007", "d042", "d099"}
    docs = [pb.Document(doc_id=f"d{i:03d}", path=f"notes/n{i:03d}.txt",
                        content=f"zzcommon entry {i}" + (" zzrare" if f"d{i:03d}" in rare
                                                         else ""))
            for i in range(n)]
    assert COMMON_TERM_SHARE * n < n  # zzcommon is in every chunk: over the share
    settings = make_settings(tmp_path / "data", lexical_engine="fts5")
    with running_server(settings, embedder) as st, RetrieverClient(st.address) as c:
        c.upsert("common", docs)

        def lexical(query: str, top_k: int, **flt: str) -> list[str]:
            resp = c.stub.Search(pb.SearchRequest(
                namespace="common", query=query, top_k=top_k, mode=pb.LEXICAL,
                filter=pb.SearchFilter(**flt)), timeout=60)
            return [h.chunk.doc_id for h in resp.hits]

        assert set(lexical("zzcommon zzrare", 3)) == rare  # the rare term fills the page
        # A page the rare term leaves short is filled by every term's matches, best first.
        got = lexical("zzcommon zzrare", 100)
        assert len(got) == 100 and set(got[:3]) == rare
        assert len(lexical("zzcommon", 100)) == 100  # alone it matches all
        # Under a filter that leaves out every rare match, the common term still matches.
        assert set(lexical("zzcommon zzrare", 20, path_prefix="notes/n01")) == {
            f"d{i:03d}" for i in range(10, 20)}
        # After deletes the statistics follow the remaining chunks: still in all of them.
        c.delete("common", [f"d{i:03d}" for i in range(0, n, 2)])
        assert set(lexical("zzcommon zzrare", 2)) == {"d007", "d099"}
