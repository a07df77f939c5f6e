"""MicroBatcher with a deterministic fake embed function that records its batches."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import numpy as np
import pytest

from retriever.errors import NotReady
from retriever.models.batcher import MicroBatcher

TIMEOUT = 10.0


class FakeEmbed:
    """Text "c:i" embeds to the row [c, i, len]; other texts to [-1, -1, len]. Records the
    size of each batch; can be held on a gate and made to fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.entered.set()
        if self.gate is not None and "gate" in texts:
            assert self.gate.wait(TIMEOUT)
        with self.lock:
            self.batches.append(len(texts))
        if "boom" in texts:
            raise RuntimeError("embedding failed")
        return np.array([row(t) for t in texts], dtype=np.float32).reshape(len(texts), 3)


def row(text: str) -> list[float]:
    if ":" in text:
        c, i = text.split(":")
        return [float(c), float(i), float(len(text))]
    return [-1.0, -1.0, float(len(text))]


def rows(texts: Sequence[str]) -> np.ndarray:
    return np.array([row(t) for t in texts], dtype=np.float32).reshape(len(texts), 3)


@pytest.fixture
def embed() -> FakeEmbed:
    return FakeEmbed()


@pytest.fixture
def make(embed: FakeEmbed) -> Iterator:
    started: list[MicroBatcher] = []

    def make_batcher(max_batch: int = 64, max_wait_s: float = 0.05, **kw: object) -> MicroBatcher:
        b = MicroBatcher(embed, max_batch, max_wait_s, **kw)  # type: ignore[arg-type]
        b.start()
        started.append(b)
        return b

    yield make_batcher
    for b in started:
        b.stop()


def submit_together(batcher: MicroBatcher, requests: list[list[str]]) -> list[Future]:
    """Submit each request from its own thread, all released at once."""
    futures: list[Future | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests), timeout=TIMEOUT)

    def go(i: int) -> None:
        barrier.wait()
        futures[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(f is not None for f in futures)
    return futures  # type: ignore[return-value]


def hold_worker(batcher: MicroBatcher, embed: FakeEmbed) -> tuple[threading.Event, Future]:
    """Occupy the worker with a request whose embedding waits on the returned gate."""
    embed.gate = threading.Event()
    fut = batcher.submit(["gate"])
    assert embed.entered.wait(TIMEOUT)
    return embed.gate, fut


def test_single_request(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make()
    out = b.submit(["1:0", "1:1", "x"]).result(TIMEOUT)
    np.testing.assert_array_equal(out, rows(["1:0", "1:1", "x"]))
    assert embed.batches == [3]


def test_concurrent_submits_are_batched_and_answered_in_order(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(max_batch=1000, max_wait_s=0.05)
    requests = [[f"{c}:{i}" for i in range(c % 3 + 1)] for c in range(16)]
    futures = submit_together(b, requests)
    for req, fut in zip(requests, futures, strict=True):
        np.testing.assert_array_equal(fut.result(TIMEOUT), rows(req))
    assert sum(embed.batches) == sum(len(r) for r in requests)
    assert len(embed.batches) < 16, f"no request shared a batch: {embed.batches}"


def test_max_batch_respected_for_single_texts(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(max_batch=4, max_wait_s=0.05)
    gate, first = hold_worker(b, embed)
    futures = [b.submit([f"{c}:0"]) for c in range(10)]  # queued behind the gate
    gate.set()
    for c, fut in enumerate(futures):
        np.testing.assert_array_equal(fut.result(TIMEOUT), rows([f"{c}:0"]))
    first.result(TIMEOUT)
    assert embed.batches == [1, 4, 4, 2]


def test_max_batch_respected_for_multi_text_requests(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    # Requests of 3 texts with max_batch 4: two of them (6 texts) must not share a batch.
    b = make(max_batch=4, max_wait_s=0.05)
    gate, first = hold_worker(b, embed)
    requests = [[f"{c}:{i}" for i in range(3)] for c in range(4)]
    futures = [b.submit(r) for r in requests]
    gate.set()
    for req, fut in zip(requests, futures, strict=True):
        np.testing.assert_array_equal(fut.result(TIMEOUT), rows(req))
    first.result(TIMEOUT)
    assert max(embed.batches) <= 4, f"batches of {embed.batches} texts with max_batch 4"


def test_a_request_larger_than_max_batch_is_still_embedded(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(max_batch=2)
    req = [f"1:{i}" for i in range(5)]
    np.testing.assert_array_equal(b.submit(req).result(TIMEOUT), rows(req))


def test_embed_failure_reaches_every_waiting_caller_then_recovers(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(max_batch=100, max_wait_s=0.05)
    gate, first = hold_worker(b, embed)
    futures = [b.submit(["1:0"]), b.submit(["boom"]), b.submit(["2:0", "2:1"])]
    gate.set()
    first.result(TIMEOUT)
    for fut in futures:
        with pytest.raises(RuntimeError, match="embedding failed"):
            fut.result(TIMEOUT)
    assert embed.batches[-1] == 4  # all three were one batch
    # The worker is still alive.
    np.testing.assert_array_equal(b.submit(["3:1"]).result(TIMEOUT), rows(["3:1"]))


def test_callbacks_see_batch_sizes_and_queue_depth(make) -> None:  # noqa: ANN001
    sizes: list[int] = []
    depths: list[int] = []
    b = make(on_batch=sizes.append, on_depth=depths.append)
    b.submit(["1:0", "1:1"]).result(TIMEOUT)
    b.submit(["2:0"]).result(TIMEOUT)
    assert sizes == [2, 1]
    assert depths and all(d >= 0 for d in depths)


def test_submit_before_start_or_after_stop_fails_with_not_ready(embed: FakeEmbed) -> None:
    b = MicroBatcher(embed, 8, 0.01)
    with pytest.raises(NotReady):
        b.submit(["1:0"]).result(TIMEOUT)
    b.start()
    np.testing.assert_array_equal(b.submit(["1:0"]).result(TIMEOUT), rows(["1:0"]))
    b.stop()
    with pytest.raises(NotReady):
        b.submit(["1:0"]).result(TIMEOUT)
    b.stop()  # twice is fine
    assert embed.batches == [1]


def test_stop_answers_what_was_queued_before_it(embed: FakeEmbed) -> None:
    b = MicroBatcher(embed, 2, 0.01)
    b.start()
    gate, first = hold_worker(b, embed)
    queued = [b.submit([f"{c}:0"]) for c in range(5)]
    stopper = threading.Thread(target=b.stop, daemon=True)
    stopper.start()
    gate.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    first.result(TIMEOUT)
    for c, fut in enumerate(queued):  # drained, not dropped
        np.testing.assert_array_equal(fut.result(TIMEOUT), rows([f"{c}:0"]))
    assert embed.batches == [1, 2, 2, 1]
    with pytest.raises(NotReady):
        b.submit(["9:0"]).result(TIMEOUT)


# -- document jobs -----------------------------------------------------------------------------
def test_document_job_is_sliced_longest_first_and_answered_in_order(make, embed: FakeEmbed
                                                                    ) -> None:  # noqa: ANN001
    b = make(doc_batch=4)
    texts = [f"{i}:{10 ** (i % 7)}" for i in range(10)]
    out = b.submit_documents(texts).result(TIMEOUT)
    np.testing.assert_array_equal(out, rows(texts))
    assert embed.batches == [4, 4, 2]


def test_queries_go_ahead_of_the_rest_of_a_document_job(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(doc_batch=2, max_wait_s=0.0)
    embed.gate = threading.Event()
    docs = b.submit_documents(["gate", "1:1", "1:2", "1:3", "1:4", "1:5"])
    assert embed.entered.wait(TIMEOUT)  # the first slice is running, held on the gate
    query = b.submit(["7:7"])
    embed.gate.set()
    np.testing.assert_array_equal(query.result(TIMEOUT), rows(["7:7"]))
    out = docs.result(TIMEOUT)
    assert out.shape == (6, 3)
    # slice 1 (2 texts), then the query (1 text) before the remaining slices
    assert embed.batches[:2] == [2, 1]
    assert sum(embed.batches) == 7


def test_failed_document_job_fails_only_itself(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(doc_batch=2)
    with pytest.raises(RuntimeError, match="embedding failed"):
        b.submit_documents(["1:1", "boom", "1:2"]).result(TIMEOUT)
    np.testing.assert_array_equal(b.submit_documents(["2:2"]).result(TIMEOUT), rows(["2:2"]))
    np.testing.assert_array_equal(b.submit(["3:3"]).result(TIMEOUT), rows(["3:3"]))


def test_empty_document_job_returns_no_rows(make) -> None:  # noqa: ANN001
    assert make().submit_documents([]).result(TIMEOUT).shape[0] == 0


# -- fairness between classes ------------------------------------------------------------------
class SlowEmbed(FakeEmbed):
    """Each forward pass takes ``per_call`` seconds, like a real model."""

    def __init__(self, per_call: float) -> None:
        super().__init__()
        self.per_call = per_call

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import time

        time.sleep(self.per_call)
        return super().__call__(texts)


def timed_job_beside(b: MicroBatcher, submit: Callable[[int], Future],
                     texts: list[str]) -> tuple[np.ndarray, float]:
    """A document job of ``texts`` and its duration while two threads keep calling
    ``submit(1)`` / ``submit(2)`` and waiting for each; stops the batcher after."""
    import time

    stop = threading.Event()

    def loop(c: int) -> None:
        while not stop.is_set():
            submit(c).result(TIMEOUT)

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in (1, 2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.05)  # the stream is running
        t0 = time.monotonic()
        out = b.submit_documents(texts).result(TIMEOUT)
        return out, time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        b.stop()


def test_a_stream_of_queries_cannot_starve_a_document_job() -> None:
    """Two clients search in a tight loop; a document job still finishes, each of its slices
    waiting no longer than the bound plus one query batch."""

    embed = SlowEmbed(0.005)
    waits: list[tuple[str, float]] = []
    b = MicroBatcher(embed, 64, 0.0, doc_batch=1, doc_max_wait_s=0.02,
                     on_wait=lambda kind, s: waits.append((kind, s)))
    b.start()
    out, elapsed = timed_job_beside(b, lambda c: b.submit(["1:0"]),
                                    [f"2:{i}" for i in range(10)])
    np.testing.assert_array_equal(out, rows([f"2:{i}" for i in range(10)]))
    doc_waits = [s for kind, s in waits if kind == "document"]
    assert len(doc_waits) >= 10
    # Bound: doc_max_wait (20 ms) + one query batch (5 ms) + scheduling slack.
    assert max(doc_waits) < 0.02 + 0.005 + 0.05, doc_waits
    # 10 slices of 5 ms each, each after at most ~25 ms of queries: well under a second.
    assert elapsed < 1.0


def test_queries_wait_at_most_one_slice_during_a_bulk_job() -> None:
    embed = SlowEmbed(0.01)
    waits: list[tuple[str, float]] = []
    b = MicroBatcher(embed, 64, 0.0, doc_batch=1, doc_max_wait_s=0.0,
                     on_wait=lambda kind, s: waits.append((kind, s)))
    b.start()
    try:
        docs = b.submit_documents([f"2:{i}" for i in range(30)])
        for _ in range(10):
            b.submit(["1:0"]).result(TIMEOUT)
        docs.result(TIMEOUT)
    finally:
        b.stop()
    query_waits = [s for kind, s in waits if kind == "query"]
    assert len(query_waits) == 10
    assert max(query_waits) < 0.01 + 0.05, query_waits  # one slice + slack


def test_document_jobs_take_turns(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    """A small job submitted behind a bulk one finishes long before the bulk one."""
    b = make(doc_batch=1)
    gate, first = hold_worker(b, embed)
    order: list[str] = []
    bulk = b.submit_documents([f"1:{i}" for i in range(20)])
    small = b.submit_documents(["2:0", "2:1"])
    bulk.add_done_callback(lambda f: order.append("bulk"))
    small.add_done_callback(lambda f: order.append("small"))
    gate.set()
    first.result(TIMEOUT)
    small.result(TIMEOUT)
    bulk.result(TIMEOUT)
    assert order == ["small", "bulk"]


def test_the_job_with_the_least_work_left_goes_first(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(doc_batch=1)
    gate, first = hold_worker(b, embed)
    order: list[str] = []
    # Submitted microseconds apart, the jobs count as arriving together: their order is by
    # work alone (once a job has waited 50 ms, its wait counts too; see the next test).
    for name, n in (("bulk", 20), ("medium", 5), ("small", 2)):
        b.submit_documents([f"{n}:{i}" for i in range(n)], [200] * n).add_done_callback(
            lambda f, name=name: order.append(name))
    gate.set()
    first.result(TIMEOUT)
    deadline = threading.Event()
    while len(order) < 3 and not deadline.wait(0.01):
        pass
    assert order == ["small", "medium", "bulk"]


def test_a_stream_of_small_jobs_cannot_starve_a_bulk_one() -> None:
    """Shortest-remaining-first alone would never serve the bulk job while small ones keep
    coming; the starvation bound gives it a slice at least every doc_starve_s."""

    b = MicroBatcher(SlowEmbed(0.005), 64, 0.0, doc_batch=1, doc_starve_s=0.05)
    b.start()
    out, elapsed = timed_job_beside(b, lambda c: b.submit_documents([f"{c}:0"]),
                                    [f"3:{i}" for i in range(20)])
    np.testing.assert_array_equal(out, rows([f"3:{i}" for i in range(20)]))
    # 20 slices, each at most doc_starve_s (50 ms) + a few 5 ms slices apart
    assert elapsed < 20 * (0.05 + 0.03), elapsed


def test_slices_respect_the_token_budget(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(doc_batch=8, doc_slice_tokens=10)
    texts = [f"1:{i}" for i in range(6)]
    out = b.submit_documents(texts, lengths=[6, 4, 4, 3, 3, 12]).result(TIMEOUT)
    np.testing.assert_array_equal(out, rows(texts))
    # longest first: [12] alone (over budget, still runs), [6, 4], [4, 3, 3]
    assert embed.batches == [1, 2, 3]


def test_a_cancelled_document_job_stops_using_the_model(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    b = make(doc_batch=1)
    gate, first = hold_worker(b, embed)
    job = b.submit_documents([f"1:{i}" for i in range(50)])
    assert b.cancel_documents(job)
    gate.set()
    first.result(TIMEOUT)
    assert job.cancelled()
    np.testing.assert_array_equal(b.submit(["3:3"]).result(TIMEOUT), rows(["3:3"]))
    assert sum(embed.batches) < 5  # the 50 texts never ran
    assert not b.cancel_documents(job)


def test_queries_run_on_their_own_function_and_documents_on_theirs(
        make: Callable[..., MicroBatcher], embed: FakeEmbed) -> None:
    """embed_queries (e.g. a pass on fewer threads) answers query batches only."""
    query_batches: list[list[str]] = []

    def embed_queries(texts: Sequence[str]) -> np.ndarray:
        query_batches.append(list(texts))
        return rows(texts)

    b = make(max_wait_s=0.0, embed_queries=embed_queries)
    docs = b.submit_documents(["1:1", "1:2", "1:3"], [3, 3, 3])
    assert np.array_equal(docs.result(TIMEOUT), rows(["1:1", "1:2", "1:3"]))
    assert np.array_equal(b.submit(["2:1"]).result(TIMEOUT), rows(["2:1"]))
    assert query_batches == [["2:1"]]
    assert sum(embed.batches) == 3  # the document texts, in slices


class LayeredEmbed(FakeEmbed):
    """A model of ``layers`` layers that calls the batcher's checkpoint before each one, as
    the real embedder's layer hooks do; a document pass can be held before its second
    layer on ``hold`` (texts starting with "2:" are documents here)."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.layers = layers
        self.batcher: MicroBatcher | None = None
        self.hold = threading.Event()
        self.held = threading.Event()
        self.calls: list[str] = []  # "start <first text>" / "end <first text>" per pass

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        assert self.batcher is not None
        self.calls.append(f"start {texts[0]}")
        for layer in range(self.layers):
            if layer == 1 and texts[0].startswith("2:") and not self.hold.is_set():
                self.held.set()
                assert self.hold.wait(TIMEOUT)
            self.batcher.checkpoint()
        self.calls.append(f"end {texts[0]}")
        return super().__call__(texts)


def test_a_query_runs_between_the_layers_of_a_document_slice() -> None:
    """A query that arrives while a document slice is in its forward pass is answered at
    the slice's next layer, before the slice ends; the slice's own result is unchanged,
    and a query pass's checkpoints run nothing (no nesting)."""
    model = LayeredEmbed()
    b = MicroBatcher(model, 64, 0.0, doc_batch=1)
    model.batcher = b
    b.start()
    try:
        docs = b.submit_documents(["2:0"], [3])
        assert model.held.wait(TIMEOUT)  # the slice is between its first and second layer
        q1, q2 = b.submit(["1:0"]), b.submit(["1:1"])
        model.hold.set()
        assert np.array_equal(docs.result(TIMEOUT), rows(["2:0"]))
        assert np.array_equal(q1.result(TIMEOUT), rows(["1:0"]))
        assert np.array_equal(q2.result(TIMEOUT), rows(["1:1"]))
    finally:
        b.stop()
    # Both queries were waiting at the checkpoint: one batch, nested in the slice.
    assert model.calls == ["start 2:0", "start 1:0", "end 1:0", "end 2:0"]
    assert b.checkpoint_batches == 1


def test_checkpoints_outside_a_document_slice_do_nothing(make, embed: FakeEmbed) -> None:  # noqa: ANN001
    """Called from another thread, or with no document pass running, a checkpoint runs no
    query (they wait for the model thread as usual)."""
    b = make(max_wait_s=0.0)
    gate, held = hold_worker(b, embed)  # the model thread is in a query pass
    waiting = b.submit(["1:0"])
    b.checkpoint()  # this thread is not the model thread
    assert not waiting.done()
    gate.set()
    assert np.array_equal(waiting.result(TIMEOUT), rows(["1:0"]))
    held.result(TIMEOUT)
    assert b.checkpoint_batches == 0


@pytest.mark.parametrize(("order", "first"), [("response_ratio", "medium"),
                                              ("least_left", "small")])
def test_a_job_that_waited_goes_before_a_smaller_one_that_just_arrived(
        make, embed: FakeEmbed, order: str, first: str) -> None:  # noqa: ANN001
    """By response ratio ((waited + work left) / work left) a mid-sized job that has waited
    is not overtaken by every small one arriving after it; shortest-remaining-first (the
    order before) lets the newcomer go first."""
    import time

    b = make(doc_batch=1, doc_order=order)
    gate, held = hold_worker(b, embed)
    done: list[str] = []
    b.submit_documents([f"5:{i}" for i in range(5)]).add_done_callback(
        lambda f: done.append("medium"))
    time.sleep(0.3)
    b.submit_documents(["1:0"]).add_done_callback(lambda f: done.append("small"))
    gate.set()
    held.result(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done[0] == first, done


def test_an_unknown_document_order_is_refused(embed: FakeEmbed) -> None:
    with pytest.raises(ValueError, match="response_ratio or least_left"):
        MicroBatcher(embed, 8, 0.0, doc_order="lifo")


def test_queries_inside_a_slice_stop_at_the_documents_share() -> None:
    """Under a saturating search stream a document slice runs queries at its layers only
    until they have taken doc_max_wait (here 25 ms of 10 ms batches: at most 3 per slice),
    so the document job still finishes at its floor."""
    import time

    events: list[str] = []
    b: MicroBatcher

    def model(texts: Sequence[str]) -> np.ndarray:
        if texts[0].startswith("2:"):
            events.append("doc start")
            for _ in range(6):
                b.checkpoint()
                time.sleep(0.002)
            events.append("doc end")
        else:
            time.sleep(0.01)
            events.append("query")
        return rows(texts)

    b = MicroBatcher(model, 64, 0.0, doc_batch=1, doc_max_wait_s=0.025)
    b.start()
    stop = threading.Event()

    def client(c: int) -> None:
        while not stop.is_set():
            b.submit([f"1:{c}"]).result(TIMEOUT)

    clients = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.05)
        out = b.submit_documents([f"2:{i}" for i in range(10)]).result(TIMEOUT)
    finally:
        stop.set()
        for t in clients:
            t.join(TIMEOUT)
        b.stop()
    np.testing.assert_array_equal(out, rows([f"2:{i}" for i in range(10)]))
    inside: list[int] = []
    for i, e in enumerate(events):
        if e == "doc start":
            end = events.index("doc end", i)
            inside.append(events[i:end].count("query"))
    assert len(inside) == 10
    assert max(inside) <= 3, inside  # 3 batches of 10 ms pass the 25 ms share
    assert sum(inside) >= 10  # and the stream did run inside the slices


def test_the_document_backlog_age_is_the_oldest_wait_for_a_first_slice(
        make, embed: FakeEmbed) -> None:  # noqa: ANN001
    import time

    b = make(doc_batch=1)
    assert b.document_backlog_age() == 0.0
    embed.gate = threading.Event()
    served = b.submit_documents(["gate", "1:0"])  # its first slice holds the model
    assert embed.entered.wait(TIMEOUT)
    time.sleep(0.1)
    assert b.document_backlog_age() == 0.0  # being served: not a backlog
    waiting = b.submit_documents(["2:0", "2:1"])
    time.sleep(0.2)
    assert b.document_backlog_age() >= 0.2
    embed.gate.set()
    served.result(TIMEOUT)
    waiting.result(TIMEOUT)
    assert b.document_backlog_age() == 0.0


def test_query_lane_answers_queries_while_a_document_slice_runs(embed: FakeEmbed) -> None:
    """With a query lane, queries run on their own thread and function, beside a document
    slice; without one they wait for the slice's end."""
    for lane in (True, False):
        docs_fn, queries_fn = FakeEmbed(), FakeEmbed()
        docs_fn.gate = threading.Event()
        b = MicroBatcher(docs_fn, 64, 0.0, embed_queries=queries_fn)  # type: ignore[arg-type]
        b.query_lane = lane
        b.start()
        try:
            docs = b.submit_documents(["gate", "2:0"])
            assert docs_fn.entered.wait(TIMEOUT)  # the model thread is inside the slice
            query = b.submit(["1:0", "1:1"])
            if lane:
                np.testing.assert_array_equal(query.result(TIMEOUT), rows(["1:0", "1:1"]))
                assert not docs.done()  # answered while the slice was still held
                assert "query-lane" in {t.name for t in threading.enumerate()}
            else:
                with pytest.raises(TimeoutError):
                    query.result(0.3)  # behind the held slice
            docs_fn.gate.set()
            np.testing.assert_array_equal(docs.result(TIMEOUT), rows(["gate", "2:0"]))
            np.testing.assert_array_equal(query.result(TIMEOUT), rows(["1:0", "1:1"]))
            assert queries_fn.batches == [2]  # never on the documents' function
        finally:
            docs_fn.gate.set()
            b.stop()
        assert "query-lane" not in {t.name for t in threading.enumerate()}


def test_query_lane_drains_on_stop_and_refuses_after(embed: FakeEmbed) -> None:
    queries_fn = FakeEmbed()
    queries_fn.gate = threading.Event()
    b = MicroBatcher(embed, 64, 0.0, embed_queries=queries_fn)  # type: ignore[arg-type]
    b.query_lane = True
    b.start()
    held = b.submit(["gate"])
    assert queries_fn.entered.wait(TIMEOUT)
    queued = b.submit(["3:0"])  # waits for the lane, which is busy
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    queries_fn.gate.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    np.testing.assert_array_equal(held.result(TIMEOUT), rows(["gate"]))
    np.testing.assert_array_equal(queued.result(TIMEOUT), rows(["3:0"]))
    with pytest.raises(NotReady):
        b.submit(["4:0"]).result(TIMEOUT)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_query_lane_and_model_thread_run_at_their_own_priorities(embed: FakeEmbed) -> None:
    """The lane's passes are batch CPU work like the model thread's: niced, so the threads
    that admit and refuse requests win the cores from them; the model thread's document
    slices at a nice of their own (the service puts them a step below the lane)."""
    from retriever._priority import thread_nice

    b = MicroBatcher(embed, 64, 0.0, nice=3)  # type: ignore[arg-type]
    b.query_lane = True
    b.nice, b.lane_nice = 6, 2
    base = thread_nice()
    b.start()
    try:
        b.submit(["1:0"]).result(TIMEOUT)  # each thread has run, so has lowered itself
        b.submit_documents(["2:0"]).result(TIMEOUT)
        ids = {t.name: t.native_id for t in threading.enumerate()}
        assert os.getpriority(os.PRIO_PROCESS, ids["embedder"]) == min(19, base + 6)
        assert os.getpriority(os.PRIO_PROCESS, ids["query-lane"]) == min(19, base + 2)
    finally:
        b.stop()


def test_document_delay_counts_each_queued_job_up_to_the_new_ones_size(make, embed: FakeEmbed
                                                                       ) -> None:
    """Jobs share the model slice by slice, so each job queued delays a new one by the
    lesser of its own work left and the new job's: a bulk job in progress counts as one
    more job of the new one's size (upsert_shed_delay_s decides from this)."""
    b = make(doc_batch=1)
    assert b.document_delay(500) == (0.0, 500 * b._seconds_per_token)  # nothing queued
    gate, first = hold_worker(b, embed)
    bulk = b.submit_documents([f"1:{i}" for i in range(20)], [100] * 20)  # 2000 tokens
    medium = b.submit_documents([f"2:{i}" for i in range(3)], [100] * 3)  # 300 tokens
    spt = b._seconds_per_token  # no slice has run since: the rate is what it was
    for tokens, ahead in ((50, 50 + 50), (300, 300 + 300), (1000, 1000 + 300),
                          (5000, 2000 + 300)):
        delay, own = b.document_delay(tokens)
        assert delay == pytest.approx(ahead * spt) and own == pytest.approx(tokens * spt)
    gate.set()
    first.result(TIMEOUT)
    bulk.result(TIMEOUT)
    medium.result(TIMEOUT)
    assert b.document_delay(1000)[0] == 0.0  # all done: nothing ahead
