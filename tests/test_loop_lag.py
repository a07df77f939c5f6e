"""retriever_event_loop_lag_seconds: how late the server's event loop runs."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from test_loadgen import _loadgen

from retriever.server.app import watch_loop_lag


def test_a_blocked_loop_shows_as_lag() -> None:
    seen: list[float] = []

    async def main() -> None:
        watcher = asyncio.ensure_future(watch_loop_lag(seen.append, period_s=0.05))
        await asyncio.sleep(0.12)  # a few on-time samples
        time.sleep(0.3)  # the loop is blocked (as by a thread that keeps the GIL)
        await asyncio.sleep(0.12)
        watcher.cancel()

    asyncio.run(main())
    assert len(seen) >= 3
    assert max(seen) >= 0.2, seen
    assert min(seen) < 0.05, seen


def test_the_server_exports_its_loop_lag(server) -> None:  # noqa: ANN001
    url = f"http://127.0.0.1:{server.info['metrics_port']}/metrics"
    deadline = time.monotonic() + 30
    count = 0.0
    while time.monotonic() < deadline:
        for line in urllib.request.urlopen(url).read().decode().splitlines():
            if line.startswith("retriever_event_loop_lag_seconds_count"):
                count = float(line.rpartition(" ")[2])
        if count >= 2:
            break
        time.sleep(0.1)
    assert count >= 2


def test_the_load_report_reads_the_lag_quantile_from_the_buckets() -> None:
    lg = _loadgen()
    name = "retriever_event_loop_lag_seconds"

    def scrape(counts: dict[str, float], total_s: float) -> dict:
        out = {(f"{name}_bucket", (("le", le),)): c for le, c in counts.items()}
        out[(f"{name}_count", ())] = counts["+Inf"]
        out[(f"{name}_sum", ())] = total_s
        return out

    before = scrape({"0.001": 10, "0.01": 10, "0.1": 10, "+Inf": 10}, 0.005)
    # 100 more samples: 90 under 1 ms, 9 under 10 ms, 1 under 100 ms.
    after = scrape({"0.001": 100, "0.01": 109, "0.1": 110, "+Inf": 110}, 0.305)
    lag = lg.loop_lag(before, after)
    assert lag["count"] == 100
    assert lag["mean_s"] == pytest.approx(0.003)
    assert lag["p99_le_s"] == 0.01
    assert lg.loop_lag(before, before) is None
    late = scrape({"0.001": 10, "0.01": 10, "0.1": 10, "+Inf": 110}, 300.0)
    assert lg.loop_lag(before, late)["p99_le_s"] is None  # past the last bucket


def _labelled_scrape(name: str, label: str, per_series: dict[str, dict[str, float]],
                     mean_s: float) -> dict:
    """A scrape (as loadgen.scrape returns it) of histogram ``name`` with one series per
    value of ``label``: cumulative bucket counts by bound, every observation ``mean_s``."""
    out: dict = {}
    for value, counts in per_series.items():
        out.update({(f"{name}_bucket", tuple(sorted({label: value, "le": le}.items()))): c
                    for le, c in counts.items()})
        out[(f"{name}_count", ((label, value),))] = counts["+Inf"]
        out[(f"{name}_sum", ((label, value),))] = counts["+Inf"] * mean_s
    return out


def test_a_labelled_histogram_is_summed_over_its_series() -> None:
    """retriever_refusal_duration_seconds has one series per rpc: the report's server-side
    refusal p99 is over all of them."""
    lg = _loadgen()
    name = "retriever_refusal_duration_seconds"

    def scrape(per_rpc: dict[str, dict[str, float]]) -> dict:
        return _labelled_scrape(name, "rpc", per_rpc, 0.002)

    before = scrape({"Search": {"0.001": 0, "0.01": 0, "0.1": 0, "+Inf": 0}})
    after = scrape({"Search": {"0.001": 60, "0.01": 99, "0.1": 99, "+Inf": 99},
                    "UpsertDocuments": {"0.001": 0, "0.01": 0, "0.1": 1, "+Inf": 1}})
    h = lg.histogram_delta(before, after, name)
    assert h["count"] == 100 and h["mean_s"] == pytest.approx(0.002)
    assert h["p99_le_s"] == 0.01  # 99 of 100 under 10 ms, across both rpcs
    assert lg.histogram_delta(after, after, name) is None


def test_the_load_report_counts_the_servers_full_garbage_collections() -> None:
    """retriever_gc_pause_seconds has a series per generation: the report counts the full
    ones (generation 2) and the bucket of the longest, and tells a server that does not
    export them from one that had none."""
    lg = _loadgen()
    name = "retriever_gc_pause_seconds"

    def scrape(per_gen: dict[str, dict[str, float]]) -> dict:
        return _labelled_scrape(name, "generation", per_gen, 0.01)

    zero = {"0.01": 0, "0.1": 0, "0.5": 0, "+Inf": 0}
    before = scrape({"0": zero, "2": zero})
    after = scrape({"0": {"0.01": 500, "0.1": 500, "0.5": 500, "+Inf": 500},
                    "2": {"0.01": 0, "0.1": 1, "0.5": 2, "+Inf": 2}})
    full = lg.full_gcs(before, after)
    assert full["count"] == 2 and full["p99_le_s"] == 0.5  # the longest, not generation 0's
    assert lg._gc(full) == "2 / 500 ms"
    assert lg.full_gcs(before, before) == {"count": 0} and lg._gc({"count": 0}) == "0"
    assert lg.full_gcs({}, {}) is None and lg._gc(None) == "-"  # an older server
