"""The embedder's OpenVINO backend (fp32, int8), its model cache, revision naming, vector
compatibility classes, refused combinations and `auto`'s choice by gate verdicts.

Real model, real OpenVINO and NNCF. One data dir for the module: the fp32 conversion and the
int8 build (calibrated on a small sample) happen once, the later loads reuse them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import make_settings
from test_embedder import real_chunks
from test_storage_faults import tmpfs

from retriever.client import RetrieverClient, pb
from retriever.config import Settings
from retriever.models import _openvino, calibration
from retriever.models.calibration import Verdict, cpu_key, has_native_bf16
from retriever.models.embedder import (
    Embedder,
    auto_candidates,
    check_backend,
    check_precision,
    compatibility_key,
    compatible,
    revision_name,
)
from retriever.server.app import ServerThread

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CAL_SAMPLES = 16
TEXTS = real_chunks()[::2]  # every length up to a full chunk


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backends")


def ov_settings(data_dir: Path, precision: str, **kw: object) -> Settings:
    # No verdicts unless a test gives some: the packaged ones would join int8 to the float
    # class here (see test_the_packaged_verdicts_...).
    kw.setdefault("embedder_verdicts_file", data_dir / "no-verdicts.json")
    return make_settings(data_dir, embedder_backend="openvino", embedder_precision=precision,
                         embedder_calibration_samples=CAL_SAMPLES, **kw)


@pytest.fixture(scope="module")
def ov_fp32(data_dir: Path) -> Embedder:
    e = Embedder(ov_settings(data_dir, "fp32"))
    e.load()
    return e


@pytest.fixture(scope="module")
def ov_int8(data_dir: Path) -> Embedder:
    asked: list[int] = []

    def catalog_chunks(n: int) -> list[str]:
        asked.append(n)
        return real_chunks()

    e = Embedder(ov_settings(data_dir, "int8"))
    e.load(calibration_texts=catalog_chunks)
    assert asked == [4 * CAL_SAMPLES]
    return e


@pytest.fixture(scope="module")
def reference(embedder: Embedder) -> np.ndarray:
    """torch fp32 vectors of TEXTS."""
    return embedder.embed(TEXTS)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


# -- fast rules ----------------------------------------------------------------------------
def test_revisions_name_backend_and_precision() -> None:
    w = "80bc779a287d"
    assert revision_name(w, "fp32") == w
    assert revision_name(w, "bf16") == f"{w}+bf16"
    assert revision_name(w, "fp32", "openvino") == f"{w}+ov-fp32"
    assert revision_name(w, "bf16", "openvino") == f"{w}+ov-bf16"
    assert revision_name(w, "int8", "openvino") == f"{w}+ov-int8"


def test_float_precisions_are_one_class_and_int8_its_own_unless_equivalent() -> None:
    w = "80bc779a287d"
    floats = [w, f"{w}+fp16", f"{w}+bf16", f"{w}+ov-fp32", f"{w}+ov-bf16"]
    assert {compatibility_key(r) for r in floats} == {w}
    assert compatibility_key(f"{w}+ov-int8") == f"{w}+int8"
    for r in floats:
        assert compatible(r, f"{w}+ov-fp32") and compatible(f"{w}+ov-bf16", r)
        assert not compatible(r, f"{w}+ov-int8") and not compatible(f"{w}+ov-int8", r)
        # A gate verdict that says int8 and float vectors are interchangeable joins them.
        assert compatible(r, f"{w}+ov-int8", int8_equivalent=True)
        assert compatible(f"{w}+ov-int8", r, int8_equivalent=True)
    assert compatible(f"{w}+ov-int8", f"{w}+ov-int8")
    # Never across weights, whatever the verdicts.
    assert not compatible("feedfacecafe", f"{w}+ov-int8", int8_equivalent=True)
    assert not compatible("feedfacecafe+ov-fp32", w)


def test_impossible_combinations_are_refused_with_what_to_set() -> None:
    with pytest.raises(ValueError, match="int8 needs embedder_backend=openvino"):
        check_backend("torch", "cpu", "int8")
    with pytest.raises(ValueError, match="int8 needs embedder_backend=openvino"):
        check_precision("cpu", "int8", "torch")
    with pytest.raises(ValueError, match="openvino runs on the CPU"):
        check_backend("openvino", "cuda", "fp32")
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        check_backend("auto", "cuda", "int8")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        check_precision("cpu", "fp16", "openvino")
    with pytest.raises(ValueError, match="one of auto, fp32, fp16, bf16, int8"):
        check_precision("cpu", "int4", "openvino")
    check_backend("openvino", "cpu", "int8")
    check_precision("cpu", "int8", "openvino")
    if not has_native_bf16():
        with pytest.raises(ValueError, match="emulated"):
            check_precision("cpu", "bf16", "openvino")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here: set "
                                             "embedder_device=cpu"):
            check_backend("torch", "cuda", "fp32")
    # Refused at load, before the weights are read.
    e = Embedder(Settings(embedder_backend="torch", embedder_precision="int8"))
    with pytest.raises(ValueError, match="int8 needs embedder_backend=openvino"):
        e.load()
    assert not e.loaded


def test_auto_candidates_follow_the_cpu_flags() -> None:
    avx2 = auto_candidates(flags=("avx2",))
    assert avx2 == [("torch", "fp32"), ("openvino", "fp32")]  # no bf16, no int8 without VNNI
    full = auto_candidates(flags=("avx2", "avx512_vnni", "avx512_bf16"))
    assert full == [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"),
                    ("openvino", "bf16"), ("openvino", "int8")]
    assert auto_candidates("int8", flags=("amx_int8",)) == [("openvino", "int8")]
    assert auto_candidates(openvino=False, flags=("avx512_bf16",)) == [
        ("torch", "fp32"), ("torch", "bf16")]


def test_verdict_file_round_trip_merges_and_survives_damage(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.json"
    a = Verdict("w", "openvino", "int8", "avx2", passed=False, speedup=1.0)
    b = Verdict("w", "openvino", "fp32", "avx2", passed=True, speedup=1.1)
    calibration.write_verdicts(path, [a, b])
    calibration.write_verdicts(path, [Verdict("w", "openvino", "int8", "avx2", True, 1.2)])
    got = {v.key: v for v in calibration.read_verdicts(path)}
    assert len(got) == 2 and got[a.key].passed and got[b.key] == b
    path.write_text("{not json")
    assert calibration.read_verdicts(path) == []


def test_a_verdict_not_well_formed_is_ignored_never_a_pass_or_a_failed_start(
        tmp_path: Path) -> None:
    """Each ill-typed verdict is dropped with a warning and the rest are read; a file whose
    "verdicts" is not a list reads as none (each of these raised out of the start, and
    "passed": "false" counted as a pass)."""
    path = tmp_path / "verdicts.json"
    good = {"weights_revision": "w", "backend": "openvino", "precision": "fp32",
            "cpu": "avx2", "passed": True, "speedup": 1.5}
    bad = [1, "x", None, [], {**good, "passed": "false", "precision": "int8"},
           {**good, "cpu": ["avx2"]}, {**good, "speedup": "fast", "precision": "bf16"},
           {**good, "speedup": float("nan"), "backend": "torch"},
           {**good, "speedup": True, "backend": "t2"}, {**good, "speedup": -1, "cpu": "c2"},
           {**good, "detail": "text", "cpu": "c3"}, {**good, "weights_revision": ""},
           {**good, "interchangeable": 1, "cpu": "c4"}]
    path.write_text(json.dumps({"verdicts": [*bad, good]}))
    assert calibration.read_verdicts(path) == [Verdict(**good)]
    for body in ({"verdicts": None}, {"verdicts": {"a": 1}}, {"verdicts": "x"}, [good], 3):
        path.write_text(json.dumps(body))
        assert calibration.read_verdicts(path) == []
        assert calibration.read_all_verdicts([path, path]) == []


def test_auto_with_a_precision_torch_cannot_run_here_is_refused_before_start() -> None:
    """`auto` falls back to torch at the configured precision: fp16 on a CPU is refused by
    the preflight (one line at `serve`), not by a traceback after the weights load."""
    from retriever.models.embedder import preflight

    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        preflight(Settings(embedder_backend="auto", embedder_precision="fp16",
                           embedder_device="cpu"))
    preflight(Settings(embedder_backend="auto", embedder_precision="int8",
                       embedder_device="cpu"))  # falls back to fp32: fine
    preflight(Settings(embedder_backend="auto", embedder_precision="fp32",
                       embedder_device="cpu"))


# -- the real model ------------------------------------------------------------------------
def test_verdict_sources_are_the_packaged_ones_then_the_data_dirs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert calibration.verdict_sources(None, data) == (
        calibration.PACKAGED_VERDICTS, data / "models" / "verdicts.json")
    mine = tmp_path / "mine.json"
    assert calibration.verdict_sources(mine, data) == (mine,)  # an explicit file alone
    cpu = cpu_key()
    calibration.write_verdicts(tmp_path / "a.json", [
        Verdict("w", "openvino", "int8", cpu, passed=True, speedup=5.0),
        Verdict("w", "openvino", "fp32", cpu, passed=True, speedup=2.0)])
    calibration.write_verdicts(tmp_path / "b.json", [  # measured here later: it failed
        Verdict("w", "openvino", "int8", cpu, passed=False, speedup=5.5)])
    merged = calibration.read_all_verdicts([tmp_path / "a.json", tmp_path / "b.json",
                                            tmp_path / "missing.json"])
    assert len(merged) == 2
    int8 = calibration.find_verdict(merged, "w", "openvino", "int8")
    assert int8 is not None and not int8.passed and int8.speedup == 5.5


def test_int8_joins_the_float_class_by_this_cpus_verdict_else_any_kinds() -> None:
    here, there = cpu_key(), "avx2 avx512f avx512_vnni some-other-kind"

    def v(cpu: str, passed: bool = True, interchangeable: bool = True) -> Verdict:
        return Verdict("w", "openvino", "int8", cpu, passed=passed, speedup=3.0,
                       interchangeable=interchangeable)

    # Measured on another kind only: the vectors it makes are what the verdict judged, so
    # a float embedder here serves a namespace built there (a data dir moved to AVX2).
    assert calibration.int8_interchangeable([v(there)], "w")
    assert not calibration.int8_interchangeable([v(there, interchangeable=False)], "w")
    assert not calibration.int8_interchangeable([v(there, passed=False)], "w")
    assert not calibration.int8_interchangeable([v(there)], "other weights")
    assert not calibration.int8_interchangeable([], "w")
    # This kind's own verdict decides when there is one.
    assert not calibration.int8_interchangeable([v(there), v(here, passed=False)], "w")
    assert calibration.int8_interchangeable([v(there, passed=False), v(here)], "w")


def test_the_packaged_verdicts_are_the_packaged_models(embedder: Embedder) -> None:
    """What `auto` starts from on every machine: readable, about the packaged model's
    weights, each with its gate figures, and an int8 that passed interchangeable."""
    assert Settings.model_fields["embedder_backend"].default == "auto"
    packaged = calibration.read_verdicts(calibration.PACKAGED_VERDICTS)
    assert packaged, calibration.PACKAGED_VERDICTS
    for v in packaged:
        assert v.weights_revision == embedder.weights_revision
        assert v.cpu and v.speedup > 0 and v.detail.get("source") == "bench/bench_backends.py"
        assert any("nDCG@10" in k for k in v.detail)
    assert calibration.int8_interchangeable(packaged, embedder.weights_revision)
    assert embedder.int8_equivalent  # the session's model reads them (no explicit file)


@pytest.mark.integration
def test_auto_by_default_picks_what_the_packaged_verdicts_say(
        ov_int8: Embedder, data_dir: Path, tmp_path: Path) -> None:
    """The default settings on this machine: the fastest backend whose packaged verdict for
    this CPU kind passed (OpenVINO int8 on the AVX-512 VNNI kinds measured), torch fp32 on
    a kind with none; a verdict measured in the data dir overrides the packaged one."""
    w = ov_int8.weights_revision
    packaged = calibration.read_verdicts(calibration.PACKAGED_VERDICTS)
    candidates = auto_candidates(openvino=True)
    passed = [v for v in packaged if v.cpu == cpu_key() and v.passed
              and (v.backend, v.precision) in candidates]
    want = max(passed, key=lambda v: v.speedup) if passed else None
    settings = make_settings(data_dir, embedder_backend="auto",
                             embedder_calibration_samples=CAL_SAMPLES)
    assert settings.embedder_verdicts_file is None
    e = Embedder(settings)
    e.load()
    if want is None:
        assert (e.backend, e.precision, e.revision) == ("torch", "fp32", w)
    else:
        assert (e.backend, e.precision) == (want.backend, want.precision)
        assert e.verdict == want
    # Measured here since: that backend failed the gate on this data's machine. Never picked.
    if want is not None:
        calibration.write_verdicts(data_dir / "models" / "verdicts.json", [Verdict(
            w, want.backend, want.precision, cpu_key(), passed=False, speedup=want.speedup)])
        try:
            again = Embedder(settings)
            again.load()
            assert (again.backend, again.precision) != (want.backend, want.precision)
        finally:
            (data_dir / "models" / "verdicts.json").unlink()


def _cpu_ticks_by_thread() -> dict[int, int]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(task.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice is Linux's")
def test_openvino_inference_runs_at_the_model_threads_priority(ov_fp32: Embedder) -> None:
    """Its inference workers were started by the load at the model thread's nice (10 by
    default beside a query lane): a forward pass run from the model thread never competes
    with the request path as an equal. Every thread that worked during a batch of passes
    is niced, the caller (the model thread, which keeps its share) not under SCHED_IDLE;
    the lane's are neither below the lane's nice nor idle. (The workers' SCHED_IDLE is
    checked in a fresh process: OpenVINO's workers are the process's, and an earlier load
    in this one may have started them.)"""
    import os

    from retriever._priority import is_idle_policy, run_lowered, thread_nice

    nice = ov_fp32._settings.model_nice(ov_fp32.has_query_lane)
    assert ov_fp32.has_query_lane and nice == ov_fp32._settings.query_lane_nice + 5 == 10
    assert ov_fp32.documents_idle
    base = thread_nice()
    passes: dict[str, int] = {}

    def model_passes() -> None:  # as the model thread: niced, not under SCHED_IDLE
        tid = threading.get_native_id()
        first = _cpu_ticks_by_thread().get(tid, 0)
        for _ in range(6):
            ov_fp32.embed(TEXTS)
        passes["caller"] = _cpu_ticks_by_thread().get(tid, 0) - first
        passes["caller_idle"] = is_idle_policy(tid)

    before = _cpu_ticks_by_thread()
    run_lowered(nice, model_passes)
    after = _cpu_ticks_by_thread()
    busy = {tid for tid, t in after.items() if t - before.get(tid, 0) >= 5}  # >= 50 ms
    assert busy, "no worker did any of the inference"  # two threads: the caller and one
    niced = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in busy}
    assert all(v >= min(19, base + nice) for v in niced.values()), niced
    assert passes["caller"] >= 5 and not passes["caller_idle"]
    # The query lane's copy (one inference thread): a pass runs on the calling thread (the
    # lane thread, at the lane's nice) or on a worker its load started there; either way
    # no thread below the lane's nice (5) works for it.
    lane_nice = ov_fp32._settings.query_lane_nice
    ticks: dict[str, int] = {}

    def lane_passes() -> None:
        tid = threading.get_native_id()
        first = _cpu_ticks_by_thread().get(tid, 0)
        for _ in range(6):
            ov_fp32.embed(TEXTS, lane=True)
        ticks["caller"] = _cpu_ticks_by_thread().get(tid, 0) - first

    before = _cpu_ticks_by_thread()
    run_lowered(lane_nice, lane_passes)
    after = _cpu_ticks_by_thread()
    busy = {tid for tid, t in after.items() if t - before.get(tid, 0) >= 5}
    assert busy or ticks["caller"] >= 5, "no thread did the lane's inference"
    niced = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in busy}
    assert all(v >= min(19, base + lane_nice) for v in niced.values()), niced
    assert not any(is_idle_policy(tid) for tid in busy), busy


_WORKER_POLICY = """
import json, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_embedder_backends import TEXTS, _cpu_ticks_by_thread, ov_settings
from retriever._priority import is_idle_policy, run_lowered
from retriever.models.embedder import Embedder
e = Embedder(ov_settings(Path(sys.argv[1]), "fp32"))
e.load()
callers = [threading.get_native_id()]
def passes():  # on a thread of run_lowered's, as the model thread
    callers.append(threading.get_native_id())
    for _ in range(6):
        e.embed(TEXTS)
before = _cpu_ticks_by_thread()
run_lowered(e._settings.model_nice(e.has_query_lane), passes)
after = _cpu_ticks_by_thread()
busy = {t: v - before.get(t, 0) for t, v in after.items() if t not in callers}
print(json.dumps({"idle": e.documents_idle,
                  "busy": [[n, is_idle_policy(t)] for t, n in busy.items() if n >= 5]}))
"""


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="SCHED_IDLE is Linux's")
def test_the_models_workers_run_under_sched_idle_in_a_fresh_process(ov_fp32: Embedder,
                                                                    data_dir: Path) -> None:
    """In a process whose first OpenVINO load is the model's (as in `retriever serve`),
    the workers that run its passes beside the model thread are under SCHED_IDLE (the
    load ran in a thread under it): most of the CPU of threads other than the caller's
    (the tokenizer's helpers may take some) went to threads under SCHED_IDLE."""
    out = subprocess.run([sys.executable, "-c", _WORKER_POLICY, str(data_dir),
                          str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["idle"] is True
    idle = sum(n for n, is_idle in got["busy"] if is_idle)
    assert idle >= 0.75 * sum(n for n, _ in got["busy"]) > 0, got


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="SCHED_IDLE is Linux's")
def test_in_a_service_no_thread_of_its_own_is_under_sched_idle(
        ov_fp32: Embedder, tmp_path: Path) -> None:
    """In a server only the model's workers (started by the load) are under SCHED_IDLE:
    the model thread keeps its share of each slice, and the query lane and the request
    path are never idle-policy."""
    from retriever._priority import is_idle_policy

    def threads_of(settings: Settings) -> dict[str, bool]:
        st = ServerThread(settings, ov_fp32).start()
        try:
            with RetrieverClient(st.address) as c:
                c.upsert("ns", [pb.Document(doc_id="a", content="def parse_config(): ...")])
                assert c.search("ns", "parse the config", top_k=1).hits
                return {t.name: is_idle_policy(t.native_id) for t in threading.enumerate()
                        if t.name in ("embedder", "query-lane", "grpc-server")
                        or t.name.startswith("rpc-")}
        finally:
            st.stop()

    got = threads_of(ov_settings(tmp_path / "a", "fp32"))
    assert {"embedder", "query-lane", "grpc-server"} <= set(got)
    assert not any(got.values()), got


@pytest.mark.integration
def test_a_lane_that_fails_to_compile_leaves_the_model_outside_sched_idle(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the lane's copy query batches run on the model thread: no thread under
    SCHED_IDLE may work for them, so the model is compiled again, on one thread (OpenVINO
    shares its workers between compiled models: the first load's are under SCHED_IDLE)."""
    from retriever._priority import is_idle_policy
    from retriever.models import _openvino

    real = _openvino.compiled_copy
    calls: list[int] = []

    def first_fails(model: object, threads: int, bf16: bool) -> object:
        calls.append(threads)
        if len(calls) == 1:
            raise RuntimeError("a compile failure")
        return real(model, threads, bf16)

    monkeypatch.setattr(_openvino, "compiled_copy", first_fails)
    e = Embedder(ov_settings(data_dir, "fp32"))
    e.load()
    assert calls == [1, 1]  # the lane's, then the model's one-thread copy outside idle
    assert not e.has_query_lane and not e.documents_idle
    before = _cpu_ticks_by_thread()
    for _ in range(6):
        e.embed(TEXTS)
    after = _cpu_ticks_by_thread()
    busy = {tid for tid, t in after.items() if t - before.get(tid, 0) >= 5}
    assert busy and not any(is_idle_policy(tid) for tid in busy), busy


@pytest.mark.integration
def test_openvino_fp32_equals_torch(ov_fp32: Embedder, embedder: Embedder,
                                    reference: np.ndarray) -> None:
    assert (ov_fp32.backend, ov_fp32.precision) == ("openvino", "fp32")
    assert ov_fp32.revision == f"{embedder.weights_revision}+ov-fp32"
    assert ov_fp32.dimension == embedder.dimension
    # Token-budgeted batches of mixed lengths: padding handled as torch does, and each batch
    # padded to a bucketed shape (OpenVINO keeps compiled state per input shape).
    assert ov_fp32._buckets
    got = ov_fp32.embed(TEXTS, batch_size=16, batch_tokens=2048)
    cos = cosines(got, reference)
    assert cos.min() > 0.999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert ov_fp32.embed([]).shape == (0, ov_fp32.dimension)


@pytest.mark.integration
def test_the_query_lane_is_a_copy_that_agrees(ov_fp32: Embedder, ov_int8: Embedder,
                                              data_dir: Path) -> None:
    """With embed_query_lane (or None: auto, the default) OpenVINO gets a one-thread copy
    for query batches; its vectors are the model's. Never with False, never for torch."""
    assert ov_fp32.has_query_lane and ov_int8.has_query_lane  # the default
    off = Embedder(ov_settings(data_dir, "int8", embed_query_lane=False))
    off.load(calibration_texts=lambda n: real_chunks())
    assert not off.has_query_lane
    assert off._settings.model_nice(off.has_query_lane) == 5  # no lane: queries go there
    for precision, lane in (("fp32", True), ("int8", None)):
        e = Embedder(ov_settings(data_dir, precision, embed_query_lane=lane))
        e.load(calibration_texts=lambda n: real_chunks())
        assert e.has_query_lane
        assert e._ov_lane is not e._ov
        texts = TEXTS[:12]
        assert cosines(e.embed(texts, lane=True), e.embed(texts)).min() > 0.9999
    torch_lane = Embedder(make_settings(data_dir, embedder_backend="torch",
                                        embed_query_lane=True))
    torch_lane.load()
    assert not torch_lane.has_query_lane
    assert torch_lane._settings.model_nice(torch_lane.has_query_lane) == 5


@pytest.mark.integration
def test_openvino_int8_is_close_and_its_cache_is_reused(ov_int8: Embedder, embedder: Embedder,
                                                        reference: np.ndarray,
                                                        data_dir: Path) -> None:
    assert ov_int8.revision == f"{embedder.weights_revision}+ov-int8"
    prov = ov_int8._ov.provenance
    assert prov.calibration.startswith("catalog") and prov.calibration_texts == CAL_SAMPLES
    cos = cosines(ov_int8.embed(TEXTS), reference)
    assert cos.mean() > 0.98, cos.mean()
    entry = ov_int8._ov.directory
    assert entry.parent == data_dir / "models" and "int8" in entry.name
    mtime = (entry / "model.bin").stat().st_mtime_ns

    again = Embedder(ov_settings(data_dir, "int8"))
    t0 = time.perf_counter()
    again.load(calibration_texts=lambda n: pytest.fail("a reused model is not recalibrated"))
    assert again._ov.reused and time.perf_counter() - t0 < prov.built_s + 5
    assert (entry / "model.bin").stat().st_mtime_ns == mtime
    assert again._ov.provenance == prov
    assert np.allclose(again.embed(TEXTS[:8]), ov_int8.embed(TEXTS[:8]), atol=1e-5)


@pytest.mark.integration
def test_a_damaged_cache_entry_is_rebuilt(ov_fp32: Embedder, reference: np.ndarray,
                                          data_dir: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    entry = ov_fp32._ov.directory
    with (entry / "model.bin").open("r+b") as fh:  # flip bytes inside the weights
        fh.seek(4096)
        fh.write(b"\xff" * 64)
    e = Embedder(ov_settings(data_dir, "fp32"))
    e.load()
    assert not e._ov.reused and "rebuilding it" in caplog.text
    assert cosines(e.embed(TEXTS[:12]), reference[:12]).min() > 0.999
    # The rebuilt entry is whole again: the next load reuses it.
    again = Embedder(ov_settings(data_dir, "fp32"))
    again.load()
    assert again._ov.reused


def _model_with_own_pooling(tmp_path: Path) -> Path:
    """The packaged model as a directory of links to its files, but for a copy of its
    pooling configuration (which the test then changes)."""
    from retriever.models.embedder import default_model_path

    src, model = Path(default_model_path()), tmp_path / "all-MiniLM-L6-v2"
    model.mkdir()
    for f in src.iterdir():
        if f.name != "1_Pooling":
            (model / f.name).symlink_to(f)
    shutil.copytree(src / "1_Pooling", model / "1_Pooling")
    return model


@pytest.mark.integration
def test_a_cached_graph_of_another_pipeline_around_the_same_weights_is_rebuilt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The cache key names the weights: a model whose pooling changed (CLS instead of mean)
    kept being served from the mean-pooled graph. A read entry is checked against torch as a
    build is; a build cut short (its temporary entry) is removed at the next load."""
    model = _model_with_own_pooling(tmp_path)
    data = tmp_path / "data"
    first = Embedder(ov_settings(data, "fp32", embedder_model=str(model)))
    first.load()
    mean = first.embed(TEXTS[:6])
    stale = data / "models" / f".{first._ov.directory.name}.tmp"
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    conf = json.loads((model / "1_Pooling" / "config.json").read_text())
    conf.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (model / "1_Pooling" / "config.json").write_text(json.dumps(conf))
    cls_torch = Embedder(make_settings(data, embedder_backend="torch",
                                       embedder_model=str(model)))
    cls_torch.load()
    want = cls_torch.embed(TEXTS[:6])
    assert cosines(want, mean).min() < 0.99  # the two pipelines really differ
    with caplog.at_level(logging.INFO, logger="retriever.models._openvino"):
        second = Embedder(ov_settings(data, "fp32", embedder_model=str(model)))
        second.load()
    assert not second._ov.reused and "rebuilding it" in caplog.text
    assert cosines(second.embed(TEXTS[:6]), want).min() > 0.999
    assert not stale.exists()


@pytest.mark.integration
def test_a_cache_that_cannot_be_written_is_served_uncached_and_leaves_nothing(
        reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk during the build (OpenVINO reports the short write as a RuntimeError):
    the model is served uncached, the log says so and what to do, no temporary files are
    left, and the query lane is compiled from the verified graph, not from files."""
    with tmpfs(tmp_path / "disk", "20m") as disk:  # the fp32 weights alone are ~90 MB
        e = Embedder(ov_settings(disk, "fp32"))
        with caplog.at_level(logging.INFO, logger="retriever.models._openvino"):
            e.load()
        assert not e._ov.reused
        assert "could not cache the OpenVINO model" in caplog.text
        assert "serving it uncached" in caplog.text and "cached in" not in caplog.text
        assert os.listdir(disk / "models") == []  # no temporary directory left
        assert cosines(e.embed(TEXTS[:12]), reference[:12]).min() > 0.999
        assert e.has_query_lane
        assert cosines(e.embed(TEXTS[:12], lane=True), reference[:12]).min() > 0.999


@pytest.mark.integration
def test_a_file_where_the_cache_entry_belongs_is_replaced(
        ov_fp32: Embedder, reference: np.ndarray, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / ov_fp32._ov.directory.name).write_text("not a model")
    e = Embedder(ov_settings(tmp_path, "fp32"))
    e.load()
    assert not e._ov.reused and (e._ov.directory / "meta.json").is_file()
    again = Embedder(ov_settings(tmp_path, "fp32"))
    again.load()
    assert again._ov.reused
    # The lane is compiled from the verified graph: files damaged since change nothing.
    with (again._ov.directory / "model.bin").open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"\x00" * 4096)
    lane = _openvino.compiled_copy(again._ov, 1, has_native_bf16())
    assert cosines(lane(again._features(TEXTS[:8])), reference[:8]).min() > 0.999


@pytest.mark.parametrize(("env", "code", "says"), [
    ({"RETRIEVER_EMBEDDER_BACKEND": "onnx"}, 2, "embedder_backend"),
    ({"RETRIEVER_EMBEDDER_BACKEND": "torch", "RETRIEVER_EMBEDDER_PRECISION": "int8"}, 1,
     "int8 needs embedder_backend=openvino"),
    ({"RETRIEVER_EMBEDDER_BACKEND": "openvino", "RETRIEVER_EMBEDDER_PRECISION": "fp16"}, 1,
     "fp16 needs CUDA"),
])
def test_serve_refuses_impossible_embedder_settings_in_one_line(
        env: dict[str, str], code: int, says: str, tmp_path: Path) -> None:
    """Before anything starts (no port bound, no weights read): the reason and what to set,
    not a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "retriever.cli", "serve", "--port", "0", "--metrics-port", "0",
         "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env})
    assert done.returncode == code, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.integration
def test_auto_picks_the_fastest_backend_that_passed(ov_fp32: Embedder, data_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    w, cpu = ov_fp32.weights_revision, cpu_key()
    verdicts = data_dir / "verdicts.json"
    calibration.write_verdicts(verdicts, [
        Verdict(w, "torch", "fp32", cpu, passed=True, speedup=1.0),
        Verdict(w, "openvino", "fp32", cpu, passed=True, speedup=1.3),
        # Faster, but failed the gate: never picked.
        Verdict(w, "openvino", "int8", cpu, passed=False, speedup=3.0),
        # Another CPU kind's verdict is not this one's.
        Verdict(w, "openvino", "bf16", "some other cpu", passed=True, speedup=9.0),
    ])
    settings = make_settings(data_dir, embedder_backend="auto", embedder_verdicts_file=verdicts)
    caplog.set_level(logging.INFO, "retriever.models.embedder")
    e = Embedder(settings)
    e.load()
    assert (e.backend, e.precision, e.revision) == ("openvino", "fp32", f"{w}+ov-fp32")
    assert e._ov.reused and e.verdict is not None and e.verdict.speedup == 1.3
    assert not e.int8_equivalent
    if has_native_bf16():  # openvino bf16 (and torch bf16) have no verdict on this CPU
        assert "bench/bench_backends.py" in caplog.text

    # No verdict that passed: torch fp32, and the log says how to make verdicts.
    caplog.clear()
    none = Embedder(make_settings(data_dir, embedder_backend="auto",
                                  embedder_verdicts_file=data_dir / "missing.json"))
    none.load()
    assert (none.backend, none.precision, none.revision) == ("torch", "fp32", w)
    assert "bench/bench_backends.py" in caplog.text


@pytest.mark.integration
def test_int8_vectors_are_a_class_of_their_own_unless_a_verdict_joins_them(
        ov_int8: Embedder, embedder: Embedder, data_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    docs = [pb.Document(doc_id=f"d{i}", path=f"src/m{i}.py", content=t)
            for i, t in enumerate(real_chunks()[:12:3])]
    st = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("code", docs)
    finally:
        st.stop()
    assert not ov_int8.serves(embedder.revision)
    st = ServerThread(settings, ov_int8).start()
    try:
        with RetrieverClient(st.address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.search("code", "token budget", top_k=1)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"{embedder.weights_revision}+ov-int8" in e.value.details()
            c.upsert("int8", docs)  # its own namespaces it serves
            assert c.search("int8", "token budget", top_k=1).hits
    finally:
        st.stop()
    # A verdict here that int8 passed the gate mixed with float vectors joins the classes.
    verdicts = data_dir / "interchangeable.json"
    calibration.write_verdicts(verdicts, [Verdict(
        ov_int8.weights_revision, "openvino", "int8", cpu_key(), passed=True, speedup=2.0,
        interchangeable=True)])
    joined = Embedder(ov_settings(data_dir, "int8", embedder_verdicts_file=verdicts))
    joined.load()
    assert joined._ov.reused and joined.int8_equivalent
    assert ov_int8.compatibility_class == f"{embedder.weights_revision}+int8"
    assert joined.compatibility_class == embedder.compatibility_class == embedder.revision
    assert joined.serves(embedder.revision) and joined.serves(f"{embedder.revision}+ov-bf16")
    assert not joined.serves("feedfacecafe")



@pytest.mark.integration
def test_a_namespace_refuses_the_same_weights_behind_another_pipeline(tmp_path: Path) -> None:
    """The embedder's revision names its weights; a model whose pooling was switched (CLS
    instead of mean) kept the revision, so its vectors joined and searched a namespace of
    mean-pooled ones, and the embedding cache served it mean-pooled vectors. A namespace
    records the pipeline around the weights and refuses another (naming what changed); one
    of an older release (no record) is served; the cache keys carry the pipeline."""
    import sqlite3

    model = _model_with_own_pooling(tmp_path)
    cache = tmp_path / "embed-cache"
    doc = pb.Document(doc_id="a.txt", content="The starter ferments overnight in the cold.")

    def serve(data: Path) -> ServerThread:
        return ServerThread(make_settings(data, embedder_backend="torch",
                                          embedder_model=str(model),
                                          embed_cache_dir=cache)).start()

    def stored_vector(data: Path) -> np.ndarray:
        with sqlite3.connect(data / "catalog.sqlite3") as db:
            (blob,) = db.execute("SELECT vector FROM chunks WHERE vector IS NOT NULL").fetchone()
        return np.frombuffer(blob, np.float32)

    st = serve(tmp_path / "one")
    try:
        with RetrieverClient(st.address) as c:
            c.upsert("docs", [doc])
            assert c.search("docs", "sourdough starter").hits
    finally:
        st.stop()
    mean = stored_vector(tmp_path / "one")

    conf = json.loads((model / "1_Pooling" / "config.json").read_text())
    conf.update(pooling_mode="cls", pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (model / "1_Pooling" / "config.json").write_text(json.dumps(conf))
    st = serve(tmp_path / "one")
    try:
        with RetrieverClient(st.address) as c:
            for call in (lambda: c.search("docs", "sourdough starter"),
                         lambda: c.upsert("docs", [pb.Document(doc_id="b.txt", content="x")])):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "another pipeline around the same weights" in e.value.details()
                assert "pooling mean -> cls" in e.value.details()
            c.upsert("fresh", [doc])  # a new namespace takes this pipeline's vectors
    finally:
        st.stop()
    # Not the cached mean-pooled vector of the same text: the cache key has the pipeline.
    fresh = stored_vector(tmp_path / "one")  # (the first row is still "docs"' a.txt)
    with sqlite3.connect(tmp_path / "one" / "catalog.sqlite3") as db:
        (blob,) = db.execute("SELECT vector FROM chunks WHERE namespace = 'fresh'").fetchone()
        cls_vector = np.frombuffer(blob, np.float32)
        assert float(fresh @ mean) > 0.999
        assert float(cls_vector @ mean) < 0.99
        # A namespace of an older release records no pipeline: it is served as before.
        db.execute("UPDATE namespaces SET embedder_pipeline = '' WHERE name = 'docs'")
    st = serve(tmp_path / "one")
    try:
        with RetrieverClient(st.address) as c:
            assert c.search("docs", "sourdough starter").hits
    finally:
        st.stop()


def test_pipelines_are_compared_on_the_fields_both_record() -> None:
    """A field one side lacks (a later release's, or one it could not read) is no
    difference: a dependency upgrade must not make every namespace refuse its model."""
    from retriever.models.embedder import pipeline_differences

    assert pipeline_differences({"pooling": "mean", "new_field": 1}, {"pooling": "mean"}) == []
    assert pipeline_differences({"pooling": "mean", "normalized": True, "max_seq_length": 256},
                                {"pooling": "cls", "normalized": False, "max_seq_length": 256}
                                ) == ["normalized True -> False", "pooling mean -> cls"]
