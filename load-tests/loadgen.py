"""Load generator for retriever.v1, on the project's own async client, with a report.

    .venv/bin/python load-tests/loadgen.py --spawn                 # quick report, ~5 min
    .venv/bin/python load-tests/loadgen.py --spawn --soak 600      # plus a 10 minute soak
    .venv/bin/python load-tests/loadgen.py --address HOST:PORT --server-pid PID

Phases (see load-tests/README.md for what each figure means):

1. corpus: the project's own source tree (``retriever/ indexers/ tests/ bench/ README.md``),
   or ``--corpus DIR`` (the files ``retriever index DIR`` would send), or a BEIR directory
   (``corpus.jsonl`` + ``queries.jsonl``, e.g. SciFact). Indexed once; queries are the prose
   lines of the corpus (comments, docstrings, Markdown), or the BEIR queries;
2. idle: each request class alone, sequentially (Search: ``--idle-requests`` of them);
3. closed loop: ``--closed`` levels of concurrency, each worker sending the mix back to back;
4. open loop: Poisson arrivals at ``--rates`` (req/s; ``auto``: fractions of the best closed
   loop goodput, up to twice it), latency counted from each request's scheduled arrival;
   the saturation point is the highest offered rate served in full (goodput >= 95 % of it,
   at most 1 % of it refused with RESOURCE_EXHAUSTED, no other error): a server that sheds
   load is telling us it is full, so a step it sheds in is not one it serves; ``--refine``
   more steps bisect the gap between the last rate served and the next one;
5. target: open loop at ``--target-fraction`` (80 %) of saturation, checked against the goals;
6. soak (``--soak SECONDS``): the target load for that long, the server's RSS and open file
   descriptors sampled every ``--sample-interval`` seconds.

The mix (``--mix``): Search (top 10), BatchSearch of 4 queries, UpsertDocuments of 1-10 small
documents (each a fresh revision of one of ``--upsert-pool`` documents, so the corpus does
not grow), GetChunk of a chunk id seen in earlier results. No retries: every refusal counts.

Callers (``--callers N``): the requests come from N clients, each on a channel of its own and
named by the ``x-retriever-caller`` header, each request from one picked at random: the
agents and indexing jobs of a deployment, not one program. A spawned server counts upsert
streams per that header (``RETRIEVER_UPSERT_PEER_HEADER``), so its per-client cap on open
upsert streams applies per caller as it would per agent; against ``--address`` set it there.

Writes ``<out-dir>/<name>.md``, ``.png`` and ``.json``. Goals are judged on the measured
figures and printed as PASS/FAIL; the exit status is 0 whatever they say (1 on a failure to
run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from retriever.aio_client import NO_RETRY, AsyncRetrieverClient, RetryPolicy, pb
from retriever.ingest.walk import WalkReport, read_sources

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOTS = ("retriever/", "indexers/", "tests/", "bench/", "README.md")
CLASSES = ("search", "batch_search", "upsert", "get_chunk")
RE = "RESOURCE_EXHAUSTED"
TOP_K = 10
BATCH_QUERIES = 4
UPSERT_PREFIX = "loadgen/"
CALLER_HEADER = "x-retriever-caller"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")

# Goals of the reliability issue, at the target load.
GOAL_SEARCH_P99_VS_IDLE = 3.0
GOAL_UPSERT_MAX_S = 2.0
GOAL_UPSERT_MAX_DOCS = 10
GOAL_RSS_GROWTH = 0.05
# Beyond saturation: a refusal is quick, and latency does not keep growing within a step.
GOAL_SHED_P99_S = 0.1
GOAL_OVERLOAD_GROWTH = 2.0
# A rate is "served in full" when goodput reaches this share of it.
SUSTAINED_SHARE = 0.95
REFUSED_SHARE = 0.01  # a step whose refusals exceed this share of its offered load is not served


# -- corpus --------------------------------------------------------------------------------
@dataclass
class Corpus:
    source: str
    docs: list[pb.Document]
    queries: list[str]
    bytes: int
    skipped: dict[str, int] = field(default_factory=dict)


_NOT_PROSE = re.compile(r"[=(){}\[\]<>_|\\$@;`*\"]|->|::|://|\.\w+\(")
# Lines of code that read like words ("for d in documents", "if value is None").
_CODE_START = re.compile(r"(from|import|for|if|elif|else|while|return|def|class|with|assert|"
                         r"raise|yield|async|await|try|except|lambda|not|del|pass|global)\b")


def prose_lines(text: str) -> Iterator[str]:
    """Lines of ``text`` that read as a short natural-language phrase (comments, docstrings,
    Markdown prose): what a person or an agent would type as a query."""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#/*-\"'>|! ").strip().rstrip(".:,;")
        words = line.split()
        if not 4 <= len(words) <= 14 or _NOT_PROSE.search(line) or _CODE_START.match(line):
            continue
        letters = sum(c.isalpha() or c == " " for c in line)
        if letters / len(line) >= 0.9 and line[0].isalpha():
            yield line


def load_corpus(corpus: Path | None, max_files: int | None, rng: random.Random,
                max_queries: int = 500) -> Corpus:
    if corpus is not None and (corpus / "corpus.jsonl").is_file():
        return _load_beir(corpus, max_files, rng, max_queries)
    root = corpus or REPO
    report = WalkReport()
    files = [f for f in read_sources(root, 1024 * 1024, report)
             if corpus is not None or f.rel_path.startswith(DEFAULT_ROOTS)]
    files.sort(key=lambda f: f.rel_path)
    if max_files:
        files = files[:max_files]
    if not files:
        raise SystemExit(f"no text files to index under {root}")
    docs = [pb.Document(doc_id=f.rel_path, path=f.rel_path, content=f.content,
                        revision=f.revision) for f in files]
    queries = sorted({q for f in files for q in prose_lines(f.content)})
    rng.shuffle(queries)
    source = str(corpus) if corpus else " ".join(DEFAULT_ROOTS) + " of this repository"
    return Corpus(source, docs, queries[:max_queries] or ["where is the configuration read"],
                  sum(len(f.content.encode()) for f in files),
                  {k: len(v) for k, v in report.skipped.items()})


def _load_beir(root: Path, max_files: int | None, rng: random.Random,
               max_queries: int) -> Corpus:
    docs = []
    with (root / "corpus.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = f"{row.get('title', '')}\n\n{row['text']}".strip()
            docs.append(pb.Document(doc_id=str(row["_id"]), path=f"{row['_id']}.txt",
                                    content=text))
            if max_files and len(docs) >= max_files:
                break
    queries = []
    if (root / "queries.jsonl").is_file():
        with (root / "queries.jsonl").open(encoding="utf-8") as fh:
            queries = [json.loads(line)["text"] for line in fh]
    rng.shuffle(queries)
    return Corpus(str(root), docs, queries[:max_queries] or ["what causes the disease"],
                  sum(len(d.content.encode()) for d in docs))


# -- the server ----------------------------------------------------------------------------
class SpawnedServer:
    """``retriever serve`` in its own process on free ports and a temporary data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.log = data_dir.parent / "server.log"

    async def start(self, timeout: float = 300) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", **self.env}
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "retriever.cli", "serve", "--port", "0",
                "--metrics-port", "0", "--data-dir", str(self.data_dir),
                "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE, stderr=log, env=env)
        assert self.proc.stdout is not None
        try:
            while True:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
                if not line:
                    raise RuntimeError("the server exited before serving:\n"
                                       + self.log.read_text(errors="replace")[-3000:])
                with contextlib.suppress(ValueError):
                    info = json.loads(line)
                    if info.get("event") == "serving":
                        self.info = info
                        return
        except TimeoutError as exc:
            raise RuntimeError(f"the server did not serve within {timeout}s") from exc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


def proc_sample(pid: int) -> dict[str, float] | None:
    """RSS (bytes), open file descriptors, threads and CPU seconds of process ``pid``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    hz = os.sysconf("SC_CLK_TCK")
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "fds": fds,
            "threads": int(fields["Threads"]), "cpu_s": (int(stat[11]) + int(stat[12])) / hz}


class Sampler:
    """Samples the server process every ``interval`` seconds, tagged with the phase."""

    def __init__(self, pid: int | None, interval: float, t0: float) -> None:
        self.pid = pid
        self.interval = interval
        self.t0 = t0
        self.phase = "setup"
        self.samples: list[dict[str, Any]] = []

    def take(self) -> dict[str, float] | None:
        if self.pid is None:
            return None
        s = proc_sample(self.pid)
        if s is not None:
            self.samples.append({"t": time.monotonic() - self.t0, "phase": self.phase, **s})
        return s

    async def run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(self.interval)


def scrape(metrics_address: str | None) -> dict[tuple[str, tuple], float]:
    """The server's Prometheus samples (empty when unknown or unreachable)."""
    if not metrics_address:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def server_delta(before: dict, after: dict) -> dict[str, Any]:
    """Requests by rpc and code, and mean model wait by class, between two scrapes."""
    if not after:
        return {}
    codes: dict[str, dict[str, int]] = {}
    sums: dict[str, dict[str, dict[str, float]]] = {"model_wait": {}, "stages": {}}
    for (name, labels), value in after.items():
        d = value - before.get((name, labels), 0.0)
        lab = dict(labels)
        if name == "retriever_requests_total" and d:
            codes.setdefault(lab["rpc"], {})[lab["code"]] = int(d)
            continue
        for prefix, kind, label in (("retriever_model_wait_seconds_", "model_wait", "class"),
                                    ("retriever_stage_duration_seconds_", "stages", "stage")):
            if name.startswith(prefix) and name[-4:] in ("_sum", "ount"):
                key = "sum" if name.endswith("_sum") else "count"
                sums[kind].setdefault(lab.get(label, "?"), {})[key] = d
    out: dict[str, Any] = {"requests": codes, "loop_lag": loop_lag(before, after),
                           "refusal": histogram_delta(before, after,
                                                      "retriever_refusal_duration_seconds"),
                           "gc_full": full_gcs(before, after)}
    for kind, by in sums.items():
        out[kind] = {c: {"count": int(w.get("count", 0)),
                         "mean_s": w.get("sum", 0.0) / w["count"] if w.get("count") else 0.0}
                     for c, w in by.items() if w.get("count")}
    return out


def full_gcs(before: dict, after: dict) -> dict[str, Any] | None:
    """The server's full garbage collections between two scrapes (each stops every thread
    of the server): count, mean and the bucket bound of the longest; ``{"count": 0}`` when
    none; None when the server does not export ``retriever_gc_pause_seconds``."""
    name = "retriever_gc_pause_seconds"
    if not any(n == f"{name}_count" for n, _ in after):
        return None
    return histogram_delta(before, after, name, 1.0, {"generation": "2"}) or {"count": 0}


def loop_lag(before: dict, after: dict, q: float = 0.99) -> dict[str, float] | None:
    """The server's event-loop lag between two scrapes (``retriever_event_loop_lag_seconds``,
    sampled every 100 ms): see histogram_delta."""
    return histogram_delta(before, after, "retriever_event_loop_lag_seconds", q)


def histogram_delta(before: dict, after: dict, name: str, q: float = 0.99,
                    where: dict[str, str] | None = None) -> dict[str, float] | None:
    """Histogram ``name`` between two scrapes, its series (labels) summed (only those with
    the labels in ``where``, when given): count, mean, and the bucket bound its ``q``
    quantile falls under (None when past the last bucket); None when nothing was observed."""
    wanted = set((where or {}).items())

    def total(suffix: str) -> float:
        return sum(v - before.get((n, lab), 0.0) for (n, lab), v in after.items()
                   if n == f"{name}_{suffix}" and wanted <= set(lab))

    by_bound: dict[float, float] = {}
    for (n, lab), v in after.items():
        if n == f"{name}_bucket" and wanted <= set(lab):
            le = float(dict(lab)["le"])
            by_bound[le] = by_bound.get(le, 0.0) + v - before.get((n, lab), 0.0)
    buckets = sorted(by_bound.items())
    count = total("count")
    if not buckets or count <= 0:
        return None
    total_s = total("sum")
    bound = next(le for le, cum in buckets if cum >= q * count)
    return {"count": int(count), "mean_s": total_s / count,
            "p99_le_s": None if math.isinf(bound) else bound}


# -- the workload --------------------------------------------------------------------------
@dataclass(slots=True)
class Rec:
    cls: str
    start: float  # loop time the request was due (open loop) or sent (closed loop)
    end: float
    code: str
    docs: int = 0
    # A Search's server-side stage times (StageTimings, seconds), to see where a tail goes.
    stages: dict[str, float] | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


class Workload:
    """Issues one request of a class and says how it ended."""

    def __init__(self, clients: list[AsyncRetrieverClient], namespace: str, corpus: Corpus,
                 mix: dict[str, float], rng: random.Random, upsert_pool: int) -> None:
        """``clients``: the callers; each request comes from one picked at random."""
        self.clients = clients
        self.ns = namespace
        self.queries = corpus.queries
        self.rng = rng
        self.classes = [c for c in CLASSES if mix.get(c, 0) > 0]
        total = sum(mix[c] for c in self.classes)
        self.cum = list(np.cumsum([mix[c] / total for c in self.classes]))
        self.chunk_ids: deque[str] = deque(maxlen=2000)
        self.snippets = _snippets(corpus.docs, rng)
        self.free_slots = list(range(upsert_pool))
        self.revision = 0
        self.messages: dict[tuple[str, str], str] = {}

    def pick(self) -> str:
        x = self.rng.random()
        for c, edge in zip(self.classes, self.cum, strict=True):
            if x < edge:
                return c
        return self.classes[-1]

    def _remember(self, resp: pb.SearchResponse) -> None:
        for h in resp.hits:
            if not h.chunk.doc_id.startswith(UPSERT_PREFIX):  # those get replaced
                self.chunk_ids.append(h.chunk.chunk_id)

    async def issue(self, cls: str, start: float) -> Rec:
        loop = asyncio.get_running_loop()
        docs = 0
        slots: list[int] = []
        stages: dict[str, float] | None = None
        client = self.rng.choice(self.clients)
        try:
            if cls == "search":
                resp = await client.search(self.ns, self.rng.choice(self.queries),
                                           top_k=TOP_K)
                self._remember(resp)
                stages = _stages(resp.timings)
            elif cls == "batch_search":
                resp = await client.batch_search(
                    [pb.SearchRequest(namespace=self.ns, query=q, top_k=TOP_K)
                     for q in self.rng.sample(self.queries, min(BATCH_QUERIES,
                                                                len(self.queries)))])
                for r in resp.responses:
                    self._remember(r)
            elif cls == "get_chunk":
                if not self.chunk_ids:
                    raise LookupError("no chunk id seen yet")
                await client.get_chunk(self.ns, self.rng.choice(self.chunk_ids))
            else:
                n = self.rng.randint(1, GOAL_UPSERT_MAX_DOCS)
                self.rng.shuffle(self.free_slots)
                slots = self.free_slots[-n:]
                del self.free_slots[-len(slots):]
                docs = len(slots)
                if not docs:
                    raise LookupError("every upsert document is in flight")
                up = await client.upsert(self.ns, [self._doc(s) for s in slots])
                stages = _upsert_stages(up)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            self.messages.setdefault((cls, code), (exc.details() or "")[:300])
        except Exception as exc:  # a client-side failure: counted, never fatal
            code = f"CLIENT_{type(exc).__name__}"
            self.messages.setdefault((cls, code), str(exc)[:300])
        finally:
            self.free_slots.extend(slots)
        return Rec(cls, start, loop.time(), code, docs, stages)

    def _doc(self, slot: int) -> pb.Document:
        self.revision += 1
        path, text = self.rng.choice(self.snippets)
        # One id per slot, so upserts replace documents; the path (whose extension picks the
        # chunker) is that of the file the text came from.
        doc_id = f"{UPSERT_PREFIX}{slot:03d}"
        return pb.Document(doc_id=doc_id, path=f"{doc_id}/{Path(path).name}",
                           revision=f"r{self.revision}",
                           content=f"{text}\n\n(load generator revision {self.revision})\n")


STAGES = ("embed", "ann", "lexical", "fuse", "fetch", "total")
# UpsertTimings, and the response's elapsed as the upsert's server total.
UPSERT_STAGES = tuple(f.name for f in pb.UpsertTimings.DESCRIPTOR.fields)


def _stages(t: pb.StageTimings) -> dict[str, float]:
    return {s: getattr(t, s).ToTimedelta().total_seconds() for s in STAGES if t.HasField(s)}


def _upsert_stages(resp: pb.UpsertDocumentsResponse) -> dict[str, float]:
    t = resp.timings
    out = {s: getattr(t, s).ToTimedelta().total_seconds() for s in UPSERT_STAGES}
    out["total"] = resp.elapsed.ToTimedelta().total_seconds()
    return out


def class_tail(recs: list[Rec], cls: str, stages: tuple[str, ...], share: float,
               least: int = 20) -> dict[str, Any] | None:
    """Where the slowest ``share`` of OK requests of ``cls`` spent their time, next to all
    of them: the mean of each server stage, and of what is outside the server's own total
    (the wait for a gRPC worker and the event loop, the transport, and the client)."""
    done = [r for r in recs if r.cls == cls and r.code == "OK" and r.stages]
    if len(done) < least:
        return None
    done.sort(key=lambda r: r.latency)
    tail = done[-max(1, round(len(done) * share)):]

    def means(rs: list[Rec]) -> dict[str, float]:
        out = {s: float(np.mean([r.stages.get(s, 0.0) for r in rs if r.stages]))
               for s in stages}
        out["outside"] = float(np.mean([r.latency - (r.stages or {}).get("total", 0.0)
                                        for r in rs]))
        out["latency"] = float(np.mean([r.latency for r in rs]))
        return out

    return {"share": share, "all": {"count": len(done), **means(done)},
            "tail": {"count": len(tail), **means(tail)}}


def search_tail(recs: list[Rec], share: float = 0.01) -> dict[str, Any] | None:
    """class_tail of the searches (StageTimings)."""
    return class_tail(recs, "search", STAGES, share)


def upsert_tail(recs: list[Rec], share: float = 0.1) -> dict[str, Any] | None:
    """class_tail of the upserts (UpsertTimings; fewer requests, so the slowest 10 %)."""
    return class_tail(recs, "upsert", (*UPSERT_STAGES, "total"), share, least=10)


def _snippets(docs: list[pb.Document], rng: random.Random, n: int = 400,
              max_chars: int = 800) -> list[tuple[str, str]]:
    """Small documents (one chunk each, at most ``max_chars``) cut from the corpus."""
    out = []
    for _ in range(n):
        d = rng.choice(docs)
        lines = d.content.splitlines() or [d.content]
        i = rng.randrange(len(lines))
        text = "\n".join(lines[i:i + rng.randint(5, 25)])[:max_chars].strip()
        out.append((d.path or d.doc_id, text or d.content[:max_chars] or "empty"))
    return out


# -- runners -------------------------------------------------------------------------------
async def run_closed(wl: Workload, concurrency: int, warmup: float, seconds: float
                     ) -> tuple[list[Rec], float]:
    """``concurrency`` workers, each sending its next request when the last one ends. Counts
    requests that end inside the measured window."""
    loop = asyncio.get_running_loop()
    t_measure = loop.time() + warmup
    t_end = t_measure + seconds
    recs: list[Rec] = []

    async def worker() -> None:
        while loop.time() < t_end:
            rec = await wl.issue(wl.pick(), loop.time())
            if t_measure <= rec.end < t_end:
                recs.append(rec)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return recs, seconds


async def run_open(wl: Workload, rate: float, warmup: float, seconds: float,
                   rng: random.Random, recs: list[Rec] | None = None,
                   max_outstanding: int = 5000) -> tuple[list[Rec], float, dict[str, float]]:
    """Poisson arrivals at ``rate``/s, each request sent at its due time whatever the ones
    before it are doing. Counts requests due inside the measured window (appended to
    ``recs`` as they end); latency runs from the due time, so a late send counts against
    the service, not for it."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    t_measure, t_end = t0 + warmup, t0 + warmup + seconds
    recs = [] if recs is None else recs
    tasks: set[asyncio.Task[Rec]] = set()
    lags: list[float] = []
    overflow = 0
    due = t0

    def done(task: asyncio.Task[Rec]) -> None:
        tasks.discard(task)
        rec = task.result()
        if rec.start >= t_measure:
            recs.append(rec)

    while True:
        due += rng.expovariate(rate)
        if due >= t_end:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if due >= t_measure:
            lags.append(loop.time() - due)
        if len(tasks) >= max_outstanding:
            overflow += 1
            continue
        task = asyncio.create_task(wl.issue(wl.pick(), due))
        tasks.add(task)
        task.add_done_callback(done)
    if tasks:
        await asyncio.wait(set(tasks))
    lag = np.asarray(lags) if lags else np.zeros(1)
    return recs, seconds, {"lag_p99_s": float(np.percentile(lag, 99)),
                           "lag_max_s": float(lag.max()), "client_overflow": overflow,
                           "t_measure": t_measure}


def pct(values: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    if not a.size:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(a.max()), "mean": float(a.mean())}


def summarize(recs: list[Rec], seconds: float) -> dict[str, Any]:
    ok = [r for r in recs if r.code == "OK"]
    shed = [r for r in recs if r.code == RE]
    classes = {}
    for c in CLASSES:
        mine = [r for r in recs if r.cls == c]
        if not mine:
            continue
        classes[c] = {"requests": len(mine), "codes": dict(Counter(r.code for r in mine)),
                      "latency_s": pct([r.latency for r in mine if r.code == "OK"]),
                      "refused_latency_s": pct([r.latency for r in mine if r.code == RE])}
        if c == "upsert":
            classes[c]["docs_max"] = max(r.docs for r in mine)
    # Does latency keep growing within the step? Search p99 of each half of the window.
    search = sorted((r for r in ok if r.cls == "search"), key=lambda r: r.start)
    halves = [search[: len(search) // 2], search[len(search) // 2:]]
    return {
        "seconds": seconds, "requests": len(recs),
        "throughput_rps": len(recs) / seconds, "goodput_rps": len(ok) / seconds,
        "shed_rps": len(shed) / seconds,
        "codes": dict(Counter(r.code for r in recs)),
        "latency_s": pct([r.latency for r in ok]),
        "shed_latency_s": pct([r.latency for r in shed]),
        "search_p99_halves_s": [pct([r.latency for r in h]).get("p99") for h in halves],
        "classes": classes,
        "search_tail": search_tail(recs),
        "upsert_tail": upsert_tail(recs),
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """Over a phase: wall time, and CPU (in cores) of this process (the load generator) and
    of the whole machine."""

    def __enter__(self) -> CpuClock:
        self.t, self.cpu, self.busy = time.monotonic(), time.process_time(), machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = max(1e-9, time.monotonic() - self.t)
        self.share = (time.process_time() - self.cpu) / self.wall
        self.machine = (machine_busy_s() - self.busy) / self.wall


# -- environment ---------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    cpu, flags = platform.processor(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    git = ["git", "-C", str(REPO)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "retriever", "indexers"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "", []
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": commit,
            "uncommitted_service_files": [d[3:] for d in dirty],
            "cpu": cpu, "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__}


# -- the run -------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    wl: Workload
    sampler: Sampler
    metrics_address: str | None
    say: Callable[[str], None]
    steps: list[dict[str, Any]] = field(default_factory=list)

    async def step(self, kind: str, level: float, seconds: float, warmup: float,
                   rng: random.Random, window: float = 0.0) -> dict[str, Any]:
        """One measured step; ``window`` > 0 also summarizes each ``window`` seconds of it
        (by due time) and prints progress that often."""
        self.sampler.phase = kind
        before, s0 = scrape(self.metrics_address), self.sampler.take()
        recs: list[Rec] = []
        progress = asyncio.create_task(self._progress(recs, window)) if window else None
        with CpuClock() as cpu:
            if kind == "closed":
                recs, secs = await run_closed(self.wl, int(level), warmup, seconds)
                extra: dict[str, float] = {}
                offered = None
            else:
                recs, secs, extra = await run_open(self.wl, level, warmup, seconds, rng, recs)
                offered = (len(recs) + extra["client_overflow"]) / secs
        if progress is not None:
            progress.cancel()
        t_measure = extra.pop("t_measure", 0.0)
        s1 = self.sampler.take()
        out = {"kind": kind, "level": level, "offered_rps": offered,
               **summarize(recs, secs), **extra, "client_cpu_share": cpu.share,
               "server": server_delta(before, scrape(self.metrics_address))}
        if window:
            out["windows"] = []
            for i in range(math.ceil(seconds / window)):
                lo = t_measure + i * window
                w = min(window, seconds - i * window)
                mine = [r for r in recs if lo <= r.start < lo + w]
                out["windows"].append({"end_s": i * window + w, **summarize(mine, w)})
        if s0 and s1:
            out["server_cpu_share"] = (s1["cpu_s"] - s0["cpu_s"]) / cpu.wall
            # CPU that neither the server nor the generator used: other processes, whose
            # work competes with the service's and makes its figures worse than its own.
            out["foreign_cpu_share"] = max(
                0.0, cpu.machine - out["server_cpu_share"] - cpu.share)
        if kind in ("closed", "open"):
            self.steps.append(out)
        await asyncio.sleep(self.args.cooldown)
        return out

    async def _progress(self, recs: list[Rec], every: float) -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(every)
            last = self.sampler.samples[-1] if self.sampler.samples else None
            self.say(f"  +{time.monotonic() - t0:>5.0f} s: {len(recs)} requests, "
                     + _codes(Counter(r.code for r in recs))
                     + (f"; server RSS {last['rss_bytes'] / 2**20:.0f} MiB, fds {last['fds']}"
                        if last else ""))


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in CLASSES:
            raise argparse.ArgumentTypeError(f"unknown class {name!r}: one of {CLASSES}")
        mix[name.strip()] = float(weight)
    return mix


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least 1")
    return n


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


async def idle_phase(run: Run) -> dict[str, Any]:
    """Each class alone, one request at a time: the latency with nothing to wait for."""
    run.sampler.phase = "idle"
    loop = asyncio.get_running_loop()
    counts = {"search": run.args.idle_requests, "batch_search": max(5, run.args.idle_requests // 5),
              "get_chunk": max(5, run.args.idle_requests // 2),
              "upsert": max(3, run.args.idle_requests // 10)}
    out = {}
    for cls, n in counts.items():
        recs = [await run.wl.issue(cls, loop.time()) for _ in range(n)]
        out[cls] = {"requests": n, "codes": dict(Counter(r.code for r in recs)),
                    "latency_s": pct([r.latency for r in recs if r.code == "OK"])}
    return out


# Saturation refinement stops once the served and unserved rates are this close.
REFINE_UNTIL = 1.1


def refinement(steps: list[dict[str, Any]]) -> float | None:
    """The offered rate of the next step that narrows saturation: halfway between the last
    rate served in full and the next one tried; None when there is no such pair or they
    are within REFINE_UNTIL of each other."""
    sat = saturation(steps)
    low, high = sat.get("served_level"), sat.get("first_unserved_level")
    if low is None or high is None or high <= REFINE_UNTIL * low:
        return None
    return round((low + high) / 2, 2)


def saturation(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest offered rate served in full (open loop); else the best closed goodput."""
    opened = sorted((s for s in steps if s["kind"] == "open"), key=lambda s: s["level"])
    closed = [s for s in steps if s["kind"] == "closed"]
    best_closed = max((s["goodput_rps"] for s in closed), default=0.0)
    if not opened:
        return {"rps": best_closed, "method": "best closed-loop goodput",
                "best_closed_goodput_rps": best_closed}
    served = [s for s in opened if s["goodput_rps"] >= SUSTAINED_SHARE * s["offered_rps"]
              and s["codes"].get(RE, 0) <= REFUSED_SHARE * s["offered_rps"] * s["seconds"]
              and not _bad_codes(s["codes"])]
    above = [s for s in opened if served and s["level"] > served[-1]["level"]]
    if served:
        rps = served[-1]["offered_rps"]
        method = (f"highest offered rate with goodput >= {SUSTAINED_SHARE:.0%} of it, at most "
                  f"{REFUSED_SHARE:.0%} of it refused and no other error")
    else:
        rps = max(s["goodput_rps"] for s in opened)
        method = "no offered rate was served in full: best open-loop goodput"
    return {"rps": rps, "method": method, "best_closed_goodput_rps": best_closed,
            "first_unserved_rps": above[0]["offered_rps"] if above else None,
            "served_level": served[-1]["level"] if served else None,
            "first_unserved_level": above[0]["level"] if above else None}


def _bad_codes(codes: dict[str, int]) -> dict[str, int]:
    return {c: n for c, n in codes.items() if c not in ("OK", RE)}


def rss_growth(samples: list[dict[str, Any]], warmup_share: float = 0.2) -> dict[str, Any]:
    soak = [s for s in samples if s["phase"] == "soak"]
    if len(soak) < 3:
        return {}
    t0, t1 = soak[0]["t"], soak[-1]["t"]
    after = [s for s in soak if s["t"] >= t0 + warmup_share * (t1 - t0)]
    # RSS swings by tens of MiB with the allocator: compare means of the first and last
    # tenth of the samples after warm-up, not two single samples.
    k = max(1, len(after) // 10)
    base, tail = after[0], after[-k:]
    base_rss = float(np.mean([s["rss_bytes"] for s in after[:k]]))
    end_rss = float(np.mean([s["rss_bytes"] for s in tail]))
    slope = (np.polyfit([s["t"] for s in after], [s["rss_bytes"] for s in after], 1)[0]
             if len(after) >= 2 else 0.0)
    return {"warmup_s": after[0]["t"] - t0, "rss_after_warmup_bytes": base_rss,
            "rss_end_bytes": end_rss, "rss_max_bytes": max(s["rss_bytes"] for s in soak),
            "growth": end_rss / base_rss - 1, "slope_bytes_per_min": float(slope) * 60,
            "fds_after_warmup": base["fds"], "fds_end": soak[-1]["fds"],
            "fds_max": max(s["fds"] for s in soak),
            "threads_after_warmup": base["threads"], "threads_end": soak[-1]["threads"]}


def judge(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal, measured: PASS, FAIL, or n/a (not measured in this run)."""
    goals = []

    def goal(name: str, ok: bool | None, value: str) -> None:
        goals.append({"goal": name, "status": "n/a" if ok is None else
                      ("PASS" if ok else "FAIL"), "measured": value})

    t = r.get("target")
    if t:
        bad = _bad_codes(t["codes"])
        goal("no error other than RESOURCE_EXHAUSTED at the target load", not bad,
             ", ".join(f"{c} {n}" for c, n in sorted(t["codes"].items())))
        idle_p99 = r["idle"]["search"]["latency_s"].get("p99")
        p99 = t["classes"].get("search", {}).get("latency_s", {}).get("p99")
        if idle_p99 and p99 is not None:
            goal(f"Search p99 <= {GOAL_SEARCH_P99_VS_IDLE:g}x idle p99",
                 p99 <= GOAL_SEARCH_P99_VS_IDLE * idle_p99,
                 f"{p99 * 1e3:.1f} ms vs idle {idle_p99 * 1e3:.1f} ms "
                 f"({p99 / idle_p99:.1f}x)")
        up = t["classes"].get("upsert")
        if up:
            lat = up["latency_s"]
            done = up["codes"].get("OK", 0)
            goal(f"every upsert of <= {GOAL_UPSERT_MAX_DOCS} small documents done in "
                 f"<= {GOAL_UPSERT_MAX_S:g} s",
                 done == up["requests"] and lat.get("max", math.inf) <= GOAL_UPSERT_MAX_S,
                 f"{done}/{up['requests']} done ({_codes(up['codes'])}); of those done: max "
                 f"{lat.get('max', float('nan')):.2f} s, p99 {lat.get('p99', float('nan')):.2f} s")
    g = r.get("soak_memory") or {}
    goal(f"server RSS growth < {GOAL_RSS_GROWTH:.0%} after warm-up (soak)",
         g["growth"] < GOAL_RSS_GROWTH if g else None,
         (f"{g['growth']:+.1%} ({g['rss_after_warmup_bytes'] / 2**20:.0f} -> "
          f"{g['rss_end_bytes'] / 2**20:.0f} MiB), fds {g['fds_after_warmup']} -> "
          f"{g['fds_end']}") if g else "no soak in this run (--soak SECONDS)")
    sat = r["saturation"]["rps"]
    over = [s for s in r["steps"] if s["kind"] == "open" and s["offered_rps"] > 1.15 * sat]
    if over:
        worst = max(over, key=lambda s: s["offered_rps"])
        shed = worst["shed_latency_s"]
        goal(f"beyond saturation, load is shed with RESOURCE_EXHAUSTED in p99 <= "
             f"{GOAL_SHED_P99_S * 1e3:.0f} ms",
             shed.get("n", 0) > 0 and shed["p99"] <= GOAL_SHED_P99_S,
             f"at {worst['offered_rps']:.1f} req/s offered: {shed.get('n', 0)} refused"
             + (f", p99 {shed['p99'] * 1e3:.1f} ms" if shed.get("n") else ""))
        h = worst["search_p99_halves_s"]
        grows = None if None in h else h[1] > GOAL_OVERLOAD_GROWTH * h[0] + 0.05
        dl = worst["codes"].get("DEADLINE_EXCEEDED", 0)
        goal("beyond saturation, latency stays bounded (no deadline exceeded; Search p99 of "
             f"the 2nd half of the step <= {GOAL_OVERLOAD_GROWTH:g}x the 1st + 50 ms)",
             None if grows is None else (not grows and dl == 0),
             f"Search p99 {_ms(h[0])} -> {_ms(h[1])}, DEADLINE_EXCEEDED {dl}")
    return goals


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    corpus = load_corpus(args.corpus, args.max_files, rng)
    say(f"corpus: {len(corpus.docs)} documents, {corpus.bytes / 1e6:.2f} MB, "
        f"{len(corpus.queries)} queries ({corpus.source})")
    server: SpawnedServer | None = None
    tmp = None
    env_overrides = dict(kv.split("=", 1) for kv in args.server_env)
    if args.spawn:
        env_overrides.setdefault("RETRIEVER_UPSERT_PEER_HEADER", CALLER_HEADER)
        tmp = tempfile.TemporaryDirectory(prefix="loadgen-")
        server = SpawnedServer(Path(tmp.name) / "data", env_overrides)
        say("starting `retriever serve` ...")
        await server.start()
        address, pid = server.address, server.pid
        metrics = f"127.0.0.1:{server.info['metrics_port']}"
    else:
        address, pid, metrics = args.address, args.server_pid, args.metrics_address
    sampler = Sampler(pid, args.sample_interval, t_start)
    sampling = asyncio.create_task(sampler.run())
    retry = RetryPolicy() if args.retry else NO_RETRY
    retries: Counter[str] = Counter()
    report: dict[str, Any] = {"environment": environment(), "config": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    options: dict[str, Any] = {
        "timeout": args.deadline, "upsert_timeout": args.deadline, "retry": retry,
        "on_retry": lambda m, c, a, d: retries.update([f"{m.rsplit('/', 1)[-1]} {c.name}"]),
        "token": os.environ.get("RETRIEVER_AUTH_TOKEN") or None}
    try:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(AsyncRetrieverClient(address, **options))
            callers = [await stack.enter_async_context(AsyncRetrieverClient(
                address, headers=[(CALLER_HEADER, f"loadgen-{i}")], **options))
                for i in range(args.callers)]
            await client.wait_ready(timeout=300)
            sampler.phase = "index"
            t0 = time.perf_counter()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await client.delete_namespace(args.namespace)
            resp = await client.upsert(args.namespace, corpus.docs, batch_size=32,
                                       timeout=3600)
            index_s = time.perf_counter() - t0
            say(f"indexed {resp.documents_received} documents, {resp.chunks_total} chunks "
                f"in {index_s:.1f} s")
            report["corpus"] = {"source": corpus.source, "documents": len(corpus.docs),
                                "bytes": corpus.bytes, "queries": len(corpus.queries),
                                "chunks": resp.chunks_total, "index_s": index_s,
                                "skipped": corpus.skipped}
            wl = Workload(callers, args.namespace, corpus, args.mix, rng, args.upsert_pool)
            run = Run(args, wl, sampler, metrics, say)
            for _ in range(20):  # warm-up; also collects chunk ids for GetChunk
                await wl.issue("search", 0.0)
            idle = await idle_phase(run)
            report["idle"] = idle
            say("idle: " + ", ".join(f"{c} p50 {_ms(v['latency_s'].get('p50'))} p99 "
                                     f"{_ms(v['latency_s'].get('p99'))}"
                                     for c, v in idle.items()))
            for c in args.closed:
                s = await run.step("closed", c, args.step_seconds, args.warmup_seconds, rng)
                say(f"closed c={int(c):>3}: {_line(s)}")
            rates = args.rates
            if rates == "auto":
                best = max((s["goodput_rps"] for s in run.steps), default=0.0)
                if not best:
                    raise SystemExit("--rates auto needs a closed-loop sweep (--closed)")
                rates = [round(f * best, 2) for f in args.rate_fractions]
            for rate in rates:
                s = await run.step("open", rate, args.step_seconds, args.warmup_seconds, rng)
                say(f"open {rate:>7.1f}/s: {_line(s)}")
            # The sweep's grid brackets saturation: narrow it between the last rate served
            # in full and the next one, so the target is a share of saturation, not of a
            # grid point below it.
            for _ in range(args.refine):
                if (rate := refinement(run.steps)) is None:
                    break
                s = await run.step("open", rate, args.step_seconds, args.warmup_seconds, rng)
                say(f"open {rate:>7.1f}/s (refining saturation): {_line(s)}")
            report["steps"] = run.steps
            report["saturation"] = sat = saturation(run.steps)
            target = args.target_rate or args.target_fraction * sat["rps"]
            say(f"saturation {sat['rps']:.1f} req/s ({sat['method']}); target {target:.1f}/s")
            if args.target_seconds > 0 and target > 0:
                t = await run.step("target", target, args.target_seconds,
                                   args.warmup_seconds, rng)
                report["target"] = t
                say(f"target {target:>6.1f}/s: {_line(t)}")
            if args.soak > 0 and target > 0:
                say(f"soak: {args.soak:.0f} s at {target:.1f} req/s")
                soak = await run.step("soak", target, args.soak, 0.0, rng, args.soak_window)
                report["soak_windows"] = soak.pop("windows")
                report["soak"] = soak
                say(f"soak {target:>6.1f}/s: {_line(soak)}")
                report["soak_memory"] = rss_growth(sampler.samples)
            report["error_messages"] = {f"{c} {code}": m
                                        for (c, code), m in sorted(wl.messages.items())}
            report["retries"] = dict(retries)
    finally:
        sampling.cancel()
        if server is not None:
            report["server_exit_code"] = await server.stop()
            report["server_settings"] = env_overrides
            server_log = server.log.read_text(errors="replace")
            report["server_log_tail"] = server_log[-4000:]
            report["server_log_problems"] = log_problems(server_log)
        if tmp is not None:
            tmp.cleanup()
    report["samples"] = sampler.samples
    report["run_s"] = time.monotonic() - t_start
    report["goals"] = judge(report)
    return report


def _line(s: dict[str, Any]) -> str:
    lat = s["latency_s"]
    search = s["classes"].get("search", {}).get("latency_s", {})
    codes = " ".join(f"{c}={n}" for c, n in sorted(s["codes"].items()) if c != "OK")
    offered = f"offered {s['offered_rps']:.1f}/s, " if s.get("offered_rps") is not None else ""
    return (f"{offered}goodput {s['goodput_rps']:.1f}/s, p50/p90/p99 {_ms(lat.get('p50'))}/"
            f"{_ms(lat.get('p90'))}/{_ms(lat.get('p99'))}, Search p99 "
            f"{_ms(search.get('p99'))}" + (f", {codes}" if codes else ""))


# -- the report ----------------------------------------------------------------------------
# A line of `retriever serve`'s log (retriever.cli.LOG_FORMAT) at WARNING or above.
_LOG_LEVEL = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")


def log_problems(text: str, keep: int = 20) -> dict[str, Any]:
    """The server log's WARNING, ERROR and CRITICAL lines: counts by level and the first
    ``keep`` of them (an SRE reading the report should see what the server complained of
    under the load, not only what the callers were answered)."""
    counts: Counter[str] = Counter()
    first: list[str] = []
    for line in text.splitlines():
        m = _LOG_LEVEL.match(line)
        if m:
            counts[m.group(1)] += 1
            if len(first) < keep:
                first.append(line[:400])
    return {"counts": dict(counts), "first": first}


def render(r: dict[str, Any], name: str) -> str:
    env, cfg = r["environment"], r["config"]
    corpus, sat = r["corpus"], r["saturation"]
    lines = [
        f"# Load test: {name}",
        "",
        f"Generated by `load-tests/loadgen.py` on {env['date']} in {r['run_s']:.0f} s: "
        f"{env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX2/AVX-512 flags'}), "
        f"{env['cores']} cores, {env['platform']}, Python {env['python']}, grpcio "
        f"{env['grpcio']}. Service code: commit {env['git_commit'][:10] or '?'}"
        + (f" with uncommitted changes in {', '.join(env['uncommitted_service_files'])}"
           if env["uncommitted_service_files"] else "") + ".",
        "",
        f"Server: {_server_line(r)}, on the same machine as the generator. "
        f"Corpus: {corpus['documents']} documents, {corpus['bytes'] / 1e6:.2f} MB, "
        f"{corpus['chunks']} chunks, indexed in {corpus['index_s']:.1f} s ({corpus['source']});"
        f" {corpus['queries']} queries. Mix: "
        + ", ".join(f"{c} {w:g}" for c, w in cfg["mix"].items())
        + f" (BatchSearch of {BATCH_QUERIES}, upserts of 1-{GOAL_UPSERT_MAX_DOCS} documents "
        f"of <= 800 characters, top_k {TOP_K}), from {cfg.get('callers', 1)} callers (a "
        f"channel each, named by the {CALLER_HEADER} header; a spawned server counts upsert "
        f"streams per caller). Deadline {cfg['deadline']:g} s per request, "
        + ("retries on" if cfg["retry"] else "no retries") + ".",
        "",
        *_foreign_warning(r),
        "## Goals",
        "",
        "| goal | result | measured |",
        "|---|---|---|",
        *[f"| {g['goal']} | **{g['status']}** | {g['measured']} |" for g in r["goals"]],
        "",
        f"Saturation: **{sat['rps']:.1f} req/s** ({sat['method']}"
        + (f"; the next step, {sat['first_unserved_rps']:.1f} req/s offered, was not"
           if sat.get("first_unserved_rps") else "")
        + f"). Best closed-loop goodput: {sat['best_closed_goodput_rps']:.1f} req/s.",
        "",
        "## Idle (one request at a time)",
        "",
        "| class | requests | p50 | p90 | p99 | max | codes |",
        "|---|---|---|---|---|---|---|",
        *[_class_row(c, v) for c, v in r["idle"].items()],
    ]
    for kind, title, level in (("closed", "Closed loop (concurrency sweep)", "concurrency"),
                               ("open", "Open loop (Poisson arrivals, offered load sweep)",
                                "offered req/s")):
        # by load: the steps that refine saturation ran last
        steps = sorted((s for s in r["steps"] if s["kind"] == kind), key=lambda s: s["level"])
        if not steps:
            continue
        lines += ["", f"## {title}", "",
                  f"| {level} | goodput req/s | refused req/s | p50 | p90 | p99 | Search p99 "
                  "| upsert max | refusal p99 (server p99 <=) | loop lag mean / p99 <= "
                  "| full GCs / max <= | codes | CPU: server / generator / other |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  *[_step_row(s) for s in steps]]
        last = steps[-1]
        refused = {c: v["refused_latency_s"] for c, v in last["classes"].items()
                   if v.get("refused_latency_s", {}).get("n")}
        if refused:
            lines += ["", "Refusals at the last step, by class: " + ", ".join(
                f"{c} {v['n']} (p50 {_ms(v['p50'])}, p99 {_ms(v['p99'])}, max "
                f"{_ms(v['max'])})" for c, v in refused.items()) + "."]
    t = r.get("target")
    if t:
        idle = r["idle"]
        lines += ["", f"## Mixed load at {cfg['target_fraction']:.0%} of saturation "
                  f"({t['level']:.1f} req/s offered, {t['seconds']:.0f} s)", "",
                  f"Goodput {t['goodput_rps']:.1f} req/s; generator lag p99 "
                  f"{_ms(t.get('lag_p99_s'))} (max {_ms(t.get('lag_max_s'))}); server full "
                  f"garbage collections (count / longest <=): "
                  f"{_gc(t.get('server', {}).get('gc_full'))}; CPU (cores) "
                  f"server / generator / other: {_cpu(t)}. Latency is "
                  "each request's wait plus its service time, from its scheduled arrival; "
                  "'added' is p50 minus the idle p50 of the class.", "",
                  "| class | requests | p50 | p90 | p99 | max | added p50 | codes |",
                  "|---|---|---|---|---|---|---|---|",
                  *[_class_row(c, v, idle.get(c)) for c, v in t["classes"].items()]]
        mw = t.get("server", {}).get("model_wait")
        if mw:
            lines += ["", "Server-side wait for the model thread "
                      "(`retriever_model_wait_seconds`, mean): "
                      + ", ".join(f"{c} {v['mean_s'] * 1e3:.1f} ms over {v['count']}"
                                  for c, v in sorted(mw.items())) + "."]
        st = t.get("server", {}).get("stages")
        if st:
            lines += ["", "Server-side stages (`retriever_stage_duration_seconds`, mean per "
                      "call; upsert: queued, chunk, embed, lock_wait, index_write, lexical_write, "
                      "commit; search: embed, ann, lexical, fuse, fetch): "
                      + ", ".join(f"{c} {v['mean_s'] * 1e3:.1f} ms over {v['count']}"
                                  for c, v in sorted(st.items()))
                      + ". An upsert's embed includes its waits for the model thread."]
        lines += _tail_table(
            t.get("search_tail"), "searches", (*STAGES, "outside", "latency"), 1,
            "Where Search time goes (mean ms; slowest {share} of OK searches vs all; "
            "`StageTimings` of each response, 'outside' = latency minus the server's total: "
            "waits for a gRPC worker and the event loop, transport, client):")
        lines += _tail_table(
            t.get("upsert_tail"), "upserts", (*UPSERT_STAGES, "total", "outside", "latency"),
            0, "Where upsert time goes (mean ms; slowest {share} of OK upserts vs all; "
            "`UpsertTimings` of each response: embed includes embed_model, the model's own "
            "time on the upsert's chunks; 'total' = the server's elapsed, 'outside' = latency "
            "minus it):")
    m, soak = r.get("soak_memory"), r.get("soak")
    if soak:
        lines += ["", f"## Soak ({soak['seconds']:.0f} s at {soak['level']:.1f} req/s offered)",
                  "", f"Goodput {soak['goodput_rps']:.1f} req/s; CPU (cores) server / "
                  f"generator / other: {_cpu(soak)}.", "",
                  "| class | requests | p50 | p90 | p99 | max | added p50 | codes |",
                  "|---|---|---|---|---|---|---|---|",
                  *[_class_row(c, v, r["idle"].get(c)) for c, v in soak["classes"].items()]]
    if soak and m:
        lines += ["", f"RSS {m['rss_after_warmup_bytes'] / 2**20:.1f} MiB after "
                  f"{m['warmup_s']:.0f} s of warm-up -> {m['rss_end_bytes'] / 2**20:.1f} MiB "
                  f"at the end ({m['growth']:+.1%}; max {m['rss_max_bytes'] / 2**20:.1f} MiB, "
                  f"trend {m['slope_bytes_per_min'] / 2**20:+.2f} MiB/min). Open file "
                  f"descriptors {m['fds_after_warmup']} -> {m['fds_end']} (max {m['fds_max']})"
                  f"; threads {m['threads_after_warmup']} -> {m['threads_end']}.", "",
                  "| window | goodput req/s | Search p99 | upsert max | codes |",
                  "|---|---|---|---|---|"]
        for w in r["soak_windows"]:
            up = w["classes"].get("upsert", {}).get("latency_s", {})
            lines.append(f"| {w['end_s']:.0f} s | {w['goodput_rps']:.1f} | "
                         f"{_ms(w['classes'].get('search', {}).get('latency_s', {}).get('p99'))}"
                         f" | {_ms(up.get('max'))} | {_codes(w['codes'])} |")
    lines += ["", "## Error codes by type (all phases after indexing)", "",
              "| class | code | count | first message |", "|---|---|---|---|"]
    totals: Counter[tuple[str, str]] = Counter()
    for s in _measured(r):
        for c, v in s["classes"].items():
            for code, n in v["codes"].items():
                if code != "OK":
                    totals[(c, code)] += n
    if not totals:
        lines.append("| - | - | 0 | none: every request succeeded |")
    for (c, code), n in sorted(totals.items()):
        msg = r.get("error_messages", {}).get(f"{c} {code}", "").replace("|", "\\|")
        lines.append(f"| {c} | {code} | {n} | {msg} |")
    if r.get("retries"):
        lines += ["", "Retries: " + ", ".join(f"{k} {v}" for k, v in r["retries"].items())]
    problems = r.get("server_log_problems")
    if problems is not None:
        counts = problems["counts"]
        lines += ["", "## Server log (warnings and errors, the whole run)", ""]
        if not counts:
            lines.append("None.")
        else:
            lines += [", ".join(f"{level} {n}" for level, n in sorted(counts.items()))
                      + (f"; the first {len(problems['first'])}:" if problems["first"] else ""),
                      "", "```", *problems["first"], "```"]
    lines += ["", f"![latency, throughput and server memory]({name}.png)", "",
              f"Raw figures: `{name}.json`. Reproduce: `.venv/bin/python load-tests/loadgen.py "
              + " ".join(r["config"].get("argv", [])) + "`.", ""]
    return "\n".join(lines)


def _measured(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured step: the sweeps, the target run and the soak."""
    return [*r["steps"], *(r[k] for k in ("target", "soak") if r.get(k))]


def _foreign_warning(r: dict[str, Any]) -> list[str]:
    worst = max((s.get("foreign_cpu_share") or 0.0 for s in _measured(r)), default=0.0)
    if worst < 0.1:
        return []
    return [f"**Other processes used up to {worst:.2f} of the {r['environment']['cores']} "
            "cores during the measured steps** (column 'other'): those figures are not the "
            "service's alone. Run on an otherwise idle machine for a report to keep.", ""]


def _server_line(r: dict[str, Any]) -> str:
    if not r["config"]["spawn"]:
        return f"external, at {r['config']['address']}"
    env = r.get("server_settings") or {}
    return ("`retriever serve` started by the generator, default settings"
            + "".join(f", {k}={v}" for k, v in env.items()))


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in sorted(codes.items())) or "-"


def _class_row(c: str, v: dict[str, Any], idle: dict[str, Any] | None = None) -> str:
    lat = v["latency_s"]
    cells = [c, str(v["requests"]), _ms(lat.get("p50")), _ms(lat.get("p90")),
             _ms(lat.get("p99")), _ms(lat.get("max"))]
    if idle is not None:
        base = idle["latency_s"].get("p50")
        cells.append("-" if base is None or "p50" not in lat else
                     f"{(lat['p50'] - base) * 1e3:+.0f} ms")
    cells.append(_codes(v["codes"]))
    return "| " + " | ".join(cells) + " |"


def _step_row(s: dict[str, Any]) -> str:
    lat = s["latency_s"]
    level = f"{int(s['level'])}" if s["kind"] == "closed" else f"{s['offered_rps']:.1f}"
    search = s["classes"].get("search", {}).get("latency_s", {})
    up = s["classes"].get("upsert", {}).get("latency_s", {})
    return (f"| {level} | {s['goodput_rps']:.1f} | {s['shed_rps']:.1f} | {_ms(lat.get('p50'))} "
            f"| {_ms(lat.get('p90'))} | {_ms(lat.get('p99'))} | {_ms(search.get('p99'))} | "
            f"{_ms(up.get('max'))} | {_ms(s['shed_latency_s'].get('p99'))}"
            f"{_server_p99(s.get('server', {}).get('refusal'))} | "
            f"{_lag(s.get('server', {}).get('loop_lag'))} | "
            f"{_gc(s.get('server', {}).get('gc_full'))} | "
            f"{_codes({k: v for k, v in s['codes'].items() if k != 'OK'})} | {_cpu(s)} |")


def _tail_table(tail: dict[str, Any] | None, what: str, cols: tuple[str, ...], digits: int,
                intro: str) -> list[str]:
    """A class_tail as Markdown: its mean stage times for all requests and for the tail."""
    if not tail:
        return []
    return ["", intro.format(share=f"{tail['share']:.0%}"), "",
            f"| {what} | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
            *[f"| {k} ({tail[k]['count']}) | "
              + " | ".join(f"{tail[k][c] * 1e3:.{digits}f}" for c in cols) + " |"
              for k in ("all", "tail")]]


def _server_p99(h: dict[str, Any] | None) -> str:
    if not h:
        return ""
    p99 = h["p99_le_s"]
    return f" ({'> 5000' if p99 is None else f'{p99 * 1e3:g}'} ms)"


def _lag(lag: dict[str, Any] | None) -> str:
    if not lag:
        return "-"
    p99 = lag["p99_le_s"]
    return f"{lag['mean_s'] * 1e3:.1f} / {'> 2500' if p99 is None else f'{p99 * 1e3:g}'} ms"


def _gc(full: dict[str, Any] | None) -> str:
    """The server's full garbage collections in a step: how many, and the bucket bound the
    longest falls under (`retriever_gc_pause_seconds{generation="2"}`)."""
    if not full:
        return "-"
    if not full["count"]:
        return "0"
    top = full["p99_le_s"]
    return f"{full['count']} / {'> 1000' if top is None else f'{top * 1e3:g}'} ms"


def _cpu(s: dict[str, Any]) -> str:
    """Cores used by the server, the generator and other processes during a step."""
    server, other = s.get("server_cpu_share"), s.get("foreign_cpu_share")
    return " / ".join("-" if x is None else f"{x:.2f}"
                      for x in (server, s["client_cpu_share"], other))


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    opened = sorted((s for s in r["steps"] if s["kind"] == "open"),
                    key=lambda s: s["offered_rps"])
    closed = [s for s in r["steps"] if s["kind"] == "closed"]
    sat = r["saturation"]["rps"]
    idle_p99 = r["idle"]["search"]["latency_s"].get("p99")

    a = ax[0][0]
    if opened:
        x = [s["offered_rps"] for s in opened]
        for q, style in (("p50", "-o"), ("p90", "-s"), ("p99", "-^")):
            a.plot(x, [s["classes"].get("search", {}).get("latency_s", {}).get(q, np.nan) * 1e3
                       for s in opened], style, label=f"Search {q}")
        a.plot(x, [s["latency_s"].get("p99", np.nan) * 1e3 for s in opened], "--",
               color="grey", label="all classes p99")
        if idle_p99:
            a.axhline(GOAL_SEARCH_P99_VS_IDLE * idle_p99 * 1e3, color="red", lw=0.8, ls=":",
                      label=f"{GOAL_SEARCH_P99_VS_IDLE:g}x idle Search p99")
        a.axvline(sat, color="black", lw=0.8, ls=":", label="saturation")
        a.set_yscale("log")
    a.set(title="Open loop: latency vs offered load", xlabel="offered req/s",
          ylabel="latency (ms, log)")
    a.legend(fontsize=8)

    a = ax[0][1]
    if opened:
        x = [s["offered_rps"] for s in opened]
        a.plot(x, [s["goodput_rps"] for s in opened], "-o", label="goodput (OK/s)")
        a.plot(x, [s["shed_rps"] for s in opened], "-x", label="RESOURCE_EXHAUSTED/s")
        other = [sum(_bad_codes(s["codes"]).values()) / s["seconds"] for s in opened]
        if any(other):
            a.plot(x, other, "-v", color="red", label="other errors/s")
        a.plot(x, x, ":", color="grey", label="offered")
        a.axvline(sat, color="black", lw=0.8, ls=":")
    a.set(title="Open loop: throughput vs offered load", xlabel="offered req/s",
          ylabel="req/s")
    a.legend(fontsize=8)

    a = ax[1][0]
    if closed:
        x = [s["level"] for s in closed]
        a.plot(x, [s["goodput_rps"] for s in closed], "-o", label="goodput (OK/s)")
        a.set_xscale("log", base=2)
        b = a.twinx()
        b.plot(x, [s["latency_s"].get("p99", np.nan) * 1e3 for s in closed], "-^",
               color="tab:red", label="p99 (all classes)")
        b.set_ylabel("p99 latency (ms)")
        b.legend(fontsize=8, loc="lower right")
    a.set(title="Closed loop: throughput and p99 vs concurrency", xlabel="concurrency",
          ylabel="req/s")
    a.legend(fontsize=8, loc="upper left")

    a = ax[1][1]
    samples = r["samples"]
    if samples:
        t = [s["t"] for s in samples]
        a.plot(t, [s["rss_bytes"] / 2**20 for s in samples], label="RSS (MiB)")
        b = a.twinx()
        b.plot(t, [s["fds"] for s in samples], color="tab:green", label="open fds")
        b.set_ylabel("open file descriptors")
        b.legend(fontsize=8, loc="lower right")
        for phase, color in (("soak", "tab:orange"), ("target", "tab:purple")):
            ts = [s["t"] for s in samples if s["phase"] == phase]
            if ts:
                a.axvspan(min(ts), max(ts), alpha=0.12, color=color, label=phase)
    a.set(title="Server process over the run", xlabel="seconds since start",
          ylabel="RSS (MiB)")
    a.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"retriever load test — {r['environment']['cpu']}, "
                 f"{r['environment']['cores']} cores, {r['environment']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(render(report, name))
    plot(report, paths[2])
    return paths


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loadgen.py", description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn", action="store_true",
                       help="start `retriever serve` on free ports and a temporary data dir")
    where.add_argument("--address", help="host:port of a running server")
    p.add_argument("--server-pid", type=int, help="pid of the server at --address, for "
                   "RSS/fd sampling")
    p.add_argument("--metrics-address", help="host:port of the server's /metrics (with "
                   "--address)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the spawned server, e.g. "
                   "RETRIEVER_MAX_INFLIGHT_SEARCHES=64 (repeatable)")
    p.add_argument("--corpus", type=Path, help="a directory to index, or a BEIR directory "
                   "with corpus.jsonl (e.g. ../shared/datasets/scifact) [default: this "
                   "repository's retriever/ indexers/ tests/ bench/ README.md]")
    p.add_argument("--max-files", type=int, help="index only the first N files")
    p.add_argument("--namespace", default="loadtest")
    p.add_argument("--mix", type=parse_mix,
                   default=parse_mix("search=70,batch_search=10,upsert=10,get_chunk=10"),
                   help="class weights (search, batch_search, upsert, get_chunk)")
    p.add_argument("--callers", type=positive_int, default=8,
                   help="clients the requests come from, each named by the x-retriever-caller "
                   "header (a spawned server counts upsert streams per caller)")
    p.add_argument("--upsert-pool", type=int, default=256,
                   help="distinct documents the upserts rewrite")
    p.add_argument("--idle-requests", type=int, default=300,
                   help="sequential Searches of the idle baseline")
    p.add_argument("--closed", type=floats, default=floats("1,2,4,8,16,32"),
                   help="closed-loop concurrency levels ('' to skip)")
    p.add_argument("--rates", default="auto", help="open-loop offered rates in req/s, "
                   "comma-separated; 'auto': --rate-fractions of the best closed-loop "
                   "goodput; '' to skip")
    p.add_argument("--rate-fractions", type=floats,
                   default=floats("0.2,0.3,0.4,0.5,0.6,0.75,0.9,1.0,1.2,1.5,2.0"))
    p.add_argument("--refine", type=int, default=2,
                   help="open-loop steps that bisect the rates between the last one served in "
                   "full and the next (while they are more than 10%% apart)")
    p.add_argument("--step-seconds", type=float, default=10.0, help="measured time per step")
    p.add_argument("--warmup-seconds", type=float, default=2.0,
                   help="unmeasured lead-in of each step")
    p.add_argument("--cooldown", type=float, default=1.0, help="pause between steps")
    p.add_argument("--target-fraction", type=float, default=0.8,
                   help="the target load, as a share of saturation")
    p.add_argument("--target-rate", type=float, help="the target load in req/s (overrides)")
    p.add_argument("--target-seconds", type=float, default=60.0)
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                   help="soak at the target load for this long (the issue asks for 600)")
    p.add_argument("--soak-window", type=float, default=30.0,
                   help="seconds per reported soak window")
    p.add_argument("--sample-interval", type=float, default=2.0,
                   help="seconds between RSS/fd samples of the server")
    p.add_argument("--deadline", type=float, default=10.0, help="deadline of each request")
    p.add_argument("--retry", action="store_true",
                   help="let the client retry (RetryInfo); off: every refusal is counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="report name [default: <host cores>core-<date>]")
    p.add_argument("--out-dir", type=Path, default=REPO / "load-tests" / "results")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.rates not in ("auto",):
        args.rates = floats(args.rates)
    if args.address and args.server_pid is None:
        print("note: no --server-pid: RSS and fds are not sampled", file=sys.stderr)
    args.argv = argv
    args.name = args.name or f"{os.cpu_count()}core-{datetime.now(UTC):%Y%m%d-%H%M}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(main_async(args))
    paths = write(report, args.out_dir, args.name)
    for g in report["goals"]:
        print(f"{g['status']:>4}  {g['goal']}: {g['measured']}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
