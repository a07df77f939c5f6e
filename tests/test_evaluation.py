"""Retrieval-quality evaluation: metric math (by hand and against trec_eval), the BEIR
loader, the git-history set builder, the runner, and `retriever eval` through a real server."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from gitrepo import TimedRepo as _Repo
from typer.testing import CliRunner

from retriever.cli import app
from retriever.slo.evaluation import (
    CorpusDoc,
    Query,
    QuerySet,
    build_git_history_set,
    clean_commit_message,
    dedupe,
    evaluate,
    is_test_path,
    load_beir,
    mrr,
    ndcg_at_k,
    per_query,
    precision_at_k,
    recall_at_k,
)
from retriever.slo.runner import ModeUnavailable, evaluate_modes, percentile

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


# -- metrics by hand ------------------------------------------------------------------------
def test_dedupe_keeps_first_occurrence() -> None:
    assert dedupe(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_precision_over_documents_with_denominator_k() -> None:
    ranked = ["a", "x", "a", "b"]  # -> a, x, b
    rel = {"a": 1, "b": 2, "c": 0}
    assert precision_at_k(ranked, rel, 1) == 1.0
    assert precision_at_k(ranked, rel, 2) == 0.5
    assert precision_at_k(ranked, rel, 3) == pytest.approx(2 / 3)
    assert precision_at_k(ranked, rel, 10) == pytest.approx(2 / 10)  # short run: still / k
    assert precision_at_k([], rel, 5) == 0.0
    assert precision_at_k(ranked, {"a", "b"}, 3) == pytest.approx(2 / 3)  # a set: binary


def test_recall_over_relevant_documents() -> None:
    rel = {"a": 1, "b": 1, "c": 3, "z": 0}  # three relevant; z is judged non-relevant
    assert recall_at_k(["a", "a", "a", "b"], rel, 2) == pytest.approx(2 / 3)  # dupes once
    assert recall_at_k(["z", "a"], rel, 1) == 0.0
    assert recall_at_k(["c", "b", "a"], rel, 3) == 1.0
    assert recall_at_k(["c"], {}, 10) == 0.0


def test_mrr_first_relevant_optionally_cut() -> None:
    rel = {"a": 1}
    assert mrr(["x", "y", "a"], rel) == pytest.approx(1 / 3)
    assert mrr(["x", "y", "a"], rel, k=2) == 0.0
    assert mrr(["x", "y", "a"], rel, k=3) == pytest.approx(1 / 3)
    assert mrr(["x", "x", "a"], rel) == 0.5  # x counts once
    assert mrr(["x"], rel) == 0.0


def test_ndcg_graded() -> None:
    grades = {"d1": 1, "d2": 0, "d3": 2, "d4": 3}
    dcg = 1 / math.log2(2) + 0 + 2 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(["d1", "d2", "d3"], grades, 3) == pytest.approx(dcg / idcg)
    # The duplicate d3 is dropped: d1 moves up to rank 2.
    dup = (2 / math.log2(2) + 1 / math.log2(3)) / idcg
    assert ndcg_at_k(["d3", "d3", "d1"], grades, 3) == pytest.approx(dup)
    assert ndcg_at_k(["d4", "d3", "d1"], grades, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["d4"], grades, 1) == 1.0
    # The ideal ranking comes from the qrels, not from what was retrieved.
    assert ndcg_at_k(["d1"], grades, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(["x", "d4"], {"d4": 1}, 2) == pytest.approx(1 / math.log2(3))


def test_no_relevant_documents() -> None:
    for rel in ({}, {"a": 0}):
        assert precision_at_k(["a"], rel, 1) == 0.0
        assert recall_at_k(["a"], rel, 1) == 0.0
        assert mrr(["a"], rel) == 0.0
        assert ndcg_at_k(["a"], rel, 1) == 0.0
    # Such queries are left out of the means; a query missing from the run scores 0.
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}, "q3": {"c": 1}}
    run = {"q1": ["a"], "q2": ["b"], "q9": ["c"]}
    assert sorted(per_query(run, qrels, ks=(1,))) == ["q1", "q3"]
    means = evaluate(run, qrels, ks=(1,))
    assert means == {"nDCG@1": 0.5, "P@1": 0.5, "R@1": 0.5, "MRR": 0.5}
    assert evaluate({}, {}, ks=(1,)) == {"nDCG@1": 0.0, "P@1": 0.0, "R@1": 0.0, "MRR": 0.0}


def test_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        precision_at_k(["a"], {"a": 1}, 0)


# -- metrics against trec_eval --------------------------------------------------------------
def test_metrics_agree_with_trec_eval_on_random_runs() -> None:
    """pytrec-eval-terrier (trec_eval) on 200 seeded random runs: same figure per query.

    Conventions match: P_k divides by k even for runs shorter than k, unjudged documents are
    non-relevant, relevant means grade >= 1, ndcg_cut uses linear gain with the ideal from
    the qrels, recip_rank is uncut. trec_eval takes a run as doc -> score with one entry per
    doc, so the runs here have no duplicates (dedupe is covered by hand above) and distinct
    scores (trec_eval breaks ties by doc id)."""
    rng = random.Random(20240601)
    ks = (1, 3, 5, 10, 20)
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, list[str]] = {}
    for i in range(200):
        qid = f"q{i}"
        pool = [f"d{j}" for j in range(40)]
        judged = rng.sample(pool, rng.randint(1, 12))
        grades = {d: rng.choice((0, 1, 1, 2, 3)) for d in judged}
        if not any(g > 0 for g in grades.values()):
            grades[judged[0]] = rng.randint(1, 3)
        qrels[qid] = grades
        run[qid] = rng.sample(pool, rng.randint(0, 30))
    measures = {f"P.{','.join(map(str, ks))}", f"recall.{','.join(map(str, ks))}",
                f"ndcg_cut.{','.join(map(str, ks))}", "recip_rank"}
    trec_run = {q: {d: float(len(ids) - r) for r, d in enumerate(ids)}
                for q, ids in run.items() if ids}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(trec_run)
    ours = per_query(run, qrels, ks)
    assert len(ours) == 200 and 150 < len(theirs) < 200  # some runs are empty
    compared = 0
    for qid, m in ours.items():
        if qid not in theirs:  # trec_eval skips empty runs; every metric of ours is 0
            assert run[qid] == [] and set(m.values()) == {0.0}
            continue
        t = theirs[qid]
        for k in ks:
            assert m[f"P@{k}"] == pytest.approx(t[f"P_{k}"], abs=1e-4), (qid, k)
            assert m[f"R@{k}"] == pytest.approx(t[f"recall_{k}"], abs=1e-4), (qid, k)
            assert m[f"nDCG@{k}"] == pytest.approx(t[f"ndcg_cut_{k}"], abs=1e-4), (qid, k)
        assert m["MRR"] == pytest.approx(t["recip_rank"], abs=1e-4), qid
        # MRR cut at k is recip_rank of the run cut at k.
        assert mrr(run[qid], qrels[qid], k=5) == pytest.approx(
            _recip_rank(run[qid][:5], qrels[qid]))
        compared += 1
    assert compared == len(theirs)


def _recip_rank(ids: list[str], grades: dict[str, int]) -> float:
    if not ids:
        return 0.0
    res = pytrec_eval.RelevanceEvaluator({"q": grades}, {"recip_rank"}).evaluate(
        {"q": {d: float(len(ids) - r) for r, d in enumerate(ids)}})
    return float(res["q"]["recip_rank"])


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 101, 1000):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) == 0.0


# -- BEIR -----------------------------------------------------------------------------------
def _write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = [
        {"_id": "bread", "title": "Baking bread",
         "text": "Knead the dough for ten minutes, then let it rise until doubled."},
        {"_id": "rust", "title": "Rust ownership",
         "text": "Every value in Rust has a single owner; borrowing lends references."},
        {"_id": "tides", "title": "",
         "text": "Ocean tides are caused by the gravitational pull of the moon and sun."},
        {"_id": "chess", "title": "Chess openings",
         "text": "The Sicilian Defence answers 1.e4 with c5 and leads to sharp play."},
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [
        {"_id": "q1", "text": "how long should I knead bread dough"},
        {"_id": "q2", "text": "what causes the tides in the ocean"},
        {"_id": "q3", "text": "rust borrow checker and ownership of values"},
        {"_id": "q4", "text": "an unjudged query"},
    ]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\tbread\t1\nq2\ttides\t2\nq2\tchess\t0\nq3\trust\t1\n")
    return root


def test_load_beir_tiny(tmp_path: Path) -> None:
    qs = load_beir(_write_beir(tmp_path / "tiny"))
    assert qs.name == "tiny/test"
    assert qs.queries == [Query("q1", "how long should I knead bread dough"),
                          Query("q2", "what causes the tides in the ocean"),
                          Query("q3", "rust borrow checker and ownership of values")]
    assert qs.qrels == {"q1": {"bread": 1}, "q2": {"tides": 2, "chess": 0},
                        "q3": {"rust": 1}}
    corpus = list(qs.iter_corpus())
    assert [d.doc_id for d in corpus] == ["bread", "rust", "tides", "chess"]
    assert corpus[0] == CorpusDoc("bread", "Baking bread\n\nKnead the dough for ten minutes, "
                                  "then let it rise until doubled.", "")
    assert corpus[2].text.startswith("Ocean tides")  # no title: the text alone
    assert list(qs.iter_corpus()) == corpus  # a loader: each pass reads afresh
    assert qs.metadata["source"] == "beir" and qs.metadata["split"] == "test"


def test_load_beir_errors(tmp_path: Path) -> None:
    from retriever.errors import InvalidArgument

    root = _write_beir(tmp_path / "tiny")
    with pytest.raises(InvalidArgument, match="train.tsv not found"):
        load_beir(root, "train")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq7\tbread\t1\n")
    with pytest.raises(InvalidArgument, match="absent from"):
        load_beir(root)
    (root / "qrels" / "test.tsv").write_text("q1\tbread\tyes\n")
    with pytest.raises(InvalidArgument, match="not an integer"):
        load_beir(root)


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="shared/datasets/scifact is not present")
def test_load_beir_scifact() -> None:
    qs = load_beir(SCIFACT, "test")
    assert len(qs.queries) == 300
    assert sum(len(r) for r in qs.qrels.values()) == 339
    ids = [d.doc_id for d in qs.iter_corpus()]
    assert len(ids) == len(set(ids)) == 5183
    judged = {d for r in qs.qrels.values() for d in r}
    assert judged <= set(ids)


# -- sets from git history ------------------------------------------------------------------
@pytest.fixture
def history(tmp_path: Path) -> tuple[_Repo, dict[str, str]]:
    r = _Repo(tmp_path / "repo")
    c: dict[str, str] = {}
    r.write("src/app.py", "def main():\n    return 'app'\n")
    r.write("src/util.py", "def slow():\n    return sum(range(10))\n")
    r.write("src/old_name.py", "OLD = 1\n")
    r.write("src/data.py", b"BLOB = b'\x00\x01\x02'\n")  # binary, though .py
    r.write("src/big.py", "x = 1\n" * 400)  # over the test's max_file_bytes
    r.write("src/latin.py", "s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    r.write("lib/helper.go", "package lib\n\nfunc Help() int { return 1 }\n")
    r.write("lib/helper_test.go", "package lib\n")
    r.write("tests/test_app.py", "def test_main():\n    pass\n")
    r.write("src/app_test.py", "def test_x():\n    pass\n")
    r.write("docs/guide.md", "# Guide\n")
    r.write("README.md", "# Repo\n")
    os.symlink("app.py", r.root / "src" / "link.py")
    c["root"] = r.commit("Initial import")
    r.write("docs/guide.md", "# Guide\n\nMore words.\n")
    c["docs"] = r.commit("Tweak the guide")
    r.write("src/util.py", "def fast():\n    return 45\n")
    r.write("tests/test_app.py", "def test_main():\n    assert True\n")
    c["util"] = r.commit("Make util faster (#12)\n\nPrecompute the sum.\n\n"
                         "Signed-off-by: Someone <s@example.com>")
    r.write("src/feature.py", "def feature():\n    return 2\n")
    r.write("src/app.py", "from src.feature import feature\n\ndef main():\n    return feature()\n")
    c["feature"] = r.commit("Add a feature module and call it from main")
    r.git("mv", "src/old_name.py", "src/new_name.py")
    r.write("src/new_name.py", "OLD = 1\nNEW = 2\n")
    c["rename"] = r.commit("Rename old_name to new_name")
    r.write("tests/test_app.py", "def test_main():\n    assert 1\n")
    r.write("lib/helper_test.go", "package lib\n\n// more\n")
    c["tests"] = r.commit("Only tests change")
    r.write("src/feature.py", "def feature():\n    return 3\n")
    c["improve"] = r.commit("gh-7: Improve the feature\n\nFixes #7")
    r.git("checkout", "-q", "-b", "side")
    r.write("lib/helper.go", "package lib\n\nfunc Help() int { return 2 }\n")
    c["helper"] = r.commit("Fix the helper's answer")
    r.git("checkout", "-q", "main")
    r.write("README.md", "# Repo\n\nNow with a feature.\n")
    c["readme"] = r.commit("Document the feature")
    r.git("merge", "-q", "--no-ff", "-m", "Merge branch 'side'", "side")
    c["merge"] = r.git("rev-parse", "HEAD")
    return r, c


def test_git_history_set_tops_up_when_a_newer_commit_has_no_relevant_file(
        history: tuple[_Repo, dict[str, str]]) -> None:
    r, c = history
    # Up to "improve": candidates are improve, rename, feature, util. The first three give a
    # corpus at util (the parent of "feature"), where src/feature.py does not exist yet, so
    # "improve" has nothing relevant; one older commit (util) is taken, and the corpus moves
    # to the parent of util.
    qs = build_git_history_set(r.root, commits=3, rev_range=c["improve"], max_file_bytes=1000)
    assert [q.id for q in qs.queries] == [c["rename"], c["feature"], c["util"]]
    assert [q.text for q in qs.queries] == [
        "Rename old_name to new_name", "Add a feature module and call it from main",
        "Make util faster\n\nPrecompute the sum."]
    assert qs.qrels == {c["rename"]: {"src/old_name.py": 1},  # renamed: the old path
                        c["feature"]: {"src/app.py": 1},  # the added feature.py is not
                        c["util"]: {"src/util.py": 1}}  # the test file is not
    assert qs.metadata["corpus_rev"] == c["docs"]
    docs = list(qs.iter_corpus())
    assert [d.doc_id for d in docs] == ["lib/helper.go", "src/app.py", "src/old_name.py",
                                        "src/util.py"]
    assert all(d.path == d.doc_id for d in docs)
    assert docs[3].text == "def slow():\n    return sum(range(10))\n"  # as at the corpus rev
    assert qs.metadata["skipped_files"] == {"too large": 1, "binary or not UTF-8": 2}
    assert qs.metadata["head"] == c["improve"]
    assert [m["sha"] for m in qs.metadata["commits"]] == [q.id for q in qs.queries]


def test_git_history_set_skips_merges_and_test_only_commits(
        history: tuple[_Repo, dict[str, str]]) -> None:
    r, c = history
    qs = build_git_history_set(r.root, commits=3, max_file_bytes=1000)
    # merge, readme (docs only) and tests (tests only) are no queries.
    assert [q.id for q in qs.queries] == [c["helper"], c["improve"], c["rename"]]
    assert qs.queries[1].text == "Improve the feature"  # "gh-7:" and "Fixes #7" dropped
    assert qs.qrels == {c["helper"]: {"lib/helper.go": 1},
                        c["improve"]: {"src/feature.py": 1},
                        c["rename"]: {"src/old_name.py": 1}}
    assert qs.metadata["corpus_rev"] == c["feature"]
    assert [d.doc_id for d in qs.iter_corpus()] == [
        "lib/helper.go", "src/app.py", "src/feature.py", "src/old_name.py", "src/util.py"]
    assert qs.metadata["repo"] == str(r.root.resolve())
    assert qs.metadata["head"] == c["merge"]
    # Deterministic: the same inputs give the same set.
    again = build_git_history_set(r.root, commits=3, max_file_bytes=1000)
    assert (again.queries, again.qrels, list(again.iter_corpus()), again.metadata) == (
        qs.queries, qs.qrels, list(qs.iter_corpus()), qs.metadata)


def test_git_history_set_filters_and_exhaustion(
        history: tuple[_Repo, dict[str, str]]) -> None:
    r, c = history
    only_go = build_git_history_set(r.root, commits=5, extensions={".go"})
    assert [q.id for q in only_go.queries] == [c["helper"]]
    assert [d.doc_id for d in only_go.iter_corpus()] == ["lib/helper.go"]
    under_src = build_git_history_set(r.root, commits=50, paths=["src/"], max_file_bytes=1000)
    # All there is: "improve" touched only src/feature.py, created after the corpus rev.
    assert [q.id for q in under_src.queries] == [c["rename"], c["feature"], c["util"]]
    assert under_src.metadata["corpus_rev"] == c["docs"]
    from retriever.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="no non-merge commit"):
        build_git_history_set(r.root, commits=3, paths=["docs"])
    with pytest.raises(InvalidArgument, match="git rev-list"):
        build_git_history_set(r.root, commits=3, rev_range="no-such-branch")


@pytest.mark.parametrize(("path", "is_test"), [
    ("tests/test_app.py", True), ("src/test_app.py", True), ("pkg/app_test.py", True),
    ("conftest.py", True), ("pkg/foo_test.go", True), ("spec/models/user_spec.rb", True),
    ("web/__tests__/a.js", True), ("web/a.test.ts", True), ("web/a.spec.tsx", True),
    ("src/main/java/FooTest.java", True), ("go/testdata/x.go", True),
    ("src/app.py", False), ("src/testing_utils.py", False), ("src/contest.py", False),
    ("web/latest.ts", False), ("src/attest.go", False), ("Testament.java", False),
])
def test_is_test_path(path: str, is_test: bool) -> None:
    assert is_test_path(path) is is_test


def test_clean_commit_message() -> None:
    msg = ("gh-123: Fix the parser (#456)\n\nIt broke on   tabs, see #77.\n"
           "Closes #12\n\n(cherry picked from commit abcdef0)\n\n"
           "Signed-off-by: A <a@b>\nCo-authored-by: B <b@c>\n")
    assert clean_commit_message(msg) == "Fix the parser\n\nIt broke on tabs, see ."
    assert clean_commit_message("Add x [skip ci]\n\nhttps://github.com/o/r/pull/5") == "Add x"
    assert clean_commit_message("Note: keep this\n\nBody.") == "Note: keep this\n\nBody."


# -- runner ---------------------------------------------------------------------------------
def test_evaluate_modes_with_a_fake_search() -> None:
    qs = QuerySet("fake", [Query("q1", "one"), Query("q2", "two"), Query("q3", "unjudged")],
                  {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}}, corpus=[])
    answers = {"one": ["a", "a", "x"], "two": ["x", "c"], "unjudged": ["a"]}
    calls: list[tuple[str, int, str]] = []

    def search(text: str, top_k: int, mode: str) -> tuple[list[str], float]:
        calls.append((text, top_k, mode))
        if mode == "lexical":
            raise ModeUnavailable("mode LEXICAL needs the lexical index")
        return answers[text], {"one": 0.010, "two": 0.030}[text]

    dense, lexical = evaluate_modes(qs, search, ["dense", "lexical"], top_k=7, ks=(1, 2))
    assert calls[:3] == [("one", 7, "dense"), ("one", 7, "dense"), ("two", 7, "dense")]
    assert dense.available and dense.queries == 2
    assert dense.metrics["P@1"] == 0.5 and dense.metrics["R@2"] == 0.75
    assert dense.metrics["MRR"] == 0.75
    assert dense.latency_p50_s == pytest.approx(0.020)
    assert dense.latency_p99_s == pytest.approx(0.0298)
    assert not lexical.available and "lexical index" in lexical.reason
    assert lexical.to_dict() == {"mode": "lexical", "available": False,
                                 "reason": "mode LEXICAL needs the lexical index"}


def test_eval_command_needs_one_source(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "-n", "x"])
    assert result.exit_code == 2 and "exactly one of" in result.output
    beir = _write_beir(tmp_path / "tiny")
    result = runner.invoke(app, ["eval", "-n", "x", "--beir", str(beir), "--modes", "bm25"])
    assert result.exit_code == 2 and "--modes" in result.output


# -- through the real server ----------------------------------------------------------------
@pytest.mark.integration
def test_eval_command_on_a_tiny_beir_set(server, client, tmp_path: Path) -> None:  # noqa: ANN001
    beir = _write_beir(tmp_path / "tiny")
    # A stray document in the namespace would be a hit: eval warns, and --prune deletes it.
    from retriever.client import Document

    client.upsert("tiny", [Document(doc_id="stray", content="Kneading bread dough for ten "
                                    "minutes")])
    out = tmp_path / "eval.json"
    runner = CliRunner()
    warned = runner.invoke(app, ["eval", "--beir", str(beir), "-n", "tiny", "-a",
                                 server.address, "--modes", "dense"])
    assert warned.exit_code == 0, warned.output
    assert "holds 1 documents outside the corpus" in warned.stderr
    assert client.status("tiny").document_count == 5
    result = runner.invoke(app, ["eval", "--beir", str(beir), "-n", "tiny", "-a",
                                 server.address, "--modes", "dense,lexical", "-k", "10",
                                 "--prune", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "nDCG@10" in result.stdout and "dense" in result.stdout
    report = json.loads(out.read_text())
    assert report["index"]["documents_received"] == 4
    assert report["index"]["documents_unchanged"] == 4  # indexed by the first run
    assert report["index"]["foreign"] == report["index"]["pruned"] == 1
    dense = report["modes"][0]
    assert dense["mode"] == "dense" and dense["available"] and dense["queries"] == 3
    assert dense["metrics"]["P@1"] == 1.0 and dense["metrics"]["MRR"] == 1.0
    assert dense["metrics"]["nDCG@10"] == 1.0 and dense["metrics"]["R@10"] == 1.0
    assert dense["metrics"]["P@5"] == pytest.approx(0.2)  # one relevant doc per query
    assert 0 < dense["latency_ms"]["p50"] <= dense["latency_ms"]["p99"]
    lexical = report["modes"][1]
    if not lexical["available"]:  # today's server: reported, not fatal
        assert "lexical" in lexical["reason"].lower()
        assert "unavailable" in result.stdout
    # Again without indexing: the same figures from the same namespace.
    again = runner.invoke(app, ["eval", "--beir", str(beir), "-n", "tiny", "-a",
                                server.address, "--modes", "dense", "--no-index",
                                "--json", "-"])
    assert again.exit_code == 0, again.output
    piped = json.loads(again.stdout)  # stdout is the JSON alone (the table goes to stderr)
    assert piped["modes"][0]["mode"] == "dense" and "nDCG@10" in again.stderr
    assert client.status("tiny").document_count == 4
    # A query judged with no relevant document is not scored: the title says so.
    with (beir / "qrels" / "test.tsv").open("a") as fh:
        fh.write("q4\tbread\t0\n")
    titled = runner.invoke(app, ["eval", "--beir", str(beir), "-n", "tiny", "-a",
                                 server.address, "--modes", "dense", "--no-index"])
    assert titled.exit_code == 0, titled.output
    assert "3 of 4 queries scored" in " ".join(titled.stdout.split())



_NO_ID = 'expected a JSON object with an "_id"'
_NO_TEXT = 'query \'q1\' has no "text"'


@pytest.mark.parametrize("file, content, message", [
    ("corpus.jsonl", '{"title": "no id", "text": "x"}\n', f"corpus.jsonl:1: {_NO_ID}"),
    ("corpus.jsonl", '{"_id": "a", "text": "x"}\n{broken\n', "corpus.jsonl:2: not JSON"),
    ("queries.jsonl", '["q1", "a list"]\n', f"queries.jsonl:1: {_NO_ID}"),
    ("queries.jsonl", '{"_id": "q1"}\n', f"queries.jsonl:1: {_NO_TEXT}"),
    ("queries.jsonl", '{"_id": "q1", "text": null}\n', f"queries.jsonl:1: {_NO_TEXT}"),
])
def test_load_beir_names_the_file_and_line_of_a_bad_record(
        tmp_path: Path, file: str, content: str, message: str) -> None:
    from retriever.errors import InvalidArgument

    root = _write_beir(tmp_path / "bad")
    (root / file).write_text(content)
    with pytest.raises(InvalidArgument) as info:
        list(load_beir(root).iter_corpus())  # the corpus is read lazily
    assert message in str(info.value)


def test_load_beir_refuses_undecodable_files_and_a_set_that_judges_nothing(
        tmp_path: Path) -> None:
    from retriever.errors import InvalidArgument

    root = _write_beir(tmp_path / "bad")
    (root / "corpus.jsonl").write_bytes('{"_id": "a", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InvalidArgument, match="corpus.jsonl: not UTF-8"):
        list(load_beir(root).iter_corpus())
    root = _write_beir(tmp_path / "empty")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(InvalidArgument, match="judges no query"):
        load_beir(root)


def test_eval_command_reports_a_bad_set_in_one_line(tmp_path: Path) -> None:
    """No traceback: the file and line, exit 2 (the corpus is read once indexing begins, so
    this needs no server: the bad first record is met before any call)."""
    runner = CliRunner()
    root = _write_beir(tmp_path / "bad")
    (root / "queries.jsonl").write_text('{"_id": "q1"}\n')
    result = runner.invoke(app, ["eval", "-n", "x", "--beir", str(root), "-a", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "has no \"text\"" in result.output and "Traceback" not in result.output
