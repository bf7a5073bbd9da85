from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from compilekit.errors import VerificationError
from compilekit.verify import latency, measure_interleaved, peak_rss_mb, percentiles


def test_percentiles_on_known_list():
    s = percentiles([k / 1000 for k in range(10, 0, -1)], items_per_run=4)  # 10..1 ms, unsorted
    assert s.runs == 10
    assert s.p50_ms == pytest.approx(5.5) and s.p90_ms == pytest.approx(9.1) and s.p99_ms == pytest.approx(9.91)
    assert s.mean_ms == pytest.approx(5.5) and s.min_ms == pytest.approx(1.0)
    assert s.throughput == pytest.approx(4 / 0.0055)  # items per second at the median
    assert s.to_dict() == {"runs": 10, "p50_ms": 5.5, "p90_ms": 9.1, "p99_ms": 9.91, "mean_ms": 5.5,
                           "min_ms": 1.0, "items_per_run": 4, "throughput": 727.27}


def test_measure_interleaved_calls_alternate_and_time_each_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    calls: list[str] = []

    def fn(name: str, seconds: float):
        def run():
            calls.append(name)
            clock[0] += seconds  # fake time passes only inside the call
        return run

    done: list[tuple[int, int]] = []
    out = measure_interleaved({"a": fn("a", 0.002), "b": fn("b", 0.004), "c": fn("c", 0.001)},
                              warmup=2, runs=3, items_per_run=8, progress=lambda i, n: done.append((i, n)))
    assert calls == list("abcabc" + "abc" "cba" "abc")  # 2 warmups, then the order flips on odd rounds
    assert done == [(1, 3), (2, 3), (3, 3)]
    assert {k: v.runs for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}
    assert out["a"].p50_ms == pytest.approx(2.0) and out["b"].p99_ms == pytest.approx(4.0)
    assert out["b"].throughput == pytest.approx(8 / 0.004)  # 2000 items/s


def test_zero_warmup_still_times_every_round():
    calls: list[str] = []
    out = measure_interleaved({"x": lambda: calls.append("x")}, warmup=0, runs=5, items_per_run=1)
    assert len(calls) == 5 and out["x"].runs == 5 and out["x"].min_ms >= 0.0


@pytest.mark.parametrize("kw", [dict(runs=0), dict(warmup=-1), dict(items_per_run=0), dict(runs=2.0)])
def test_bad_arguments_raise(kw):
    args = dict(warmup=1, runs=2, items_per_run=1) | kw
    with pytest.raises(VerificationError):
        measure_interleaved({"x": lambda: None}, **args)


def test_empty_inputs_raise():
    with pytest.raises(VerificationError):
        measure_interleaved({}, warmup=0, runs=1, items_per_run=1)
    with pytest.raises(VerificationError):
        percentiles([], items_per_run=1)


@pytest.mark.skipif(sys.platform != "linux", reason="reads current RSS from /proc")
def test_peak_rss_tracks_a_large_allocation():
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        rss_now_mb = int(f.read().split()[1]) * page / 2**20
    block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched so it is resident
    assert peak_rss_mb() >= rss_now_mb + 200
    del block


def test_measure_blocks_times_steady_state_blocks_in_alternating_order():
    from compilekit.verify.latency import measure_blocks

    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    stats = measure_blocks(fns, warmup=1, runs=5, block=3, settle=1, settle_seconds=0.0, items_per_run=2)
    assert stats["a"].runs == 5 and stats["b"].runs == 5
    # warm-up a, b; round 0: a x (1 settle + 3), b x (1 + 3); round 1 reversed: b x (1 + 2), a x (1 + 2)
    assert "".join(calls) == "ab" + "aaaa" + "bbbb" + "bbb" + "aaa"


def test_measure_blocks_rejects_bad_counts():
    from compilekit.verify.latency import measure_blocks

    with pytest.raises(VerificationError):
        measure_blocks({"a": lambda: None}, warmup=0, runs=3, block=0, settle=0, items_per_run=1)
    with pytest.raises(VerificationError):
        measure_blocks({}, warmup=0, runs=3, block=2, settle=0, items_per_run=1)


def test_measure_blocks_settles_for_a_minimum_time():
    from compilekit.verify.latency import measure_blocks

    calls: list[str] = []
    fns = {"a": lambda: calls.append("a")}
    measure_blocks(fns, warmup=0, runs=2, block=2, settle=1, settle_seconds=0.02, items_per_run=1)
    assert len(calls) > 2 + 1  # fast calls keep settling until 20 ms have passed
