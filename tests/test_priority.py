"""Batch work runs at a lower CPU priority than the request path (Linux, per thread)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_settings

from retriever._priority import is_idle_policy, lower_priority, run_lowered, thread_nice
from retriever.client import RetrieverClient, pb
from retriever.server.app import ServerThread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_lower_priority_affects_only_the_calling_thread() -> None:
    base = thread_nice()
    seen: dict[str, int] = {}

    def work() -> None:
        lower_priority(3)
        seen["worker"] = thread_nice()
        child = threading.Thread(target=lambda: seen.__setitem__("child", thread_nice()))
        child.start()
        child.join()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"worker": min(19, base + 3), "child": min(19, base + 3)}  # inherited
    assert thread_nice() == base  # the caller's own priority is untouched
    lower_priority(0)
    assert thread_nice() == base


def test_run_lowered_runs_at_the_lower_priority_and_threads_it_starts_inherit_it() -> None:
    base = thread_nice()
    seen: dict[str, int] = {}

    def load() -> str:
        seen["loader"] = thread_nice()
        child = threading.Thread(target=lambda: seen.__setitem__("child", thread_nice()))
        child.start()
        child.join()
        return "loaded"

    assert run_lowered(4, load) == "loaded"
    assert seen == {"loader": min(19, base + 4), "child": min(19, base + 4)}
    assert thread_nice() == base

    def broken() -> None:
        raise ValueError("a damaged model")

    with pytest.raises(ValueError, match="a damaged model"):
        run_lowered(4, broken)
    assert run_lowered(0, thread_nice) == base  # 0: on the caller's thread, as it is


def test_model_and_upsert_threads_give_way_to_the_request_path(tmp_path: Path,
                                                               embedder) -> None:  # noqa: ANN001
    base = thread_nice()
    settings = make_settings(tmp_path / "data", model_thread_nice=4, write_thread_nice=9)
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("ns", [pb.Document(doc_id="a", content="def parse_config(path): ...")])
            assert c.search("ns", "parse the config", top_k=1).hits
            threads = {t.name: t.native_id for t in threading.enumerate()}
            embedder_tid = next(tid for name, tid in threads.items() if name == "embedder")
            writers = [tid for name, tid in threads.items() if name.startswith("rpc-write")]
            readers = [tid for name, tid in threads.items() if name.startswith("rpc-read")]
            assert nice_of(embedder_tid) == min(19, base + 4)
            assert writers and {nice_of(t) for t in writers} == {min(19, base + 9)}
            assert readers and {nice_of(t) for t in readers} == {base}
            assert nice_of(threads["grpc-server"]) == base
    finally:
        st.stop()


def test_the_model_threads_nice_is_a_step_below_the_query_lane_by_default(tmp_path: Path
                                                                          ) -> None:
    """Auto (model_thread_nice unset): with a query lane the model thread runs document
    slices only, at query_lane_nice + 5; without one its query batches run there, at 5.
    A value set applies as it is, lane or not."""
    s = make_settings(tmp_path / "data")
    assert s.model_thread_nice is None
    assert (s.model_nice(query_lane=True), s.model_nice(query_lane=False)) == (10, 5)
    s = make_settings(tmp_path / "data", query_lane_nice=3)
    assert s.model_nice(query_lane=True) == 8
    s = make_settings(tmp_path / "data", query_lane_nice=17)
    assert s.model_nice(query_lane=True) == 19
    s = make_settings(tmp_path / "data", model_thread_nice=4)
    assert (s.model_nice(query_lane=True), s.model_nice(query_lane=False)) == (4, 4)


def test_idle_policy_applies_to_the_lowered_thread_and_what_it_starts() -> None:
    """run_lowered(idle=True): the thread (and threads it starts, as a library's workers)
    runs under SCHED_IDLE; the caller's policy is untouched."""
    seen: dict[str, bool] = {}

    def load() -> None:
        seen["loader"] = is_idle_policy(threading.get_native_id())
        t = threading.Thread(target=lambda: seen.setdefault(
            "worker", is_idle_policy(threading.get_native_id())))
        t.start()
        t.join()

    run_lowered(0, load, idle=True)
    assert seen == {"loader": True, "worker": True}
    assert not is_idle_policy(threading.get_native_id())
    run_lowered(3, load)  # without idle: nice alone
    assert seen["loader"] is False


def test_the_models_workers_go_under_sched_idle_only_where_no_query_runs_on_them(
        tmp_path: Path) -> None:
    """Only with a query lane (queries never run on the model's workers), and only while
    document_sched_idle is on; a re-ranker does not matter (it runs on torch threads of
    the model thread's own)."""
    s = make_settings(tmp_path / "data")
    assert s.document_sched_idle
    assert s.document_idle(query_lane=True) and not s.document_idle(query_lane=False)
    assert make_settings(tmp_path / "data",
                         reranker_model=str(tmp_path)).document_idle(query_lane=True)
    assert not make_settings(tmp_path / "data",
                             document_sched_idle=False).document_idle(query_lane=True)
