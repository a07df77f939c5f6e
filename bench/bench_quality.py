"""Retrieval quality per search mode, through the real gRPC Search, in one run.

    python bench/bench_quality.py --repo requests=/path/to/requests --repo click=/path/to/click \
        --tune-repo flask=/path/to/flask [--scifact ../shared/datasets/scifact] [--out ...]

1. The real server (``ServerThread``) with the packaged all-MiniLM-L6-v2 and an embedding
   cache in ``bench/.cache`` (keyed by model revision and embedded text: a re-run embeds
   only what changed).
2. **Weights are chosen first, on data that is not reported**: SciFact's *train* queries and
   the history set of the ``--tune-repo`` repository. Each candidate dense weight runs as a
   per-request ``dense_weight``; the one with the best mean of SciFact-train nDCG@10 and the
   tuning set's MRR wins. The server's default (``hybrid_dense_weight``) is compared with it.
3. **Reported**: SciFact *test* (300 queries; nDCG@10, R@100) and each ``--repo``'s history
   set (query = a commit message, relevant = the non-test source files it modified, corpus =
   the parent of the oldest query commit without test files; file-level R@10 and MRR), for
   DENSE, LEXICAL and HYBRID at the server's defaults, with client-side p50/p99 latency.
4. Re-rank cost per candidate, measured with a cross-encoder of ms-marco-MiniLM-L-6-v2's
   shape (6 layers, 384 wide) built from the packaged MiniLM's encoder and a fresh head
   (no cross-encoder weights can be downloaded here, so its quality is not measured).

Writes JSON and Markdown to ``--out`` (default bench/results/quality.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retriever.client import RetrieverClient, pb  # noqa: E402
from retriever.config import Settings  # noqa: E402
from retriever.models.embedder import Embedder  # noqa: E402
from retriever.server.app import ServerThread  # noqa: E402
from retriever.slo.evaluation import (  # noqa: E402
    QuerySet,
    build_git_history_set,
    evaluate,
    load_beir,
)
from retriever.slo.runner import index_corpus, percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("dense", "lexical", "hybrid")
WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def cpu_info() -> dict[str, object]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = sorted({f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_tile")
                    if f" {f}" in text})
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def run_queries(client: RetrieverClient, ns: str, qs: QuerySet, mode: str, top_k: int,
                dense_weight: float | None = None) -> tuple[dict[str, list[str]], list[float]]:
    run: dict[str, list[str]] = {}
    lat: list[float] = []
    judged = [q for q in qs.queries if q.id in qs.qrels]
    for q in judged[:2]:  # warm-up, untimed
        client.stub.Search(pb.SearchRequest(namespace=ns, query=q.text, top_k=top_k))
    for q in judged:
        # collapse: one hit per document (its best chunk), so top_k counts documents.
        req = pb.SearchRequest(namespace=ns, query=q.text, top_k=top_k, collapse=True,
                               mode=pb.SearchMode.Value(mode.upper()))
        if dense_weight is not None:
            req.dense_weight = dense_weight
        t0 = time.perf_counter()
        resp = client.stub.Search(req, timeout=60)
        lat.append(time.perf_counter() - t0)
        run[q.id] = [h.chunk.doc_id for h in resp.hits]
    return run, lat


def rerank_cost(embedder: Embedder) -> dict[str, float]:
    """Seconds per candidate of a MiniLM-L6-shaped cross-encoder on (query, 256-token chunk)
    pairs, in slices of 8, as the server runs it."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

    from retriever.models.embedder import default_model_path

    src = default_model_path()
    out = Path(tempfile.mkdtemp()) / "minilm-l6-ce"
    torch.manual_seed(0)
    base = AutoModel.from_pretrained(src, local_files_only=True)
    ce = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(),
                                                                "num_labels": 1}))
    ce.bert.load_state_dict(base.state_dict(), strict=False)
    ce.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(out)
    model = CrossEncoder(str(out), device="cpu", local_files_only=True, max_length=512)
    passage = " ".join(["retrieval service chunk text with identifiers parse_config"] * 30)
    pairs = [("where is the config parsed", passage)] * 8
    model.predict(pairs, batch_size=8, show_progress_bar=False)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 5:
        model.predict(pairs, batch_size=8, show_progress_bar=False)
        n += len(pairs)
    per = (time.perf_counter() - t0) / n
    return {"seconds_per_candidate": per, "pair_tokens": len(model.tokenizer(
        pairs[0][0], pairs[0][1], truncation=True, max_length=512)["input_ids"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scifact", type=Path, default=ROOT.parent / "shared/datasets/scifact")
    ap.add_argument("--repo", action="append", default=[], help="NAME=PATH (reported)")
    ap.add_argument("--tune-repo", default="", help="NAME=PATH (weights chosen on it)")
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/quality.json")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench/.cache")
    ap.add_argument("--latency-only", action="store_true",
                    help="only step 3 (DENSE vs LEXICAL vs HYBRID latency on SciFact); writes "
                         "bench/results/hybrid-latency.{json,md} unless --out is given")
    args = ap.parse_args()
    if args.latency_only and args.out == ROOT / "bench/results/quality.json":
        args.out = ROOT / "bench/results/hybrid-latency.json"

    embedder = Embedder(Settings(embedder_backend="torch"))  # the reference model
    embedder.load()
    data = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    settings = Settings(data_dir=data, grpc_port=0, metrics_port=0,
                        embed_cache_dir=args.cache / "embeddings")
    result: dict[str, object] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_info(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "embedder": f"{embedder.name}@{embedder.revision}",
        "default_dense_weight": settings.hybrid_dense_weight,
        "normalization": settings.hybrid_normalization,
        "default_mode": settings.default_search_mode,
    }
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address, timeout=600) as client:
            sets: dict[str, tuple[str, QuerySet, str]] = {}  # name -> (ns, set, kind)
            t0 = time.perf_counter()
            sci_test = load_beir(args.scifact, "test", name="scifact-test")
            sci_train = load_beir(args.scifact, "train", name="scifact-train")
            log("indexing SciFact")
            counts = index_corpus(client, "scifact", sci_test, batch_size=64)
            result["scifact_index"] = {**counts, "seconds": time.perf_counter() - t0}
            sets["scifact-test"] = ("scifact", sci_test, "beir")
            tune: list[tuple[str, QuerySet]] = [("scifact", sci_train)]
            if args.latency_only:
                args.repo, args.tune_repo, tune = [], "", []
            for spec, role in [(r, "report") for r in args.repo] + (
                    [(args.tune_repo, "tune")] if args.tune_repo else []):
                name, path = spec.split("=", 1)
                log(f"building the history set of {name}")
                qs = build_git_history_set(path, commits=args.commits, name=name)
                ns = f"hist-{name}"
                counts = index_corpus(client, ns, qs, batch_size=32)
                log(f"{name}: {len(qs.queries)} queries, corpus indexed ({counts})")
                result.setdefault("history_sets", {})[name] = {  # type: ignore[union-attr]
                    "role": role, "queries": len(qs.queries), **qs.metadata,
                    "corpus_documents": counts["documents_received"],
                    "corpus_chunks": counts["chunks_total"]}
                if role == "tune":
                    tune.append((ns, qs))
                else:
                    sets[name] = (ns, qs, "history")

            # -- 1. choose the weight on the tuning data --------------------------------
            log("choosing the dense weight on SciFact-train and the tuning history set")
            sweep: dict[str, dict[str, float]] = {}
            for w in WEIGHTS if not args.latency_only else ():
                row: dict[str, float] = {}
                for ns, qs in tune:
                    run, _ = run_queries(client, ns, qs, "hybrid", 100, w)
                    m = evaluate(run, qs.qrels, ks=(10,))
                    key = "nDCG@10" if ns == "scifact" else "MRR"
                    row[f"{qs.name}:{key}"] = m[key]
                row["objective"] = sum(row.values()) / len(row)
                sweep[str(w)] = row
                log(f"w={w}: {row}")
            if sweep:
                best = max(sweep, key=lambda w: sweep[w]["objective"])
                result["weight_sweep"] = sweep
                result["chosen_dense_weight"] = float(best)

            # -- 2. the reported table --------------------------------------------------
            reported: dict[str, dict[str, object]] = {}
            for name, (ns, qs, _kind) in (sets.items() if not args.latency_only else ()):
                for mode in MODES:
                    log(f"{name}: {mode}")
                    run, lat = run_queries(client, ns, qs, mode, 100)
                    m = evaluate(run, qs.qrels, ks=(1, 5, 10, 100))
                    reported.setdefault(name, {})[mode] = {
                        **m, "p50_ms": percentile(lat, 50) * 1000,
                        "p99_ms": percentile(lat, 99) * 1000, "queries": len(run)}
            result["reported"] = reported

            # -- 3. what hybrid adds to a plain search (top_k 10, no collapse) ----------
            log("latency of dense vs hybrid at top_k 10")
            queries = [q.text for q in sci_test.queries][:300]
            lat_modes: dict[str, list[float]] = {"dense": [], "hybrid": [], "lexical": []}
            for _ in range(2):  # interleaved, so drift hits every mode alike
                for text in queries:
                    for mode in lat_modes:
                        t0 = time.perf_counter()
                        client.stub.Search(pb.SearchRequest(
                            namespace="scifact", query=text, top_k=10,
                            mode=pb.SearchMode.Value(mode.upper())), timeout=60)
                        lat_modes[mode].append(time.perf_counter() - t0)
            result["latency_top10"] = {
                m: {"p50_ms": percentile(v, 50) * 1000, "p99_ms": percentile(v, 99) * 1000}
                for m, v in lat_modes.items()}
    finally:
        st.stop()
        shutil.rmtree(data, ignore_errors=True)
    if args.latency_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        md = render_latency(result)
        args.out.with_suffix(".md").write_text(md)
        print(md)
        return 0
    log("re-rank cost")
    result["rerank"] = rerank_cost(embedder)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def render_latency(r: dict) -> str:
    lt = r["latency_top10"]
    cpu = r["cpu"]
    lines = [f"# Search latency per mode ({r['when']}, commit {r['commit']})", "",
             f"`bench/bench_quality.py --latency-only`: {cpu}. The real gRPC Search on the "
             f"SciFact corpus ({r['scifact_index']['chunks_total']} chunks), top_k 10, no "
             "collapse, the 300 test queries twice, the modes interleaved per query so drift "
             "hits each alike; client-side latency.", "",
             "| mode | p50 ms | p99 ms |", "|---|---|---|"]
    for mode, v in lt.items():
        lines.append(f"| {mode} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |")
    lines.append(f"\nHybrid adds {lt['hybrid']['p50_ms'] - lt['dense']['p50_ms']:.1f} ms p50 "
                 f"and {lt['hybrid']['p99_ms'] - lt['dense']['p99_ms']:.1f} ms p99 to dense "
                 "(goal: <= 5 ms p50).")
    return "\n".join(lines) + "\n"


def render(r: dict) -> str:
    cpu = r["cpu"]
    lines = [
        "# Retrieval quality per search mode",
        "",
        f"Run {r['when']} at commit {r['commit']}, {r['embedder']}, CPU {cpu['model']} "
        f"({cpu['cores']} cores; {', '.join(cpu['flags'])}). Every figure through the real "
        "gRPC Search, client-side latency, top_k 100 with collapse (one hit per document: its best "
        "chunk), so metrics are over documents.",
        "",
        f"Defaults: mode **{r['default_mode']}**, dense weight {r['default_dense_weight']}, "
        f"{r['normalization']} normalization. Weight chosen on SciFact-train and the tuning "
        f"history set (never on the reported queries): **{r['chosen_dense_weight']}**.",
        "",
        "| set | mode | nDCG@10 | R@10 | R@100 | MRR | P@1 | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, modes in r["reported"].items():
        for mode, m in modes.items():
            lines.append(f"| {name} | {mode} | {m['nDCG@10']:.3f} | {m['R@10']:.3f} | "
                         f"{m['R@100']:.3f} | {m['MRR']:.3f} | {m['P@1']:.3f} | "
                         f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} |")
    lines += ["", "Weight sweep (tuning data only):", "",
              "| dense weight | " + " | ".join(next(iter(r["weight_sweep"].values()))) + " |",
              "|---" * (1 + len(next(iter(r["weight_sweep"].values())))) + "|"]
    for w, row in r["weight_sweep"].items():
        lines.append(f"| {w} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    if "history_sets" in r:
        lines += ["", "History sets (query = commit message, relevant = non-test source files "
                  "it modified, corpus = parent of the oldest query commit, tests excluded):",
                  ""]
        for name, h in r["history_sets"].items():
            lines.append(f"- **{name}** ({h['role']}): {h['queries']} queries, "
                         f"{h['corpus_documents']} files / {h['corpus_chunks']} chunks; "
                         f"repo {h.get('repo', '')}, corpus at {h.get('corpus_rev', '')}")
    lt = r["latency_top10"]
    lines += ["", "Search latency at top_k 10 without collapse, SciFact corpus "
              f"({r['scifact_index']['chunks_total']} chunks), 600 interleaved requests per mode:",
              "", "| mode | p50 ms | p99 ms |", "|---|---|---|"]
    for mode, v in lt.items():
        lines.append(f"| {mode} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |")
    lines.append(f"\nHybrid adds {lt['hybrid']['p50_ms'] - lt['dense']['p50_ms']:.1f} ms "
                 "p50 to dense.")
    rr = r["rerank"]
    lines += ["", f"Re-rank cost: {rr['seconds_per_candidate'] * 1000:.1f} ms per candidate "
              f"({rr['pair_tokens']}-token pairs, MiniLM-L6-shaped cross-encoder, CPU, slices "
              "of 8); 30 candidates (the default) add about "
              f"{rr['seconds_per_candidate'] * 30 * 1000:.0f} ms to a search."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
