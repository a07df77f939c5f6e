"""Full index vs incremental sync of a real git repository, and commit-to-searchable latency.

    python bench/bench_sync.py --repo NAME=PATH [--repo ...] [--out bench/results/sync.json]

PATH is any clone or bare mirror of a public repository (fetched for the run, never
committed). For each one, in one process with the real server (``ServerThread``, packaged
MiniLM, no embedding cache):

1. A work-tree clone is made in a temporary directory. Among the newest 300 first-parent
   commits of its HEAD the newest one whose diff to its parent touches at least one and at
   most 1 % of the tree's files (and at least one file the sync indexes) is chosen: C.
2. **Full**: the work tree is put at C's parent and synced into a fresh namespace
   (`SyncSource`, wait): seconds, files, chunks embedded.
3. **Incremental**: the branch is moved to C and synced again: seconds, files changed,
   chunks embedded and reused. **Goal: incremental seconds <= 3 % of the full index's.**
4. **Commit to searchable**, as a poller sees it: the branch goes back to C's parent, a
   server on the same data with ``sync_poll_interval_s`` 1 syncs back to it, then the branch
   moves to C (the "push") and the time until `GetIndexStatus` shows C indexed is measured.

Writes JSON and Markdown (``--out``, ``.md`` next to it).
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
GOAL = 0.03


def pick_commit(work: Path) -> tuple[str, list[str], int]:
    """(commit, files it touches, files in its parent's tree) of the newest small change."""
    for sha in git(work, "log", "--first-parent", "--format=%H", "-n", "300").split():
        parents = git(work, "rev-list", "--parents", "-n", "1", sha).split()[1:]
        if not parents:
            continue
        files = int(git(work, "ls-tree", "-r", "--name-only", parents[0]).count("\n") + 1)
        changed = git(work, "diff", "--name-only", parents[0], sha).splitlines()
        texty = [p for p in changed if p.endswith((".py", ".md", ".rst", ".go", ".ts", ".js",
                                                   ".rs", ".txt", ".toml", ".yaml", ".yml"))]
        if texty and 1 <= len(changed) <= max(1, files // 100):
            return sha, changed, files
    raise SystemExit(f"no first-parent commit of {work} touches 1..1% of its files")


def sync(client: RetrieverClient, ns: str, repo: str = "") -> tuple[pb.SyncSourceResponse, float]:
    t0 = time.perf_counter()
    resp = client.sync_source(ns, repo, wait=True, timeout=3600)
    return resp, time.perf_counter() - t0


def summary(resp: pb.SyncSourceResponse, seconds: float) -> dict:
    return {"seconds": seconds, "commit": resp.commit, "full_reconcile": resp.full_reconcile,
            "files_added": resp.files_added, "files_modified": resp.files_modified,
            "files_deleted": resp.files_deleted, "files_renamed": resp.files_renamed,
            "documents_upserted": resp.documents_upserted,
            "chunks_embedded": resp.chunks_embedded, "chunks_reused": resp.chunks_reused,
            "skipped": dict(resp.skipped)}


def measure(name: str, source: Path, embedder: Embedder, tmp: Path) -> dict:
    work = tmp / f"{name}-work"
    git(tmp, "clone", "-q", "--no-local", str(source), str(work))
    commit, changed, files = pick_commit(work)
    parent = git(work, "rev-parse", f"{commit}^1")
    log(f"{name}: change {commit[:12]} touches {len(changed)} of {files} files: {changed}")
    branch = "bench"
    git(work, "checkout", "-q", "-B", branch, parent)
    out: dict = {"repository": str(source), "change": commit, "parent": parent,
                 "changed_files": changed, "tree_files": files}
    settings = Settings(data_dir=tmp / f"{name}-data", grpc_port=0, metrics_port=0,
                        sync_roots=[tmp])
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address, timeout=3600) as c:
            log(f"{name}: full index at {parent[:12]}")
            full, full_s = sync(c, name, str(work))
            out["full"] = summary(full, full_s)
            log(f"{name}: full {full_s:.1f}s, {full.chunks_embedded} chunks embedded")
            git(work, "checkout", "-q", "-B", branch, commit)
            inc, inc_s = sync(c, name)
            out["incremental"] = summary(inc, inc_s)
            log(f"{name}: incremental {inc_s:.2f}s, {inc.chunks_embedded} embedded, "
                f"{inc.chunks_reused} reused")
            status = c.status(name)
            out["chunks_in_namespace"] = status.chunk_count
    finally:
        st.stop()
    out["incremental_over_full"] = out["incremental"]["seconds"] / out["full"]["seconds"]
    out["goal_met"] = out["incremental_over_full"] <= GOAL

    # Commit to searchable through the poller: the same namespace, put back at the parent,
    # then a server polling every second sees the branch move to C (the "push").
    git(work, "checkout", "-q", "-B", branch, parent)
    poll = Settings(data_dir=settings.data_dir, grpc_port=0, metrics_port=0,
                    sync_roots=[tmp], sync_poll_interval_s=1.0)
    st = ServerThread(poll, embedder).start()
    try:
        with RetrieverClient(st.address, timeout=3600) as c:
            deadline = time.perf_counter() + 600
            while c.status(name).source.indexed_commit != parent:  # the poller reverts it
                if time.perf_counter() > deadline:
                    raise SystemExit("the poller did not sync back to the parent in 600 s")
                time.sleep(0.05)
            time.sleep(1.5)  # let that sync end
            t0 = time.perf_counter()
            git(work, "checkout", "-q", "-B", branch, commit)
            while c.status(name).source.indexed_commit != commit:
                if time.perf_counter() - t0 > 600:
                    raise SystemExit("the poller did not sync the change within 600 s")
                time.sleep(0.05)
            out["commit_to_searchable_s"] = time.perf_counter() - t0
            out["poll_interval_s"] = poll.sync_poll_interval_s
    finally:
        st.stop()
    log(f"{name}: commit to searchable {out['commit_to_searchable_s']:.2f}s (poll 1 s)")
    return out


def render(r: dict) -> str:
    c = r["cpu"]
    lines = [f"# Sync: full index vs incremental ({r['when']}, commit {r['commit']})", "",
             f"{cpu_line(c)}; embedder on CPU, no embedding cache. Goal: incremental <= 3 % "
             "of the full index's seconds.", "",
             "| repository | change | files touched / tree | full s (chunks) | incremental s "
             "(embedded / reused) | ratio | goal | commit to searchable (poll 1 s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, x in r["repos"].items():
        f, i = x["full"], x["incremental"]
        lines.append(
            f"| {name} | {x['change'][:12]} | {len(x['changed_files'])} / {x['tree_files']} | "
            f"{f['seconds']:.1f} ({f['chunks_embedded']}) | {i['seconds']:.2f} "
            f"({i['chunks_embedded']} / {i['chunks_reused']}) | "
            f"{x['incremental_over_full']:.2%} | {'met' if x['goal_met'] else 'NOT met'} | "
            f"{x['commit_to_searchable_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sync.json")
    args = ap.parse_args()
    embedder = Embedder(Settings(embedder_backend="torch"))  # the reference model
    embedder.load()
    result: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu(),
                    "commit": git(ROOT, "rev-parse", "--short", "HEAD"), "repos": {}}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        for spec in args.repo:
            name, path = spec.split("=", 1)
            result["repos"][name] = measure(name, Path(path), embedder, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
