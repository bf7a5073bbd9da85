"""Accuracy of a candidate's outputs against a reference, and the gates that judge them.

Inputs are batches: a list of `{output_name: tensor}` dicts. Dim 0 of every tensor is the sample
dimension. All metrics are computed in float64 so the metric itself adds no error.

- `max_abs`  = max |c - r| over every element of every batch.
- `max_rel`  = max_abs / max |r|: relative to the reference's range, not element-wise, so outputs
  with values near zero do not blow up (0/0 -> 0.0; x/0 -> inf).
- `cosine_*` = cos(r_i, c_i) per sample i (flattened over non-batch dims); mean and min over samples.
  Both zero -> 1.0, one zero -> 0.0, NaN stays NaN.
- `sqnr_db`  = 10 log10(sum r^2 / sum (r - c)^2), clamped to +-`SQNR_CAP_DB` so identical outputs
  give a finite, JSON-safe number.
- `top1`     = fraction of positions (all indices but the last) whose argmax over the last dim agrees;
  only for outputs named as logits.

Padding: given per-batch masks of valid positions ([batch, seq], from the inputs' attention_mask), the
positions a mask marks padded are left out of every metric of outputs whose leading dims are [batch, seq].
A padded position's output is unspecified (nothing reads it, and attention masks it from every other
position), so counting it would measure noise, not the model.

A NaN in the candidate propagates into max_abs, cosine and SQNR (and counts as a top-1 miss), so every
gate on that output fails instead of passing silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compilekit.errors import VerificationError

SQNR_CAP_DB = 200.0  # float64 round-off sits near 300 dB; 200 dB already means "identical"

GATE_METRICS: dict[str, str] = {
    "cosine_min": ">=",
    "cosine_mean": ">=",
    "sqnr_db": ">=",
    "top1": ">=",
    "max_abs": "<=",
    "max_rel": "<=",
}


def _json_float(x: float | None, fmt: str) -> float | None:
    """Round for a manifest; NaN and inf (not valid JSON) become None."""
    if x is None or not math.isfinite(x):
        return None
    return float(format(x, fmt))


@dataclass(frozen=True)
class OutputMetrics:
    """Accuracy of one output, aggregated over all batches."""

    name: str
    samples: int
    max_abs: float
    max_rel: float
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    top1: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: cosine to 8 decimals, errors to 4 significant digits, non-finite -> None."""
        return {
            "name": self.name,
            "samples": self.samples,
            "max_abs": _json_float(self.max_abs, ".4g"),
            "max_rel": _json_float(self.max_rel, ".4g"),
            "cosine_mean": _json_float(self.cosine_mean, ".8f"),
            "cosine_min": _json_float(self.cosine_min, ".8f"),
            "sqnr_db": _json_float(self.sqnr_db, ".2f"),
            "top1": _json_float(self.top1, ".6f"),
        }


def _to_f64(x: Any) -> np.ndarray:
    # Duck-typed so this module does not import torch; .to() also handles bfloat16, which numpy lacks.
    if hasattr(x, "detach"):
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _cosines(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per-sample cosine of two (n, ...) arrays."""
    r2, c2 = r.reshape(len(r), -1), c.reshape(len(c), -1)
    nr, nc = np.linalg.norm(r2, axis=1), np.linalg.norm(c2, axis=1)
    dot = np.einsum("ij,ij->i", r2, c2)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(dot / (nr * nc), -1.0, 1.0)  # clip round-off above 1; NaN passes through
    # `== 0` is False for NaN, so a NaN sample never takes the zero-vector branches.
    cos = np.where((nr == 0) & (nc == 0), 1.0, cos)
    return np.where((nr == 0) ^ (nc == 0), 0.0, cos)


class _Acc:
    """Running sums for one output; per-batch maxima are kept as lists so NaN propagates."""

    def __init__(self) -> None:
        self.samples = 0
        self.abs_err: list[float] = []
        self.ref_abs: list[float] = []
        self.sig = 0.0
        self.noise = 0.0
        self.cos: list[np.ndarray] = []
        self.agree = 0
        self.positions = 0

    def add(self, r: np.ndarray, c: np.ndarray, logits: bool, valid: np.ndarray | None = None) -> None:
        keep = None
        if valid is not None and r.ndim >= 2 and r.shape[:2] == valid.shape:
            keep = valid.reshape(valid.shape + (1,) * (r.ndim - 2))
            r, c = np.where(keep, r, 0.0), np.where(keep, c, 0.0)  # padded positions: no error, no signal
        err = c - r
        self.samples += len(r)
        self.abs_err.append(float(np.max(np.abs(err), initial=0.0)))
        self.ref_abs.append(float(np.max(np.abs(r), initial=0.0)))
        self.sig += float(np.sum(r * r))
        self.noise += float(np.sum(err * err))
        self.cos.append(_cosines(r, c))
        if logits:
            # A row holding NaN counts as a miss: np.argmax would otherwise pick the NaN's index.
            hit = (np.argmax(r, -1) == np.argmax(c, -1)) & ~np.isnan(c).any(-1)
            counted = np.ones_like(hit) if keep is None else np.broadcast_to(keep[..., 0], hit.shape)
            self.agree += int((hit & counted).sum())
            self.positions += int(counted.sum())

    def result(self, name: str, logits: bool) -> OutputMetrics:
        max_abs, ref_max = float(np.max(self.abs_err)), float(np.max(self.ref_abs))
        with np.errstate(divide="ignore", invalid="ignore"):
            max_rel = 0.0 if max_abs == 0.0 else float(np.float64(max_abs) / ref_max)
            sqnr = SQNR_CAP_DB if self.noise == 0.0 else float(10 * np.log10(np.float64(self.sig) / self.noise))
        cos = np.concatenate(self.cos)
        return OutputMetrics(
            name=name,
            samples=self.samples,
            max_abs=max_abs,
            max_rel=max_rel,
            cosine_mean=float(np.mean(cos)),
            cosine_min=float(np.min(cos)),
            sqnr_db=float(np.clip(sqnr, -SQNR_CAP_DB, SQNR_CAP_DB)),
            top1=(self.agree / self.positions if self.positions else math.nan) if logits else None,
        )


def compare(
    reference: Sequence[Mapping[str, Any]],
    candidate: Sequence[Mapping[str, Any]],
    *,
    logits: Iterable[str] = (),
    masks: Sequence[Any] | None = None,
) -> dict[str, OutputMetrics]:
    """Metrics per output name for batches of reference and candidate outputs.

    `logits` names the outputs that also get top-1 agreement (argmax over the last dim). `masks` gives, per
    batch, the valid positions ([batch, seq], nonzero = valid) or None (see the module's note on padding).
    """
    if len(reference) != len(candidate):
        raise VerificationError(f"reference has {len(reference)} batches but candidate has {len(candidate)}")
    if not reference:
        raise VerificationError("no batches to compare")
    names = list(reference[0])
    logit_names = set(logits)
    if unknown := sorted(logit_names - set(names)):
        raise VerificationError(f"logits output(s) {unknown} not among outputs {names}")
    accs = {n: _Acc() for n in names}
    for b, (ref, cand) in enumerate(zip(reference, candidate)):
        for side, batch in (("reference", ref), ("candidate", cand)):
            if set(batch) != set(names):
                raise VerificationError(
                    f"batch {b}: {side} outputs {sorted(batch)} differ from expected {sorted(names)}"
                )
        for n in names:
            r, c = _to_f64(ref[n]), _to_f64(cand[n])
            if r.shape != c.shape:
                raise VerificationError(f"batch {b}, output {n!r}: reference shape {r.shape} != candidate {c.shape}")
            if r.ndim < 1 or (n in logit_names and (r.ndim < 2 or r.shape[-1] == 0)):
                need = "a batch dim and a non-empty class dim (logits)" if n in logit_names else "a batch dim"
                raise VerificationError(f"batch {b}, output {n!r}: shape {r.shape} lacks {need}")
            valid = masks[b] if masks is not None and b < len(masks) else None
            accs[n].add(r, c, n in logit_names, None if valid is None else _to_f64(valid) != 0)
    for n, acc in accs.items():
        if acc.samples == 0:
            raise VerificationError(f"output {n!r} has no samples in any batch")
    return {n: acc.result(n, n in logit_names) for n, acc in accs.items()}


def padding_masks(batches: Sequence[Mapping[str, Any]], name: str = "attention_mask") -> list[Any] | None:
    """Per batch, the valid positions of a padded batch: its 2-D `attention_mask` input (None without one)."""
    masks = [b.get(name) for b in batches]
    if all(m is None for m in masks):
        return None
    return [m if m is not None and getattr(m, "ndim", 0) == 2 else None for m in masks]


@dataclass(frozen=True)
class GateResult:
    """One gate checked on one output. `value` is the raw metric (NaN if the candidate had NaN)."""

    metric: str
    output: str
    value: float | None
    bound: float
    op: str
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "output": self.output,
            "value": _json_float(self.value, ".8g"),
            "bound": self.bound,
            "op": self.op,
            "passed": self.passed,
        }


def evaluate_gates(
    metrics: Mapping[str, OutputMetrics],
    gates: Mapping[str, float],
    outputs: Sequence[str] | None = None,
) -> list[GateResult]:
    """Check each gate `{metric: bound}` on every output in `outputs` (default: all).

    `top1` skips outputs that are not logits, but at least one selected output must be.
    A NaN (or missing) value fails its gate.
    """
    selected = list(metrics) if outputs is None else list(outputs)
    if missing := [o for o in selected if o not in metrics]:
        raise VerificationError(f"gate outputs {missing} not among measured outputs {sorted(metrics)}")
    results: list[GateResult] = []
    for metric, bound in gates.items():
        op = GATE_METRICS.get(metric)
        if op is None:
            raise VerificationError(f"unknown accuracy gate {metric!r}; known gates: {', '.join(GATE_METRICS)}")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise VerificationError(f"gate {metric!r}: bound must be a finite number, got {bound!r}")
        rows = [(o, getattr(metrics[o], metric)) for o in selected]
        if metric == "top1":
            rows = [(o, v) for o, v in rows if v is not None]
            if not rows:
                raise VerificationError(
                    "gate 'top1' needs a logits output", hint="name the output under logits in the recipe"
                )
        for o, v in rows:
            # Comparisons with NaN are False, so NaN fails both ">=" and "<=".
            ok = v is not None and (v >= bound if op == ">=" else v <= bound)
            results.append(GateResult(metric, o, v, float(bound), op, bool(ok)))
    return results
