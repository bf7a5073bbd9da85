"""Per-layer sensitivity of a quantization, and the choice of layers to keep in higher precision.

Sensitivity of a layer = the output error when *only that layer* is quantized, measured in PyTorch on the
program (the quantized ops' references are the exact quantized numerics) against the unquantized program,
on calibration data. `choose_float_layers` then keeps the fewest most-sensitive layers in float that meet an
accuracy budget: layers are ranked by their own error, and the smallest prefix of that ranking whose removal
meets the budget is found by bisection (errors add up roughly monotonically as layers are quantized), then
checked once more as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .ir import Program
from .verify.accuracy import compare, evaluate_gates, padding_masks

Batch = dict[str, torch.Tensor]
Quantize = Callable[[set[str] | None, set[str]], Program]  # (only these layers | None = all, keep float) -> program


def _metrics(program: Program, batches: Sequence[Batch], reference: Sequence[Mapping[str, torch.Tensor]]):
    return compare(reference, [program.run(b) for b in batches], masks=padding_masks(batches))


def layer_sensitivity(program: Program, quantize: Quantize, layers: Sequence[str], batches: Sequence[Batch],
                      progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One row per layer, most sensitive first: each output's cosine min / mean and SQNR with only that
    layer quantized."""
    reference = [program.run(b) for b in batches]
    rows = []
    for i, name in enumerate(layers):
        metrics = _metrics(quantize({name}, set()), batches, reference)
        rows.append({"layer": name, "outputs": {k: {"cosine_min": round(m.cosine_min, 6),
                                                    "cosine_mean": round(m.cosine_mean, 6),
                                                    "sqnr_db": round(min(m.sqnr_db, 200.0), 2)}
                                                for k, m in metrics.items()}})
        if progress:
            progress(i + 1, len(layers))
    rows.sort(key=lambda r: min(o["sqnr_db"] for o in r["outputs"].values()))
    return rows


def choose_float_layers(program: Program, quantize: Quantize, ranking: Sequence[str], batches: Sequence[Batch],
                        budget: Mapping[str, float], outputs: Sequence[str] | None = None) -> dict[str, Any]:
    """The fewest layers (a prefix of `ranking`, most sensitive first) to keep float so that quantizing the
    rest meets `budget` (gate name -> bound, as in verify.accuracy). Returns the layers, the metrics of
    the result and how many candidates were evaluated."""
    reference = [program.run(b) for b in batches]
    tried: dict[int, bool] = {}

    def meets(k: int) -> bool:
        if k not in tried:
            metrics = _metrics(quantize(None, set(ranking[:k])), batches, reference)
            tried[k] = all(g.passed for g in evaluate_gates(metrics, dict(budget), list(outputs) if outputs else None))
        return tried[k]

    n = len(ranking)
    if meets(0):
        k = 0
    elif not meets(n - 1 if n > 1 else n):
        k = None
    else:
        lo, hi = 0, n - 1 if n > 1 else n  # meets(lo) is False, meets(hi) is True
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
        k = hi
    return {"keep_float": list(ranking[:k]) if k is not None else None, "evaluated": len(tried)}
