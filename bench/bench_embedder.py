"""Embedder backends and precisions against raw sentence-transformers fp32, with the quality
gate, in one run.

    python bench/bench_embedder.py [--device auto|cpu|cuda] [--precisions fp32,bf16]
        [--runs torch:fp32,torch:bf16,openvino:fp32,openvino:bf16,openvino:int8]
        [--scifact ../shared/datasets/scifact] [--scifact-docs N]
        [--code-set NAME=REPO | --code-set FILE.json.gz]
        [--save-code-set FILE.json.gz] [--out bench/results/embedder-NAME.json]

On one machine, one corpus, in one process:

1. **raw**: `SentenceTransformer.encode` (fp32, batch 32, the library's defaults) of exactly
   the texts the service embeds (header + chunk, read back from the fp32 run's catalog), on
   the same device; on CUDA also the same `encode` after `model.half()`.
2. **service**, once per run (a backend and precision: ``--runs``, or torch with each of
   ``--precisions``): a real gRPC server (``ServerThread``) built with that
   ``embedder_backend`` and ``embedder_precision`` indexes the corpus through
   ``UpsertDocuments`` (chunks/s end to end, and the ratio to raw fp32), then each quality
   set is indexed and every judged query runs through the real ``Search`` (dense, documents
   collapsed).
3. **gate**, per run: nDCG@10 and recall@10 on SciFact (test) and on a code set (a
   repository's history: query = a commit message, relevant = the source files it changed)
   >= 99 % of torch fp32's, and the mean cosine of its vectors to torch fp32's on the same
   chunks >= 0.99.

A server's model (an OpenVINO build, an int8 calibration) is made when its embedder loads,
before any timing; an int8 build is calibrated as a fresh server's is (no catalog yet: the
bundled sample). ``--scifact-docs`` keeps SciFact's judged documents plus others up to that
many (as bench_backends.py), for CPUs where the whole corpus per run takes too long.

The corpus is a fixed list of standard-library packages (as bench_service.py). A code set
can be saved (``--save-code-set``) and read back (``--code-set FILE``) so a machine without
the repository, a GPU machine say, measures the same set. Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service  # noqa: E402
from bench_quality import run_queries  # noqa: E402

from retriever.client import RetrieverClient  # noqa: E402
from retriever.config import Settings  # noqa: E402
from retriever.models.embedder import Embedder, cpu_has_bf16, default_model_path  # noqa: E402
from retriever.server.app import ServerThread  # noqa: E402
from retriever.slo.evaluation import (  # noqa: E402
    CorpusDoc,
    Query,
    QuerySet,
    build_git_history_set,
    evaluate,
)
from retriever.slo.runner import index_corpus, percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GATE = 0.99  # quality and cosine floor, relative to fp32
RAW_BATCH = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- code sets -----------------------------------------------------------------------------
def save_set(qs: QuerySet, path: Path) -> None:
    obj = {"name": qs.name, "metadata": qs.metadata,
           "queries": [[q.id, q.text] for q in qs.queries], "qrels": qs.qrels,
           "corpus": [[d.doc_id, d.text, d.path] for d in qs.iter_corpus()]}
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(obj, fh)


def load_set(path: Path) -> QuerySet:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        obj = json.load(fh)
    return QuerySet(name=obj["name"], queries=[Query(i, t) for i, t in obj["queries"]],
                    qrels=obj["qrels"], corpus=[CorpusDoc(*d) for d in obj["corpus"]],
                    metadata=obj["metadata"])


def code_set(spec: str, commits: int) -> QuerySet:
    if "=" in spec:
        name, repo = spec.split("=", 1)
        return build_git_history_set(repo, commits=commits, name=name)
    return load_set(Path(spec))


# -- environment ---------------------------------------------------------------------------
def environment(device: str) -> dict:
    import sentence_transformers
    import torch
    import transformers

    cpu = ""
    flags: list[str] = []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                    if ln.startswith("model name")), "")
        present = set(info.split())
        flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                             "amx_int8") if f in present]
    except OSError:
        pass
    env = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "sentence_transformers": sentence_transformers.__version__, "device": device}
    try:
        import openvino

        env["openvino"] = openvino.get_version()
    except ImportError:
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# -- phases --------------------------------------------------------------------------------
def service_run(backend: str, precision: str, device: str, docs: list,
                sets: dict[str, QuerySet], tmp: Path
                ) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    """Index the corpus and the quality sets through a server of this backend and precision;
    its figures, its vectors by chunk id, and the embedded texts (header + text) in catalog
    order."""
    label = run_label(backend, precision)
    settings = Settings(data_dir=tmp / label.replace(" ", "-"), grpc_port=0, metrics_port=0,
                        embedder_device=device, embedder_backend=backend,
                        embedder_precision=precision)
    embedder = Embedder(settings)
    t0 = time.perf_counter()
    embedder.load()
    ov = getattr(embedder, "_ov", None)
    out: dict = {"backend": backend, "precision": precision,
                 "load_s": time.perf_counter() - t0,
                 "embedder_revision": embedder.revision, "device": embedder.device,
                 "batch_size": embedder.default_batch_size,
                 "batch_tokens": embedder.default_batch_tokens,
                 "slice_tokens": embedder.default_slice_tokens}
    if ov is not None:
        prov = ov.provenance
        out["openvino"] = {"built_s": prov.built_s, "reused": ov.reused,
                           "calibration": prov.calibration,
                           "calibration_texts": prov.calibration_texts}
    server = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(server.address, timeout=None) as client:
            client.wait_ready()
            client.create_namespace(bench_service.NAMESPACE)
            # Untimed warm-up: first CUDA kernels, allocator, OpenMP team.
            embedder.embed(["def warm_up(x):\n    return x"] * 8)
            log(f"{label}: indexing {len(docs)} files")
            index, rows = bench_service.index_corpus(
                client, docs, settings, server.info["metrics_port"])
            out["index"] = {k: index[k] for k in ("docs", "chunks", "tokens", "wall_s",
                                                  "chunks_per_s", "tokens_per_s")}
            log(f"{label}: {index['chunks']} chunks in {index['wall_s']:.1f}s "
                f"({index['chunks_per_s']:.1f}/s)")
            quality: dict = {}
            for name, qs in sets.items():
                t0 = time.perf_counter()
                counts = index_corpus(client, name, qs, batch_size=64)
                seconds = time.perf_counter() - t0
                run, lat = run_queries(client, name, qs, "dense", 100)
                m = evaluate(run, qs.qrels, ks=(10,))
                quality[name] = {"nDCG@10": m["nDCG@10"], "R@10": m["R@10"],
                                 "queries": len(run), "chunks": counts["chunks_total"],
                                 "index_s": seconds,
                                 "search_p50_ms": percentile(lat, 50) * 1e3,
                                 "search_p99_ms": percentile(lat, 99) * 1e3}
                log(f"{label}: {name}: nDCG@10 {m['nDCG@10']:.4f} R@10 {m['R@10']:.4f}")
            out["quality"] = quality
    finally:
        server.stop()
    vectors = {r["chunk_id"]: np.frombuffer(r["vector"], dtype=np.float32) for r in rows}
    texts = [r["header"] + r["text"] for r in rows]
    del embedder, server
    release(device)
    return out, vectors, texts


def run_label(backend: str, precision: str) -> str:
    return f"{backend} {precision}"


def parse_runs(spec: str) -> list[tuple[str, str]]:
    """``backend:precision,...`` -> pairs, torch fp32 first (the gate's reference)."""
    runs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        backend, _, precision = item.partition(":")
        if backend not in ("torch", "openvino") or not precision:
            raise SystemExit(f"--runs: {item!r} is not BACKEND:PRECISION (torch or openvino)")
        runs.append((backend, precision))
    if ("torch", "fp32") in runs:
        runs.remove(("torch", "fp32"))
    return [("torch", "fp32"), *runs]


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def raw_encode(texts: list[str], device: str, half: bool) -> dict:
    """What a plain script does: load the model, ``encode`` the texts (fp32, or after
    ``model.half()``)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(Settings().embedder_model or default_model_path(), device=device,
                                local_files_only=True)
    model.eval()
    if half:
        model.half()
    model.encode(texts[:64], batch_size=RAW_BATCH, show_progress_bar=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.encode(texts, batch_size=RAW_BATCH, normalize_embeddings=True,
                 show_progress_bar=False)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model
    release(device)
    return {"chunks": len(texts), "wall_s": wall, "chunks_per_s": len(texts) / wall}


def agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    common = sorted(set(ref) & set(got))
    if not common:
        return {"chunks": 0}
    a = np.stack([ref[c] for c in common])
    b = np.stack([got[c] for c in common])
    cos = np.sum(a * b, axis=1)
    return {"chunks": len(common), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min())}


# -- main ----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--precisions", default="",
                    help="comma-separated, fp32 first [default: fp32,fp16,bf16 on CUDA; "
                         "fp32 and bf16 where the CPU has native bf16]")
    ap.add_argument("--runs", default="",
                    help="comma-separated BACKEND:PRECISION (torch or openvino), e.g. "
                         "torch:fp32,openvino:int8; overrides --precisions")
    ap.add_argument("--scifact", type=Path, default=ROOT.parent / "shared/datasets/scifact")
    ap.add_argument("--scifact-docs", type=int, default=0,
                    help="SciFact corpus size: the judged documents plus others up to this "
                         "many (0: all 5,183)")
    ap.add_argument("--code-set", default="",
                    help="NAME=REPO (a history set built from a git repository) or a file "
                         "written by --save-code-set")
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--save-code-set", type=Path, default=None,
                    help="write the code set to this file (.json.gz) and exit")
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results [default: bench/results/embedder-<device>.json]; "
                         "Markdown next to it")
    args = ap.parse_args()

    sets: dict[str, QuerySet] = {}
    if args.code_set:
        qs = code_set(args.code_set, args.commits)
        if args.save_code_set:
            save_set(qs, args.save_code_set)
            log(f"wrote {args.save_code_set}: {len(qs.queries)} queries")
            return 0
        sets[f"code-{qs.name}"] = qs
    if args.scifact and (args.scifact / "corpus.jsonl").is_file():
        from bench_backends import scifact_subset

        sets = {"scifact-test": scifact_subset(args.scifact, args.scifact_docs), **sets}

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precisions:
        precisions = args.precisions.split(",")
    elif device == "cuda":
        precisions = ["fp32", "fp16", "bf16"]
    else:
        precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    # torch fp32 first: the reference the gate compares with
    plan = parse_runs(args.runs or ",".join(f"torch:{p}" for p in precisions))
    if device == "cuda" and any(b == "openvino" for b, _ in plan):
        raise SystemExit("--runs: openvino runs on the CPU; use --device cpu")
    out = args.out or ROOT / f"bench/results/embedder-{device}.json"
    result: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "environment": environment(device), "gate": GATE,
        "loadavg_start": bench_service.loadavg(),
        "sets": {n: {"queries": len(q.queries), **{k: v for k, v in q.metadata.items()
                                                   if isinstance(v, str | int)}}
                 for n, q in sets.items()},
    }
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-embedder-") as tmp:
        docs, corpus = bench_service.load_corpus(None, args.max_files, Path(tmp) / "corpus",
                                                 Settings().max_document_bytes)
        result["corpus"] = {k: corpus[k] for k in ("packages", "files", "bytes")}
        runs: dict[str, dict] = {}
        vectors: dict[str, dict[str, np.ndarray]] = {}
        texts: list[str] = []
        for backend, precision in plan:
            p = run_label(backend, precision)
            runs[p], vectors[p], t = service_run(backend, precision, device, docs, sets,
                                                 Path(tmp))
            texts = texts or t
        log(f"raw fp32 encode of {len(texts)} texts")
        raw = {"fp32": raw_encode(texts, device, half=False)}
        if device == "cuda":
            raw["fp16"] = raw_encode(texts, device, half=True)
    reference = run_label("torch", "fp32")
    for p, r in runs.items():
        r["over_raw_fp32"] = r["index"]["chunks_per_s"] / raw["fp32"]["chunks_per_s"]
        r["agreement"] = agreement(vectors[reference], vectors[p])
        passed = r["agreement"].get("mean_cosine", 0.0) >= GATE
        for name, q in r["quality"].items():
            ref = runs[reference]["quality"][name]
            q["nDCG@10_vs_fp32"] = q["nDCG@10"] / ref["nDCG@10"] if ref["nDCG@10"] else 0.0
            q["R@10_vs_fp32"] = q["R@10"] / ref["R@10"] if ref["R@10"] else 0.0
            passed = passed and q["nDCG@10_vs_fp32"] >= GATE and q["R@10_vs_fp32"] >= GATE
        r["gate_passed"] = passed
    result.update(raw=raw, service=runs, run_s=time.perf_counter() - t_run,
                  loadavg_end=bench_service.loadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def goal(env: dict) -> tuple[float, str] | None:
    """The indexing goal for this CPU kind (service / raw fp32), or None on a GPU."""
    if env.get("gpu"):
        return None
    if "avx512_vnni" in env["cpu_flags"]:
        return 3.0, "AVX-512 VNNI"
    return 1.3, "AVX2-only"


def render(r: dict) -> str:
    env = r["environment"]
    hw = env.get("gpu") or env["cpu"]
    versions = f"torch {env['torch']}" + (f", OpenVINO {env['openvino']}"
                                          if env.get("openvino") else "")
    lines = [
        f"# Embedder backends on {hw}", "",
        f"{r['when']}, commit {r['commit']}. Device **{env['device']}**"
        + (f" ({env['gpu']}, CUDA {env['cuda']})" if env.get("gpu") else "")
        + f"; CPU {env['cpu']} ({env['cores']} cores; flags {' '.join(env['cpu_flags'])}); "
        f"{versions}, sentence-transformers {env['sentence_transformers']}. Load average "
        f"{r.get('loadavg_start', '?')} at the start, {r.get('loadavg_end', '?')} at the end.",
        "",
        f"Corpus: {r['corpus']['files']} standard-library files "
        f"({', '.join(r['corpus']['packages'] or [])}). Raw = `SentenceTransformer.encode`, "
        f"batch {RAW_BATCH}, fp32, of the exact texts the service embedded, on the same "
        "device, after the servers are gone. *service* = a real gRPC server with that "
        "embedder indexing the corpus through `UpsertDocuments` (32 files per message), "
        "end to end, one pass.", "",
        "| run | chunks/s | × raw fp32 | mean cos vs torch fp32 | " + " | ".join(
            f"{n} nDCG@10 (× fp32) | {n} R@10 (× fp32)" for n in r["sets"]) + " | gate |",
        "|---|---|---|---|" + "---|---|" * len(r["sets"]) + "---|",
    ]
    for p, raw in r["raw"].items():
        x = raw["chunks_per_s"] / r["raw"]["fp32"]["chunks_per_s"]
        lines.append(f"| raw encode {p} | {raw['chunks_per_s']:.1f} | {x:.2f} | | "
                     + "| " * (2 * len(r["sets"])) + "|")
    for p, s in r["service"].items():
        cells = []
        for n in r["sets"]:
            q = s["quality"][n]
            cells += [f"{q['nDCG@10']:.4f} ({q['nDCG@10_vs_fp32']:.3f})",
                      f"{q['R@10']:.4f} ({q['R@10_vs_fp32']:.3f})"]
        a = s["agreement"]
        name = p if " " in p else f"torch {p}"
        lines.append(f"| service {name} (gRPC, end to end) | {s['index']['chunks_per_s']:.1f} "
                     f"| {s['over_raw_fp32']:.2f} | {a.get('mean_cosine', 0):.5f} | "
                     + " | ".join(cells) + f" | {'pass' if s['gate_passed'] else 'FAIL'} |")
    g = goal(env)
    if g is not None:
        target, kind = g
        passing = {p: s for p, s in r["service"].items() if s["gate_passed"]}
        best = max(passing.items(), key=lambda kv: kv[1]["over_raw_fp32"], default=None)
        if best is not None:
            met = best[1]["over_raw_fp32"] >= target
            lines += ["", f"Goal on this {kind} CPU: service indexing >= {target:.1f}x raw "
                      f"fp32 with the gate passed: **{'met' if met else 'not met'}** by "
                      f"{best[0]} ({best[1]['over_raw_fp32']:.2f}x)."]
    builds = [(p, s["openvino"]) for p, s in r["service"].items() if s.get("openvino")]
    if builds:
        lines += ["", "OpenVINO models, built when the server's embedder loaded (not timed "
                  "above): " + "; ".join(
                      f"{p} {o['built_s']:.1f} s"
                      + (f", int8 calibrated on {o['calibration_texts']} texts "
                         f"({o['calibration']})" if o["calibration_texts"] else "")
                      for p, o in builds) + "."]
    lines += ["", "Search latency (dense, top 100 collapsed to documents, the set's judged "
              "queries one at a time, client side):", ""]
    for p, s in r["service"].items():
        lines.append(f"- {p}: " + "; ".join(
            f"{n} p50 {q['search_p50_ms']:.1f} ms, p99 {q['search_p99_ms']:.1f} ms"
            for n, q in s["quality"].items()))
    sci = r["sets"].get("scifact-test", {})
    if sci.get("corpus_docs") and sci["corpus_docs"] < 5183:
        lines += ["", f"SciFact: all {sci['queries']} test queries over a subset of the corpus "
                  f"({sci['corpus_docs']} of 5,183 documents: every judged one plus others by "
                  "hash of the id), so scores are higher than the published full-corpus "
                  "figures; every run is compared on the same subset."]
    lines += ["", f"Gate: nDCG@10 and R@10 on every set >= {r['gate']:.0%} of torch fp32's "
              f"and mean cosine to its vectors >= {r['gate']}. Run took {r['run_s']:.0f} s.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
