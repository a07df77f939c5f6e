"""One thread runs every forward pass of the model (query batches aside where there is a
query lane, below): the one place that decides what runs next.

Why one thread: when several long-lived threads run the model, each keeps its own OpenMP
team and a single query's forward pass takes about twice as long (measured: p50 6.6 ms ->
13.1 ms once an upsert thread had run the model). Funnelling all passes through one thread
removes that, and gives an explicit priority:

- queries: the first waiting query opens a micro-batch; others join it for up to
  ``max_wait_s`` or until ``max_batch`` texts, then one forward pass answers them all;
- documents: a document job (the new chunks of one upsert message) is embedded in slices of
  at most ``doc_batch`` texts and ``doc_slice_tokens`` tokens, longest first; between
  slices (and, with layer checkpoints, between a slice's layers) waiting queries go ahead.

Fair both ways, with a bounded wait for each class:
- a query waits for at most the one slice in flight (a slice is small: one or a few chunks),
  or about one layer of it with layer checkpoints (below);
- documents are not starved by a stream of searches: once a document job has waited
  ``doc_max_wait_s`` since the model last worked on documents, its next slice runs before
  the next query batch. Under a saturating search load documents still get at least
  slice / (slice + doc_max_wait) of the model;
- document jobs take turns slice by slice, highest response ratio first (waited + work
  left, over work left): a small upsert is not queued behind a bulk one, and a job's turn
  comes sooner the longer it has waited;
- a job whose caller went away is dropped before its next slice (``cancel_documents``).

Layer checkpoints: a one-chunk slice is a whole forward pass (~38 ms for 256 tokens on two
cores here, against ~6 ms for a query), so "at most one slice" is most of a loaded search's
tail. Where the model can say when it is between transformer layers (torch), it calls
``checkpoint()`` there; during a document slice, queries waiting at that moment run then and
there, nested on the model thread, and the slice resumes. A query then waits for at most
one layer of a slice (~1/6 of it for a 6-layer model). Each checkpoint runs at most one query
batch, and once a slice's nested batches have taken ``doc_max_wait_s`` (at least one runs)
the rest wait for the slice's end; that query time counts as the documents' wait, so a
document slice still runs after at most ``doc_max_wait_s`` of queries. Their throughput
share is lower all the same: beside a tight loop of sequential searches a bulk upsert ran at
0.35 of raw encode against 0.71 without checkpoints (bench/results/service.md), as queries
no longer leave the model idle between their passes for documents to fill.

Query lane (OpenVINO, ``query_lane``): query batches run on a thread of their own, on a
one-thread compiled copy of the model, beside the model thread's slices; a query then waits
for no slice at all, and the two share the cores, both below the threads that admit and
refuse requests, the slices a step below the lane (``lane_nice`` 5, ``nice`` 10 by default:
a query pass beside a slice gets most of a core; Search p99 at 45.6 req/s of mixed load
24-31 % lower than with both at 5 in three alternated pairs,
load-tests/results/ab-lane-priority.md). The model thread then runs documents and
re-ranking only, and its OpenVINO workers go under SCHED_IDLE (Settings.document_idle): the
part of a slice they run takes a core only when nothing else wants it, the part the model
thread runs keeps its share (load-tests/results/ab-document-sched-idle.md). On this 2-core
machine a 256-token slice takes ~19 ms on two threads and a query ~3.5 ms on one thread or
two; in isolation (the query thread then at normal priority, the slices niced) queries
arriving during back-to-back slices were answered in p50 11 / p99 20 ms between slices and
3-4 / 5-6 ms on the lane, with slices at the same rate. On by default with OpenVINO: at
36.5 req/s of load-tests/' mix it passed the upsert goal in four runs of four, none without
it (at 80 % of the higher saturation it reaches, 55 req/s, it does not):
load-tests/results/ab-query-lane.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from retriever._priority import lower_priority
from retriever.errors import NotReady

EmbedFn = Callable[[Sequence[str]], np.ndarray]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Query:
    texts: list[str]
    future: Future[np.ndarray]
    arrived: float


# Document jobs submitted within this long of each other count as arriving together when
# picked by response ratio (a wait this short says nothing about which waited longer).
_ARRIVED_TOGETHER_S = 0.05


@dataclass(eq=False)
class _DocJob:
    """A long job run in slices: a document job (texts -> vectors) or a re-ranking job
    ((query, passage) pairs -> scores)."""

    texts: list
    future: Future[np.ndarray]
    order: list[int]  # indices, longest text first
    lengths: list[int]  # tokens (or an estimate) per text
    fn: Callable[[list], np.ndarray]
    kind: str  # "document" | "rerank"
    done: int = 0
    left: int = 0  # tokens not embedded yet
    served: float = 0.0  # when it last had a slice (or was submitted)
    submitted: float = 0.0
    started: bool = False  # picked for a slice at least once
    # Called on the model thread with each slice's own model time (queries run inside it
    # excluded).
    on_slice: Callable[[float], None] | None = None
    out: list[tuple[list[int], np.ndarray]] = field(default_factory=list)


class MicroBatcher:
    def __init__(self, embed: EmbedFn, max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 doc_batch: int = 16, doc_slice_tokens: int = 0,
                 doc_max_wait_s: float = 0.05,
                 on_wait: Callable[[str, float], None] | None = None,
                 nice: int = 0, doc_starve_s: float = 1.0,
                 embed_queries: EmbedFn | None = None,
                 doc_order: str = "response_ratio") -> None:
        """``embed``: vectors of a document slice (and of a query batch unless
        ``embed_queries`` is given). ``doc_slice_tokens``: token budget of one document
        slice (0: no budget, only ``doc_batch``). ``on_wait(kind, seconds)`` receives how
        long each query batch and each document slice waited for the model. ``nice``: how
        far the model thread (and the OpenMP workers its first forward pass starts) lowers
        its CPU priority. ``doc_order``: "response_ratio" (see ``_pick_doc_locked``) or
        "least_left" (shortest remaining first, the order before it; kept for comparison)."""
        if doc_order not in ("response_ratio", "least_left"):
            raise ValueError(f"doc_order {doc_order!r}: response_ratio or least_left")
        self._doc_order = doc_order
        self._embed = embed
        self._embed_queries = embed_queries or embed
        self.nice = nice  # may be changed before start()
        self.lane_nice = nice  # the query lane's (may be changed before start())
        self._max_batch = max_batch
        self._max_wait = max_wait_s
        self.doc_batch = doc_batch  # may be changed before start()
        self.doc_slice_tokens = doc_slice_tokens
        self._doc_max_wait = doc_max_wait_s
        self._doc_starve = doc_starve_s
        self._on_wait = on_wait or (lambda kind, s: None)
        # When the model last worked on documents (or the first job began to wait).
        self._docs_served = time.monotonic()
        self._last_was_doc = False
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_depth or (lambda n: None)
        self._cond = threading.Condition()
        self._queries: deque[_Query] = deque()
        self._docs: deque[_DocJob] = deque()
        self._reranks: deque[_DocJob] = deque()
        self._thread: threading.Thread | None = None
        # With a query lane (set before start(); the embedder must run ``embed_queries``
        # beside ``embed``), query batches run on a thread of their own, beside the model
        # thread's slices instead of between them.
        self.query_lane = False
        self._lane: threading.Thread | None = None
        self._running = False
        # Set while the model thread runs a document slice's forward pass: checkpoint() may
        # run waiting queries then.
        self._in_doc_pass = False
        self._model_ident = 0
        self.checkpoint_batches = 0  # query batches run inside a document slice
        self._nested_s = 0.0  # time those took in the slice now running
        # Model time per document token, measured on the slices run (for job priorities).
        self._seconds_per_token = 1e-4

    def start(self) -> None:
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._run, name="embedder", daemon=True)
        self._thread.start()
        if self.query_lane:
            self._lane = threading.Thread(target=self._run_lane, name="query-lane",
                                          daemon=True)
            self._lane.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        for t in (self._thread, self._lane):
            if t is not None:
                t.join(timeout=60)
        self._thread = self._lane = None

    def submit(self, texts: Sequence[str]) -> Future[np.ndarray]:
        """Query embeddings of ``texts`` (rows in order), micro-batched with other queries."""
        fut: Future[np.ndarray] = Future()
        with self._cond:
            if not self._running:
                fut.set_exception(NotReady("the embedder is not running"))
                return fut
            self._queries.append(_Query(list(texts), fut, time.monotonic()))
            depth = sum(len(q.texts) for q in self._queries)
            self._cond.notify_all()
        self._on_depth(depth)
        return fut

    def submit_documents(self, texts: Sequence[str], lengths: Sequence[int] | None = None,
                         on_slice: Callable[[float], None] | None = None
                         ) -> Future[np.ndarray]:
        """Document embeddings of ``texts`` (rows in order), computed in slices that yield
        to queries. ``lengths``: tokens per text, for token-budgeted slices (estimated from
        characters when absent). ``on_slice(seconds)``: each slice's model time, on the
        model thread."""
        fut: Future[np.ndarray] = Future()
        texts = list(texts)
        sizes = list(lengths) if lengths is not None else [len(t) // 4 + 1 for t in texts]
        if len(sizes) != len(texts):
            raise ValueError(f"{len(sizes)} lengths for {len(texts)} texts")
        order = sorted(range(len(texts)), key=lambda i: (-sizes[i], -len(texts[i])))
        with self._cond:
            if not self._running:
                fut.set_exception(NotReady("the embedder is not running"))
                return fut
            if not self._docs:
                self._docs_served = time.monotonic()  # the wait starts now
            self._docs.append(_DocJob(texts, fut, order, sizes, self._embed, "document",
                                      left=sum(sizes), served=time.monotonic(),
                                      submitted=time.monotonic(), on_slice=on_slice))
            self._cond.notify_all()
        return fut

    def submit_rerank(self, score: Callable[[list], np.ndarray], pairs: Sequence[object],
                      lengths: Sequence[int]) -> Future[np.ndarray]:
        """Scores of ``pairs`` by ``score`` (a cross-encoder), in slices like a document job
        but ahead of documents: a re-ranking search is interactive. Queries still go first
        after each slice, so a plain search waits at most one slice behind a re-ranking."""
        fut: Future[np.ndarray] = Future()
        items = list(pairs)
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        with self._cond:
            if not self._running:
                fut.set_exception(NotReady("the model thread is not running"))
                return fut
            self._reranks.append(_DocJob(items, fut, order, list(lengths), score, "rerank"))
            self._cond.notify_all()
        return fut

    def document_backlog_age(self) -> float:
        """Seconds the oldest document job still waiting for its first slice has waited (0
        when none waits). A bulk job being served does not count, nor does a new job while
        the model still turns to new jobs soon; when it stays high, the model is behind on
        documents: more upserts would only wait longer."""
        now = time.monotonic()
        with self._cond:
            waiting = [j.submitted for j in self._docs if not j.started]
        return now - min(waiting) if waiting else 0.0

    def document_delay(self, tokens: int) -> tuple[float, float]:
        """(seconds by which the document jobs queued now would delay a new job of
        ``tokens`` tokens, seconds of the new job's own work), at the model's measured rate.
        Jobs take turns slice by slice (roughly an equal share each), so a job ahead delays
        the new one by the lesser of its own work left and the new job's: a bulk job in
        progress counts as one more job of the new one's size, not as all it has left."""
        with self._cond:
            ahead = sum(min(j.left, tokens) for j in self._docs)
            return ahead * self._seconds_per_token, tokens * self._seconds_per_token

    def cancel_documents(self, future: Future[np.ndarray]) -> bool:
        """Drop the queued job of ``future`` (its caller went away); True if it was queued.
        A slice already running finishes; nothing more of the job runs."""
        with self._cond:
            for queue in (self._docs, self._reranks):
                job = next((j for j in queue if j.future is future), None)
                if job is not None:
                    queue.remove(job)
                    break
            else:
                return False
        future.cancel()
        return True

    def checkpoint(self) -> None:
        """The model is between two layers of a forward pass. On the model thread, during a
        document slice, run the query batch waiting now (if any) before the slice goes on.
        Anywhere else (a query batch, a re-ranking, another thread) it does nothing."""
        if not self._in_doc_pass or threading.get_ident() != self._model_ident:
            return
        if not self._queries:  # an unlocked peek: a query missed now is taken next layer
            return
        if 0 < self._doc_max_wait <= self._nested_s:
            return  # this slice has given queries their share: the rest wait for its end
        with self._cond:
            if not self._queries:
                return
            batch = self._take_queries_locked()
        self._in_doc_pass = False  # the nested pass has checkpoints too: no nesting
        began = time.monotonic()
        try:
            self.checkpoint_batches += 1
            self._run_queries(batch)
        finally:
            self._nested_s += time.monotonic() - began
            self._in_doc_pass = True

    # -- the model thread ------------------------------------------------------------------
    def _run(self) -> None:
        self._model_ident = threading.get_ident()  # before any slice: checkpoint() checks it
        lower_priority(self.nice)
        while True:
            with self._cond:
                work = self._next_locked()
                if work is None:
                    return
            if isinstance(work, list):
                self._run_queries(work)
            else:
                self._run_slice(work)

    def _run_lane(self) -> None:
        """The query lane: query batches only, as they come (micro-batched as on the model
        thread), until stopped and drained. At ``lane_nice``, below the request path: a pass
        is batch CPU work, and the threads that admit and refuse requests must win the cores
        from it (with the lane at the request path's priority, refusals beyond saturation
        took seconds: load-tests/results/ab-query-lane.md); the service puts the model
        thread's slices a step below the lane (Settings.model_nice)."""
        lower_priority(self.lane_nice)
        while True:
            with self._cond:
                while self._running and not self._queries:
                    self._cond.wait()
                if not self._queries:
                    return
                batch = self._batch_locked()
            self._run_queries(batch)

    def _next_locked(self) -> list[_Query] | _DocJob | None:
        """The next unit of work; None once stopped and drained. Holds ``_cond``."""
        while (self._running and not self._queries_here() and not self._docs
               and not self._reranks):
            self._cond.wait()
        if not self._queries_here() and not self._docs and not self._reranks:
            return None  # stopped, nothing left: what was queued before stop() is answered
        # Waiting queries go after at most one slice; waiting documents after at most
        # doc_max_wait of query batches.
        if self._docs and ((not self._queries_here() and not self._reranks)
                           or (not self._last_was_doc and self._docs_overdue())):
            self._last_was_doc = True
            job = self._pick_doc_locked()
            job.started = True
            return job
        if self._reranks and not self._queries_here():
            self._last_was_doc = False
            job = self._reranks[0]
            self._reranks.rotate(-1)
            return job
        self._last_was_doc = False
        return self._batch_locked()

    def _queries_here(self) -> bool:
        """Queries wait for the model thread (with a query lane they are the lane's)."""
        return bool(self._queries) and not self.query_lane

    def _batch_locked(self) -> list[_Query]:
        """The next query batch: the first waiting query opens it, others join it for up
        to max_wait or until max_batch texts. Holds ``_cond``; a query waits."""
        deadline = self._queries[0].arrived + self._max_wait
        while self._running and sum(len(q.texts) for q in self._queries) < self._max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        return self._take_queries_locked()

    def _take_queries_locked(self) -> list[_Query]:
        """The waiting queries of the next batch, up to max_batch texts. Holds ``_cond``."""
        batch = [self._queries.popleft()]  # a single request over max_batch runs alone
        n = len(batch[0].texts)
        while self._queries and n + len(self._queries[0].texts) <= self._max_batch:
            n += len(self._queries[0].texts)
            batch.append(self._queries.popleft())
        self._on_depth(sum(len(q.texts) for q in self._queries))
        return batch

    def _pick_doc_locked(self) -> _DocJob:
        """The document job with the highest response ratio, (waited + work left) / work
        left, the work in seconds at the model's measured rate: among jobs that arrived
        together the one with the least work left goes first (a small upsert is not queued
        behind a bulk one), and a job's priority grows with its wait, so a mid-sized upsert
        is not overtaken by every small one that arrives after it (shortest-first alone left
        a 10-document upsert waiting seconds under a stream of small ones). Unless a job has
        had no slice for ``doc_starve_s``: then the longest-waiting one, so a bulk job moves
        on at least a slice that often under any stream of small ones."""
        now = time.monotonic()
        starved = [j for j in self._docs if now - j.served >= self._doc_starve]
        if starved:
            return min(starved, key=lambda j: j.served)

        if self._doc_order == "least_left":
            return min(self._docs, key=lambda j: (j.left, j.served))

        def ratio(j: _DocJob) -> tuple[float, int, float]:
            work = max(j.left, 1) * self._seconds_per_token
            # Waits shorter than _ARRIVED_TOGETHER_S count as none: jobs submitted that
            # close together go by work alone, not by microseconds of submission order.
            waited = max(0.0, now - j.submitted - _ARRIVED_TOGETHER_S)
            return ((waited + work) / work, -j.left, -j.submitted)
        return max(self._docs, key=ratio)

    def _docs_overdue(self) -> bool:
        return time.monotonic() - self._docs_served >= self._doc_max_wait

    def _run_queries(self, batch: list[_Query]) -> None:
        texts = [t for q in batch for t in q.texts]
        self._on_wait("query", time.monotonic() - batch[0].arrived)
        try:
            vectors = self._embed_queries(texts)
        except BaseException as exc:  # every waiting caller hears of it
            for q in batch:
                q.future.set_exception(exc)
            return
        self._on_batch(len(texts))
        row = 0
        for q in batch:
            q.future.set_result(vectors[row : row + len(q.texts)])
            row += len(q.texts)

    def _slice(self, job: _DocJob) -> list[int]:
        """The next texts of ``job``: up to doc_batch texts and doc_slice_tokens tokens
        (always at least one text)."""
        budget = self.doc_slice_tokens
        idx: list[int] = []
        tokens = 0
        for i in job.order[job.done : job.done + max(1, self.doc_batch)]:
            if idx and budget and tokens + job.lengths[i] > budget:
                break
            idx.append(i)
            tokens += job.lengths[i]
        return idx

    def _run_slice(self, job: _DocJob) -> None:
        queue = self._docs if job.kind == "document" else self._reranks
        if job.kind == "document":
            with self._cond:
                waited = time.monotonic() - self._docs_served
            self._on_wait("document", waited)
        idx = self._slice(job)
        # (With a query lane no query waits for a slice: checkpoints have nothing to do.)
        self._in_doc_pass = job.kind == "document" and not self.query_lane
        self._nested_s = 0.0
        began = time.monotonic()
        try:
            vectors = job.fn([job.texts[i] for i in idx]) if idx else None
        except BaseException as exc:
            self._in_doc_pass = False
            with self._cond:
                if job.kind == "document":
                    self._docs_served = time.monotonic()
                if job in queue:
                    queue.remove(job)
            if not job.future.done():
                job.future.set_exception(exc)
            return
        self._in_doc_pass = False
        if job.kind == "document":
            own = max(time.monotonic() - began - self._nested_s, 0.0)  # without the queries
            tokens = sum(job.lengths[i] for i in idx)
            if tokens > 0:
                self._seconds_per_token += 0.2 * (own / tokens - self._seconds_per_token)
            if job.on_slice is not None:
                try:
                    job.on_slice(own)
                except Exception:  # noqa: BLE001 - a report must not stop the model thread
                    log.exception("on_slice of a document job failed")
            with self._cond:
                # Query time inside the slice counts as the documents' wait: a slice whose
                # queries took doc_max_wait has its successor due after one more batch.
                self._docs_served = time.monotonic() - self._nested_s
        if vectors is not None:
            job.out.append((idx, vectors))
        job.done += len(idx)
        job.left -= sum(job.lengths[i] for i in idx)
        job.served = time.monotonic()
        if job.done < len(job.texts):
            return
        with self._cond:
            if job in queue:
                queue.remove(job)
        if job.future.done():  # cancelled meanwhile
            return
        if job.out:
            first = job.out[0][1]
            result = np.empty((len(job.texts), *first.shape[1:]), dtype=np.float32)
            for rows, vecs in job.out:
                result[rows] = vecs
        else:
            result = job.fn([])
        job.future.set_result(result)
