"""A golden set built from a real repository's history, evaluated by the service itself.

    python bench/bench_golden.py --repo NAME=PATH [--commits 200] [--out bench/results/golden.json]

PATH is a clone or bare mirror of a public repository (fetched for the run, never
committed). In one process with the real server (``ServerThread``, packaged MiniLM):

1. a work-tree clone at its HEAD is synced into a namespace (`SyncSource`, wait);
2. `RegisterGoldenSet` with ``from_source_history``: the server builds the set from the
   source's history (query = a commit message, relevant = the non-test source files it
   changed that the namespace holds);
3. `Evaluate` in DENSE, LEXICAL and HYBRID: precision@k, recall@k, nDCG@k (k = 1, 5, 10) and
   MRR over documents, as the gauges export them.

On a live namespace the corpus is the indexed revision, which already holds each change, so
these figures run higher than the benchmark's parent-snapshot history sets
(bench_quality.py): they are what the service's own quality monitoring watches for drift.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu, cpu_line, git, log  # noqa: E402

from retriever.client import RetrieverClient  # noqa: E402
from retriever.config import Settings  # noqa: E402
from retriever.models.embedder import Embedder  # noqa: E402
from retriever.server.app import ServerThread  # noqa: E402
from retriever.v1 import retriever_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("DENSE", "LEXICAL", "HYBRID")


def measure(name: str, source: Path, commits: int, embedder: Embedder, tmp: Path) -> dict:
    work = tmp / name
    git(tmp, "clone", "-q", "--no-local", str(source), str(work))
    settings = Settings(data_dir=tmp / f"{name}-data", grpc_port=0, metrics_port=0,
                        sync_roots=[tmp])
    st = ServerThread(settings, embedder).start()
    out: dict = {"repository": str(source), "head": git(work, "rev-parse", "HEAD")}
    try:
        with RetrieverClient(st.address, timeout=3600) as c:
            t0 = time.perf_counter()
            synced = c.sync_source(name, str(work), wait=True, timeout=3600)
            out["sync"] = {"seconds": time.perf_counter() - t0,
                           "documents": synced.documents_upserted,
                           "chunks": synced.chunks_embedded}
            log(f"{name}: synced {synced.documents_upserted} files in "
                f"{out['sync']['seconds']:.0f}s")
            reg = c.stub.RegisterGoldenSet(pb.RegisterGoldenSetRequest(
                namespace=name, name="history",
                from_source_history=pb.GoldenSetFromHistory(commits=commits)), timeout=600)
            out["golden_set"] = {"queries": reg.query_count, "version": reg.version,
                                 "origin": reg.origin, "corpus_revision": reg.corpus_revision}
            log(f"{name}: golden set of {reg.query_count} queries")
            out["evaluations"] = {}
            for mode in MODES:
                t0 = time.perf_counter()
                ev = c.stub.Evaluate(pb.EvaluateRequest(
                    namespace=name, golden_set="history", mode=pb.SearchMode.Value(mode)),
                    timeout=3600).evaluation
                metrics = {f"{m.name}@{m.k}" if m.k else m.name: m.value for m in ev.metrics}
                out["evaluations"][mode.lower()] = {
                    "seconds": time.perf_counter() - t0, "queries": ev.query_count,
                    "metrics": metrics}
                log(f"{name}: {mode}: {metrics}")
    finally:
        st.stop()
    return out


def render(r: dict) -> str:
    lines = [f"# Golden sets from git history, evaluated by the service ({r['when']}, "
             f"commit {r['commit']})", "",
             f"{r['cpu']}. `RegisterGoldenSet(from_source_history)` on a namespace synced to "
             "the repository's HEAD, then `Evaluate` per mode (documents collapsed). The corpus "
             "holds each change already, so these run higher than bench_quality.py's "
             "parent-snapshot sets: they are a drift monitor, not a benchmark.", ""]
    for name, x in r["repos"].items():
        g = x["golden_set"]
        lines += [f"## {name} (HEAD {x['head'][:12]}; {x['sync']['documents']} files, "
                  f"{x['sync']['chunks']} chunks; {g['queries']} queries)", "",
                  "| mode | P@1 | P@5 | P@10 | R@5 | R@10 | nDCG@10 | MRR | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode, ev in x["evaluations"].items():
            m = ev["metrics"]

            def f(key: str, m: dict = m) -> str:
                return f"{m[key]:.3f}" if key in m else "-"
            lines.append(f"| {mode} | {f('precision@1')} | {f('precision@5')} | "
                         f"{f('precision@10')} | {f('recall@5')} | {f('recall@10')} | "
                         f"{f('ndcg@10')} | {f('mrr@10')} | {ev['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/golden.json")
    args = ap.parse_args()
    embedder = Embedder(Settings(embedder_backend="torch"))  # the reference model
    embedder.load()
    result: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                    "commit": git(ROOT, "rev-parse", "--short", "HEAD"),
                    "cpu": cpu_line(cpu()), "repos": {}}
    with tempfile.TemporaryDirectory(prefix="bench-golden-") as tmp:
        for spec in args.repo:
            name, path = spec.split("=", 1)
            result["repos"][name] = measure(name, Path(path), args.commits, embedder,
                                            Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
