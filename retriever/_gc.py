"""Python's garbage collector in the serving process: its pauses, observed; its start-up
objects, frozen.

A collection of generation 2 (a full one) walks every container object the process
tracks, holding the GIL: every thread stops for as long as it takes. A started server
tracks ~575k of them (torch, transformers, OpenVINO, gRPC, the loaded model and indexes)
and a full collection took ~330 ms here, every few seconds to minutes under load: the
p99 of refusals beyond saturation, in every request class, was that pause (load-tests/).
Few of those objects ever become garbage while the server runs, so `retriever serve` moves them
into the permanent generation once started (``gc.freeze``), and full collections walk
only what the server made since. Frozen objects are still freed by reference counting
when dropped (a namespace deleted or re-indexed after the freeze is: tests/test_gc.py); only a
reference cycle among them would never be collected.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

__all__ = ["PauseWatch", "freeze_startup"]


def freeze_startup() -> int:
    """Collect what start-up left as garbage, then move every object the collector tracks
    into the permanent generation. Returns how many objects are frozen. Only for a process
    that is the server's: frozen objects are never collected, cycles among them included."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class PauseWatch:
    """Observes the length of each garbage collection (``gc.callbacks``), by generation,
    while installed. Collections never overlap (they hold the GIL), so one start time
    serves."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._began = 0.0

    def install(self) -> PauseWatch:
        gc.callbacks.append(self._callback)
        return self

    def remove(self) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began:
            self._observe(info["generation"], time.perf_counter() - self._began)
            self._began = 0.0
