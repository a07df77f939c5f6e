"""Chunking: throughput per language on real trees, and the quality it buys, in one run.

    python bench/bench_chunking.py --tree stdlib=/usr/lib/python3.11 --tree cobra=/path/to/cobra \
        --repo requests=/path/to/requests --repo click=/path/to/click --repo cobra=/path/to/cobra

1. **Throughput**: every file of each ``--tree`` (language by the service's detection) cut by
   the service's own chunkers (``service_chunkers`` with the packaged model's tokenizer and the
   service's budgets): MB/s of source and chunks/s per language, and how many documents fell
   back to windows and why. The same files are also cut by ``windows/v1`` alone, in the same
   process (the ratio is the cost of structure). The **share of indexing time** is chunking
   time / (chunking time + embedding time of the chunks made), with the embedding rate
   measured here on a sample of those chunks' embedded texts with the service's default
   embedder on this machine (``embedder_backend`` auto: the fastest backend that passed the
   quality gate, the service's batches), and beside it with the fp32 reference model.
2. **Quality**: for each ``--repo``, its history set (query = a commit message, relevant =
   the non-test source files it modified, corpus = the parent of the oldest query commit
   without test files; ``retriever.slo`` — what ``retriever eval`` runs), indexed by two real
   servers that differ only in ``chunking`` ("windows" = windows/v1 alone, "structured" =
   the syntax/sections chunkers), same embedder, same corpus, same queries, each query
   through the real gRPC Search (collapse: one hit per file): file-level R@10 and MRR per
   search mode.

Repositories are read from their git objects (no checkout needed for ``--repo``; ``--tree``
wants a directory, use ``git archive`` for a bare mirror). Writes JSON and Markdown to
``--out`` (default bench/results/chunking.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retriever.client import RetrieverClient  # noqa: E402
from retriever.config import Settings  # noqa: E402
from retriever.ingest.chunking import detect_language  # noqa: E402
from retriever.ingest.pipeline import (  # noqa: E402
    chunk_headers,
    service_chunkers,
    text_budget,
)
from retriever.models.embedder import Embedder  # noqa: E402
from retriever.server.app import ServerThread  # noqa: E402
from retriever.slo.evaluation import build_git_history_set  # noqa: E402
from retriever.slo.runner import client_search, evaluate_modes, index_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_quality import cpu_info, log  # noqa: E402

MODES = ("dense", "hybrid")
SKIP_DIRS = {".git", "node_modules", "__pycache__", "vendor", "site-packages", "test",
             "tests", "idlelib", "lib2to3"}
MAX_FILE_BYTES = 1024 * 1024


def tree_files(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of the UTF-8 regular files under ``root`` (no symlinks, no
    test or vendored directories, none over 1 MiB)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if p.is_symlink() or not p.is_file() or p.stat().st_size > MAX_FILE_BYTES:
                continue
            try:
                text = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if "\x00" in text:
                continue
            out.append((str(p.relative_to(root)), text))
    return out


def embed_ms_per_chunk(embedder: Embedder, sample: list[str]) -> float:
    embedder.embed(sample[:32])  # warm up
    t0 = time.perf_counter()
    embedder.embed(sample)
    return (time.perf_counter() - t0) / max(1, len(sample)) * 1000


def throughput(embedder: Embedder, settings: Settings, trees: dict[str, Path],
               service_embedder: Embedder) -> dict:
    """``embedder`` (the fp32 reference) tokenises; the share of indexing time is against
    ``service_embedder``'s rate (the service's default here), the reference's beside it."""
    budget = text_budget(settings, embedder)
    structured = service_chunkers(settings, embedder, structured=True)
    windows = service_chunkers(settings, embedder, structured=False)
    per_lang: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    fallbacks: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    sample: list[str] = []
    warmed: set[str] = set()
    for tree, root in trees.items():
        files = tree_files(root)
        log(f"{tree}: {len(files)} files")
        for path, text in files:
            lang = detect_language(path, text)
            chunker = structured.chunker_for(lang)
            if lang not in warmed:  # a grammar loads on first use: not timed
                warmed.add(lang)
                chunker.chunk(text, path=path, language=lang)
            t0 = time.perf_counter()
            spans = chunker.chunk(text, path=path, language=lang)
            headers = chunk_headers(path, lang, [(s.symbol, s.context) for s in spans],
                                    embedder.count_tokens)
            t1 = time.perf_counter()
            wspans = windows.chunker_for(lang).chunk(text, path=path, language=lang)
            t2 = time.perf_counter()
            row = per_lang[lang]
            row["files"] += 1
            row["bytes"] += len(text.encode("utf-8"))
            row["chunks"] += len(spans)
            row["seconds"] += t1 - t0
            row["windows_chunks"] += len(wspans)
            row["windows_seconds"] += t2 - t1
            reasons = {s.fallback for s in spans if s.fallback}
            for r in reasons:
                fallbacks[lang][r] += 1
            if len(sample) < 4096 and spans and hash(path) % 7 == 0:
                sample.extend(h + s.text for (h, _), s in zip(headers, spans, strict=True))
    # The embedding rate on a sample of the chunks made (what indexing spends on them).
    sample = sample[:512]
    reference_ms = embed_ms_per_chunk(embedder, sample)
    embed_s_per_chunk = embed_ms_per_chunk(service_embedder, sample) / 1000
    langs = {}
    total_chunk_s = total_chunks = 0.0
    for lang, row in sorted(per_lang.items()):
        s = row["seconds"]
        total_chunk_s += s
        total_chunks += row["chunks"]
        embed_s = row["chunks"] * embed_s_per_chunk
        langs[lang] = {
            "files": int(row["files"]), "mb": row["bytes"] / 1e6, "chunks": int(row["chunks"]),
            "mb_per_s": row["bytes"] / 1e6 / s if s else 0.0,
            "chunks_per_s": row["chunks"] / s if s else 0.0,
            "vs_windows_time": s / row["windows_seconds"] if row["windows_seconds"] else 0.0,
            "windows_chunks": int(row["windows_chunks"]),
            "share_of_indexing": s / (s + embed_s) if s + embed_s else 0.0,
            "fallbacks": dict(fallbacks.get(lang, {})),
        }
    total_embed = total_chunks * embed_s_per_chunk
    reference_embed = total_chunks * reference_ms / 1000
    return {"budget_tokens": budget, "embed_ms_per_chunk": embed_s_per_chunk * 1000,
            "embedder": f"{service_embedder.name}@{service_embedder.revision}",
            "reference_embed_ms_per_chunk": reference_ms,
            "embed_sample_chunks": len(sample), "languages": langs,
            "chunking_s": total_chunk_s, "chunks": int(total_chunks),
            "share_of_indexing": total_chunk_s / (total_chunk_s + total_embed),
            "share_of_reference_indexing": total_chunk_s / (total_chunk_s + reference_embed)}


def quality(embedder: Embedder, repos: dict[str, str], commits: int, cache: Path) -> dict:
    sets = {}
    for name, path in repos.items():
        log(f"building the history set of {name}")
        sets[name] = build_git_history_set(path, commits=commits, name=name)
    out: dict[str, dict] = {}
    per_query: dict[tuple[str, str], dict[str, dict[str, dict[str, float]]]] = {}
    for chunking in ("windows", "structured"):
        tmp = tempfile.TemporaryDirectory(prefix=f"bench-chunking-{chunking}-")
        settings = Settings(data_dir=Path(tmp.name), grpc_port=0, metrics_port=0,
                            chunking=chunking, embed_cache_dir=cache / "embeddings")
        st = ServerThread(settings, embedder).start()
        try:
            with RetrieverClient(st.address, timeout=600) as client:
                for name, qs in sets.items():
                    t0 = time.perf_counter()
                    counts = index_corpus(client, name, qs, batch_size=32)
                    log(f"{chunking} {name}: indexed {counts['chunks_total']} chunks in "
                        f"{time.perf_counter() - t0:.0f} s")
                    results = evaluate_modes(qs, client_search(client, name), MODES,
                                             top_k=100, ks=(1, 10, 100))
                    entry = out.setdefault(name, {
                        "queries": len(qs.queries), **qs.metadata,
                        "corpus_documents": counts["documents_received"]})
                    entry[chunking] = {"chunks": counts["chunks_total"], **{
                        r.mode: {k: r.metrics[k] for k in ("R@10", "MRR", "nDCG@10", "R@100")}
                        for r in results}}
                    per_query[(name, chunking)] = {r.mode: r.per_query for r in results}
        finally:
            st.stop()
            tmp.cleanup()
    for name, entry in out.items():
        entry["paired"] = {mode: {metric: paired_difference(
            per_query[(name, "windows")][mode], per_query[(name, "structured")][mode], metric)
            for metric in ("R@10", "MRR")} for mode in MODES}
    return out


def paired_difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]],
                      metric: str, resamples: int = 10_000) -> dict[str, float]:
    """Mean of ``b - a`` over the queries both answered, with a 95 % paired bootstrap
    interval (queries resampled with replacement, fixed seed) and the share of resamples in
    which ``b`` is ahead: how far a difference between two chunkers is more than the draw
    of 200 queries."""
    ids = sorted(set(a) & set(b))
    d = np.array([b[q][metric] - a[q][metric] for q in ids])
    if not len(d):
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_ahead": 0.0, "queries": 0}
    rng = np.random.default_rng(20261127)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi),
            "p_ahead": float((means > 0).mean()), "queries": len(d)}


def render(r: dict) -> str:
    lines = [
        "# Chunking: throughput and quality",
        "",
        f"Run {r['when']} at commit {r['commit']}, {r['embedder']}, CPU {r['cpu']['model']} "
        f"({r['cpu']['cores']} cores; {', '.join(r['cpu']['flags']) or 'no avx-512'}).",
        "",
    ]
    if "quality" in r:
        lines += [
            "## Quality: windows/v1 vs the structured chunkers (same embedder, corpus, queries)",
            "",
            "History sets: query = a commit message, relevant = the non-test source files it "
            "modified, corpus = the parent of the oldest query commit without test files; "
            "file-level metrics through the real gRPC Search with collapse.",
            "",
            "| repo | mode | chunks windows → structured | R@10 windows | R@10 structured | "
            "MRR windows | MRR structured | Δ R@10 [95 %] | Δ MRR [95 %] |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        wins = total = sure_wins = sure_losses = 0

        def delta(p: dict | None) -> str:
            nonlocal sure_wins, sure_losses
            if p is None:
                return "-"
            sure_wins += p["lo"] > 0
            sure_losses += p["hi"] < 0
            return f"{p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"

        def pair(a: float, b: float) -> str:  # the better one in bold
            return (f"{a:.3f} | **{b:.3f}**" if b > a else
                    f"**{a:.3f}** | {b:.3f}" if a > b else f"{a:.3f} | {b:.3f}")

        for name, e in r["quality"].items():
            for mode in MODES:
                w, s = e["windows"][mode], e["structured"][mode]
                r10_w, r10_s = pair(w["R@10"], s["R@10"]).split(" | ")
                mrr_w, mrr_s = pair(w["MRR"], s["MRR"]).split(" | ")
                wins += (s["R@10"] > w["R@10"]) + (s["MRR"] > w["MRR"])
                total += 2
                paired = e.get("paired", {}).get(mode, {})
                lines.append(
                    f"| {name} | {mode} | {e['windows']['chunks']} → {e['structured']['chunks']}"
                    f" | {r10_w} | {r10_s} | {mrr_w} | {mrr_s} | {delta(paired.get('R@10'))} |"
                    f" {delta(paired.get('MRR'))} |")
        lines += ["", f"Structured chunking wins {wins} of {total} comparisons (R@10 and MRR, "
                  "each repository and mode; ties count as losses)."]
        if any("paired" in e for e in r["quality"].values()):
            lines += ["", "Δ = structured − windows, mean over the queries, with a 95 % paired "
                      "bootstrap interval (queries resampled, 10,000 times): "
                      f"{sure_wins} of {total} differences are ahead for structured beyond the "
                      f"interval, {sure_losses} behind beyond it; the rest are within what "
                      "another draw of the same number of queries could give."]
        lines += ["", "Sets:", ""]
        for name, e in r["quality"].items():
            lines.append(f"- **{name}**: {e['queries']} queries, {e['corpus_documents']} files;"
                         f" repo {e.get('repo', '?')}, corpus at {e.get('corpus_rev', '?')}")
        lines.append("")
    if "throughput" in r:
        t = r["throughput"]
        lines += [
            "## Throughput (the service's chunkers, real tokenizer, one thread)",
            "",
            f"Trees: {', '.join(r['trees'])}. Text budget {t['budget_tokens']} tokens. "
            f"Embedding measured on {t['embed_sample_chunks']} of these chunks with the "
            f"service's default embedder here ({t.get('embedder', r.get('embedder'))}): "
            f"{t['embed_ms_per_chunk']:.1f} ms/chunk. **Chunking is "
            f"{100 * t['share_of_indexing']:.2f} % of indexing time** (goal < 5 %)"
            + (f"; against the fp32 reference model ({t['reference_embed_ms_per_chunk']:.1f}"
               f" ms/chunk) {100 * t['share_of_reference_indexing']:.2f} %."
               if "reference_embed_ms_per_chunk" in t else "."),
            "",
            "Per language, the share is against the service's default embedder.",
            "",
            "| language | files | MB | chunks | MB/s | chunks/s | × windows/v1 time | "
            "% of indexing | fell back (files) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for lang, x in sorted(t["languages"].items(), key=lambda kv: -kv[1]["mb"]):
            fb = ", ".join(f"{k} {v}" for k, v in sorted(x["fallbacks"].items())) or "-"
            lines.append(
                f"| {lang} | {x['files']} | {x['mb']:.2f} | {x['chunks']} | "
                f"{x['mb_per_s']:.2f} | {x['chunks_per_s']:.0f} | {x['vs_windows_time']:.2f} | "
                f"{100 * x['share_of_indexing']:.2f} | {fb} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render", type=Path, help="only render this JSON result as Markdown")
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR (throughput)")
    ap.add_argument("--repo", action="append", default=[], help="NAME=GIT DIR (quality)")
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/chunking.json")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench/.cache")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    embedder = Embedder(Settings(embedder_backend="torch"))  # the reference model
    embedder.load()
    result: dict[str, object] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_info(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "embedder": f"{embedder.name}@{embedder.revision}",
    }
    if args.tree:
        trees = {k: Path(v) for k, v in (t.split("=", 1) for t in args.tree)}
        result["trees"] = [f"{k} ({v})" for k, v in trees.items()]
        # The service's default embedder on this machine, its built models cached.
        service_embedder = Embedder(Settings(data_dir=args.cache / "service-embedder"))
        service_embedder.load()
        result["throughput"] = throughput(embedder, Settings(), trees, service_embedder)
    if args.repo:
        repos = dict(r.split("=", 1) for r in args.repo)
        result["quality"] = quality(embedder, repos, args.commits, args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
