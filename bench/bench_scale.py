"""The service driven to 10k, 100k (and 1M) chunks, with a tiny embedder it builds itself.

What grows with the namespace is the catalog, the vector index and the lexical index, not
the model: so the model here is a one-layer, 32-wide BERT on all-MiniLM-L6-v2's tokenizer
(chunks are cut exactly as with the real model), mean-pooled and projected to 384
dimensions (the vectors are as wide as the real model's), built with random weights and
saved by this script. Its vectors carry no meaning: figures of retrieval quality come from
bench_quality.py; the real model's speed from bench_service.py and bench_embedder.py.

One `retriever serve` process (embedded defaults: FAISS, SQLite, tantivy) on one data dir;
one namespace grown to each size by gRPC UpsertDocuments (32 documents per message), and at
each size:

- upsert throughput of the step (chunks/s, end to end);
- default-mode Search (top_k 10) p50/p99 at concurrency 1, 8 and 32 (client threads), and
  the throughput at 32 against the raw batched query encoding of the same model (the
  ratio the performance goal names);
- the server stopped (SIGTERM) and started again: seconds to serving (model load, catalog
  check, index load, reconcile), and the reconcile's report;
- concurrency 1 again after the restart (nothing building in the background);
- RSS of the server after the searches, and disk per chunk (catalog, vector index, lexical
  index).

Corpus: documents of 10 paragraphs of SciFact sentences (prose: sentence-bounded chunks
of up to the token budget); queries: SciFact's test queries.

    python bench/bench_scale.py [--sizes 10000,100000,1000000] [--out bench/results/scale]
        [--model tiny|packaged] [--server-env NAME=VALUE ...]

``--model packaged`` runs the packaged all-MiniLM-L6-v2 instead (with ``--server-env``, e.g.
``RETRIEVER_EMBEDDER_BACKEND=openvino RETRIEVER_EMBEDDER_PRECISION=int8``): the same
figures with the real model's query encoding in every search, at the sizes its indexing
speed allows (100k chunks: ~13 minutes of OpenVINO int8 on 2 cores); the raw batched
query encoding is then the real model's, torch fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lexical import queries, sentences  # noqa: E402
from benchlib import cpu, cpu_line, git, log  # noqa: E402

from retriever.client import RetrieverClient  # noqa: E402
from retriever.v1 import retriever_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NS = "scale"
DOCS_PER_MESSAGE = 32
PARAGRAPHS = 10
# Sequential searches per c=1 row: p99 of 1000 is the 10th slowest (of 200 it was the 2nd,
# one stray request away from another figure).
C1_REQUESTS = 1000


def build_tiny_model(out: Path) -> Path:
    """A sentence-transformers model: 1-layer BERT (hidden 32) on MiniLM's tokenizer, mean
    pooling, a 32 -> 384 projection, normalized. Deterministic (seeded)."""
    if (out / "modules.json").exists():
        return out
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retriever.models.embedder import default_model_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    base = out / "bert"
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=512)
    BertModel(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    word = models.Transformer(str(base), max_seq_length=256)
    pool = models.Pooling(32, "mean")
    dense = models.Dense(32, 384, activation_function=torch.nn.Identity())
    model = SentenceTransformer(modules=[word, pool, dense, models.Normalize()])
    model.save(str(out))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`retriever serve` on the data dir; ``seconds`` = start to the serving line."""

    def __init__(self, data: Path, model: Path | None,
                 extra_env: dict[str, str] | None = None) -> None:
        """``model``: a model directory, or None for the packaged model."""
        self.port = _free_port()
        env = dict(os.environ, RETRIEVER_DATA_DIR=str(data), RETRIEVER_GRPC_PORT=str(self.port),
                   RETRIEVER_METRICS_PORT="0", HF_HUB_OFFLINE="1")
        if model is not None:
            # The tiny model's pass (~0.3 ms) is shorter than an OpenMP team's fork and
            # join: one thread, as for any model that small (query_threads).
            env.update(RETRIEVER_EMBEDDER_MODEL=str(model), RETRIEVER_QUERY_THREADS="1")
        env.update(extra_env or {})
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retriever.cli", "serve", "--log-level", "WARNING"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError("server died before serving")
        self.seconds = time.perf_counter() - t0
        self.info = json.loads(line)
        self.address = f"127.0.0.1:{self.port}"

    def rss_mb(self, field: str = "VmRSS") -> float:
        """VmRSS, or RssAnon (the process's own memory: VmRSS less the file pages it maps,
        such as the memory-mapped catalog, which are the OS's file cache)."""
        for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if ln.startswith(f"{field}:"):
                return int(ln.split()[1]) / 1024
        return 0.0

    def stop(self) -> float:
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(600)
        return time.perf_counter() - t0


def documents(pool: list[str], start: int, count: int, rng: random.Random
              ) -> list[pb.Document]:
    out = []
    for d in range(start, start + count):
        paras = ["\n".join(rng.sample(pool, rng.randint(2, 5))) for _ in range(PARAGRAPHS)]
        out.append(pb.Document(doc_id=f"d{d:07d}", path=f"notes/t{d % 500:03d}/n{d}.txt",
                               content="\n\n".join(paras)))
    return out


def latency(address: str, qs: list[str], concurrency: int, requests: int) -> dict:
    times: list[float] = []
    lock = threading.Lock()
    clients = [RetrieverClient(address) for _ in range(concurrency)]

    def one(i: int) -> None:
        c = clients[i % concurrency]
        t0 = time.perf_counter()
        c.search(NS, qs[i % len(qs)], top_k=10, timeout=120)
        with lock:
            times.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    times.sort()
    return {"concurrency": concurrency, "requests": requests,
            "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
            "qps": round(requests / wall, 1)}


def raw_query_qps(model_dir: Path, qs: list[str], batch: int = 32) -> float:
    """Queries per second of the same model's batched encode (the ceiling concurrency 32
    is measured against), in this process, with the server idle."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    texts = [qs[i % len(qs)] for i in range(batch * 30)]
    model.encode(texts[:batch], batch_size=batch)
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i : i + batch], batch_size=batch)
    return len(texts) / (time.perf_counter() - t0)


def disk(data: Path) -> dict[str, int]:
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    catalog = sum(f.stat().st_size for f in data.glob("catalog.sqlite3*"))
    return {"catalog": catalog, "vectors": size(data / "indexes"),
            "lexical": size(data / "lexical")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale")
    ap.add_argument("--work", type=Path, default=None, help="data dir parent (default: tmp)")
    ap.add_argument("--model", choices=("tiny", "packaged"), default="tiny")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the server (repeatable)")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(11)
    pool = sentences()
    qs = queries(300)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    if args.model == "tiny":
        model: Path | None = build_tiny_model(ROOT / "bench" / ".cache" / "tiny-embedder")
        raw_dir, model_name = model, "tiny"
    else:
        from retriever.models.embedder import default_model_path

        model, raw_dir, model_name = None, Path(default_model_path()), "all-MiniLM-L6-v2"
    data = work / "data"
    raw_qps = raw_query_qps(raw_dir, qs)
    log(f"model {model_name}; raw batched query encode {raw_qps:.0f} q/s")
    rows = []
    server = Server(data, model, extra)
    chunks = docs = 0
    try:
        for size in sizes:
            t0 = time.perf_counter()
            added = 0
            with RetrieverClient(server.address) as c:
                while chunks < size:
                    # About 10 chunks per document: ask for what is left, 32 per message.
                    n = max(1, min(2000, (size - chunks) // 10 + 1))
                    resp = c.upsert(NS, documents(pool, docs, n, rng),
                                    batch_size=DOCS_PER_MESSAGE, timeout=3600)
                    docs += n
                    chunks += resp.chunks_total
                    added += resp.chunks_total
            upsert_s = time.perf_counter() - t0
            log(f"{chunks} chunks ({docs} docs): +{added} in {upsert_s:.1f} s")
            lat = [latency(server.address, qs, c, r) for c, r in ((1, C1_REQUESTS), (8, 400),
                                                                 (32, 800))]
            log(json.dumps(lat))
            rss, anon = server.rss_mb(), server.rss_mb("RssAnon")
            stop_s = server.stop()
            server = Server(data, model, extra)
            with RetrieverClient(server.address) as c:
                st = c.status(NS)
            # Right after the upserts the server still builds (HNSW, lexical merges):
            # concurrency 1 again once restarted, with nothing in the background.
            steady = latency(server.address, qs, 1, C1_REQUESTS)
            log(json.dumps(steady))
            row = {"chunks": chunks, "documents": docs,
                   "upsert_chunks_per_s": round(added / upsert_s, 1),
                   "search": lat,
                   "c32_vs_raw_query_encode": round(lat[2]["qps"] / raw_qps, 3),
                   "rss_mb_after_searches": round(rss),
                   "rss_anon_mb_after_searches": round(anon),
                   "search_c1_after_restart": steady, "stop_s": round(stop_s, 2),
                   "start_s": round(server.seconds, 2),
                   "reconciled": server.info.get("reconciled", {}).get(NS, {}),
                   "status_chunks": st.chunk_count, "vector_count": st.vector_count,
                   "disk_bytes": disk(data)}
            row["disk_bytes_per_chunk"] = {k: round(v / chunks) for k, v in
                                           row["disk_bytes"].items()}
            log(json.dumps(row))
            rows.append(row)
    finally:
        server.stop()
    c = cpu()
    result = {"cpu": c, "commit": git(ROOT, "rev-parse", "--short", "HEAD"),
              "model": model_name, "server_env": extra,
              "raw_query_encode_qps": round(raw_qps, 1), "rows": rows,
              "run": datetime.now(UTC).isoformat(timespec="seconds")}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if model is not None:
        title = "# The service at scale (tiny embedder)"
        what = ("with the bench's own 1-layer, 32-wide embedder projected to 384-d (MiniLM's "
                "tokenizer: chunks as with the real model; vectors without meaning)")
    else:
        env = " ".join(f"{k}={v}" for k, v in extra.items()) or "default settings"
        title = "# The service at scale (all-MiniLM-L6-v2)"
        what = (f"with the packaged all-MiniLM-L6-v2 ({env}): every search embeds its "
                "query with the real model")
    lines = [
        title,
        "",
        f"Run {result['run']} at commit {result['commit']}, CPU {cpu_line(c)}. One "
        f"`retriever serve` process on embedded defaults (FAISS, SQLite, tantivy) {what}, "
        "one namespace grown by gRPC "
        "UpsertDocuments (32 documents per message, prose documents of 10 paragraphs of "
        "SciFact sentences). Search: default mode (hybrid), top_k 10, SciFact test queries, "
        "client threads on the same 2 cores. Raw batched query encoding of the same model "
        f"(torch fp32, batch 32): {raw_qps:,.0f} queries/s. Produced by `python "
        f"bench/bench_scale.py{' --model packaged' if model is None else ''}`.",
        "",
        "Search p50 / p99 in ms; c=1 once right after the upserts (background index builds "
        "and merges still running) and once after the restart. RSS: the whole (its "
        "anonymous part: less the file pages the process maps, its libraries and, where "
        "catalog_mmap_bytes is set, the catalog).",
        "",
        "| chunks | upsert chunks/s (step) | c=1 | c=1 after restart | c=8 | c=32 | QPS c=32 "
        "(× raw encode) | start s (reconcile) | RSS MB | disk B/chunk: catalog / vectors / "
        "lexical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s1, s8, s32 = r["search"]
        st1 = r["search_c1_after_restart"]
        d = r["disk_bytes_per_chunk"]
        rec = ", ".join(f"{k} {v}" for k, v in r["reconciled"].items() if v) or "nothing"
        lines.append(
            f"| {r['chunks']:,} | {r['upsert_chunks_per_s']:,} | {s1['p50_ms']} / "
            f"{s1['p99_ms']} | {st1['p50_ms']} / {st1['p99_ms']} | {s8['p50_ms']} / "
            f"{s8['p99_ms']} | {s32['p50_ms']} / "
            f"{s32['p99_ms']} | {s32['qps']} ({r['c32_vs_raw_query_encode']}) | "
            f"{r['start_s']} ({rec}) | {r['rss_mb_after_searches']:,} "
            f"({r['rss_anon_mb_after_searches']:,}) | {d['catalog']:,} / "
            f"{d['vectors']:,} / {d['lexical']:,} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
