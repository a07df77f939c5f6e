"""The model thread's scheduling under mixed load: searches beside upserts, with and without
layer checkpoints, in one process on the real model.

    python bench/bench_scheduler.py [--seconds 40] [--query-rate 25] [--upsert-rate 3]

The service's ``MicroBatcher`` and ``Embedder`` (packaged all-MiniLM-L6-v2, torch, the
service's slice size: one full chunk per document slice on CPU) are driven by the same
seeded Poisson schedule twice: single-text queries (SciFact queries) at ``--query-rate``
and document jobs of 1-10 texts (SciFact abstracts cut to 800 characters, like the load
test's upserts) at ``--upsert-rate``, under each of ``CONFIGS``: *before* (a query that
arrives during a document slice waits for the whole slice, one forward pass; document jobs
shortest-remaining-first), *checkpoints* (``embed_layer_checkpoints``: the query runs at
the slice's next layer boundary) and *checkpoints + ratio* (document jobs by response
ratio: the service's defaults). Reports query latency (submit to
vectors) and document-job latency, p50/p90/p99/max, and how many query batches ran inside a
slice. No gRPC, no catalog: this isolates the scheduler; ``load-tests/`` measures the whole
service. Writes bench/results/scheduler.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retriever.config import Settings  # noqa: E402
from retriever.models.batcher import MicroBatcher  # noqa: E402
from retriever.models.embedder import Embedder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_quality import cpu_info, log  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"


def schedule(seconds: float, qrate: float, drate: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    events, t = [], 0.0
    while True:
        t += rng.expovariate(qrate + drate)
        if t >= seconds:
            return events
        events.append((t, "q" if rng.random() < qrate / (qrate + drate) else "d"))


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


# (name, layer checkpoints, order of document jobs): what the service ran before, each
# change alone, and what it runs now.
CONFIGS = (("before", False, "least_left"), ("checkpoints", True, "least_left"),
           ("checkpoints + ratio", True, "response_ratio"))


def run(emb: Embedder, name: str, checkpoints: bool, order: str,
        events: list[tuple[float, str]], queries: list[str], docs: list[str],
        seed: int) -> dict[str, object]:
    s = Settings()
    b = MicroBatcher(lambda t: emb.embed(t, batch_size=max(1, len(t))), s.query_batch_size,
                     s.query_batch_wait_ms / 1000, doc_max_wait_s=s.embed_doc_max_wait_ms / 1000,
                     nice=s.model_thread_nice, doc_order=order)
    b.doc_batch, b.doc_slice_tokens = emb.default_batch_size, emb.default_slice_tokens
    if checkpoints:
        emb.add_checkpoint(b.checkpoint)
    b.start()
    rng = random.Random(seed)
    qlat: list[float] = []
    dlat: list[float] = []
    try:
        b.submit(["warm up"]).result(60)
        b.submit_documents(docs[:4]).result(60)
        futures = []
        start = time.perf_counter()
        for at, kind in events:
            now = time.perf_counter() - start
            if at > now:
                time.sleep(at - now)
            due = start + at
            if kind == "q":
                f = b.submit([rng.choice(queries)])
                f.add_done_callback(lambda _f, due=due: qlat.append(time.perf_counter() - due))
            else:
                texts = [rng.choice(docs) for _ in range(rng.randint(1, 10))]
                f = b.submit_documents(texts, emb.count_tokens(texts))
                f.add_done_callback(lambda _f, due=due: dlat.append(time.perf_counter() - due))
            futures.append(f)
        for f in futures:
            f.result(120)
        wall = time.perf_counter() - start
    finally:
        b.stop()
        emb.remove_checkpoint(b.checkpoint)
    return {"config": name, "checkpoints": checkpoints, "doc_order": order,
            "queries_ms": pct(qlat), "documents_ms": pct(dlat),
            "checkpoint_batches": b.checkpoint_batches, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--query-rate", type=float, default=25.0)
    p.add_argument("--upsert-rate", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the configurations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scheduler")
    args = p.parse_args(argv)
    emb = Embedder(Settings(embedder_backend="torch"))  # the reference model
    emb.load()
    queries = [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").open()]
    docs = [json.loads(line)["text"][:800] for line in (SCIFACT / "corpus.jsonl").open()][:3000]
    events = schedule(args.seconds, args.query_rate, args.upsert_rate, args.seed)
    runs = []
    for r in range(args.rounds):
        for name, on, order in CONFIGS:
            res = run(emb, name, on, order, events, queries, docs, args.seed + r)
            q, d = res["queries_ms"], res["documents_ms"]
            log(f"round {r + 1} {name}: queries p50 "
                f"{q['p50']:.1f} p90 {q['p90']:.1f} p99 {q['p99']:.1f} ms | document jobs p50 "
                f"{d['p50']:.0f} p99 {d['p99']:.0f} max {d['max']:.0f} ms | "
                f"{res['checkpoint_batches']} query batches inside slices")
            runs.append(res)
    report = {"generated": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_info(),
              "embedder": f"{emb.name}@{emb.revision} ({emb.backend} {emb.precision})",
              "slice_tokens": emb.default_slice_tokens, "seconds": args.seconds,
              "query_rate": args.query_rate, "upsert_rate": args.upsert_rate, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    cpu = r["cpu"]
    lines = [
        "# Model-thread scheduling: searches beside upserts",
        "",
        f"Generated by `bench/bench_scheduler.py` on {r['generated']}: {cpu['model']} "
        f"({', '.join(cpu['flags'])}), {cpu['cores']} cores, no GPU. Embedder "
        f"{r['embedder']}, document slice {r['slice_tokens']} tokens (one chunk). Load: "
        f"{r['query_rate']} single-text queries/s and {r['upsert_rate']} document jobs/s of "
        f"1-10 SciFact abstracts (<= 800 characters), Poisson, {r['seconds']:.0f} s, the same "
        "schedule for every run; each round runs every configuration in one process. "
        "Latency: from the scheduled arrival to the vectors. *before*: a query waits for the "
        "document slice in flight, document jobs shortest-remaining-first; *checkpoints*: "
        "queries run between a slice's layers; *+ ratio*: document jobs by response ratio "
        "(waited + work left over work left; the service's default now).",
        "",
        "| round | configuration | queries p50 | p90 | p99 | max | document jobs p50 | p90 "
        "| p99 | max | query batches inside a slice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run_ in enumerate(r["runs"]):
        q, d = run_["queries_ms"], run_["documents_ms"]
        lines.append(
            f"| {i // len(CONFIGS) + 1} | {run_['config']} | {q['p50']:.1f} ms | "
            f"{q['p90']:.1f} | {q['p99']:.1f} | {q['max']:.1f} | {d['p50']:.0f} ms | "
            f"{d['p90']:.0f} | {d['p99']:.0f} | {d['max']:.0f} | {run_['checkpoint_batches']} |")
    base = [x for x in r["runs"] if x["config"] == CONFIGS[0][0]]
    for name, _, _ in CONFIGS[1:]:
        rs = [x for x in r["runs"] if x["config"] == name]
        if not base or not rs:
            continue

        def ratio(side: str, key: str, rs: list[dict] = rs) -> float:
            return float(np.median([x[side][key] for x in rs])
                         / np.median([x[side][key] for x in base]))
        lines += ["", f"*{name}* against *before* (median over rounds): query p99 "
                  f"{ratio('queries_ms', 'p99'):.2f}x, p90 {ratio('queries_ms', 'p90'):.2f}x; "
                  f"document-job p50 {ratio('documents_ms', 'p50'):.2f}x, p99 "
                  f"{ratio('documents_ms', 'p99'):.2f}x, max {ratio('documents_ms', 'max'):.2f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
