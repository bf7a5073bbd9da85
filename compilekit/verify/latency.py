"""Latency harness: interleaved timing, percentiles, throughput, and peak memory."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compilekit.errors import VerificationError


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one callable over `runs` timed calls, in milliseconds."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    items_per_run: int
    throughput: float  # items per second at the median

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: times to 0.1 us; an infinite throughput (p50 of 0) becomes None."""
        ms = {k: round(getattr(self, k), 4) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms")}
        tput = round(self.throughput, 2) if np.isfinite(self.throughput) else None
        return {"runs": self.runs, **ms, "items_per_run": self.items_per_run, "throughput": tput}


def _check_count(name: str, value: int, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise VerificationError(f"{name} must be an integer >= {lowest}, got {value!r}")


def percentiles(samples_s: Sequence[float], items_per_run: int) -> LatencyStats:
    """Stats of per-call times given in seconds (numpy percentiles, linear interpolation)."""
    _check_count("items_per_run", items_per_run, 1)
    if len(samples_s) == 0:
        raise VerificationError("no latency samples")
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(np.percentile(ms, q, method="linear")) for q in (50, 90, 99))
    return LatencyStats(
        runs=len(ms),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        items_per_run=items_per_run,
        throughput=items_per_run / (p50 / 1000.0) if p50 > 0 else float("inf"),
    )


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    items_per_run: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time several callables (e.g. eager vs compiled) round-robin and return stats per name.

    Why interleave: machine load (thermal state, other processes, frequency scaling) drifts over
    seconds, so timing A fully and then B would compare them under different conditions. One call of
    each per round makes both see the same conditions, and the order flips every round (odd rounds
    run reversed) so neither always runs right after the other, e.g. in its cache or clock state.

    The caller must make each fn block until its work is done (e.g. synchronize a GPU), and should
    set ORT's `session.intra_op.allow_spinning` to "0": spinning ORT threads keep busy-waiting after
    a run and steal the cores that eager PyTorch uses in between, inflating its times.

    Every fn is warmed `warmup` times (also interleaved) and then timed `runs` times with
    `time.perf_counter`; `progress(done, runs)` is called after each timed round.
    """
    _check_count("warmup", warmup, 0)
    _check_count("runs", runs, 1)
    _check_count("items_per_run", items_per_run, 1)
    if not fns:
        raise VerificationError("nothing to measure: no callables given")
    order = list(fns)
    for _ in range(warmup):
        for name in order:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(runs):
        for name in reversed(order) if i % 2 else order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress(i + 1, runs)
    return {name: percentiles(ts, items_per_run) for name, ts in times.items()}


def measure_blocks(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    block: int = 10,
    settle: int = 2,
    settle_seconds: float = 0.1,
    items_per_run: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each callable in steady state, in alternating blocks; return stats per name.

    Why blocks: one-by-one interleaving (`measure_interleaved`) runs each candidate right after the other,
    so every run starts with caches and thread pools in the other's state. On MiniLM that made ONNX
    Runtime look 15% slower than it runs back to back, which is how a deployed model runs. Blocks of
    `block` consecutive calls give each candidate its steady state; alternating the blocks (order flipped
    every round) still spreads drifting machine load over both. The first `settle` calls of every block
    are not timed: they absorb the switch, including ORT worker threads still spinning after their block.

    `warmup` untimed calls of each fn come first; then rounds until each fn has `runs` timed calls.
    `progress(done, runs)` is called after each round with the timed calls so far per fn.
    """
    _check_count("warmup", warmup, 0)
    _check_count("runs", runs, 1)
    _check_count("block", block, 1)
    _check_count("settle", settle, 0)
    _check_count("items_per_run", items_per_run, 1)
    if not fns:
        raise VerificationError("nothing to measure: no callables given")
    order = list(fns)
    for name in order:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    round_index = 0
    while len(times[order[0]]) < runs:
        take = min(block, runs - len(times[order[0]]))
        for name in reversed(order) if round_index % 2 else order:
            fn = fns[name]
            settle_start, settled = time.perf_counter(), 0
            while settled < settle or time.perf_counter() - settle_start < settle_seconds:
                fn()
                settled += 1
            for _ in range(take):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        round_index += 1
        if progress is not None:
            progress(len(times[order[0]]), runs)
    return {name: percentiles(ts, items_per_run) for name, ts in times.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of the whole process so far, in MiB.

    Process-wide and monotonic: it includes the reference model, every runtime loaded, and anything
    measured earlier, so it bounds a candidate's memory from above rather than isolating it.
    """
    import resource  # POSIX only; imported here so the rest of verify still loads elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
