"""Golden sets of a namespace: checking them, building them from the namespace's git source
history, and running them through the search path.

A set refers to documents (doc ids, or paths standing for the documents with that path),
never to chunk ids, so re-chunking does not break it. The metric math is
retriever.slo.evaluation's, so `Evaluate`, `retriever eval` and the benchmarks agree. No grpc
here.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from retriever import validation
from retriever.catalog import SourceRecord
from retriever.domain import EvalMetric, EvaluationRecord, GoldenQuery, SearchMode
from retriever.errors import FailedPrecondition, InvalidArgument
from retriever.freshness.git import GitRepo, SourceSpec, is_url, mirror_path, open_source
from retriever.slo.evaluation import (
    DEFAULT_SOURCE_EXTENSIONS,
    _parse_raw,
    clean_commit_message,
    is_test_path,
    per_query,
)

__all__ = ["DEFAULT_EVAL_KS", "MAX_KS", "EvalRun", "check_ks", "check_name", "check_queries",
           "history_queries", "run_evaluation"]

#: The cut-offs of an evaluation that names none (and the k labels the alerts select).
DEFAULT_EVAL_KS: tuple[int, ...] = (1, 5, 10)
MAX_KS = 10
MAX_NAME_CHARS = 128
MAX_QUERY_ID_BYTES = 256
MAX_JUDGED_PER_QUERY = 1000
MAX_HISTORY_PATHS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def check_name(name: str, field: str = "name") -> None:
    if not name:
        raise InvalidArgument(f"{field} is required: the golden set's name", field=field)
    if len(name) > MAX_NAME_CHARS or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{field} {name[:MAX_NAME_CHARS]!r} is not a golden set name: 1..{MAX_NAME_CHARS} "
            "letters, digits, '.', '_', '-' and '/', starting with a letter or digit",
            field=field)


def check_ks(ks: Sequence[int], max_top_k: int) -> tuple[int, ...]:
    """The cut-offs, sorted; DEFAULT_EVAL_KS when none are given."""
    if not ks:
        return tuple(k for k in DEFAULT_EVAL_KS if k <= max_top_k) or (max_top_k,)
    if len(ks) > MAX_KS:
        raise InvalidArgument(f"k has {len(ks)} values; at most {MAX_KS}", field="k")
    if len(set(ks)) != len(ks):
        raise InvalidArgument(f"k has repeated values: {list(ks)}", field="k")
    for k in ks:
        if not 1 <= k <= max_top_k:
            raise InvalidArgument(f"k {k} is out of range: 1..{max_top_k} (max_top_k)",
                                  field="k")
    return tuple(sorted(ks))


def check_queries(queries: Sequence[GoldenQuery], max_queries: int, max_query_bytes: int
                  ) -> tuple[GoldenQuery, ...]:
    """The queries of a set to register, checked; ids filled in (the position) where empty."""
    if not queries:
        raise InvalidArgument("queries is empty: give at least one golden query, or "
                              "from_source_history", field="queries")
    if len(queries) > max_queries:
        raise InvalidArgument(f"queries has {len(queries)} queries; at most {max_queries} "
                              "(max_golden_set_queries)", field="queries")
    out: list[GoldenQuery] = []
    seen: set[str] = set()
    for i, q in enumerate(queries):
        f = f"queries[{i}]"
        if not q.text or not q.text.strip():
            raise InvalidArgument(f"{f}.query is empty", field=f"{f}.query")
        size = len(q.text.encode("utf-8", "surrogatepass"))
        if size > max_query_bytes:
            raise InvalidArgument(f"{f}.query is {size} bytes; the limit is {max_query_bytes} "
                                  "(max_query_bytes)", field=f"{f}.query")
        qid = q.id or str(i)
        if len(qid.encode("utf-8", "surrogatepass")) > MAX_QUERY_ID_BYTES or "\0" in qid:
            raise InvalidArgument(f"{f}.id is longer than {MAX_QUERY_ID_BYTES} bytes or holds "
                                  "NUL", field=f"{f}.id")
        if qid in seen:
            raise InvalidArgument(f"{f}.id {qid!r} is used twice in the set", field=f"{f}.id")
        seen.add(qid)
        if len(q.doc_grades) + len(q.path_grades) > MAX_JUDGED_PER_QUERY:
            raise InvalidArgument(f"{f} judges more than {MAX_JUDGED_PER_QUERY} documents",
                                  field=f)
        for d in q.doc_grades:
            validation.doc_id(d, f"{f}.doc_grades")
        for p in q.path_grades:
            if not p:
                raise InvalidArgument(f"{f}: a relevant path is empty", field=f"{f}.path_grades")
            validation.path(p, f"{f}.path_grades")
        if not any(g > 0 for g in (*q.doc_grades.values(), *q.path_grades.values())):
            raise InvalidArgument(
                f"{f} has no relevant document: give relevant_doc_ids, relevant_paths, or a "
                "grade > 0", field=f)
        out.append(GoldenQuery(qid, q.text, dict(q.doc_grades), dict(q.path_grades)))
    return tuple(out)


# -- sets from the namespace's git source --------------------------------------------------
def open_source_repo(source: SourceRecord, mirrors: Path) -> GitRepo:
    """The repository a namespace is synced from: a local path in place, a URL's mirror
    under ``mirrors`` as of its last fetch (never fetched here: that is a sync's)."""
    if not is_url(source.location):
        return open_source(SourceSpec(source.location, source.ref or "HEAD"), mirrors)
    mirror = mirror_path(mirrors, source.location)
    if not (mirror / "HEAD").is_file():
        raise FailedPrecondition(f"the source of namespace {source.namespace!r} has no "
                                 "mirror yet: sync it first", field="from_source_history")
    return GitRepo(mirror)


def history_queries(
    git: GitRepo, commit: str, n: int, documents: Collection[str], *,
    paths: Sequence[str] = (), extensions: Collection[str] = DEFAULT_SOURCE_EXTENSIONS,
    max_query_bytes: int = 8192, max_query_chars: int = 2000,
) -> tuple[list[GoldenQuery], dict[str, object]]:
    """Up to ``n`` golden queries from the history of ``commit`` (the indexed one).

    Each is the cleaned message (`clean_commit_message`) of one of the latest non-merge,
    non-root commits reachable from ``commit``; its relevant documents (grade 1) are the
    non-test source files (by extension; under ``paths`` when given) it added, modified or
    renamed (the new path) that exist at ``commit`` and are ``documents`` of the namespace
    (doc id = path, as a sync makes them). Commits with none are passed over. Returns the
    queries, newest first, and metadata (corpus revision, query commits)."""
    prefixes = tuple(p.strip("/") for p in paths if p.strip("/"))
    exts = frozenset(e.lower() for e in extensions)

    def in_scope(path: str) -> bool:
        if prefixes and not any(path == p or path.startswith(p + "/") for p in prefixes):
            return False
        dot = path.rfind(".")
        ext = path[dot:].lower() if dot > path.rfind("/") else ""
        return ext in exts and not is_test_path(path)

    tree = {p.decode("utf-8", "surrogateescape")
            for p in git.run("ls-tree", "-r", "--name-only", "-z", commit).split(b"\0") if p}
    present = tree & set(documents)
    queries: list[GoldenQuery] = []
    commits: list[dict[str, str]] = []
    for sha, message in _non_merge_commits(git, commit):
        changes = _parse_raw(git.run("diff-tree", "-r", "-z", "--raw", "-M",
                                     "--no-commit-id", sha))
        relevant = sorted({c.new_path for c in changes if c.status in "AMRT"
                           and in_scope(c.new_path) and c.new_path in present})
        if not relevant:
            continue
        text = _cut(clean_commit_message(message)[:max_query_chars], max_query_bytes).strip()
        if not text:
            continue
        queries.append(GoldenQuery(sha, text, dict.fromkeys(relevant, 1)))
        commits.append({"sha": sha, "subject": message.strip().split("\n", 1)[0][:200]})
        if len(queries) >= n:
            break
    if not queries:
        raise FailedPrecondition(
            f"no non-merge commit reachable from {commit[:12]} changed a non-test source file "
            "the namespace holds: nothing to build a golden set from",
            field="from_source_history")
    return queries, {"corpus_revision": commit, "commits_requested": n,
                     "paths": list(prefixes), "commits": commits}


def _non_merge_commits(git: GitRepo, commit: str) -> Iterator[tuple[str, str]]:
    """(sha, message) of the non-merge, non-root commits reachable from ``commit``, newest
    first (topological order)."""
    listing = git.run("rev-list", "--no-merges", "--topo-order", "--parents",
                      "--end-of-options", commit, "--")
    for line in listing.decode().splitlines():
        sha, *parents = line.split()
        if not parents:
            continue  # a root commit: no diff to a parent
        raw = git.object(sha).decode("utf-8", errors="replace")
        yield sha, raw.split("\n\n", 1)[1] if "\n\n" in raw else ""


def _cut(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


# -- running a set -------------------------------------------------------------------------
RankedDocs = Callable[[Sequence[str]], list[list[str]]]
"""query texts -> the doc ids of each query's hits in rank order."""


@dataclass(frozen=True)
class EvalRun:
    """What to evaluate and how; `run_evaluation` fills in the rest."""

    namespace: str
    golden_set: str
    version: int
    mode: SearchMode
    rerank: bool
    ks: tuple[int, ...]
    trigger: str


def run_evaluation(run: EvalRun, queries: Sequence[GoldenQuery], search: RankedDocs,
                   docs_by_path: Mapping[str, Sequence[str]], *, batch: int = 32
                   ) -> EvaluationRecord:
    """Search every query (``batch`` at a time) and score the runs over documents: hits
    de-duplicated by doc id (first occurrence kept); paths of the set stand for the
    documents ``docs_by_path`` gives them (a path none has stays relevant, unretrieved).
    Means are over the queries with a relevant document; MRR is cut at the largest k."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    qrels: dict[str, dict[str, int]] = {}
    for q in queries:
        grades = dict(q.doc_grades)
        for path, g in q.path_grades.items():
            for d in docs_by_path.get(path) or (f"\0path:{path}",):  # never a doc id (NUL)
                grades[d] = max(grades.get(d, g), g)
        qrels[q.id] = grades
    ranked: dict[str, list[str]] = {}
    for i in range(0, len(queries), batch):
        part = queries[i:i + batch]
        for q, docs in zip(part, search([q.text for q in part]), strict=True):
            ranked[q.id] = list(dict.fromkeys(docs))[:max(run.ks)]
    rows = per_query(ranked, qrels, run.ks)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows.values()) / len(rows) if rows else 0.0

    metrics: list[EvalMetric] = []
    for k in run.ks:
        metrics += [EvalMetric("precision", k, mean(f"P@{k}")),
                    EvalMetric("recall", k, mean(f"R@{k}")),
                    EvalMetric("ndcg", k, mean(f"nDCG@{k}"))]
    metrics.append(EvalMetric("mrr", max(run.ks), mean("MRR")))
    return EvaluationRecord(
        evaluation_id=uuid.uuid4().hex, namespace=run.namespace, golden_set=run.golden_set,
        version=run.version, started_at=started, seconds=time.perf_counter() - t0,
        mode=run.mode, rerank=run.rerank, query_count=len(rows), trigger=run.trigger,
        metrics=tuple(metrics))
