"""RWLock: shared readers, exclusive writers, and writers preferred over new readers.

Every wait has a timeout and every thread is a daemon, so a broken lock fails a test
instead of hanging the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from retriever._rwlock import RWLock

TIMEOUT = 5.0
BLOCKED = 0.1  # how long "does not get in" is watched for


class Holder:
    """A thread that takes the lock (read or write), reports when it is in, and holds it
    until released."""

    def __init__(self, lock: RWLock, mode: str, log: list[str] | None = None,
                 name: str = "") -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self._ctx: Callable = lock.read if mode == "read" else lock.write
        self._log = log
        self._name = name or mode
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self._ctx():
            if self._log is not None:
                self._log.append(self._name)
            self.entered.set()
            self.release.wait(TIMEOUT)
        self.done.set()

    def finish(self) -> None:
        self.release.set()
        assert self.done.wait(TIMEOUT), f"{self._name} did not finish"
        self.thread.join(TIMEOUT)


def wait_until(predicate: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(int(TIMEOUT / 0.005)):
        if predicate():
            return
        done.wait(0.005)
    raise AssertionError("condition not reached in time")


def test_readers_share() -> None:
    lock = RWLock()
    barrier = threading.Barrier(3, timeout=TIMEOUT)  # only passable if all three are inside
    errors: list[BaseException] = []

    def read() -> None:
        try:
            with lock.read():
                barrier.wait()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert errors == []
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_writer_excludes_readers_and_writers(mode: str) -> None:
    lock = RWLock()
    writer = Holder(lock, "write")
    assert writer.entered.wait(TIMEOUT)
    other = Holder(lock, mode)
    assert not other.entered.wait(BLOCKED)
    writer.finish()
    assert other.entered.wait(TIMEOUT)
    other.finish()


def test_writer_waits_for_all_readers() -> None:
    lock = RWLock()
    readers = [Holder(lock, "read") for _ in range(2)]
    for r in readers:
        assert r.entered.wait(TIMEOUT)
    writer = Holder(lock, "write")
    assert not writer.entered.wait(BLOCKED)
    readers[0].finish()
    assert not writer.entered.wait(BLOCKED)
    readers[1].finish()
    assert writer.entered.wait(TIMEOUT)
    writer.finish()


def test_waiting_writer_blocks_new_readers() -> None:
    lock = RWLock()
    log: list[str] = []
    r1 = Holder(lock, "read", log, "r1")
    assert r1.entered.wait(TIMEOUT)
    w = Holder(lock, "write", log, "w")
    wait_until(lambda: lock._waiting_writers == 1)  # the writer is queued
    r2 = Holder(lock, "read", log, "r2")
    assert not r2.entered.wait(BLOCKED), "a new reader overtook a waiting writer"
    assert not w.entered.is_set()
    r1.finish()
    assert w.entered.wait(TIMEOUT)
    assert not r2.entered.wait(BLOCKED)
    w.finish()
    assert r2.entered.wait(TIMEOUT)
    r2.finish()
    assert log == ["r1", "w", "r2"]


def test_stream_of_readers_cannot_starve_a_writer() -> None:
    lock = RWLock()
    stop = threading.Event()
    writer_in = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with lock.read():
                stop.wait(0.002)

    readers = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        def write() -> None:
            with lock.write():
                writer_in.set()

        w = threading.Thread(target=write, daemon=True)
        w.start()
        assert writer_in.wait(TIMEOUT), "the writer starved"
    finally:
        stop.set()
        for t in readers:
            t.join(TIMEOUT)
    assert not any(t.is_alive() for t in readers)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_an_exception_inside_releases_the_lock(mode: str) -> None:
    lock = RWLock()
    ctx = lock.read if mode == "read" else lock.write
    with pytest.raises(KeyError), ctx():
        raise KeyError("x")
    writer = Holder(lock, "write")
    assert writer.entered.wait(TIMEOUT)
    writer.finish()
    reader = Holder(lock, "read")
    assert reader.entered.wait(TIMEOUT)
    reader.finish()
