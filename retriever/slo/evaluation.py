"""Retrieval quality: query sets, the metric math, and the loaders that build query sets.

Shared by `retriever eval`, the Evaluate RPC, scheduled evaluations and the benchmarks, so
every figure the project publishes comes from one implementation. No grpc here.

Metric conventions (checked against trec_eval through pytrec-eval-terrier in
tests/test_evaluation.py):

- A run is a ranked list of document ids. Hits are de-duplicated by doc id before any metric
  (the first occurrence keeps its rank), so several chunks of one file count once.
- A document is relevant when its grade is > 0; unjudged documents are not relevant.
- precision@k = relevant documents in the top k / k (k, not the run's length, even when the
  run is shorter — as trec_eval's P_k).
- recall@k = relevant documents in the top k / relevant documents in the qrels.
- MRR = 1 / rank of the first relevant document (0 when none), over the whole run or its top k.
- nDCG@k = DCG@k / ideal DCG@k with linear gain (the grade) and a log2(rank + 1) discount;
  the ideal ranking is the qrels' grades sorted (trec_eval's ndcg_cut, BEIR's nDCG).
- A query with no relevant document scores 0 on every metric; `evaluate` leaves such queries
  out of its means (their recall and nDCG are undefined) and averages over every other query
  of the qrels, a query missing from the run scoring 0.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.errors import InvalidArgument
from retriever.freshness.git import GitRepo

__all__ = [
    "DEFAULT_KS", "DEFAULT_SOURCE_EXTENSIONS", "CorpusDoc", "Qrels", "Query", "QuerySet",
    "build_git_history_set", "clean_commit_message", "dedupe", "evaluate", "is_test_path",
    "load_beir", "mrr", "ndcg_at_k", "per_query", "precision_at_k", "recall_at_k",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 100)

#: query id -> doc id -> grade (> 0: relevant).
Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Query:
    id: str
    text: str


@dataclass(frozen=True)
class CorpusDoc:
    """One document to index: ``doc_id`` is what runs and qrels name; ``path`` drives the
    server's language detection (empty: plain text)."""

    doc_id: str
    text: str
    path: str = ""


@dataclass
class QuerySet:
    """Queries, their judgments, and the corpus they are judged against.

    ``corpus`` is a list, or a callable that yields the documents afresh on every call (for
    corpora too big to hold twice). ``metadata`` records where the set came from (for a git
    set: the repository, the query commits and the corpus revision)."""

    name: str
    queries: list[Query]
    qrels: Qrels
    corpus: Sequence[CorpusDoc] | Callable[[], Iterable[CorpusDoc]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def iter_corpus(self) -> Iterator[CorpusDoc]:
        docs = self.corpus() if callable(self.corpus) else self.corpus
        yield from docs


# -- metrics --------------------------------------------------------------------------------
Relevance = Mapping[str, int] | Mapping[str, float] | Collection[str]


def dedupe(ranked: Iterable[str]) -> list[str]:
    """Doc ids in rank order, each once (its first occurrence)."""
    return list(dict.fromkeys(ranked))


def _grades(relevance: Relevance) -> Mapping[str, float]:
    if isinstance(relevance, Mapping):
        return relevance
    return dict.fromkeys(relevance, 1)


def _num_relevant(grades: Mapping[str, float]) -> int:
    return sum(1 for g in grades.values() if g > 0)


def _hits_at(ranked: Iterable[str], grades: Mapping[str, float], k: int) -> int:
    return sum(1 for d in dedupe(ranked)[:k] if grades.get(d, 0) > 0)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def precision_at_k(ranked: Iterable[str], relevance: Relevance, k: int) -> float:
    """Relevant documents among the first k distinct ones, over k."""
    _check_k(k)
    return _hits_at(ranked, _grades(relevance), k) / k


def recall_at_k(ranked: Iterable[str], relevance: Relevance, k: int) -> float:
    """Relevant documents among the first k distinct ones, over all relevant documents
    (0 when there are none)."""
    _check_k(k)
    grades = _grades(relevance)
    n = _num_relevant(grades)
    return _hits_at(ranked, grades, k) / n if n else 0.0


def mrr(ranked: Iterable[str], relevance: Relevance, k: int | None = None) -> float:
    """Reciprocal rank of the first relevant document (0 if none is in the top k, or in the
    whole run when k is None)."""
    if k is not None:
        _check_k(k)
    grades = _grades(relevance)
    docs = dedupe(ranked)
    for rank, d in enumerate(docs if k is None else docs[:k], start=1):
        if grades.get(d, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Iterable[str], relevance: Relevance, k: int) -> float:
    """Graded nDCG@k: gain = grade (negative grades count 0), discount log2(rank + 1),
    normalised by the DCG of the qrels' grades in descending order (0 with no relevant)."""
    _check_k(k)
    grades = _grades(relevance)
    dcg = sum(max(grades.get(d, 0), 0) / math.log2(i + 2)
              for i, d in enumerate(dedupe(ranked)[:k]))
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The keys `evaluate` returns, in a stable order."""
    return ([f"nDCG@{k}" for k in ks] + [f"P@{k}" for k in ks] + [f"R@{k}" for k in ks]
            + ["MRR"])


def per_query(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Relevance],
              ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, float]]:
    """Every metric of every judged query that has at least one relevant document."""
    out: dict[str, dict[str, float]] = {}
    for qid in sorted(qrels):
        grades = _grades(qrels[qid])
        if not _num_relevant(grades):
            continue
        ranked = dedupe(run.get(qid, ()))
        m: dict[str, float] = {}
        for k in ks:
            m[f"nDCG@{k}"] = ndcg_at_k(ranked, grades, k)
        for k in ks:
            m[f"P@{k}"] = precision_at_k(ranked, grades, k)
        for k in ks:
            m[f"R@{k}"] = recall_at_k(ranked, grades, k)
        m["MRR"] = mrr(ranked, grades)
        out[qid] = m
    return out


def evaluate(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Relevance],
             ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean of each metric (`metric_names`) over the judged queries with a relevant document.

    ``run``: query id -> ranked doc ids (duplicates allowed; the first counts). Queries of the
    run that the qrels do not judge are ignored; an empty evaluation gives all zeros."""
    rows = per_query(run, qrels, ks)
    names = metric_names(ks)
    if not rows:
        return dict.fromkeys(names, 0.0)
    return {n: sum(r[n] for r in rows.values()) / len(rows) for n in names}


# -- BEIR -----------------------------------------------------------------------------------
def load_beir(directory: str | Path, split: str = "test", name: str | None = None) -> QuerySet:
    """A BEIR dataset: corpus.jsonl ({_id, title, text}, scored as title + text),
    queries.jsonl ({_id, text}), qrels/<split>.tsv (query-id, corpus-id, score; a header).

    Only queries the split judges are kept, in the qrels' order. The corpus is read lazily,
    afresh on each pass."""
    root = Path(directory)
    corpus_file, queries_file = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_file = root / "qrels" / f"{split}.tsv"
    for f in (corpus_file, queries_file, qrels_file):
        if not f.is_file():
            raise InvalidArgument(f"{f} not found: not a BEIR dataset (split {split!r})",
                                  field="beir")
    qrels: Qrels = {}
    with qrels_file.open(encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(_lines(qrels_file, fh), start=1):
            parts = line.rstrip("\r\n").split("\t")
            if lineno == 1 and parts[-1].strip().lower() == "score":
                continue  # the header
            if not line.strip():
                continue
            if len(parts) != 3:
                raise InvalidArgument(f"{qrels_file}:{lineno}: expected query-id, corpus-id, "
                                      f"score separated by tabs, got {line.rstrip()!r}",
                                      field="qrels")
            try:
                grade = int(parts[2])
            except ValueError:
                raise InvalidArgument(f"{qrels_file}:{lineno}: score {parts[2]!r} is not an "
                                      "integer", field="qrels") from None
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    if not qrels:
        raise InvalidArgument(f"{qrels_file} judges no query: nothing to evaluate",
                              field="qrels")
    texts: dict[str, str] = {}
    for lineno, obj in _jsonl(queries_file, numbered=True):
        qid, text = _record_id(queries_file, lineno, obj), obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(f"{queries_file}:{lineno}: query {qid!r} has no \"text\"",
                                  field="beir")
        texts[qid] = text
    missing = [q for q in qrels if q not in texts]
    if missing:
        raise InvalidArgument(f"{qrels_file} judges queries absent from {queries_file}: "
                              f"{missing[:5]}", field="qrels")
    queries = [Query(q, texts[q]) for q in qrels]

    def corpus() -> Iterator[CorpusDoc]:
        for lineno, obj in _jsonl(corpus_file, numbered=True):
            doc_id = _record_id(corpus_file, lineno, obj)
            title, text = str(obj.get("title") or ""), str(obj.get("text") or "")
            yield CorpusDoc(doc_id, f"{title}\n\n{text}" if title else text)

    return QuerySet(name=name or f"{root.name}/{split}", queries=queries, qrels=qrels,
                    corpus=corpus, metadata={"source": "beir", "path": str(root.resolve()),
                                             "split": split})


def _lines(path: Path, fh: Iterable[str]) -> Iterator[str]:
    """The lines of ``fh``; undecodable bytes are an InvalidArgument naming the file."""
    try:
        yield from fh
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start} of a "
                              "read block)", field="beir") from None


def _record_id(path: Path, lineno: int, obj: Any) -> str:
    if not isinstance(obj, dict) or obj.get("_id") in (None, ""):
        raise InvalidArgument(f"{path}:{lineno}: expected a JSON object with an \"_id\"",
                              field="beir")
    return str(obj["_id"])


def _jsonl(path: Path, *, numbered: bool = False) -> Iterator[Any]:
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})", field="beir") from None
    with fh:
        for lineno, line in enumerate(_lines(path, fh), start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"{path}:{lineno}: not JSON ({exc.msg})",
                                          field="beir") from None
                yield (lineno, obj) if numbered else obj


# -- sets from a git repository's history ---------------------------------------------------
#: Programming-language files; documentation and configuration are not "source".
DEFAULT_SOURCE_EXTENSIONS = frozenset({
    ".py", ".pyi", ".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx", ".go", ".rs", ".java",
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cs", ".rb", ".php", ".kt", ".kts",
    ".swift", ".scala", ".lua", ".sh", ".bash", ".sql", ".proto", ".m", ".mm", ".ex", ".exs",
    ".erl", ".hs", ".ml", ".clj", ".dart", ".jl", ".r", ".pl", ".pm", ".vue", ".svelte",
})
_TEST_DIRS = frozenset({"test", "tests", "__tests__", "__mocks__", "spec", "specs",
                        "testdata", "test_data", "e2e"})
_TEST_NAMES = re.compile(
    r"""^(?: test_.*\.py | .*_tests?\.py | conftest\.py | tests?\.py
          | .*_test\.(?:go|rb|rs|c|cc|cpp|cxx|exs?|dart|lua|sh)
          | .*_(?:unit)?tests?\.(?:cc|cpp|cxx)
          | .*_spec\.(?:rb|lua|exs?)
          | .*\.(?:test|spec)\.(?:js|jsx|mjs|cjs|ts|tsx|vue|svelte)
          | .*(?:Test|Tests|IT|Spec)\.(?:java|kt|kts|scala|cs|swift|php|groovy)
          | .*\.t )$""", re.VERBOSE)


def is_test_path(path: str) -> bool:
    """True for test code by path: a test directory anywhere (tests/, spec/, __tests__/,
    testdata/ ...) or a test file name (test_*.py, *_test.py, *_test.go, *.test.ts,
    *Test.java, *_spec.rb ...)."""
    parts = path.split("/")
    if any(p.lower() in _TEST_DIRS for p in parts[:-1]):
        return True
    return bool(_TEST_NAMES.match(parts[-1]))


# Trailers and references that leak ids or authorship rather than describe the change.
_TRAILER = re.compile(r"^[A-Za-z][A-Za-z0-9-]*: \S")
_KNOWN_TRAILERS = re.compile(
    r"^\s*(?:signed-off-by|co-authored-by|reviewed-by|acked-by|tested-by|reported-by|"
    r"suggested-by|helped-by|requested-by|cc|change-id|bug|fixes|closes|resolves|refs?|"
    r"see-also|link|git-svn-id|pr-url|pr-close|differential revision|reviewed-on|"
    r"reviewed-url|issue|jira|ticket|upstream-commit)\s*:", re.IGNORECASE)
_CHERRY_PICK = re.compile(r"^\s*\(cherry picked from commit [0-9a-f]+\)\s*$", re.IGNORECASE)
_ISSUE_REFS = [
    re.compile(r"https?://\S+/(?:issues?|pulls?|merge_requests|show_bug\.cgi\?id=)/?\d*\S*"),
    re.compile(r"\(\s*(?:#|gh-|GH-|bpo-)\d+(?:\s*,\s*(?:#|gh-|GH-|bpo-)?\d+)*\s*\)"),
    re.compile(r"\b(?:fix(?:es|ed)?|close[sd]?|resolve[sd]?)\s+#\d+", re.IGNORECASE),
    re.compile(r"(?<![\w&/])(?:gh|bpo|issue)[- ]?#?\d+\b", re.IGNORECASE),
    re.compile(r"(?<![\w&/])#\d+\b"),
    re.compile(r"\[(?:skip ci|ci skip|no ci)\]", re.IGNORECASE),
]


def clean_commit_message(message: str) -> str:
    """Subject and body of a commit message without what leaks ids: trailers
    (Signed-off-by:, Change-Id: ... and a closing paragraph of "Key: value" lines), cherry-pick
    notes, issue and pull-request references ("(#1234)", "gh-123:", "Fixes #9", issue URLs).
    Runs of spaces become one; paragraphs stay apart."""
    paragraphs = re.split(r"\n[ \t]*\n", message.strip())
    if len(paragraphs) > 1 and all(_TRAILER.match(ln) for ln in paragraphs[-1].splitlines()):
        paragraphs.pop()  # a git trailer block
    kept: list[str] = []
    for p in paragraphs:
        lines = []
        for ln in p.splitlines():
            if _KNOWN_TRAILERS.match(ln) or _CHERRY_PICK.match(ln):
                continue
            for rx in _ISSUE_REFS:
                ln = rx.sub("", ln)
            ln = re.sub(r"[ \t]+", " ", ln).strip()
            if ln:
                lines.append(ln)
        if lines:
            kept.append("\n".join(lines))
    if kept:  # "gh-123: Fix x" leaves ": Fix x"
        kept[0] = kept[0].lstrip(" :-")
    return "\n\n".join(kept).strip()


@dataclass(frozen=True)
class _Change:
    status: str  # A, M, D, R, T (first letter of git's status)
    old_mode: str
    old_oid: str
    old_path: str  # the pre-image path; the path itself unless renamed
    new_path: str


@dataclass(frozen=True)
class _Candidate:
    sha: str
    parent: str
    changes: tuple[_Change, ...]
    text: str  # the query
    subject: str


def _parse_raw(out: bytes) -> list[_Change]:
    """Records of `git diff-tree -r -z --raw -M`:
    ":oldmode newmode oldoid newoid status" NUL path NUL (NUL new-path, for renames)."""
    fields = out.decode("utf-8", errors="surrogateescape").split("\0")
    changes: list[_Change] = []
    i = 0
    while i < len(fields) and fields[i].startswith(":"):
        old_mode, _new_mode, old_oid, _new_oid, status = fields[i][1:].split()
        if status[0] in "RC":
            changes.append(_Change(status[0], old_mode, old_oid, fields[i + 1], fields[i + 2]))
            i += 3
        else:
            changes.append(_Change(status[0], old_mode, old_oid, fields[i + 1], fields[i + 1]))
            i += 2
    return changes


def build_git_history_set(
    repo: str | Path, *, commits: int, rev_range: str = "HEAD",
    paths: Sequence[str] = (), extensions: Collection[str] = DEFAULT_SOURCE_EXTENSIONS,
    max_file_bytes: int = 1024 * 1024, max_query_chars: int = 2000, name: str | None = None,
) -> QuerySet:
    """A query set from a repository's history, read with git plumbing (no checkout).

    Queries are the last ``commits`` non-merge commits of ``rev_range`` (a revision or a
    range such as ``v1.0..v2.0``) that changed a non-test source file existing at the corpus
    revision; each query is the commit's cleaned message (`clean_commit_message`, cut to
    ``max_query_chars``), its id the commit sha.

    The corpus is every non-test source file at the parent of the oldest query commit
    (files under ``paths`` prefixes when given, with one of ``extensions``; no symlinks,
    submodules, binary, non-UTF-8 or files over ``max_file_bytes``). A query's relevant
    documents (grade 1) are the files its commit modified, renamed (by their old path) or
    deleted that are in that corpus: files the commit added are not in the corpus, and test
    files are in neither. Fewer queries come back when the history runs out. Doc ids and
    paths are repository-relative paths."""
    if commits < 1:
        raise InvalidArgument(f"commits must be >= 1, got {commits}", field="commits")
    root = Path(repo).resolve()
    git = GitRepo(root, error=functools.partial(InvalidArgument, field="git"))
    try:
        return _build(git, root, commits, rev_range, paths, frozenset(e.lower() for e in
                      extensions), max_file_bytes, max_query_chars, name)
    finally:
        git.close()


def _build(git: GitRepo, root: Path, n: int, rev_range: str, paths: Sequence[str],
           extensions: frozenset[str], max_file_bytes: int, max_query_chars: int,
           name: str | None) -> QuerySet:
    prefixes = tuple(p.strip("/") for p in paths if p.strip("/"))

    def in_scope(path: str) -> bool:
        if prefixes and not any(path == p or path.startswith(p + "/") for p in prefixes):
            return False
        dot = path.rfind(".")
        ext = path[dot:].lower() if dot > path.rfind("/") else ""
        return ext in extensions and not is_test_path(path)

    def regular(mode: str) -> bool:
        return mode in ("100644", "100755")

    def candidates() -> Iterator[_Candidate]:
        listing = git.run("rev-list", "--no-merges", "--topo-order", "--parents",
                          "--end-of-options", rev_range, "--")
        for line in listing.decode().splitlines():
            # A non-merge has one parent; a root commit has none (and no corpus before it).
            sha, *parents = line.split()
            if not parents:
                continue
            changes = [c for c in _parse_raw(git.run("diff-tree", "-r", "-z", "--raw", "-M",
                                                     "--no-commit-id", sha))
                       if c.status != "A" and regular(c.old_mode) and in_scope(c.old_path)]
            # Only pre-images that would be corpus documents count, so that the oldest
            # query always has a relevant document in its own parent.
            changes = [c for c in changes if _utf8(c.old_path)
                       and _text(git.object(c.old_oid), max_file_bytes) is not None]
            if not changes:
                continue
            raw = git.object(sha).decode("utf-8", errors="replace")
            message = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
            text = clean_commit_message(message)[:max_query_chars].strip()
            if text:
                yield _Candidate(sha, parents[0], tuple(changes), text,
                                 message.strip().split("\n", 1)[0])

    corpus_cache: dict[str, tuple[dict[str, CorpusDoc], dict[str, int]]] = {}

    def snapshot(rev: str) -> tuple[dict[str, CorpusDoc], dict[str, int]]:
        if rev not in corpus_cache:
            corpus_cache.clear()  # one snapshot in memory at a time
            docs: dict[str, CorpusDoc] = {}
            skipped = {"too large": 0, "binary or not UTF-8": 0}
            for rec in git.run("ls-tree", "-r", "-l", "-z", rev).split(b"\0"):
                if not rec:
                    continue
                meta, _, raw_path = rec.partition(b"\t")
                mode, kind, oid, size = meta.split()
                path = raw_path.decode("utf-8", errors="surrogateescape")
                if kind != b"blob" or not regular(mode.decode()) or not in_scope(path):
                    continue
                if int(size) > max_file_bytes:
                    skipped["too large"] += 1
                    continue
                text = _text(git.object(oid.decode()), max_file_bytes)
                if text is None or not _utf8(path):
                    skipped["binary or not UTF-8"] += 1
                    continue
                docs[path] = CorpusDoc(path, text, path)
            corpus_cache[rev] = (docs, skipped)
        return corpus_cache[rev]

    def relevant(c: _Candidate, corpus: Mapping[str, CorpusDoc]) -> dict[str, int]:
        return {p: 1 for p in sorted({ch.old_path for ch in c.changes}) if p in corpus}

    # Take n candidates; the parent of the oldest is the corpus. A newer candidate may have
    # touched only files created after that parent, so it has no relevant document and is
    # dropped: take older candidates until n queries stand or the history runs out.
    stream = candidates()
    selected = list(itertools.islice(stream, n))
    if not selected:
        raise InvalidArgument(f"no non-merge commit in {rev_range!r} of {root} changes a "
                              "non-test source file", field="git")
    while True:
        corpus, skipped = snapshot(selected[-1].parent)
        valid = [c for c in selected if relevant(c, corpus)]
        more = list(itertools.islice(stream, n - len(valid))) if len(valid) < n else []
        if not more:
            break
        selected += more
    # An older corpus can, rarely, revive a query (a file deleted, then re-created): keep
    # the oldest n, so the corpus revision stays the parent of the oldest query.
    valid = valid[-n:]
    corpus_rev = selected[-1].parent
    queries: list[Query] = []
    qrels: Qrels = {}
    commits_meta: list[dict[str, str]] = []
    for c in valid:
        queries.append(Query(c.sha, c.text))
        qrels[c.sha] = relevant(c, corpus)
        commits_meta.append({"sha": c.sha, "subject": c.subject})
    docs = [corpus[p] for p in sorted(corpus)]
    head = git.run("rev-list", "-n", "1", "--topo-order", "--end-of-options", rev_range,
                   "--").decode().strip()
    return QuerySet(
        name=name or f"{root.name}@{head[:12]}/{len(queries)}",
        queries=queries, qrels=qrels, corpus=docs,
        metadata={
            "source": "git", "repo": str(root), "rev_range": rev_range, "head": head,
            "commits_requested": n, "corpus_rev": corpus_rev, "corpus_docs": len(docs),
            "paths": list(prefixes), "extensions": sorted(extensions),
            "skipped_files": skipped, "commits": commits_meta,
        })


def _text(data: bytes, max_bytes: int) -> str | None:
    """A blob's text, or None when it is no corpus document (too large, binary, not UTF-8)."""
    if len(data) > max_bytes or b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
