"""Verification: accuracy metrics and gates against a reference, and the latency harness."""

from __future__ import annotations

from compilekit.verify.accuracy import (
    GATE_METRICS,
    SQNR_CAP_DB,
    GateResult,
    OutputMetrics,
    compare,
    evaluate_gates,
)
from compilekit.verify.latency import LatencyStats, measure_blocks, measure_interleaved, peak_rss_mb, percentiles

__all__ = [
    "GATE_METRICS",
    "SQNR_CAP_DB",
    "GateResult",
    "LatencyStats",
    "OutputMetrics",
    "compare",
    "evaluate_gates",
    "measure_blocks",
    "measure_interleaved",
    "peak_rss_mb",
    "percentiles",
]
