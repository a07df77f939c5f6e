"""Python's garbage collector in the serving process (retriever/_gc.py): start-up objects
frozen out of full collections, and every collection's pause exported."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_durability import ServerProcess

from retriever._gc import PauseWatch

# A process with 200k tracked objects and a garbage cycle; after freeze_startup the objects
# are in the permanent generation, not in the one a full collection walks, and the cycle
# was collected first (frozen garbage would never be).
PROBE = """
import gc, weakref
from retriever._gc import freeze_startup
class Node: pass
keep = [[i] for i in range(200_000)]  # lists are tracked (dicts of atoms are not)
a, b = Node(), Node()
a.other, b.other = b, a
dead = weakref.ref(a)
del a, b
before = len(gc.get_objects())  # all generations: what a full collection walks
frozen = freeze_startup()
print(before, frozen, len(gc.get_objects()), dead() is None)
"""


def test_freeze_startup_moves_live_objects_out_of_full_collections_and_drops_garbage() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    before, frozen, after = (int(x) for x in out[:3])
    assert frozen >= 200_000
    assert after < 1_000 < before  # a full collection now walks almost nothing
    assert out[3] == "True"  # the cycle that was garbage at start-up was collected


# Namespaces whose objects were frozen (as those loaded at start are), then deleted or
# re-indexed into a new generation: reference counting still frees what they dropped;
# only cycles among frozen objects would stay.
DROPPED = """
import gc, sys, weakref
from pathlib import Path
from retriever._gc import freeze_startup
from retriever.config import Settings
from retriever.domain import Document
from retriever.service import RetrieverService
svc = RetrieverService(Settings(data_dir=Path(sys.argv[1])))
svc.start()
for ns in ("a", "b"):
    svc.create_namespace(ns)
    svc.upsert(ns, [Document(doc_id=f"d{i}", content=f"def f{i}(x):\\n    return x + {i}\\n"
                                                        * 20) for i in range(30)])
assert freeze_startup() > 100_000
a, b = svc.namespaces._handles["a"], svc.namespaces._handles["b"]
refs = [weakref.ref(a), weakref.ref(a.index)] + ([weakref.ref(a.lexical)] if a.lexical else [])
old_b = weakref.ref(b.index)
del a, b
svc.delete_namespace("a")
svc.reindex_namespace("b")
gc.collect()
print(len(refs), sum(r() is None for r in refs), old_b() is None)
svc.close()
"""


@pytest.mark.integration
def test_deleted_and_reindexed_namespaces_are_freed_though_frozen(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", DROPPED, str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    watched, freed, old_generation_freed = out.stdout.split()[-3:]
    assert int(watched) == int(freed) == 3  # handle, vector index, lexical index
    assert old_generation_freed == "True"  # the re-indexed namespace's old vector index


def test_pause_watch_observes_each_collection_by_generation() -> None:
    seen: list[tuple[int, float]] = []
    watch = PauseWatch(lambda generation, s: seen.append((generation, s))).install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        watch.remove()
    assert {g for g, _ in seen} >= {0, 2}
    assert all(s >= 0 for _, s in seen)
    n = len(seen)
    gc.collect(0)
    assert len(seen) == n  # removed


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("retriever_gc_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _pauses_counted(port: int) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while True:
        seen = _scrape(port)
        if seen.get('retriever_gc_pause_seconds_count{generation="0"}', 0) > 0:
            return seen
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


@pytest.mark.integration
def test_retriever_serve_freezes_its_start_up_and_exports_gc_pauses(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    try:
        seen = _pauses_counted(server.info["metrics_port"])
        # torch, transformers, gRPC, the model: hundreds of thousands of objects
        assert seen["retriever_gc_frozen_objects"] > 100_000, seen
        assert seen['retriever_gc_pause_seconds_count{generation="0"}'] > 0, seen
    finally:
        assert server.terminate() == 0


def test_a_server_in_a_process_not_its_own_freezes_nothing(server) -> None:  # noqa: ANN001
    # ServerThread (tests, benchmarks, embedding programs): frozen objects would never be
    # collected, so only `retriever serve` freezes; the pauses are exported all the same.
    seen = _pauses_counted(server.info["metrics_port"])
    assert seen["retriever_gc_frozen_objects"] == gc.get_freeze_count() == 0
    assert seen['retriever_gc_pause_seconds_count{generation="0"}'] > 0, seen
