"""The lexical index (SQLite FTS5 in the catalog) at 10k, 100k and 1M chunks.

Does the service's BM25 path hold up at 1M chunks? This drives the real code: a Catalog in
a temp dir, chunks staged and committed through its own methods (terms from the service's
analyzer), and `Catalog.lexical_search` — the call a LEXICAL or HYBRID search makes —
timed per query, unfiltered and with a path-prefix filter, at each size on the same growing
namespace. Also reported: the catalog's size per chunk and the insert rate.

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

from retriever import analyzer  # noqa: E402
from retriever.catalog import Catalog, DocumentWrite, NewChunk  # noqa: E402
from retriever.domain import NamespaceRecord, SearchFilter  # noqa: E402

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


def fill(catalog: Catalog, pool: list[str], start: int, stop: int, rng: random.Random
         ) -> None:
    """Documents of CHUNKS_PER_DOC chunks each, chunks start..stop, committed in batches."""
    vec = np.zeros(4, dtype=np.float32)
    for d0 in range(start // CHUNKS_PER_DOC, stop // CHUNKS_PER_DOC, DOCS_PER_COMMIT):
        rows: list[NewChunk] = []
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
        ids = catalog.stage_chunks(NS, rows)
        writes = []
        for i, d in enumerate(docs):
            writes.append(DocumentWrite(
                doc_id=f"doc{d}", path=f"src/pkg{d % 200:03d}/mod{d}.txt", revision="",
                content_hash="", language="text", version=1, content="",
                chunk_count=CHUNKS_PER_DOC, source_updated_at=None, metadata={},
                chunker="bench", keep=(),
                activate=tuple(ids[i * CHUNKS_PER_DOC:(i + 1) * CHUNKS_PER_DOC]), drop=()))
        catalog.commit_documents(NS, writes, [])


def timed(catalog: Catalog, qs: list[list[str]], flt: SearchFilter) -> dict:
    times = []
    hits = []
    for terms in qs:
        t0 = time.perf_counter()
        found = catalog.lexical_search(NS, terms, flt, LIMIT)
        times.append((time.perf_counter() - t0) * 1000)
        hits.append(len(found))
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
            "mean_hits": round(statistics.mean(hits), 1)}


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
        have = 0
        for size in sizes:
            t0 = time.perf_counter()
            fill(catalog, pool, have, size, rng)
            insert_s = time.perf_counter() - t0
            log(f"{size} chunks: inserted {size - have} in {insert_s:.1f} s")
            have = size
            db = Path(tmp) / "catalog.db"
            disk = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
            catalog.lexical_search(NS, qs[0], SearchFilter(), LIMIT)  # warm
            row = {"chunks": size, "insert_chunks_per_s": round((size - rows[-1]["chunks"]
                                                                  if rows else size)
                                                                 / insert_s),
                   "catalog_bytes_per_chunk": round(disk / size),
                   "unfiltered": timed(catalog, qs, SearchFilter()),
                   "path_prefix": timed(catalog, qs, SearchFilter(path_prefix="src/pkg007/")),
                   "db": str(db.name)}
            log(json.dumps(row))
            rows.append(row)
        catalog.close()
    c = cpu()
    result = {"cpu": c, "commit": git(ROOT, "rev-parse", "--short", "HEAD"),
              "sqlite": __import__("sqlite3").sqlite_version, "limit": LIMIT,
              "queries": len(qs), "rows": rows,
              "run": datetime.now(UTC).isoformat(timespec="seconds")}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Lexical index (SQLite FTS5) at scale",
        "",
        f"Run {result['run']} at commit {result['commit']}, CPU {cpu_line(c)}, SQLite "
        f"{result['sqlite']}. `Catalog.lexical_search` (the call LEXICAL and HYBRID searches "
        f"make, {LIMIT} candidates) on one namespace grown to each size; chunks of 3-8 random "
        "SciFact sentences under 200 directories; SciFact test queries analysed by the "
        f"service's analyzer ({len(qs)}). Produced by `python bench/bench_lexical.py`.",
        "",
        "| chunks | insert chunks/s | catalog bytes/chunk (4-d vectors) | unfiltered p50 / p90 / "
        "p99 ms | path-prefix filter (0.5 %) p50 / p90 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        u, p = r["unfiltered"], r["path_prefix"]
        lines.append(f"| {r['chunks']:,} | {r['insert_chunks_per_s']:,} | "
                     f"{r['catalog_bytes_per_chunk']:,} | {u['p50_ms']} / {u['p90_ms']} / "
                     f"{u['p99_ms']} | {p['p50_ms']} / {p['p90_ms']} / {p['p99_ms']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
