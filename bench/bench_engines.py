"""The vector engines side by side, through the VectorIndex contract, on one data set.

    python bench/bench_engines.py [--engines faiss-flat,faiss-hnsw,chroma,chroma-server,
                                   milvus-server,milvus-lite] [--n 100000] [--dim 384]
                                  [--queries 200] [--lite-queries 30] [--lite-build-max-s 600]
                                  [--build-max-s SECONDS]
                                  [--out bench/results/engines.md]
    python bench/bench_engines.py --render bench/results/engines.json  # Markdown again

In one process, one data set, every engine through ``create_backend`` + ``open`` +
``upsert`` (with payloads) + ``search`` (with ``where``), as the service uses them:

* **Data.** bench_faiss.py's Gaussian mixture (1,000 centres, L2-normalised, cosine) and
  its queries; the payloads of bench_faiss.py (doc id, path ``src/pkgNNN/modM.py``,
  language, kind) plus one document metadata pair ``team`` (web/infra/data, by document).
  Ground truth: exact top-10 by brute force (numpy-equivalent, faiss.knn).
* **Engines.** ``faiss-flat`` / ``faiss-hnsw``: the FAISS backend with ``kind="flat"`` /
  ``kind="hnsw"`` (M 32, efConstruction 40, efSearch 128; 2 OpenMP threads for the HNSW
  build, 1 per search). ``chroma``: chromadb embedded (``PersistentClient``).
  ``chroma-server``: ``chroma run`` on loopback, through ``HttpClient``. ``milvus-server``:
  the PyPI ``milvus==2.3.5`` standalone server from ``.venv-milvus-server`` (HNSW M 16,
  efConstruction 200, ef 128), started as tests/test_milvus_server.py starts it.
  ``milvus-lite``: milvus-lite 3.x, ``MilvusClient("….db")`` (a Python engine in this
  process: fewer queries, ``--lite-queries``; its build stops at ``--lite-build-max-s``).
  ``--build-max-s`` bounds every engine's build the same way (upserts, flush and the wait
  for the index together: "does it finish within 20 minutes" is ``--build-max-s 1200``);
  an engine over it is measured on what it had built, and the report says so.
* **Build**: upserts of 1,000 vectors with payloads, then ``flush``, then the wait until
  the engine's ANN index covers every vector (FAISS HNSW: ``wait_idle``; Milvus server:
  every row indexed and every loaded segment sealed with its index; milvus-lite: its
  background index build, which describe_index does not report; Chroma indexes as it
  writes).
* **Memory**: the peak RSS of this process during the engine's turn (VmHWM, reset through
  /proc/self/clear_refs at its start; freed memory given back with ``malloc_trim`` before)
  and, for a server, the sum of VmHWM over the server's process group, from /proc.
* **Search**: single-query k=10 searches, one client (p50/p99), then the same queries from
  8 threads at once (p50/p99 of each search, and queries per second over the wall time);
  recall@10 against the exact answer. Filters: *selective*, a path prefix passing 0.1 %
  (``src/pkg007/``), and *broad*, a metadata equality passing 33 % (``team == web``): p50
  and recall@10 against the exact answer within the filter.
* **Writes**: delete 1,000 ids in one call, then replace 1,000 other ids (one upsert of new
  vectors, same payloads): vectors per second of the call (what is acknowledged; Chroma and
  Milvus have logged it durably by then, FAISS snapshots at ``flush``, timed apart).

Servers are stopped (their process group: SIGTERM, then SIGKILL) and temporary
directories removed, also on error. Writes ``--out`` (Markdown) and the same name with
``.json``; ``--engines`` and ``--n`` rerun a part (into another ``--out``: figures compare
only within one run). The Chroma and Milvus rows also get an estimate of a 1M build from
the rate their build ended at.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_faiss import SELECTIVE, exact_top, mixture, ms, payload_of, recall  # noqa: E402
from benchlib import cpu, cpu_line, log  # noqa: E402

from indexers import (  # noqa: E402
    CollectionSpec,
    EngineUnavailable,
    Filter,
    Payload,
    VectorIndex,
    create_backend,
)

ROOT = Path(__file__).resolve().parent.parent
K = 10
BATCH = 1000
WRITES = 1000  # ids deleted, and ids replaced
THREADS = 8
TEAMS = ("web", "infra", "data")
BROAD = Filter(metadata=(("team", "web"),))
ENGINES = ("faiss-flat", "faiss-hnsw", "chroma", "chroma-server", "milvus-server",
           "milvus-lite")
MILVUS_SERVER_BIN = ROOT / ".venv-milvus-server" / "bin" / "milvus-server"
CHROMA_BIN = Path(sys.executable).parent / "chroma"
SERVER_READY_S = 180.0
INDEX_WAIT_S = 600.0


# -- data ----------------------------------------------------------------------------------
def payload(i: int) -> Payload:
    """bench_faiss's payload plus the document's metadata: a team, a third of documents each."""
    return replace(payload_of(i), metadata=(("team", TEAMS[(i // 20 // 3) % 3]),))


@dataclass
class Data:
    data: np.ndarray
    queries: np.ndarray
    payloads: list[Payload]
    fresh: np.ndarray  # the replacement vectors
    _truth: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def truth(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact top-k of every query over the first ``n`` vectors: unfiltered, within the
        selective filter, within the broad filter."""
        if n not in self._truth:
            ids = np.arange(n, dtype=np.int64)
            sel = np.flatnonzero((ids // 20) % 1000 == 7)
            broad = np.flatnonzero((ids // 20 // 3) % 3 == 0)
            for flt, rows in ((SELECTIVE, sel), (BROAD, broad)):  # the rows are the filter's
                passing = [i for i in range(n) if flt.matches(self.payloads[i])]
                assert np.array_equal(np.asarray(passing, dtype=np.int64), rows)
            self._truth[n] = (exact_top(self.data[:n], self.queries, K),
                              exact_top(self.data[:n], self.queries, K, sel),
                              exact_top(self.data[:n], self.queries, K, broad))
        return self._truth[n]


def make_data(n: int, dim: int, nq: int) -> Data:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return Data(data=mixture(n, dim, centres, seed=1), queries=mixture(nq, dim, centres, seed=2),
                payloads=[payload(i) for i in range(n)],
                fresh=mixture(WRITES, dim, centres, seed=3))


# -- memory, from /proc ------------------------------------------------------------------------
def status_kb(pid: int | str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # state ppid pgrp ...
            pids.append(int(entry.name))
    return pids


def group_hwm_mb(pgid: int) -> float:
    """Sum of the peak RSS of every process in the group (an upper bound of the group's
    peak)."""
    return round(sum(status_kb(p, "VmHWM") for p in group_pids(pgid)) / 1024, 1)


def reset_own_peak() -> float:
    """Give freed memory back, reset this process's VmHWM; the RSS now, MB."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return round(status_kb("self", "VmRSS") / 1024, 1)


# -- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    logs: list[Path]
    start_s: float = 0.0

    def tail(self) -> str:
        return "\n".join(f"-- {p}:\n{p.read_text(errors='replace')[-2000:]}"
                         for p in self.logs if p.exists())

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after a grace period."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.2)  # reap the leader, or the group never empties
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
        log(f"server group {self.proc.pid} still alive after SIGKILL")


def start_chroma(base: Path) -> Server:
    if not CHROMA_BIN.exists():
        raise EngineUnavailable(f"no chroma CLI at {CHROMA_BIN}")
    port = free_port()
    (base / "data").mkdir(parents=True)
    logfile = base / "chroma.log"
    started = time.monotonic()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [str(CHROMA_BIN), "run", "--path", str(base / "data"), "--host", "127.0.0.1",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
    server = Server(proc, f"http://127.0.0.1:{port}", [logfile])
    import httpx
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chroma run exited with {proc.returncode}:\n{server.tail()}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/api/v2/heartbeat", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() - started > SERVER_READY_S:
                raise RuntimeError(f"chroma run not ready in {SERVER_READY_S} s")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    server.start_s = round(time.monotonic() - started, 2)
    return server


def start_milvus(base: Path) -> Server:
    """As tests/test_milvus_server.py does: free ports, the embedded etcd told its ports by
    a config file of its own, a process group of its own."""
    if not MILVUS_SERVER_BIN.exists():
        raise EngineUnavailable(f"no Milvus server at {MILVUS_SERVER_BIN} (pip install "
                                "milvus==2.3.5 into .venv-milvus-server)")
    from indexers.milvus_index import MilvusBackend
    base.mkdir(parents=True)
    port, etcd_client, etcd_peer = free_port(), free_port(), free_port()
    etcd_config = base / "etcd.yaml"
    etcd_config.write_text(
        "name: retriever-bench\n"
        f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-cluster: retriever-bench=http://127.0.0.1:{etcd_peer}\n")
    started = time.monotonic()
    with open(base / "server.log", "wb") as out:
        proc = subprocess.Popen(
            [str(MILVUS_SERVER_BIN), "--data", str(base / "data"), "--proxy-port", str(port),
             "--etcd-port", str(etcd_client)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)})
    server = Server(proc, f"http://127.0.0.1:{port}",
                    [base / "server.log", base / "data" / "logs" / "milvus-stderr.log"])
    try:
        while True:
            crashed = (server.logs[1].exists()
                       and "panic:" in server.logs[1].read_text(errors="replace"))
            if proc.poll() is not None or crashed:
                raise RuntimeError(f"milvus-server failed to start:\n{server.tail()}")
            probe = MilvusBackend(base, uri=server.url, timeout=2.0)
            try:
                probe.collections()
                break
            except EngineUnavailable:
                if time.monotonic() - started > SERVER_READY_S:
                    raise RuntimeError(f"milvus-server not ready in {SERVER_READY_S} s:\n"
                                       f"{server.tail()}") from None
                time.sleep(1)
            finally:
                probe.close()
    except BaseException:
        server.stop()
        raise
    server.start_s = round(time.monotonic() - started, 2)
    return server


@contextmanager
def engine(name: str, tmp: Path) -> Iterator[tuple[Any, Server | None]]:
    """The engine's backend (and its server), closed, stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    server: Server | None = None
    backend: Any = None
    try:
        if name == "faiss-flat":
            backend = create_backend("faiss", base, kind="flat")
        elif name == "faiss-hnsw":
            backend = create_backend("faiss", base, kind="hnsw", build_threads=2)
        elif name == "chroma":
            backend = create_backend("chroma", base)
        elif name == "chroma-server":
            server = start_chroma(base / "server")
            backend = create_backend("chroma", base, url=server.url)
        elif name == "milvus-server":
            server = start_milvus(base / "server")
            backend = create_backend("milvus", base, uri=server.url, timeout=120.0)
        elif name == "milvus-lite":
            backend = create_backend("milvus", base, timeout=120.0)
        else:
            raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")
        yield backend, server
    finally:
        try:
            if backend is not None:
                with suppress(Exception):
                    backend.close()
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(base, ignore_errors=True)


# -- waiting for the ANN index -------------------------------------------------------------------
def wait_indexed(name: str, backend: Any, index: Any, n: int,
                 wait_s: float = INDEX_WAIT_S) -> dict[str, Any]:
    """Block until the engine's approximate index covers every vector, or ``wait_s``
    passed; what was seen."""
    if name == "faiss-hnsw":
        ok = index.wait_idle(wait_s)
        return {"indexed": bool(ok), "kind": index.stats()["kind"]}
    if name == "milvus-lite":
        return wait_lite_indexed(backend, index, wait_s)
    if name != "milvus-server":
        return {}
    client = backend._connect()  # bench only: the index state is not part of the contract
    deadline = time.monotonic() + wait_s
    desc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        desc = client.describe_index(index.collection, "vector")
        if int(desc.get("indexed_rows", 0)) >= n and not int(desc.get("pending_index_rows", 0)):
            break
        time.sleep(0.5)
    segments: list[Any] = []
    while time.monotonic() < deadline:
        segments = client.list_loaded_segments(index.collection)
        rows = sum(s.num_rows for s in segments)
        if rows >= n and all(s.index_name or s.index_id for s in segments):
            break
        time.sleep(0.5)
    return {"indexed_rows": int(desc.get("indexed_rows", 0)),
            "loaded_segments": len(segments),
            "segments_with_index": sum(1 for s in segments if s.index_name or s.index_id),
            "segment_rows": [int(s.num_rows) for s in segments]}


def wait_lite_indexed(backend: Any, index: Any, wait_s: float = INDEX_WAIT_S
                      ) -> dict[str, Any]:
    """milvus-lite builds its segments' HNSW in a background thread after a flush (and
    searches unindexed segments by brute force meanwhile), and its describe_index says
    "finished" at once: wait on that thread, through the in-process engine (bench only)."""
    from milvus_lite.server_manager import server_manager_instance
    _server, db, _port = server_manager_instance._servers[str(backend._lite_path)]
    col = db.get_collection(index.collection)
    deadline = time.monotonic() + wait_s
    segments: list[tuple[int, bool]] = []
    while time.monotonic() < deadline:
        col._wait_for_bg(timeout=max(1.0, deadline - time.monotonic()))
        segments = [(int(s.num_rows), "vector" in s.indexes)
                    for s in col._segments_snapshot() if s.num_rows]
        if all(has for _, has in segments):
            break
        time.sleep(0.5)
    return {"segment_rows": [rows for rows, _ in segments],
            "segments_with_index": sum(1 for _, has in segments if has)}


# -- measuring ---------------------------------------------------------------------------------
def percentiles(times: list[float]) -> dict[str, float]:
    return {"p50_ms": ms(float(np.percentile(times, 50))),
            "p99_ms": ms(float(np.percentile(times, 99)))}


def one_client(index: VectorIndex, queries: np.ndarray,
               where: Filter | None) -> tuple[dict[str, float], list[np.ndarray]]:
    index.search(queries[:1], K, where=where)  # warm (and, on Milvus, the Strong read)
    times, got = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q[None, :], K, where=where)
        times.append(time.perf_counter() - t)
        got.append(hits[0].ids)
    return percentiles(times), got


def concurrent(index: VectorIndex, queries: np.ndarray, threads: int) -> dict[str, float]:
    """Every query once, from ``threads`` threads at once."""
    barrier = threading.Barrier(threads + 1)
    times: list[list[float]] = [[] for _ in range(threads)]

    def worker(t: int) -> None:
        barrier.wait()
        for q in queries[t::threads]:
            s = time.perf_counter()
            index.search(q[None, :], K)
            times[t].append(time.perf_counter() - s)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker, t) for t in range(threads)]
        barrier.wait()
        start = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - start
    res = percentiles([x for per in times for x in per])
    res["qps"] = round(len(queries) / wall, 1)
    return res


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# -- one engine --------------------------------------------------------------------------------
def run_engine(name: str, d: Data, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    lite = name == "milvus-lite"
    nq = min(len(d.queries), args.lite_queries if lite else args.queries)
    queries = d.queries[:nq]
    n = len(d.data)
    res: dict[str, Any] = {"engine": name, "queries": nq, "load_before": os.getloadavg()[0]}
    base_rss = reset_own_peak()
    res["rss_before_mb"] = base_rss
    t_all = time.perf_counter()
    with engine(name, tmp) as (backend, server):
        if server is not None:
            res["server_start_s"] = server.start_s
        index = backend.open(CollectionSpec("bench", d.data.shape[1], "cosine"))
        # -- build ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        built = 0
        mark: tuple[int, float] | None = None  # where the last fifth of the build began
        cap = args.lite_build_max_s if lite else 0.0
        if args.build_max_s:
            cap = min(cap, args.build_max_s) if cap else args.build_max_s
        while built < n:
            if mark is None and built >= 0.8 * n:
                mark = (built, time.perf_counter())
            hi = min(n, built + BATCH)
            index.upsert(np.arange(built, hi, dtype=np.int64), d.data[built:hi],
                         d.payloads[built:hi])
            built = hi
            if built % 20_000 == 0:
                log(f"{name}: {built:,} upserted, {time.perf_counter() - t0:.0f} s")
            if cap and time.perf_counter() - t0 > cap and built < n:
                log(f"{name}: stopping the build at {built:,} (over {cap:.0f} s)")
                break
        res["n"] = built
        res["truncated"] = built < n
        res["build_max_s"] = cap
        res["upsert_s"] = round(time.perf_counter() - t0, 2)
        if mark is not None and built > mark[0]:  # upserts only: the rate the build ended at
            res["upsert_rate_last_fifth_vps"] = round(
                (built - mark[0]) / (time.perf_counter() - mark[1]), 1)
        res["flush_s"] = round(timed(index.flush)[0], 2)
        wait_s = INDEX_WAIT_S
        if cap:  # what is left of the cap (at least a minute, to see how far it got)
            wait_s = max(60.0, cap - (time.perf_counter() - t0))
        t_ix, res["index_state"] = timed(
            lambda: wait_indexed(name, backend, index, built, wait_s))
        res["index_wait_s"] = round(t_ix, 2)
        res["build_s"] = round(res["upsert_s"] + res["flush_s"] + res["index_wait_s"], 2)
        res["over_cap"] = bool(cap) and (res["truncated"] or res["build_s"] > cap)
        res["build_rate_vps"] = round(built / res["build_s"], 1)
        res["count"] = index.count()
        log(f"{name}: built {built:,} in {res['build_s']} s (upsert {res['upsert_s']}, flush "
            f"{res['flush_s']}, index wait {res['index_wait_s']}); count {res['count']:,}")
        truth, truth_sel, truth_broad = d.truth(built)
        # -- search --------------------------------------------------------------------------
        res["search"], got = one_client(index, queries, None)
        res["recall"] = recall(got, truth[:nq])
        res["search_8"] = concurrent(index, queries, THREADS)
        log(f"{name}: search {res['search']}, recall {res['recall']:.3f}, "
            f"8 threads {res['search_8']}")
        for key, flt, want in (("selective", SELECTIVE, truth_sel),
                               ("broad", BROAD, truth_broad)):
            res[key], got = one_client(index, queries, flt)
            res[key]["recall"] = recall(got, want[:nq])
            res[key]["short"] = sum(1 for g in got if len(g) < K)  # queries with < k hits
            log(f"{name}: {key} {res[key]}")
        # -- writes --------------------------------------------------------------------------
        perm = np.random.default_rng(4).permutation(built)
        gone, repl = perm[:WRITES].astype(np.int64), perm[WRITES : 2 * WRITES].astype(np.int64)
        t, removed = timed(lambda: index.delete(gone.tolist()))
        res["delete"] = {"s": round(t, 3), "vps": round(WRITES / t, 1), "removed": removed}
        t, _ = timed(lambda: index.upsert(repl, d.fresh, [d.payloads[int(i)] for i in repl]))
        res["replace"] = {"s": round(t, 3), "vps": round(WRITES / t, 1)}
        res["flush_after_writes_s"] = round(timed(index.flush)[0], 2)
        res["count_after_writes"] = index.count()
        top1 = [int(h.ids[0]) if len(h.ids) else -1 for h in index.search(d.fresh[:20], 1)]
        res["replaced_found_top1"] = sum(a == b for a, b in zip(top1, repl[:20], strict=True))
        deleted_hit = {int(i) for h in index.search(d.data[gone[:20]], K) for i in h.ids}
        res["deleted_returned"] = len(deleted_hit & set(gone.tolist()))
        log(f"{name}: delete {res['delete']}, replace {res['replace']}, count "
            f"{res['count_after_writes']:,}")
        # -- memory --------------------------------------------------------------------------
        res["rss_peak_mb"] = round(status_kb("self", "VmHWM") / 1024, 1)
        res["rss_peak_delta_mb"] = round(res["rss_peak_mb"] - base_rss, 1)
        if server is not None:
            res["server_pids"] = group_pids(server.proc.pid)
            res["server_peak_mb"] = group_hwm_mb(server.proc.pid)
            if name == "milvus-server":
                res["server_version"] = backend._connect().get_server_version()
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    res["load_after"] = os.getloadavg()[0]
    log(f"{name}: done in {res['total_s']} s; peak RSS {res['rss_peak_mb']} MB "
        f"(+{res['rss_peak_delta_mb']}), server {res.get('server_peak_mb', '-')} MB")
    return res


# -- report ------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"faiss": faiss.__version__, "numpy": np.__version__}
    for pkg in ("chromadb", "pymilvus", "milvus-lite"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    py = ROOT / ".venv-milvus-server" / "bin" / "python"
    if py.exists():
        with suppress(subprocess.SubprocessError, OSError):
            out["milvus (server package)"] = subprocess.run(
                [str(py), "-c", "import importlib.metadata as m; print(m.version('milvus'))"],
                capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    return out


def jsonable(o: Any) -> Any:
    return o.item() if isinstance(o, np.generic) else str(o)


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| engine | n | build s (vectors/s) | peak RSS MB: bench process (+Δ) / server "
            "| search p50 / p99 ms, 1 client | 8 threads: p50 / p99 ms, queries/s "
            "| recall@10 | selective 0.1 %: p50 ms (recall) | broad 33 %: p50 ms (recall) "
            "| delete 1,000 vectors/s | replace 1,000 vectors/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['engine']} | failed: {r['error'][:200]} |" + " |" * 9)
            continue
        server = f" / {r['server_peak_mb']:,.0f}" if "server_peak_mb" in r else ""
        s, c, sel, br = r["search"], r["search_8"], r["selective"], r["broad"]
        n = f"{r['n']:,}" + (" (cut)" if r["truncated"] else
                             " (over the cap)" if r.get("over_cap") else "")
        rows.append(
            f"| {r['engine']} | {n} | {r['build_s']} ({r['build_rate_vps']:,.0f}) "
            f"| {r['rss_peak_mb']:,.0f} (+{r['rss_peak_delta_mb']:,.0f}){server} "
            f"| {s['p50_ms']} / {s['p99_ms']} | {c['p50_ms']} / {c['p99_ms']}, {c['qps']:,} "
            f"| {r['recall']:.3f} | {sel['p50_ms']} ({sel['recall']:.3f}) "
            f"| {br['p50_ms']} ({br['recall']:.3f}) | {r['delete']['vps']:,.0f} "
            f"| {r['replace']['vps']:,.0f} |")
    return "\n".join(rows)


def details(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"- **{r['engine']}** failed: {r['error']}")
            continue
        parts = [f"upsert {r['upsert_s']} s, flush {r['flush_s']} s, index wait "
                 f"{r['index_wait_s']} s"]
        if "server_start_s" in r:
            parts.append(f"server ready {r['server_start_s']} s after spawn")
        if r.get("index_state"):
            parts.append(f"index state {json.dumps(r['index_state'])}")
        parts.append(f"{r['queries']} queries per mode")
        parts.append(f"p99 selective {r['selective']['p99_ms']} ms, broad "
                     f"{r['broad']['p99_ms']} ms; filtered queries with < k hits: "
                     f"{r['selective']['short']} / {r['broad']['short']}")
        parts.append(f"delete {r['delete']['s']} s (removed {r['delete']['removed']}), replace "
                     f"{r['replace']['s']} s, flush after {r['flush_after_writes_s']} s; count "
                     f"after {r['count_after_writes']:,}; replaced vectors found top-1 "
                     f"{r['replaced_found_top1']}/20, deleted ids returned "
                     f"{r['deleted_returned']}")
        if r.get("over_cap"):
            parts.append(f"**did not finish within {r['build_max_s']:.0f} s**: "
                         f"{r['n']:,} vectors upserted, flushed and waited on in "
                         f"{r['build_s']} s (the rest of this row is on those)")
        if r["engine"] in ("chroma", "chroma-server", "milvus-server", "milvus-lite") and (
                r["n"] < 1_000_000):
            parts.append(one_million(r))
        parts.append(f"load average {r['load_before']:.1f} → {r['load_after']:.1f}; turn "
                     f"{r['total_s']} s")
        lines.append(f"- **{r['engine']}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def one_million(r: dict[str, Any]) -> str:
    """A lower bound of the build time of 1M vectors: the upserts at the rate the build
    ended at (upserts slow down as an HNSW graph grows), flush and index wait scaled
    linearly."""
    rate = r.get("upsert_rate_last_fifth_vps") or r["n"] / max(r["upsert_s"], 1e-9)
    scale = 1_000_000 / r["n"]
    est = 1_000_000 / rate + (r["flush_s"] + r["index_wait_s"]) * scale
    return (f"1M build estimate ≥ {est / 60:.0f} min (upserts at {rate:,.0f} vectors/s, the "
            f"rate {'over the last fifth' if 'upsert_rate_last_fifth_vps' in r else 'overall'}"
            f", plus flush and index wait × {scale:.0f})")


def render(report: dict[str, Any]) -> str:
    results = report["results"]
    return (f"# Vector engines through the VectorIndex contract ({report['started']})\n\n"
            f"{cpu_line(report['cpu'])}; "
            + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
            + f". {report['n']:,} vectors, {report['dim']}-d cosine, k={report['k']}, "
            f"{report['threads']} threads for the concurrent searches; the whole run took "
            f"{report['wall_s']} s. The machine was shared with other jobs while this ran "
            "(load averages below): absolute figures are noisy, ratios within this run (same "
            "process, same data) hold. Data: bench_faiss.py's Gaussian mixture (1,000 "
            "centres), not real embeddings. Produced by `python bench/bench_engines.py`.\n\n"
            f"{table(results)}\n\n{details(results)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--lite-queries", type=int, default=30)
    ap.add_argument("--lite-build-max-s", type=float, default=600.0)
    ap.add_argument("--build-max-s", type=float, default=0.0,
                    help="bound on every engine's build (upserts + flush + index wait); "
                         "0: none")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/engines.md")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only write --out (Markdown) again from a run's JSON")
    args = ap.parse_args()
    if args.render:
        md = render(json.loads(args.render.read_text()))
        args.out.write_text(md)
        print(md)
        return
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in names:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; one of {', '.join(ENGINES)}")
    faiss.omp_set_num_threads(1)
    machine = cpu()
    started = datetime.now(UTC)
    t_run = time.perf_counter()
    log(f"data: {args.n:,} x {args.dim}")
    d = make_data(args.n, args.dim, max(args.queries, args.lite_queries))
    d.truth(args.n)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for name in names:
            log(f"== {name}")
            try:
                results.append(run_engine(name, d, args, Path(tmp)))
            except Exception as exc:  # one engine failing still reports the others
                log(f"{name}: failed: {exc!r}")
                results.append({"engine": name, "error": repr(exc)})
    wall = round(time.perf_counter() - t_run, 1)
    vers = versions()
    server_version = next((r["server_version"] for r in results if "server_version" in r), "")
    if server_version:
        vers["milvus server (reported)"] = server_version
    report = {"started": started.isoformat(timespec="seconds"), "cpu": machine,
              "versions": vers, "n": args.n, "dim": args.dim, "k": K, "threads": THREADS,
              "wall_s": wall, "results": results}
    md = render(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=jsonable)
                                            + "\n")
    print(md)


if __name__ == "__main__":
    main()
