"""Per-thread CPU priority: batch work yields the cores to the request path.

On a machine with few cores the model's forward passes (and their OpenMP workers) and the
CPU work of upserts (chunking, token counting, commits) can keep every core busy; the event
loop that admits or refuses requests, and the threads that answer searches, then wait for a
time slice behind them. Linux keeps a nice value per thread, and threads inherit their
creator's: a thread that lowers its own priority before it starts work (before its first
forward pass creates the OpenMP team) takes its helpers down with it. It still uses every
idle core; it only gives way when request-path threads want to run. Work that must never
take a core from them (document slices beside a query lane) can go further, under
SCHED_IDLE: it then runs only on a core that nothing else wants.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (at most 19); no-op for 0, and off
    Linux (where nice values are per process)."""
    if nice <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # e.g. a seccomp profile that refuses it: run as is
        log.warning("could not lower the priority of thread %s: %s", tid, exc)


def idle_policy() -> None:
    """Put the calling thread under Linux's SCHED_IDLE policy: it then runs only on a core
    that no thread of another policy wants (its nice no longer matters). Without
    CAP_SYS_NICE a thread cannot leave it again. No-op off Linux; logged where refused
    (the thread then runs as it was, as `lower_priority` does)."""
    if sys.platform != "linux" or not hasattr(os, "SCHED_IDLE"):
        return
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("could not put thread %s under SCHED_IDLE: %s", tid, exc)


def is_idle_policy(tid: int) -> bool:
    """Whether thread ``tid`` runs under SCHED_IDLE (Linux), for tests and diagnostics."""
    return hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(tid) == os.SCHED_IDLE


def run_lowered(nice: int, fn: Callable[[], T], *, idle: bool = False) -> T:
    """``fn()`` on a thread of its own whose priority is lowered by ``nice`` first; its
    result, or its exception. For loading a library whose worker threads are created by
    its first use and inherit the nice value of the thread that created them: OpenVINO's
    (TBB) inference workers, which the model thread's forward passes run on afterwards.
    Loaded on the starting thread, they kept its priority, so a document slice competed
    with the request path as an equal while the model thread itself gave way. ``idle``:
    the thread (so its workers) also goes under SCHED_IDLE (`idle_policy`)."""
    if (nice <= 0 and not idle) or sys.platform != "linux":
        return fn()
    box: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        lower_priority(nice)
        if idle:
            idle_policy()
        try:
            box.append(fn())
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=work, name="lowered-load")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return box[0]


def thread_nice() -> int:
    """The calling thread's nice value (Linux), for tests and diagnostics."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
