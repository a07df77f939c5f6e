"""Micro-batching: concurrent callers' texts are embedded together in one forward pass.

A worker thread takes the first waiting request, then gathers more for up to ``max_wait_s``
or until ``max_batch`` texts, embeds them in one call and hands each caller its rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from retriever.errors import NotReady

EmbedFn = Callable[[Sequence[str]], np.ndarray]
_STOP = object()


class MicroBatcher:
    def __init__(self, embed: EmbedFn, max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self._embed = embed
        self._max_batch = max_batch
        self._max_wait = max_wait_s
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_depth or (lambda n: None)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="query-embedder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._running = False
        self._queue.put(_STOP)
        self._thread.join(timeout=10)
        self._thread = None

    def submit(self, texts: Sequence[str]) -> Future[np.ndarray]:
        """Rows of the embeddings of ``texts``, in order, once their batch has run."""
        fut: Future[np.ndarray] = Future()
        if not self._running:
            fut.set_exception(NotReady("the query embedder is not running"))
            return fut
        self._queue.put((list(texts), fut))
        self._on_depth(self._queue.qsize())
        return fut

    def _run(self) -> None:
        carry = None  # a request that did not fit the previous batch
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                self._fail_rest()
                return
            batch = [item]  # a single request larger than max_batch runs alone
            n = len(item[0])
            deadline = time.monotonic() + self._max_wait
            while n < self._max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or n + len(nxt[0]) > self._max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                n += len(nxt[0])
            self._on_depth(self._queue.qsize())
            texts = [t for texts, _ in batch for t in texts]
            try:
                vectors = self._embed(texts)
            except BaseException as exc:  # hand the failure to every waiting caller
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            self._on_batch(len(texts))
            row = 0
            for texts_i, fut in batch:
                fut.set_result(vectors[row : row + len(texts_i)])
                row += len(texts_i)

    def _fail_rest(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(NotReady("the service is shutting down"))
