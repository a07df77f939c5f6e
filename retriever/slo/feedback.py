"""Online precision@k: a bounded log of recent search responses, and the relevance
judgements callers send for them (RecordFeedback).

Online precision@k over a window = judgements "relevant" of chunks returned at rank <= k /
judgements of chunks returned at rank <= k, summed over the window's judgements (each
request's chunk counts once: judging it again replaces the verdict). No grpc here.

Each response is kept with the trace id it belongs to (Lineage.trace_id), and a judgement
names that trace on the RecordFeedback span (``retriever.feedback.trace_id``), so feedback
can be joined to the traces of the searches it judges.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from retriever import tracing, validation
from retriever.errors import InvalidArgument, NotFound

__all__ = ["MAX_JUDGEMENTS_PER_CALL", "MAX_REQUEST_ID_BYTES", "FeedbackLog", "WindowStats"]

MAX_JUDGEMENTS_PER_CALL = 1000
MAX_REQUEST_ID_BYTES = 128
#: Judgements kept (within the window) per response the log holds.
_JUDGEMENTS_PER_RESPONSE = 10


@dataclass(frozen=True, slots=True)
class WindowStats:
    namespace: str
    k: int
    relevant: int
    judged: int


class FeedbackLog:
    """Thread-safe. ``record`` after each search response; ``judge`` for RecordFeedback;
    ``window`` at scrape time."""

    def __init__(self, size: int, window_s: float, ks: Sequence[int] = (1, 5, 10),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._window = window_s
        self._ks = tuple(ks)
        self._clock = clock
        self._lock = threading.Lock()
        # request id -> (its trace id, the searches it made: (namespace, chunk ids in rank
        # order))
        self._responses: OrderedDict[
            str, tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = OrderedDict()
        # (request id, chunk id) -> (time, namespace, rank, relevant), oldest first
        self._judged: OrderedDict[tuple[str, str], tuple[float, str, int, bool]] = OrderedDict()

    def record(self, request_id: str, results: Sequence[tuple[str, Sequence[str]]],
               trace_id: str | None = None) -> None:
        """Remember what ``request_id`` returned: per search, its namespace and chunk ids in
        rank order, and the trace it belongs to (None: the current one,
        ``tracing.current_trace_id()``). A request id seen again replaces the earlier
        entry."""
        if not request_id:
            return
        if trace_id is None:
            trace_id = tracing.current_trace_id()
        entry = (trace_id, tuple((ns, tuple(ids)) for ns, ids in results))
        with self._lock:
            self._responses.pop(request_id, None)
            self._responses[request_id] = entry
            while len(self._responses) > self._size:
                self._responses.popitem(last=False)

    def judge(self, namespace: str, request_id: str, judgements: Sequence[tuple[str, bool]]
              ) -> tuple[int, int, dict[str, tuple[int, int]]]:
        """Record judgements of chunks ``request_id`` returned; returns (recorded,
        relevant, per namespace of the judged chunks: (recorded, relevant)). NotFound for
        a request the log does not hold; InvalidArgument for bad input, a namespace the
        request did not search, or a chunk it did not return."""
        if not request_id:
            raise InvalidArgument("request_id is required: the Lineage.request_id of the "
                                  "search judged", field="request_id")
        if len(request_id.encode("utf-8", "surrogatepass")) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes",
                                  field="request_id")
        if namespace:
            validation.namespace_name(namespace)
        if not judgements:
            raise InvalidArgument("feedback is empty: judge at least one chunk",
                                  field="feedback")
        if len(judgements) > MAX_JUDGEMENTS_PER_CALL:
            raise InvalidArgument(f"feedback has {len(judgements)} judgements; at most "
                                  f"{MAX_JUDGEMENTS_PER_CALL}", field="feedback")
        verdicts: dict[str, bool] = {}
        for i, (chunk_id, relevant) in enumerate(judgements):
            validation.chunk_id(chunk_id, f"feedback[{i}].chunk_id")
            if verdicts.setdefault(chunk_id, relevant) != relevant:
                raise InvalidArgument(f"feedback[{i}].chunk_id {chunk_id!r} is judged both "
                                      "relevant and not relevant", field=f"feedback[{i}]")
        with self._lock:
            entry = self._responses.get(request_id)
            if entry is None:
                raise NotFound(
                    f"no recent search has request id {request_id!r}: it is unknown, older "
                    f"than the last {self._size} responses the server keeps "
                    "(feedback_log_size), or its namespace was deleted", field="request_id")
            trace_id, searches = entry
            searched = [(ns, ids) for ns, ids in searches if not namespace or ns == namespace]
            if not searched:
                names = sorted({ns for ns, _ in searches})
                raise InvalidArgument(f"request {request_id!r} searched {names}, not "
                                      f"namespace {namespace!r}", field="namespace")
            ranks: dict[str, tuple[str, int]] = {}
            for ns, ids in searched:
                for rank, cid in enumerate(ids, start=1):
                    ranks.setdefault(cid, (ns, rank))
            for i, chunk_id in enumerate(verdicts):
                if chunk_id not in ranks:
                    raise InvalidArgument(
                        f"chunk {chunk_id!r} (feedback, judgement {i}) was not returned by "
                        f"request {request_id!r}", field="feedback")
            now = self._clock()
            by_ns: dict[str, tuple[int, int]] = {}
            for chunk_id, relevant in verdicts.items():
                ns, rank = ranks[chunk_id]
                n, r = by_ns.get(ns, (0, 0))
                by_ns[ns] = (n + 1, r + int(relevant))
                key = (request_id, chunk_id)
                self._judged.pop(key, None)
                self._judged[key] = (now, ns, rank, relevant)
            self._prune(now)
        if trace_id:
            trace.get_current_span().set_attribute("retriever.feedback.trace_id", trace_id)
        return len(verdicts), sum(verdicts.values()), by_ns

    def trace_id(self, request_id: str) -> str | None:
        """The trace id recorded with ``request_id`` ("" when it had none); None when the
        log does not hold the request."""
        with self._lock:
            entry = self._responses.get(request_id)
        return None if entry is None else entry[0]

    def _prune(self, now: float) -> None:
        cap = self._size * _JUDGEMENTS_PER_RESPONSE
        while self._judged:
            key, (t, *_rest) = next(iter(self._judged.items()))
            if t >= now - self._window and len(self._judged) <= cap:
                break
            del self._judged[key]

    def window(self) -> list[WindowStats]:
        """Per namespace and k: judgements of the last window_s seconds at rank <= k, and
        how many of them said relevant. Namespaces without any judgement are absent."""
        with self._lock:
            self._prune(self._clock())
            counts: dict[tuple[str, int], list[int]] = {}
            for _t, ns, rank, relevant in self._judged.values():
                for k in self._ks:
                    c = counts.setdefault((ns, k), [0, 0])
                    if rank <= k:
                        c[1] += 1
                        c[0] += int(relevant)
        return [WindowStats(ns, k, rel, judged)
                for (ns, k), (rel, judged) in sorted(counts.items())]

    def forget(self, namespace: str) -> None:
        """Drop the judgements of a deleted namespace, and its searches: feedback on them
        would count for the namespace again (or for a new one of the same name)."""
        with self._lock:
            for key in [k for k, v in self._judged.items() if v[1] == namespace]:
                del self._judged[key]
            for request_id, (trace_id, searches) in list(self._responses.items()):
                kept = tuple(s for s in searches if s[0] != namespace)
                if not kept:
                    del self._responses[request_id]
                elif len(kept) != len(searches):
                    self._responses[request_id] = (trace_id, kept)
