"""Golden sets through the real server: RegisterGoldenSet (given, versioned, built from a git
source's history), Evaluate (metrics by hand and against trec_eval), the retriever_eval_*
gauges, GetIndexStatus, the schedule, and the CLI."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import pytrec_eval
from conftest import make_settings, running_server
from gitrepo import TimedRepo
from typer.testing import CliRunner

from retriever.cli import app
from retriever.client import RetrieverClient
from retriever.v1 import retriever_pb2 as pb

pytestmark = pytest.mark.integration

NS = "gold"
# Four documents on unrelated topics: the top hit of each query below is certain. Doc ids
# differ from paths so that judging by path is tested too.
DOCS = {
    "d-apple": ("fruit/apple.txt", "Apples are crisp red fruit picked from orchard trees in "
                                   "autumn."),
    "d-car": ("vehicles/car.txt", "A car engine burns petrol to turn the wheels on the "
                                  "motorway."),
    "d-moon": ("space/moon.txt", "The moon orbits the earth and its phases change every "
                                 "month."),
    "d-bread": ("cooking/bread.txt", "Knead the dough, let it rise, then bake the bread in a "
                                     "hot oven."),
}
ORCHARD = pb.GoldenQuery(id="orchard", query="which fruit grows on orchard trees",
                         relevant_doc_ids=["d-apple"])
ENGINE = pb.GoldenQuery(id="engine", query="how does a petrol car engine work",
                        relevant_paths=["vehicles/car.txt"])
# Judged wrongly on purpose: its top hit (the moon) is not the relevant document.
LUNAR = pb.GoldenQuery(id="lunar", query="phases of the moon", relevant_doc_ids=["d-bread"])


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repos")


@pytest.fixture(scope="module")
def server(roots: Path, embedder, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
           ) -> Iterator[object]:
    settings = make_settings(tmp_path_factory.mktemp("data") / "d", sync_roots=[roots],
                             max_golden_set_queries=5)
    with running_server(settings, embedder) as st:
        yield st


@pytest.fixture(scope="module")
def client(server) -> Iterator[RetrieverClient]:  # noqa: ANN001
    with RetrieverClient(server.address, timeout=120) as c:
        c.upsert(NS, [pb.Document(doc_id=d, path=p, content=t) for d, (p, t) in DOCS.items()])
        yield c


def scrape(server) -> str:  # noqa: ANN001
    port = server.info["metrics_port"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def gauge(text: str, name: str, **labels: str) -> float | None:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for found, value in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M):
        if set(found.split(",")) == want:
            return float(value)
    return None


def metrics_of(e: pb.Evaluation) -> dict[str, float]:
    return {(m.name if m.name == "mrr" else f"{m.name}@{m.k}"): m.value for m in e.metrics}


def register(client: RetrieverClient, name: str, *queries: pb.GoldenQuery,
             ns: str = NS) -> pb.RegisterGoldenSetResponse:
    return client.stub.RegisterGoldenSet(pb.RegisterGoldenSetRequest(
        namespace=ns, name=name, queries=list(queries)), timeout=60)


def evaluate(client: RetrieverClient, name: str, ns: str = NS, **kw: object) -> pb.Evaluation:
    return client.stub.Evaluate(pb.EvaluateRequest(namespace=ns, golden_set=name, **kw),
                                timeout=120).evaluation  # type: ignore[arg-type]


def test_evaluate_a_set_with_known_answers_and_export_it(client: RetrieverClient,
                                                         server) -> None:  # noqa: ANN001
    reg = register(client, "known", ORCHARD, ENGINE, LUNAR)
    assert (reg.version, reg.query_count, reg.origin, reg.name) == (1, 3, "request", "known")
    assert reg.queries[1].path_grades == {"vehicles/car.txt": 1}

    e = evaluate(client, "known", mode=pb.DENSE)
    m = metrics_of(e)
    # By hand: the top hit is right for two of the three queries; every query's one
    # relevant document is among the four documents, all returned within the top 5.
    assert m["precision@1"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["recall@1"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["precision@5"] == pytest.approx(1 / 5, abs=1e-12)
    assert m["recall@5"] == m["recall@10"] == 1.0
    assert [(x.name, x.k) for x in e.metrics] == [
        ("precision", 1), ("recall", 1), ("ndcg", 1), ("precision", 5), ("recall", 5),
        ("ndcg", 5), ("precision", 10), ("recall", 10), ("ndcg", 10), ("mrr", 10)]
    assert (e.golden_set, e.version, e.query_count, e.trigger, e.mode, e.slo) == (
        "known", 1, 3, "request", pb.DENSE, False)

    # GetIndexStatus shows the latest run.
    last = client.status(NS).last_evaluation
    assert last.evaluation_id == e.evaluation_id and metrics_of(last) == m and not last.slo
    # A dense run is not how the scheduler runs the set (the server's default mode is
    # hybrid): it is recorded and answered, and leaves the SLO gauges alone.
    assert gauge(scrape(server), "retriever_eval_recall_at_k", namespace=NS, k="10") is None

    # Run as the scheduler runs it (default mode and cut-offs): exported.
    e = evaluate(client, "known")
    m = metrics_of(e)
    assert e.mode == pb.HYBRID and m["recall@10"] == 1.0 and e.slo
    assert client.status(NS).last_evaluation.slo
    text = scrape(server)
    for name, key in (("precision", "precision@1"), ("precision", "precision@10"),
                      ("recall", "recall@10"), ("ndcg", "ndcg@5")):
        k = key.split("@")[1]
        assert gauge(text, f"retriever_eval_{name}_at_k", namespace=NS, k=k) == pytest.approx(
            m[key], abs=1e-12)
    assert gauge(text, "retriever_eval_recall_at_k", namespace=NS, k="10") == 1.0
    assert gauge(text, "retriever_eval_mrr", namespace=NS) == pytest.approx(m["mrr"],
                                                                           abs=1e-12)


def test_metrics_agree_with_trec_eval_on_graded_judgements(client: RetrieverClient) -> None:
    graded = [
        pb.GoldenQuery(id="a", query="fresh fruit from the orchard",
                       doc_grades={"d-apple": 2, "d-bread": 1, "d-car": 0}),
        pb.GoldenQuery(id="b", query="baking at home", doc_grades={"d-bread": 3},
                       relevant_paths=["space/moon.txt"]),
        pb.GoldenQuery(id="c", query="driving on the motorway",
                       doc_grades={"d-moon": 1, "d-apple": 2}),
    ]
    register(client, "graded", *graded)
    e = evaluate(client, "graded", mode=pb.DENSE, k=[1, 3])
    # The same searches through Search, scored by trec_eval.
    run: dict[str, dict[str, float]] = {}
    for q in graded:
        resp = client.stub.Search(pb.SearchRequest(namespace=NS, query=q.query, top_k=3,
                                                   mode=pb.DENSE, collapse=True), timeout=60)
        run[q.id] = {h.chunk.doc_id: 1.0 / h.rank for h in resp.hits}
    qrels = {q.id: dict(q.doc_grades) for q in graded}
    qrels["b"]["d-moon"] = 1  # the path stands for the document with it
    measures = {"P_1", "P_3", "recall_1", "recall_3", "ndcg_cut_1", "ndcg_cut_3", "recip_rank"}
    per_q = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)

    def mean(measure: str) -> float:
        return sum(v[measure] for v in per_q.values()) / len(per_q)

    m = metrics_of(e)
    for k in (1, 3):
        assert m[f"precision@{k}"] == pytest.approx(mean(f"P_{k}"))
        assert m[f"recall@{k}"] == pytest.approx(mean(f"recall_{k}"))
        assert m[f"ndcg@{k}"] == pytest.approx(mean(f"ndcg_cut_{k}"))
    assert m["mrr"] == pytest.approx(mean("recip_rank"))


def test_registering_a_name_again_makes_a_new_version(client: RetrieverClient) -> None:
    assert register(client, "versioned", ORCHARD, ENGINE, LUNAR).version == 1
    second = register(client, "versioned", ORCHARD, ENGINE)
    assert (second.version, second.query_count) == (2, 2)
    latest = evaluate(client, "versioned", mode=pb.DENSE, k=[1])
    assert latest.version == 2 and metrics_of(latest)["precision@1"] == 1.0
    older = evaluate(client, "versioned", mode=pb.DENSE, k=[1], version=1)
    assert older.version == 1 and metrics_of(older)["precision@1"] == pytest.approx(2 / 3)
    with pytest.raises(grpc.RpcError) as err:
        evaluate(client, "versioned", version=7)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version 7" in err.value.details()


@pytest.mark.parametrize(("request_", "code", "words"), [
    (pb.RegisterGoldenSetRequest(namespace=NS, name="", queries=[ORCHARD]),
     grpc.StatusCode.INVALID_ARGUMENT, ["name", "required"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="bad name!", queries=[ORCHARD]),
     grpc.StatusCode.INVALID_ARGUMENT, ["name"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x"),
     grpc.StatusCode.INVALID_ARGUMENT, ["queries", "empty"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[ORCHARD] * 6),
     grpc.StatusCode.INVALID_ARGUMENT, ["6 queries", "max_golden_set_queries"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[
        pb.GoldenQuery(query="no answer", doc_grades={"d-car": 0})]),
     grpc.StatusCode.INVALID_ARGUMENT, ["queries[0]", "no relevant"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[
        pb.GoldenQuery(query="  ", relevant_doc_ids=["d-car"])]),
     grpc.StatusCode.INVALID_ARGUMENT, ["queries[0].query"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[ORCHARD, ORCHARD]),
     grpc.StatusCode.INVALID_ARGUMENT, ["queries[1].id", "twice"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[
        ORCHARD, pb.GoldenQuery(query="cars", relevant_doc_ids=["d-car", ""])]),
     grpc.StatusCode.INVALID_ARGUMENT, ["queries[1].relevant_doc_ids[1]", "empty"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[
        pb.GoldenQuery(query="cars", relevant_paths=[""])]),
     grpc.StatusCode.INVALID_ARGUMENT, ["queries[0].relevant_paths[0]", "empty"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x", queries=[ORCHARD],
                                 from_source_history=pb.GoldenSetFromHistory(commits=3)),
     grpc.StatusCode.INVALID_ARGUMENT, ["from_source_history"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x",
                                 from_source_history=pb.GoldenSetFromHistory(commits=0)),
     grpc.StatusCode.INVALID_ARGUMENT, ["commits"]),
    (pb.RegisterGoldenSetRequest(namespace=NS, name="x",
                                 from_source_history=pb.GoldenSetFromHistory(commits=3)),
     grpc.StatusCode.FAILED_PRECONDITION, ["no git source"]),
    (pb.RegisterGoldenSetRequest(namespace="nosuch", name="x", queries=[ORCHARD]),
     grpc.StatusCode.NOT_FOUND, ["nosuch"]),
])
def test_register_refuses_bad_input(client: RetrieverClient, request_: object,
                                    code: grpc.StatusCode, words: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.RegisterGoldenSet(request_, timeout=30)
    assert err.value.code() == code, err.value.details()
    for w in words:
        assert w in err.value.details()


@pytest.mark.parametrize(("kw", "code", "words"), [
    ({"golden_set": "nosuch"}, grpc.StatusCode.NOT_FOUND, ["nosuch"]),
    ({"golden_set": "known", "k": [0]}, grpc.StatusCode.INVALID_ARGUMENT, ["k 0"]),
    ({"golden_set": "known", "k": [5, 5]}, grpc.StatusCode.INVALID_ARGUMENT, ["repeated"]),
    ({"golden_set": "known", "mode": 9}, grpc.StatusCode.INVALID_ARGUMENT, ["mode"]),
    ({"golden_set": "known", "rerank": True}, grpc.StatusCode.FAILED_PRECONDITION,
     ["reranker_model", "rerank: "]),
    ({"golden_set": "known", "namespace": "nosuch"}, grpc.StatusCode.NOT_FOUND, ["nosuch"]),
])
def test_evaluate_refuses_bad_input(client: RetrieverClient, kw: dict[str, object],
                                    code: grpc.StatusCode, words: list[str]) -> None:
    register(client, "known", ORCHARD, ENGINE, LUNAR)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(pb.EvaluateRequest(**{"namespace": NS, **kw}),  # type: ignore[arg-type]
                             timeout=60)
    assert err.value.code() == code, err.value.details()
    for w in words:
        assert w in err.value.details()
    assert "requests[" not in err.value.details()  # the fields an EvaluateRequest has


def test_a_set_built_from_the_source_history(client: RetrieverClient, roots: Path) -> None:
    repo = TimedRepo(roots / "history")
    repo.write("src/tokenizer.py", "def split(text):\n    return text.split(' ')\n")
    repo.write("src/server.py", "def serve(port):\n    listen(port)\n")
    repo.write("tests/test_tokenizer.py", "def test_split():\n    assert split('a b')\n")
    repo.write("README.md", "# Tools\n")
    repo.commit("Initial import")  # a root commit: no query
    repo.write("src/tokenizer.py", "def split(text):\n    return text.split()\n")
    repo.write("tests/test_tokenizer.py", "def test_split():\n    assert split('a\\tb')\n")
    tokenize = repo.commit("Split words on any whitespace in the tokenizer\n\nFixes #12")
    repo.write("README.md", "# Tools\n\nA tokenizer and a server.\n")
    repo.commit("Describe the tools in the readme")  # no source file: no query
    repo.write("tests/test_server.py", "def test_serve():\n    pass\n")
    repo.commit("Test the server")  # tests only: no query
    repo.write("src/server.py", "def serve(path):\n    listen_unix(path)\n")
    repo.write("src/socket_util.py", "def listen_unix(path):\n    return path\n")
    sockets = repo.commit("Serve requests over a unix socket")
    ns = "hist"
    assert client.sync_source(ns, str(repo.root), wait=True, timeout=120).commit == sockets

    reg = client.stub.RegisterGoldenSet(pb.RegisterGoldenSetRequest(
        namespace=ns, name="history",
        from_source_history=pb.GoldenSetFromHistory(commits=5)), timeout=60)
    assert (reg.origin, reg.corpus_revision, reg.version) == ("git-history", sockets, 1)
    assert [(q.id, q.query, dict(q.doc_grades)) for q in reg.queries] == [
        (sockets, "Serve requests over a unix socket",
         {"src/server.py": 1, "src/socket_util.py": 1}),
        (tokenize, "Split words on any whitespace in the tokenizer", {"src/tokenizer.py": 1}),
    ]
    # Only the latest commit.
    one = client.stub.RegisterGoldenSet(pb.RegisterGoldenSetRequest(
        namespace=ns, name="history", from_source_history=pb.GoldenSetFromHistory(
            commits=1)), timeout=60)
    assert (one.version, [q.id for q in one.queries]) == (2, [sockets])
    # Evaluated like any set: the namespace holds six documents, all within the top 10.
    e = evaluate(client, "history", ns=ns, version=1)
    assert e.query_count == 2 and metrics_of(e)["recall@10"] == 1.0


def test_a_scheduled_evaluation_runs_and_is_exported(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path / "data", eval_interval_s=0.3)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.upsert(NS, [pb.Document(doc_id=d, path=p, content=t) for d, (p, t) in DOCS.items()])
        register(c, "known", ORCHARD, ENGINE, LUNAR)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            last = c.status(NS).last_evaluation
            if last.trigger == "schedule":
                break
            time.sleep(0.1)
        assert last.trigger == "schedule" and last.golden_set == "known"
        assert last.query_count == 3 and last.mode == pb.HYBRID  # the server's default mode
        text = scrape(st)
        assert gauge(text, "retriever_eval_precision_at_k", namespace=NS, k="1") is not None
        assert gauge(text, "retriever_evaluations_total", trigger="schedule",
                     outcome="ok") >= 1  # type: ignore[operator]


def test_the_cli_registers_a_beir_set_and_evaluates_it(server, client: RetrieverClient,  # noqa: ANN001
                                                       tmp_path: Path) -> None:
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "text": t}) + "\n" for d, (_p, t) in DOCS.items()))
    (beir / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": ORCHARD.query}) + "\n"
        + json.dumps({"_id": "q2", "text": ENGINE.query}) + "\n")
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td-apple\t1\nq2\td-car\t1\n")
    runner = CliRunner()
    reg = runner.invoke(app, ["golden-set", "register", NS, "cli-beir", "--beir", str(beir),
                              "-a", server.address])
    assert reg.exit_code == 0, reg.output
    assert "cli-beir version 1, 2 queries from request" in reg.stdout
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--golden-set", "cli-beir", "-n", NS, "--modes",
                                 "dense", "-a", server.address, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "@10" in result.stdout and "dense" in result.stdout and "nDCG" in result.stdout
    (run,) = json.loads(out.read_text())["evaluations"]
    assert {m["name"]: m["value"] for m in run["metrics"] if m["k"] == 1}["precision"] == 1.0
    # Fields at their default are written too (a 0.0 score had no "value"; no "slo").
    assert run["slo"] is False and all("value" in m for m in run["metrics"])
    missing = runner.invoke(app, ["eval", "--golden-set", "nope", "-n", NS, "-a",
                                  server.address])
    assert missing.exit_code == 2 and "NOT_FOUND" in missing.output


# A query whose one relevant document is in no namespace: recall 0 whatever is returned.
MISSING = pb.GoldenQuery(id="missing", query="phases of the moon",
                         relevant_doc_ids=["d-not-indexed"])


def test_the_gauges_resume_from_each_sets_latest_slo_run_after_a_restart(
        embedder, tmp_path: Path) -> None:  # noqa: ANN001
    """A failing set stays failing across a restart, however many runs of other sets and
    ad-hoc runs (other cut-offs, mode) came after its latest one — even past the history
    kept (eval_history_size: the latest SLO run of each set is kept beyond it)."""
    settings = make_settings(tmp_path / "data", eval_history_size=2)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.upsert(NS, [pb.Document(doc_id=d, path=p, content=t) for d, (p, t) in DOCS.items()])
        register(c, "failing", MISSING)
        register(c, "passing", ORCHARD, ENGINE)
        assert metrics_of(evaluate(c, "failing"))["recall@10"] == 0.0
        # Ad-hoc runs: recorded, answered (saying so), not exported.
        assert not evaluate(c, "failing", k=[1]).slo
        assert not evaluate(c, "failing", mode=pb.DENSE).slo
        assert metrics_of(evaluate(c, "passing"))["recall@10"] == 1.0
        assert metrics_of(evaluate(c, "passing", k=[1]))["recall@1"] == 1.0
        assert gauge(scrape(st), "retriever_eval_recall_at_k", namespace=NS, k="10") == 0.0
        assert gauge(scrape(st), "retriever_eval_recall_at_k", namespace=NS, k="1") == 0.0
        # The gauge shows the worst; the status says which set it is (the last evaluation
        # alone showed the passing one).
        status = c.status(NS)
        assert status.last_evaluation.golden_set == "passing"
        assert [(e.golden_set, metrics_of(e)["recall@10"], e.slo)
                for e in status.slo_evaluations] == [("failing", 0.0, True),
                                                     ("passing", 1.0, True)]
    with running_server(settings, embedder) as st:
        text = scrape(st)
        assert gauge(text, "retriever_eval_recall_at_k", namespace=NS, k="10") == 0.0
        assert gauge(text, "retriever_eval_recall_at_k", namespace=NS, k="1") == 0.0


def test_deleting_namespaces_does_not_use_up_the_metric_labels(embedder, tmp_path: Path
                                                               ) -> None:  # noqa: ANN001
    """Past metrics_max_namespaces namespaces share the label "_other": deleting names that
    do not exist must not take labels, and a deleted namespace gives its label back."""
    settings = make_settings(tmp_path / "data", metrics_max_namespaces=2)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        for i in range(5):
            with pytest.raises(grpc.RpcError) as e:
                c.delete_namespace(f"never-{i}")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

        def evaluated(ns: str) -> None:
            c.upsert(ns, [pb.Document(doc_id=d, path=p, content=t)
                          for d, (p, t) in DOCS.items()])
            register(c, "smoke", ORCHARD, ns=ns)
            evaluate(c, "smoke", ns=ns)

        evaluated("first")
        evaluated("second")
        text = scrape(st)
        for ns in ("first", "second"):
            assert gauge(text, "retriever_eval_recall_at_k", namespace=ns, k="10") == 1.0
        c.delete_namespace("first")
        evaluated("third")
        text = scrape(st)
        assert gauge(text, "retriever_eval_recall_at_k", namespace="third", k="10") == 1.0
        assert gauge(text, "retriever_eval_recall_at_k", namespace="first", k="10") is None
        assert gauge(text, "retriever_eval_recall_at_k", namespace="_other", k="10") is None
        # Churn: a label given back takes all its series (counters too), so namespaces
        # created and deleted one after another never grow the series past the cap.
        for i in range(4):
            evaluated(f"brief-{i}")
            c.delete_namespace(f"brief-{i}")
        labels = set(re.findall(r'namespace="([^"]*)"', scrape(st)))
        assert labels <= {"second", "third", "_other"}, labels


def test_a_set_whose_echo_would_not_fit_a_message_is_refused_and_not_stored(
        embedder, tmp_path: Path) -> None:  # noqa: ANN001
    """The reply echoes the set (with the ids the server fills in): a request just under
    the message limit can make a reply over it. Refused before it is stored."""
    limit = 1024 * 1024
    settings = make_settings(tmp_path / "data", grpc_max_message_bytes=limit)
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.upsert(NS, [pb.Document(doc_id=d, path=p, content=t) for d, (p, t) in DOCS.items()])
        req = pb.RegisterGoldenSetRequest(namespace=NS, name="huge", queries=[
            pb.GoldenQuery(query=f"fruit {i} " + "orchard " * 500, relevant_doc_ids=["d-apple"])
            for i in range(200)])
        target, i = limit - 16, 0
        while req.ByteSize() < target:
            q = req.queries[i % len(req.queries)]
            q.query += "x" * min(8000 - len(q.query), target - req.ByteSize())
            i += 1
        assert limit - 32 < req.ByteSize() <= limit
        with pytest.raises(grpc.RpcError) as e:
            c.stub.RegisterGoldenSet(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "grpc_max_message_bytes" in e.value.details()
        assert "nothing was stored" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            evaluate(c, "huge")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # Half of it fits, and is stored as version 1 (no version was taken by the refusal).
        del req.queries[100:]
        assert c.stub.RegisterGoldenSet(req, timeout=60).version == 1


def test_an_evaluation_whose_caller_went_away_records_nothing(embedder, tmp_path: Path
                                                              ) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path / "data")
    with running_server(settings, embedder) as st, \
            RetrieverClient(st.address, timeout=120) as c:
        c.upsert(NS, [pb.Document(doc_id=d, path=p, content=t) for d, (p, t) in DOCS.items()])
        req = pb.RegisterGoldenSetRequest(namespace=NS, name="long", queries=[
            pb.GoldenQuery(query=f"which fruit grows on orchard trees, variant {i}",
                           relevant_doc_ids=["d-apple"]) for i in range(1000)])
        c.stub.RegisterGoldenSet(req, timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            c.stub.Evaluate(pb.EvaluateRequest(namespace=NS, golden_set="long"), timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 60
        cancelled = None
        while time.monotonic() < deadline and not cancelled:
            cancelled = gauge(scrape(st), "retriever_evaluations_total", trigger="request",
                              outcome="cancelled")
            time.sleep(0.2)
        assert cancelled == 1
        # Each deadline that passes is counted as DEADLINE_EXCEEDED (the availability SLI
        # counts those; CANCELLED is the caller's choice): gRPC cancels the handler at the
        # deadline, when the time left it reads can still be a hair above zero.
        for timeout in (0.6, 0.7, 0.8, 0.9):
            with pytest.raises(grpc.RpcError) as e:
                c.stub.Evaluate(pb.EvaluateRequest(namespace=NS, golden_set="long"),
                                timeout=timeout)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and gauge(
                scrape(st), "retriever_requests_total", rpc="Evaluate",
                code="DEADLINE_EXCEEDED") != 5:
            time.sleep(0.2)
        text = scrape(st)
        assert gauge(text, "retriever_requests_total", rpc="Evaluate",
                     code="DEADLINE_EXCEEDED") == 5
        assert gauge(text, "retriever_requests_total", rpc="Evaluate", code="CANCELLED") is None
        assert not c.status(NS).last_evaluation.evaluation_id
        text = scrape(st)
        assert gauge(text, "retriever_eval_recall_at_k", namespace=NS, k="10") is None
        assert gauge(text, "retriever_evaluations_total", trigger="request",
                     outcome="ok") in (None, 0.0)
