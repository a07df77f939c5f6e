"""What the core knows of its caller: whether anyone still waits for the answer.

A gRPC call that is cancelled, or whose deadline passes, stops waiting, but the thread doing
its work goes on. The server hands the core a ``CallToken``; the core checks it before every
point that would make the work visible (the catalog commit), and while it waits for a lock
or for the model, so a call nobody waits for never commits and stops using the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from retriever.errors import Cancelled

T = TypeVar("T")

_POLL_S = 0.05


class CallToken:
    def __init__(self, timeout_s: float | None = None) -> None:
        """``timeout_s``: the caller's deadline, seconds from now (None: no deadline)."""
        self._cancelled = threading.Event()
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Set by the server on a new upsert stream's first message: refuse it (Overloaded)
        # rather than begin it if the work queued for the model would delay it by more
        # than this many seconds. Checked once, just before its first embedding, then
        # cleared: a stream that has begun is never refused midway. 0 = no such check.
        self.shed_delay_s = 0.0

    def cancel(self) -> None:
        """The caller went away (it cancelled, or the connection dropped)."""
        self._cancelled.set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def done(self) -> bool:
        """True once nobody waits for the answer any more."""
        return self._cancelled.is_set() or self.expired

    def check(self, before: str) -> None:
        """Raise Cancelled if the caller no longer waits. ``before`` names what is skipped,
        e.g. "the commit", for the message."""
        if self._cancelled.is_set():
            raise Cancelled(f"the call was cancelled before {before}; nothing was committed")
        if self.expired:
            raise Cancelled(f"the deadline passed before {before}; nothing was committed",
                            deadline=True)

    def wait(self, future: Future[T], before: str,
             on_cancel: Callable[[], object] | None = None) -> T:
        """The future's result, or Cancelled (after ``on_cancel``) once the caller is gone."""
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                if self.done:
                    if on_cancel is not None:
                        on_cancel()
                    self.check(before)

    def acquire(self, lock: threading.Lock, before: str) -> None:
        """Take ``lock``, giving up with Cancelled once the caller is gone."""
        while not lock.acquire(timeout=_POLL_S):
            self.check(before)
        if self.done:
            lock.release()
            self.check(before)


# For calls made inside the process (tests, CLI tools, reconcile): nobody cancels them.
NEVER = CallToken()
