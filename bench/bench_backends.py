"""Embedder backends on this CPU: speed and the quality gate in one run, and the gate
verdicts that ``embedder_backend=auto`` reads.

    python bench/bench_backends.py --code-set NAME=REPO|FILE.json.gz [--scifact DIR]
        [--scifact-docs 2000] [--speed-chunks 192] [--rounds 3] [--calibration-samples 128]
        [--verdicts DATA_DIR/models/verdicts.json] [--out bench/results/embedder-backends.json]

In one process, on the same real chunks (the service's own chunking and headers):

1. **candidates**: torch fp32 (the reference), torch bf16 where the CPU has native bf16,
   OpenVINO fp32, OpenVINO bf16 (native bf16 only) and OpenVINO static int8 (NNCF,
   calibrated on a sample of the corpus's own chunks, as a server calibrates on its
   catalog's), each a real ``Embedder`` loaded with that backend, its model built into a
   fresh data dir (the build time is reported).
2. **speed**: raw sentence-transformers fp32 ``encode`` (batch 32, the baseline), then each
   candidate's ``Embedder.embed`` with the service's own token-budgeted batches (what a
   server runs) and with batches of 32; ``--rounds`` rounds, the candidates interleaved
   within each round so that a change in the machine's load hits them all; the best round
   of each (and the median).
3. **gate**: every chunk of each quality set and every query embedded by each candidate;
   documents ranked by their best chunk (exact inner product: dense search collapsed to
   documents); nDCG@10 and R@10 on SciFact (test queries; a corpus subset, see
   ``--scifact-docs``) and on a code history set (query = a commit message, relevant = the
   source files it changed) >= 99 % of torch fp32's passes. Also measured: mean/min cosine
   to torch fp32's chunk vectors, top-10 overlap with torch fp32's ranking, and the gate
   with one side's queries against the other side's documents (both ways): a backend that
   passes that too is *interchangeable* (its vectors may share a namespace with float ones).
4. **verdicts**: one per candidate (passed, speed over raw fp32 with the service's batches,
   interchangeable), merged into the packaged retriever/models/verdicts.json (what `auto`
   starts from on every machine) and ``--verdicts``.

Writes JSON and Markdown; every figure names the CPU model and flags. Compare only within
one run: the machine may be shared (the load average is recorded), ratios in one process
still hold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedder import code_set  # noqa: E402
from benchlib import cpu, cpu_line, log  # noqa: E402

from retriever.config import Settings  # noqa: E402
from retriever.ingest.chunking import detect_language  # noqa: E402
from retriever.ingest.pipeline import chunk_headers, service_chunkers  # noqa: E402
from retriever.models import calibration  # noqa: E402
from retriever.models.calibration import (  # noqa: E402
    Verdict,
    cpu_key,
    has_int8_dot,
    has_native_bf16,
)
from retriever.models.embedder import (  # noqa: E402
    Embedder,
    auto_candidates,
    default_model_path,
)
from retriever.slo.evaluation import CorpusDoc, QuerySet, evaluate, load_beir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GATE = 0.99
RAW_BATCH = 32
TOP = 100


# -- data ----------------------------------------------------------------------------------
def _stable(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def scifact_subset(directory: Path, docs: int) -> QuerySet:
    """SciFact test: every query, every judged document, and the other documents up to
    ``docs`` in all (a fixed choice by hash of the id); 0 keeps the whole corpus."""
    qs = load_beir(directory, "test", name="scifact-test")
    corpus = list(qs.iter_corpus())
    if docs and docs < len(corpus):
        judged = {d for rel in qs.qrels.values() for d in rel}
        rest = sorted((d for d in corpus if d.doc_id not in judged),
                      key=lambda d: _stable(d.doc_id))
        keep = judged | {d.doc_id for d in rest[: max(0, docs - len(judged))]}
        corpus = [d for d in corpus if d.doc_id in keep]
    return QuerySet(name=qs.name, queries=qs.queries, qrels=qs.qrels, corpus=corpus,
                    metadata={**qs.metadata, "corpus_docs": len(corpus)})


class Chunked:
    """A quality set's documents cut as the service cuts them: the embedded texts (header +
    chunk), grouped by document."""

    def __init__(self, qs: QuerySet, ref: Embedder, settings: Settings) -> None:
        chunkers = service_chunkers(settings, ref)
        self.qs = qs
        self.doc_ids: list[str] = []
        self.starts: list[int] = []
        self.texts: list[str] = []
        for d in qs.iter_corpus():
            texts = chunk_doc(d, chunkers, ref)
            if texts:
                self.doc_ids.append(d.doc_id)
                self.starts.append(len(self.texts))
                self.texts += texts
        self.queries = [q.text for q in qs.queries]
        self.query_ids = [q.id for q in qs.queries]

    def run(self, q: np.ndarray, c: np.ndarray) -> dict[str, list[str]]:
        """Top documents per query by their best chunk."""
        scores = np.maximum.reduceat(q @ c.T, np.asarray(self.starts), axis=1)
        k = min(TOP, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = {}
        for i, qid in enumerate(self.query_ids):
            row = top[i][np.argsort(-scores[i, top[i]], kind="stable")]
            out[qid] = [self.doc_ids[j] for j in row]
        return out


def chunk_doc(d: CorpusDoc, chunkers: Any, ref: Embedder) -> list[str]:
    path = d.path or d.doc_id
    language = detect_language(path, d.text)
    spans = chunkers.chunker_for(language).chunk(d.text, path=path, language=language)
    headers = chunk_headers(path, language, [(s.symbol, s.context) for s in spans],
                            ref.count_tokens)
    return [h + s.text for (h, _), s in zip(headers, spans, strict=True)]


# -- measuring -----------------------------------------------------------------------------
def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def quality(chunked: dict[str, Chunked], vecs: dict[str, dict[str, np.ndarray]],
            name: str, ref: str) -> dict[str, Any]:
    """Per set: nDCG@10 and R@10 of ``name``, and mixed with ``ref`` (queries of one, chunks
    of the other, both ways); mean/min cosine to ``ref``'s chunks; top-10 overlap."""
    out = {}
    for set_name, ch in chunked.items():
        own, base = vecs[name][set_name], vecs[ref][set_name]
        nq = len(ch.queries)
        q, c = own[:nq], own[nq:]
        rq, rc = base[:nq], base[nq:]
        run = ch.run(q, c)
        ref_run = ch.run(rq, rc)
        m = evaluate(run, ch.qs.qrels, ks=(10,))
        mixed_q = evaluate(ch.run(q, rc), ch.qs.qrels, ks=(10,))  # its queries, ref docs
        mixed_d = evaluate(ch.run(rq, c), ch.qs.qrels, ks=(10,))  # ref queries, its docs
        cos = np.sum(c * rc, axis=1)
        overlap = np.mean([len(set(run[i][:10]) & set(ref_run[i][:10])) / 10
                           for i in ch.query_ids])
        out[set_name] = {
            "nDCG@10": m["nDCG@10"], "R@10": m["R@10"],
            "mixed_queries": {"nDCG@10": mixed_q["nDCG@10"], "R@10": mixed_q["R@10"]},
            "mixed_docs": {"nDCG@10": mixed_d["nDCG@10"], "R@10": mixed_d["R@10"]},
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top10_overlap": float(overlap),
        }
    return out


def gate(q: dict[str, Any], ref: dict[str, Any], key: str | None = None) -> bool:
    """Every set's nDCG@10 and R@10 (or those of q[key]) >= GATE x the reference's."""
    for set_name, m in q.items():
        got = m[key] if key else m
        for metric in ("nDCG@10", "R@10"):
            if got[metric] < GATE * ref[set_name][metric]:
                return False
    return True


# -- main ----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scifact", type=Path, default=ROOT.parent / "shared/datasets/scifact")
    ap.add_argument("--scifact-docs", type=int, default=2000,
                    help="SciFact corpus size: the judged documents plus others up to this "
                         "many (0: all 5,183)")
    ap.add_argument("--code-set", required=True,
                    help="NAME=REPO (a history set from a git repository, bare is fine) or a "
                         "file written by bench_embedder.py --save-code-set")
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--speed-chunks", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calibration-samples", type=int,
                    default=Settings().embedder_calibration_samples)
    ap.add_argument("--verdicts", type=Path, default=None,
                    help="also merge the verdicts into this file (a data dir's "
                         "models/verdicts.json, or embedder_verdicts_file)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/embedder-backends.json")
    args = ap.parse_args()

    import nncf
    import openvino
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    machine = cpu()
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "cpu": machine, "cpu_key": cpu_key(), "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "openvino": openvino.get_version(),
                     "nncf": nncf.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "loadavg_start": loadavg(), "gate": GATE,
    }
    log(f"CPU {cpu_line(machine)}; load average {result['loadavg_start']}")
    t_run = time.perf_counter()
    base = Settings(embedder_backend="torch")  # the fp32 reference, whatever the default
    ref = Embedder(base)
    ref.load()
    sets = {"scifact-test": scifact_subset(args.scifact, args.scifact_docs)}
    cs = code_set(args.code_set, args.commits)
    sets[f"code-{cs.name}"] = cs
    chunked = {n: Chunked(qs, ref, base) for n, qs in sets.items()}
    result["sets"] = {n: {"queries": len(c.queries), "docs": len(c.doc_ids),
                          "chunks": len(c.texts),
                          **{k: v for k, v in sets[n].metadata.items()
                             if k in ("source", "split", "repo", "corpus_rev", "head")}}
                      for n, c in chunked.items()}
    log(f"sets: {result['sets']}")
    pool = sorted({t for c in chunked.values() for t in c.texts}, key=_stable)
    speed_texts = pool[: args.speed_chunks]
    calib_pool = pool[args.speed_chunks:]  # the corpus's own chunks, minus the timed ones
    result["speed_chunks"] = {"chunks": len(speed_texts),
                              "tokens": int(sum(ref.count_tokens(speed_texts)))}

    cands = [("torch", "fp32")] + ([("torch", "bf16")] if has_native_bf16() else [])
    cands += [("openvino", "fp32")] + ([("openvino", "bf16")] if has_native_bf16() else [])
    cands += [("openvino", "int8")]
    embedders: dict[str, Embedder] = {}
    built: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        for backend, prec in cands:
            name = f"{backend} {prec}"
            s = Settings(data_dir=Path(tmp) / f"{backend}-{prec}", embedder_backend=backend,
                         embedder_precision=prec,
                         embedder_calibration_samples=args.calibration_samples)
            e = Embedder(s)
            seconds = timed(lambda e=e: e.load(calibration_texts=lambda n: calib_pool[:n]))
            embedders[name] = e
            built[name] = {"revision": e.revision, "load_s": round(seconds, 2)}
            if e._ov is not None:
                p = e._ov.provenance
                built[name].update(build_s=p.built_s, calibration=p.calibration,
                                   calibration_texts=p.calibration_texts)
            log(f"{name}: {e.revision} loaded in {seconds:.1f}s")
        raw = SentenceTransformer(base.embedder_model or default_model_path(), device="cpu",
                                  local_files_only=True).eval()

        # -- speed, interleaved ---------------------------------------------------------
        runs: dict[str, list[float]] = {"raw fp32": []}
        for name in embedders:
            runs[f"{name} service"] = []
            runs[f"{name} b32"] = []
        warm = speed_texts[:8]
        raw.encode(warm, batch_size=RAW_BATCH)
        for e in embedders.values():
            e.embed(warm)
        for r in range(args.rounds):
            runs["raw fp32"].append(timed(lambda: raw.encode(
                speed_texts, batch_size=RAW_BATCH, normalize_embeddings=True,
                show_progress_bar=False)))
            for name, e in embedders.items():
                runs[f"{name} service"].append(timed(lambda e=e: e.embed(speed_texts)))
                runs[f"{name} b32"].append(timed(lambda e=e: e.embed(
                    speed_texts, batch_size=32, batch_tokens=32 * e.max_tokens)))
            log(f"speed round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {len(speed_texts) / v[-1]:.1f}/s" for k, v in runs.items()))
        n = len(speed_texts)
        # Best of the rounds: on a shared machine the least disturbed one is the closest to
        # the machine's own speed (torch's OpenMP team slows down far more than OpenVINO's
        # pool when another process takes a core); the median is kept beside it.
        speed = {k: {"chunks_per_s": n / min(v), "median_chunks_per_s": n / float(np.median(v)),
                     "seconds": v} for k, v in runs.items()}
        raw_cps = speed["raw fp32"]["chunks_per_s"]
        raw_median = speed["raw fp32"]["median_chunks_per_s"]
        for v in speed.values():
            v["x_raw_fp32"] = v["chunks_per_s"] / raw_cps
            v["median_x_raw_fp32"] = v["median_chunks_per_s"] / raw_median

        # -- quality --------------------------------------------------------------------
        vecs: dict[str, dict[str, np.ndarray]] = {}
        embed_s: dict[str, float] = {}
        for name, e in embedders.items():
            vecs[name] = {}
            t0 = time.perf_counter()
            for set_name, ch in chunked.items():
                vecs[name][set_name] = e.embed(ch.queries + ch.texts)
            embed_s[name] = time.perf_counter() - t0
            log(f"{name}: quality sets embedded in {embed_s[name]:.0f}s")
    ref_name = "torch fp32"
    results: dict[str, Any] = {}
    verdicts = []
    measured_at = result["when"]
    for name, e in embedders.items():
        q = quality(chunked, vecs, name, ref_name)
        ref_q = quality(chunked, vecs, ref_name, ref_name) if name != ref_name else q
        passed = gate(q, ref_q)
        interchangeable = (passed and gate(q, ref_q, "mixed_queries")
                           and gate(q, ref_q, "mixed_docs"))
        sp = speed[f"{name} service"]["x_raw_fp32"]
        results[name] = {**built[name], "quality": q, "passed": passed,
                         "interchangeable": interchangeable,
                         "service": speed[f"{name} service"], "b32": speed[f"{name} b32"],
                         "quality_embed_s": embed_s[name]}
        verdicts.append(Verdict(
            weights_revision=e.weights_revision, backend=e.backend, precision=e.precision,
            cpu=cpu_key(), passed=passed, speedup=round(sp, 3),
            interchangeable=interchangeable, measured_at=measured_at,
            cpu_model=machine["model"],
            detail={"b32_x_raw_fp32": round(speed[f"{name} b32"]["x_raw_fp32"], 3),
                    **{f"{s} {m}": round(q[s][m] / ref_q[s][m], 4) if ref_q[s][m] else 0.0
                       for s in q for m in ("nDCG@10", "R@10")},
                    "source": "bench/bench_backends.py"}))
        log(f"{name}: gate {'pass' if passed else 'FAIL'}"
            f"{' (interchangeable)' if interchangeable else ''}, {sp:.2f}x raw fp32")
    for v in verdicts:
        if v.precision == "int8" and not has_int8_dot():
            log("int8 on a CPU without VNNI/AMX: measured, but auto never considers it")
    result.update(raw=speed["raw fp32"], backends=results, loadavg_end=loadavg(),
                  run_s=time.perf_counter() - t_run, verdicts=[v.__dict__ for v in verdicts])
    verdict_file = calibration.PACKAGED_VERDICTS
    calibration.write_verdicts(verdict_file, verdicts)
    if args.verdicts:
        calibration.write_verdicts(args.verdicts, verdicts)
        log(f"verdicts merged into {args.verdicts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(result, args)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def render(r: dict[str, Any], args: argparse.Namespace) -> str:
    c, sets = r["cpu"], list(r["sets"])
    v = r["versions"]
    lines = [
        f"# Embedder backends on {c['model']} ({' '.join(c['flags'])})", "",
        f"{r['when']}, commit {r['commit']}. CPU **{c['model']}**, {c['cores']} cores, flags "
        f"{' '.join(c['flags'])} (verdict key `{r['cpu_key']}`); torch {v['torch']} "
        f"({r['torch_threads']} threads), OpenVINO {v['openvino']}, NNCF {v['nncf']}, "
        f"transformers {v['transformers']}, sentence-transformers "
        f"{v['sentence_transformers']}.", "",
        f"**Shared machine**: other work ran during the run (load average "
        f"{r['loadavg_start']} at the start, {r['loadavg_end']} at the end, on "
        f"{c['cores']} cores). Absolute chunks/s are depressed and noisy; the ratios hold "
        f"better: every figure comes from one process, the candidates interleaved in "
        f"{args.rounds} rounds; the table gives the best round of each (the least disturbed), "
        "the median in brackets after it.", "",
        f"Speed: {r['speed_chunks']['chunks']} real chunks ({r['speed_chunks']['tokens']} "
        f"tokens; the service's chunking and headers, from both quality sets). Raw = "
        f"`SentenceTransformer.encode` fp32, batch {RAW_BATCH}: "
        f"**{r['raw']['chunks_per_s']:.1f} chunks/s** (median "
        f"{r['raw']['median_chunks_per_s']:.1f}). *service* = `Embedder.embed` with the "
        "service's token-budgeted batches (what a server runs, and what `auto` ranks by); "
        "*b32* = batches of 32.", "",
        "| backend | revision | chunks/s service (× raw) | chunks/s b32 (× raw) | " + " | ".join(
            f"{s} nDCG@10 (× fp32) | {s} R@10 (× fp32)" for s in sets)
        + " | cos vs fp32 mean / min | top-10 overlap | gate | interchangeable | build s |",
        "|---|---|---|---|" + "---|---|" * len(sets) + "---|---|---|---|---|",
    ]
    ref = r["backends"]["torch fp32"]["quality"]
    for name, b in r["backends"].items():
        cells = []
        for s in sets:
            q = b["quality"][s]
            cells += [f"{q['nDCG@10']:.4f} ({q['nDCG@10'] / ref[s]['nDCG@10']:.3f})",
                      f"{q['R@10']:.4f} ({q['R@10'] / ref[s]['R@10']:.3f})"]
        cos = [b["quality"][s] for s in sets]
        mean_cos = np.mean([x["mean_cosine"] for x in cos])
        min_cos = min(x["min_cosine"] for x in cos)
        overlap = np.mean([x["top10_overlap"] for x in cos])
        sv, b32 = b["service"], b["b32"]
        lines.append(
            f"| {name} | `{b['revision']}` | {sv['chunks_per_s']:.1f} "
            f"(**{sv['x_raw_fp32']:.2f}**) [{sv['median_x_raw_fp32']:.2f}] | "
            f"{b32['chunks_per_s']:.1f} ({b32['x_raw_fp32']:.2f}) "
            f"[{b32['median_x_raw_fp32']:.2f}] | " + " | ".join(cells)
            + f" | {mean_cos:.4f} / {min_cos:.4f} | {overlap:.3f} | "
            f"{'pass' if b['passed'] else 'FAIL'} | {'yes' if b['interchangeable'] else 'no'}"
            f" | {b.get('build_s', '')} |")
    lines += ["", "Mixed (interchangeability): nDCG@10 / R@10 with the backend's queries "
              "against torch fp32's chunk vectors, and torch fp32's queries against the "
              "backend's:", ""]
    for name, b in r["backends"].items():
        if name == "torch fp32":
            continue
        lines.append(f"- {name}: " + "; ".join(
            f"{s} its queries {b['quality'][s]['mixed_queries']['nDCG@10']:.4f} / "
            f"{b['quality'][s]['mixed_queries']['R@10']:.4f}, its docs "
            f"{b['quality'][s]['mixed_docs']['nDCG@10']:.4f} / "
            f"{b['quality'][s]['mixed_docs']['R@10']:.4f}" for s in sets))
    info = r["sets"]
    sci = info.get("scifact-test", {})
    lines += [
        "", "Sets: " + "; ".join(f"**{s}** {i['queries']} queries, {i['docs']} documents, "
                                 f"{i['chunks']} chunks" for s, i in info.items()) + ".",
        f"SciFact is a subset of the corpus ({sci.get('docs')} of 5,183 documents: every "
        "document judged for a test query plus others chosen by hash of their id), with all "
        "300 test queries: the full corpus takes too long per backend on 2 shared cores. "
        "Scores are therefore higher than the published full-corpus figures; the gate "
        "compares backends on the same subset. The code set is a repository's history "
        "(query = a commit message, relevant = the non-test source files it changed; "
        "corpus = the parent of the oldest query commit).",
        "", f"Gate: nDCG@10 and R@10 on every set >= {GATE:.0%} of torch fp32's, in this run. "
        "*Interchangeable*: it also passes with mixed queries and documents (both ways), so "
        "its vectors may share a namespace with float vectors (`compatible`). int8 is "
        f"calibrated on {args.calibration_samples} texts of the corpus's own chunks (not the "
        "timed ones).",
        "", "Verdicts (what `embedder_backend=auto` reads; merged into "
        "`retriever/models/verdicts.json`" + (f" and `{args.verdicts}`" if args.verdicts
                                                   else "") + "):", "",
        "| weights | backend | precision | passed | speedup (service × raw fp32) | "
        "interchangeable |", "|---|---|---|---|---|---|"]
    for vd in r["verdicts"]:
        lines.append(f"| {vd['weights_revision']} | {vd['backend']} | {vd['precision']} | "
                     f"{vd['passed']} | {vd['speedup']:.2f} | {vd['interchangeable']} |")
    cands = set(auto_candidates(flags=r["cpu"]["flags"]))
    pick = max((vd for vd in r["verdicts"]
                if vd["passed"] and (vd["backend"], vd["precision"]) in cands),
               key=lambda vd: vd["speedup"], default=None)
    if pick:
        lines += ["", f"`auto` on this CPU kind would pick **{pick['backend']} "
                      f"{pick['precision']}** ({pick['speedup']:.2f}x raw fp32)."]
    lines += ["", f"Run took {r['run_s']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
