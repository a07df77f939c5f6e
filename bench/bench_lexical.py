"""The lexical engines at 10k, 100k and 1M chunks: tantivy (the default) against the
catalog's SQLite FTS5 table, on the same chunks in one run.

Does the service's BM25 path hold up at 1M chunks? This drives the real code: a Catalog in
a temp dir, chunks staged and committed through its own methods (terms from the service's
analyzer), and beside it a `LexicalIndex` fed the same chunks as the ingest path feeds it.
Timed per query, as a LEXICAL or HYBRID search makes it (100 candidates): FTS5 is
`Catalog.lexical_search` (its SQL joins the chunk rows); tantivy is `LexicalIndex.search`
plus `Catalog.chunk_heads` of what it found (the visibility check the search pipeline
makes). Unfiltered and with a path-prefix filter, at each size on the same growing
namespace; also the top-10 agreement of the two engines (both BM25, k1 1.2, b 0.75), the
insert rate and the bytes per chunk of each.

Corpus: chunks made of 3-8 sentences drawn at random from the BEIR SciFact corpus (so term
frequencies follow real English, with SciFact's vocabulary), under 200 paths; queries:
SciFact's test queries. Vectors are 4-d placeholders: this measures the lexical path only.

    python bench/bench_lexical.py [--sizes 10000,100000,1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import cpu, cpu_line, git, log  # noqa: E402

from indexers import Filter, Payload  # noqa: E402
from retriever import analyzer  # noqa: E402
from retriever.catalog import Catalog, DocumentWrite, NewChunk  # noqa: E402
from retriever.domain import NamespaceRecord, SearchFilter  # noqa: E402
from retriever.lexical import LexicalIndex  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
ROOT = Path(__file__).resolve().parents[1]
NS = "lex"
DOCS_PER_COMMIT = 500
CHUNKS_PER_DOC = 10
LIMIT = 100  # candidates a HYBRID search asks the lexical side for (hybrid_candidates)


def sentences() -> list[str]:
    out: list[str] = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            out += [s for s in re.split(r"(?<=[.!?])\s+", doc["text"]) if len(s) > 20]
    return out


def queries(n: int) -> list[str]:
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        qs = [json.loads(line)["text"] for line in f]
    return qs[:n]


def fill(catalog: Catalog, lex: LexicalIndex, pool: list[str], start: int, stop: int,
         rng: random.Random) -> tuple[float, float]:
    """Documents of CHUNKS_PER_DOC chunks each, chunks start..stop, committed in batches
    to both engines; returns the seconds each took (the analyzer's time is in neither)."""
    vec = np.zeros(4, dtype=np.float32)
    fts_s = lex_s = 0.0
    for d0 in range(start // CHUNKS_PER_DOC, stop // CHUNKS_PER_DOC, DOCS_PER_COMMIT):
        rows: list[NewChunk] = []
        payloads: list[Payload] = []
        docs = range(d0, min(d0 + DOCS_PER_COMMIT, stop // CHUNKS_PER_DOC))
        for d in docs:
            path = f"src/pkg{d % 200:03d}/mod{d}.txt"
            for c in range(CHUNKS_PER_DOC):
                text = " ".join(rng.sample(pool, rng.randint(3, 8)))
                rows.append(NewChunk(
                    chunk_id=f"{d}:{c}", doc_id=f"doc{d}", ordinal=c, text=text,
                    content_hash="", start_line=c, end_line=c, start_byte=0, end_byte=0,
                    token_count=0, chunker="bench", vector=vec,
                    terms=analyzer.chunk_terms(path, "", text)))
                payloads.append(Payload(f"doc{d}", path, "text"))
        t0 = time.perf_counter()
        ids = catalog.stage_chunks(NS, rows)
        t1 = time.perf_counter()
        lex.add(ids, [r.terms for r in rows], payloads)  # before the flip, as ingest does
        t2 = time.perf_counter()
        writes = []
        for i, d in enumerate(docs):
            writes.append(DocumentWrite(
                doc_id=f"doc{d}", path=f"src/pkg{d % 200:03d}/mod{d}.txt", revision="",
                content_hash="", language="text", version=1, content="",
                chunk_count=CHUNKS_PER_DOC, source_updated_at=None, metadata={},
                chunker="bench", keep=(),
                activate=tuple(ids[i * CHUNKS_PER_DOC:(i + 1) * CHUNKS_PER_DOC]), drop=()))
        catalog.commit_documents(NS, writes, [])
        fts_s += t1 - t0 + time.perf_counter() - t2
        lex_s += t2 - t1
    return fts_s, lex_s


def _stats(times: list[float], hits: list[int]) -> dict:
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
            "mean_hits": round(statistics.mean(hits), 1)}


def timed(catalog: Catalog, lex: LexicalIndex, qs: list[list[str]], flt: SearchFilter
          ) -> dict:
    """Both engines per query (interleaved, so drift hits each alike), and their top-10
    agreement."""
    engine_filter = Filter(path_prefix=flt.path_prefix)
    fts_t, lex_t, fts_h, lex_h, overlap = [], [], [], [], []
    for terms in qs:
        t0 = time.perf_counter()
        a = catalog.lexical_search(NS, terms, flt, LIMIT)
        t1 = time.perf_counter()
        found = lex.search(terms, engine_filter, LIMIT + 16)
        heads = catalog.chunk_heads(NS, [v for v, _ in found])
        b = [(v, s) for v, s in found if v in heads][:LIMIT]
        t2 = time.perf_counter()
        fts_t.append((t1 - t0) * 1000)
        lex_t.append((t2 - t1) * 1000)
        fts_h.append(len(a))
        lex_h.append(len(b))
        top_a, top_b = {v for v, _ in a[:10]}, {v for v, _ in b[:10]}
        if top_a:
            overlap.append(len(top_a & top_b) / len(top_a))
    return {"fts5": _stats(fts_t, fts_h), "tantivy": _stats(lex_t, lex_h),
            "top10_overlap": round(statistics.mean(overlap), 3) if overlap else None}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lexical-scale")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(7)
    pool = sentences()
    qs = [analyzer.query_terms(q) for q in queries(args.queries)]
    log(f"{len(pool)} sentences, {len(qs)} queries")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(Path(tmp) / "catalog.db")
        catalog.open(check=False)
        catalog.create_namespace(NamespaceRecord(
            name=NS, backend="faiss", embedder="none", embedder_revision="none", dimension=4,
            metric="cosine", index_generation=1, index_version=0,
            created_at=datetime.now(UTC)))
        lex = LexicalIndex(Path(tmp) / "lexical")
        have = 0
        for size in sizes:
            fts_s, lex_s = fill(catalog, lex, pool, have, size, rng)
            log(f"{size} chunks: inserted {size - have}: FTS5 {fts_s:.1f} s, tantivy "
                f"{lex_s:.1f} s")
            catalog_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
            timed(catalog, lex, qs[:5], SearchFilter())  # warm
            row = {"chunks": size,
                   "insert_chunks_per_s": {"fts5": round((size - have) / fts_s),
                                           "tantivy": round((size - have) / lex_s)},
                   "catalog_bytes_per_chunk": round(catalog_bytes / size),
                   "tantivy_bytes_per_chunk": round(_bytes(Path(tmp) / "lexical") / size),
                   "unfiltered": timed(catalog, lex, qs, SearchFilter()),
                   "path_prefix": timed(catalog, lex, qs,
                                        SearchFilter(path_prefix="src/pkg007/"))}
            have = size
            log(json.dumps(row))
            rows.append(row)
        lex.close()
        catalog.close()
    c = cpu()
    result = {"cpu": c, "commit": git(ROOT, "rev-parse", "--short", "HEAD"),
              "sqlite": __import__("sqlite3").sqlite_version, "limit": LIMIT,
              "tantivy": __import__("importlib.metadata").metadata.version("tantivy"),
              "queries": len(qs), "rows": rows,
              "run": datetime.now(UTC).isoformat(timespec="seconds")}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Lexical engines at scale: tantivy (default) and SQLite FTS5",
        "",
        f"Run {result['run']} at commit {result['commit']}, CPU {cpu_line(c)}, SQLite "
        f"{result['sqlite']}, tantivy {result['tantivy']}. One namespace grown to each size "
        f"(chunks of 3-8 random SciFact sentences under 200 directories), both engines fed "
        f"the same chunks; {len(qs)} SciFact test queries through the service's analyzer, "
        f"{LIMIT} candidates each (what a LEXICAL or HYBRID search asks for), the engines "
        "interleaved per query. FTS5: `Catalog.lexical_search`; tantivy: "
        "`LexicalIndex.search` plus the catalog look-up of what it found (the search "
        "pipeline's visibility check). Produced by `python bench/bench_lexical.py`.",
        "",
        "| chunks | engine | insert chunks/s | bytes/chunk | unfiltered p50 / p90 / p99 ms "
        "| path-prefix filter (0.5 %) p50 / p90 / p99 ms | top-10 agreement (unfiltered) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u, p = r["unfiltered"], r["path_prefix"]
        for eng, size_key in (("fts5", "catalog_bytes_per_chunk"),
                              ("tantivy", "tantivy_bytes_per_chunk")):
            eu, ep = u[eng], p[eng]
            agree = f"{u['top10_overlap']}" if eng == "tantivy" else ""
            lines.append(
                f"| {r['chunks']:,} | {eng} | {r['insert_chunks_per_s'][eng]:,} | "
                f"{r[size_key]:,} | {eu['p50_ms']} / {eu['p90_ms']} / {eu['p99_ms']} | "
                f"{ep['p50_ms']} / {ep['p90_ms']} / {ep['p99_ms']} | {agree} |")
    lines += [
        "",
        "FTS5's bytes per chunk are the whole catalog's (chunk rows, text, 4-d vectors and "
        "the FTS5 table); tantivy's are its index directory alone. The catalog keeps the "
        "FTS5 table with either engine (it is the source the tantivy index is rebuilt "
        "from), so tantivy adds its bytes and its insert time to FTS5's.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
