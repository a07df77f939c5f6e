"""A few seconds of load-tests/loadgen.py against the test server: the report is written and
its figures are sane (what they say about the service is the full run's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import CORPUS

REPO = Path(__file__).resolve().parent.parent


def _ordered(lat: dict) -> bool:
    return lat.get("n", 0) == 0 or lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


@pytest.mark.integration
def test_loadgen_writes_a_sane_report(server, tmp_path: Path) -> None:  # noqa: ANN001
    corpus = tmp_path / "corpus"
    for rel, text in CORPUS.items():
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text(text)
    out = tmp_path / "results"
    cmd = [sys.executable, "load-tests/loadgen.py", "--address", server.address,
           "--server-pid", str(os.getpid()),
           "--metrics-address", f"127.0.0.1:{server.info['metrics_port']}",
           "--corpus", str(corpus), "--idle-requests", "10", "--closed", "1,2",
           "--rates", "4", "--step-seconds", "2", "--warmup-seconds", "0.5",
           "--cooldown", "0.1", "--target-rate", "4", "--target-seconds", "2", "--soak", "2",
           "--soak-window", "2",
           "--sample-interval", "0.5", "--deadline", "60", "--callers", "3", "--name", "smoke",
           "--out-dir", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "smoke.json").read_text())
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "smoke.md").read_text()
    for heading in ("## Goals", "## Idle", "## Closed loop", "## Open loop", "## Mixed load",
                    "## Soak", "## Error codes by type"):
        assert heading in md
    assert report["corpus"]["documents"] == len(CORPUS) and report["corpus"]["chunks"] > 0
    assert "from 3 callers" in md and report["config"]["callers"] == 3

    steps = report["steps"]
    assert [(s["kind"], s["level"]) for s in steps] == [("closed", 1), ("closed", 2),
                                                        ("open", 4)]
    assert [w["end_s"] for w in report["soak_windows"]] == [2]
    for s in [*steps, report["target"], report["soak"], *report["soak_windows"]]:
        assert s["goodput_rps"] > 0 and s["codes"].get("OK", 0) > 0
        assert _ordered(s["latency_s"])
        assert all(_ordered(c["latency_s"]) for c in s["classes"].values())
    assert all(_ordered(c["latency_s"]) for c in report["idle"].values())
    assert report["idle"]["search"]["codes"] == {"OK": 10}
    assert report["saturation"]["rps"] > 0
    assert report["target"]["level"] == 4

    # The server (this process) was sampled, through the soak too.
    assert {s["phase"] for s in report["samples"]} >= {"idle", "closed", "open", "soak"}
    assert all(s["rss_bytes"] > 0 and s["fds"] > 0 for s in report["samples"])
    assert report["soak_memory"]["rss_after_warmup_bytes"] > 0

    # Every goal judged on a measured value, and printed.
    assert {g["status"] for g in report["goals"]} <= {"PASS", "FAIL", "n/a"}
    assert len([g for g in report["goals"] if g["status"] != "n/a"]) >= 2
    printed = [line for line in proc.stdout.splitlines() if line[:4].strip() in
               ("PASS", "FAIL", "n/a")]
    assert len(printed) == len(report["goals"])


def _loadgen():  # noqa: ANN202 - the script is not a package
    import importlib.util
    spec = importlib.util.spec_from_file_location("loadgen", REPO / "load-tests" / "loadgen.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["loadgen"] = mod
    spec.loader.exec_module(mod)
    return mod


def _open_step(offered: float, ok: int, refused: int = 0, other: int = 0) -> dict:
    codes = {"OK": ok, "RESOURCE_EXHAUSTED": refused, "DEADLINE_EXCEEDED": other}
    return {"kind": "open", "level": offered, "offered_rps": offered, "seconds": 10.0,
            "goodput_rps": ok / 10.0, "codes": {c: n for c, n in codes.items() if n}}


def test_saturation_is_the_last_step_served_without_shedding() -> None:
    lg = _loadgen()
    steps = [_open_step(10, 100), _open_step(20, 199, refused=1),
             # goodput 96 % of offered, but 4 % refused: the server is shedding, so full
             _open_step(30, 288, refused=12), _open_step(40, 300, refused=100)]
    sat = lg.saturation(steps)
    assert sat["rps"] == 20
    assert sat["first_unserved_rps"] == 30
    assert "refused" in sat["method"]
    # any other error disqualifies a step whatever its goodput
    assert lg.saturation([_open_step(10, 100), _open_step(20, 200, other=1)])["rps"] == 10


def test_saturation_is_narrowed_between_the_grid_steps() -> None:
    lg = _loadgen()
    steps = [_open_step(10, 100), _open_step(20, 200), _open_step(30, 250, refused=40)]
    assert lg.refinement(steps) == 25  # halfway between served 20 and unserved 30
    steps.append(_open_step(25, 250))  # served: the gap is now 25..30
    assert lg.saturation(steps)["rps"] == 25
    assert lg.refinement(steps) == 27.5
    steps.append(_open_step(27.5, 260, refused=10))  # not served: 25..27.5, within 10 %
    assert lg.refinement(steps) is None
    assert lg.saturation(steps)["first_unserved_rps"] == 27.5
    # nothing to narrow: every step served, or none
    assert lg.refinement([_open_step(10, 100), _open_step(20, 200)]) is None
    assert lg.refinement([_open_step(10, 50, refused=50)]) is None


def test_search_tail_says_where_the_slowest_searches_spent_their_time() -> None:
    lg = _loadgen()
    from google.protobuf.duration_pb2 import Duration

    t = lg.pb.StageTimings(embed=Duration(nanos=20_000_000), total=Duration(nanos=30_000_000))
    assert lg._stages(t) == {"embed": 0.02, "total": 0.03}  # unset stages stay out

    # 99 searches of 40 ms (30 in the server), and one of 500 ms that waited 400 ms for the
    # model: the tail's row shows the embed stage, the mean row barely moves.
    recs = [lg.Rec("search", 0.0, 0.04, "OK", 0, {"embed": 0.02, "total": 0.03})
            for _ in range(99)]
    recs.append(lg.Rec("search", 0.0, 0.5, "OK", 0, {"embed": 0.42, "total": 0.45}))
    recs.append(lg.Rec("upsert", 0.0, 9.0, "OK", 3))  # other classes do not count
    recs.append(lg.Rec("search", 0.0, 9.0, "DEADLINE_EXCEEDED"))  # nor failures
    tail = lg.search_tail(recs)
    assert tail["all"]["count"] == 100 and tail["tail"]["count"] == 1
    assert tail["tail"]["embed"] == pytest.approx(0.42)
    assert tail["tail"]["outside"] == pytest.approx(0.05)
    assert tail["all"]["latency"] == pytest.approx((99 * 0.04 + 0.5) / 100)
    assert tail["all"]["ann"] == 0.0
    assert lg.search_tail(recs[:10]) is None  # too few to say


def test_upsert_tail_shows_the_stages_of_the_slowest_upserts() -> None:
    lg = _loadgen()
    from google.protobuf.duration_pb2 import Duration

    resp = lg.pb.UpsertDocumentsResponse(elapsed=Duration(nanos=300_000_000))
    resp.timings.embed.FromNanoseconds(200_000_000)
    resp.timings.lock_wait.FromNanoseconds(50_000_000)
    stages = lg._upsert_stages(resp)
    assert stages["embed"] == 0.2 and stages["lock_wait"] == 0.05 and stages["total"] == 0.3
    assert stages["commit"] == 0.0  # unset: none

    # 18 upserts of 0.3 s; two of 3 s that waited 2.5 s for the namespace lock.
    recs = [lg.Rec("upsert", 0.0, 0.35, "OK", 2, dict(stages)) for _ in range(18)]
    recs += [lg.Rec("upsert", 0.0, 3.0, "OK", 2, {**stages, "lock_wait": 2.5, "total": 2.9})
             for _ in range(2)]
    tail = lg.upsert_tail(recs)
    assert tail["all"]["count"] == 20 and tail["tail"]["count"] == 2
    assert tail["tail"]["lock_wait"] == pytest.approx(2.5)
    assert tail["tail"]["outside"] == pytest.approx(0.1)
    assert tail["all"]["lock_wait"] == pytest.approx((18 * 0.05 + 2 * 2.5) / 20)
    assert lg.upsert_tail(recs[:9]) is None


def test_callers_must_be_at_least_one() -> None:
    lg = _loadgen()
    assert lg.parse_args(["--spawn", "--callers", "3"]).callers == 3
    with pytest.raises(SystemExit):
        lg.parse_args(["--spawn", "--callers", "0"])


def test_the_report_shows_what_the_server_logged_above_info() -> None:
    """Lines as `retriever serve` writes them (its own format), with a traceback between."""
    import logging

    from retriever.cli import LOG_FORMAT

    lg = _loadgen()
    fmt = logging.Formatter(LOG_FORMAT)

    def line(level: int, msg: str) -> str:
        return fmt.format(logging.LogRecord("retriever.x", level, __file__, 1, msg, None, None))

    log = "\n".join(["Loading weights: 100%", line(logging.WARNING, "could not remove 14"),
                     line(logging.INFO, "fine"), "Traceback (most recent call last):",
                     line(logging.ERROR, "boom")]) + "\n"
    problems = lg.log_problems(log)
    assert problems["counts"] == {"WARNING": 1, "ERROR": 1}
    assert [p.split()[2] for p in problems["first"]] == ["WARNING", "ERROR"]
    assert problems["first"][1].endswith("retriever.x: boom")
    assert lg.log_problems("")["counts"] == {}
