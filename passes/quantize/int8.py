"""`quantize.int8`: linears to `compilekit::int8_linear`, int8 weights (symmetric, per output channel) with
dynamic or static int8 activations, optionally smoothed first (SmoothQuant).

SmoothQuant (Xiao et al., 2023): a linear's input X has a few channels with large outliers, which waste a
per-tensor int8 range. For a scale s per input channel, X W^T = (X / s)(W s)^T exactly; choosing
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves part of each outlier into the weight, which is quantized
per output channel and absorbs it. Linears that read the same tensor (q/k/v) share one s, computed over
their weights together. 1 / s is folded into the producing norm when nothing else reads it, else applied by
one multiply before the group (BERT's norms also feed the residual, so there it is a multiply).

`alpha: auto` chooses alpha per group, as Intel Neural Compressor's `alpha="auto"` does: each of 0,
1/alpha_grid, ..., 1 is tried on calibration rows of the group's input, and the one with the least squared
output error of the group's int8 linears (each in its own activation mode, weights quantized as they will
be) wins, if it beats no smoothing by 1%; else the group stays unsmoothed and needs no multiply. The
dynamic mode's per-tensor range is taken as the whole calibration's range, its worst case. One alpha for
every layer is rarely right: on all-MiniLM-L6-v2, alpha 0.5 makes the FFN down-projections' inputs (GELU
outputs with token outliers) worse than no smoothing (25.5 against 31.1 dB output SQNR, layer 0, per-tensor
activations), and alpha 0.8 gives 36.2 dB.

Activation modes (see compilekit.quant): `dynamic` (per tensor, at run time; ORT's DynamicQuantizeMatMul,
the fastest int8 form on this CPU), `per_token` (per row, at run time; more accurate, and on ORT CPU
measured 2.6x faster than fp32 per layer on an AMX Xeon, about as fast as fp32 on an AVX-512 EPYC),
`static` (per tensor, the scale from calibration; the only form TensorRT takes).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from compilekit import quant
from compilekit.calibrate import observe_values
from compilekit.ir import Program, WeightEdit
from compilekit.pipeline import PassResult, register_pass

from ._base import QuantizeOptions, QuantizePass
from ._linears import find_linears, groups_by_input, replace_node, scale_input, summarize, weight_bytes


@register_pass
class QuantizeInt8Pass(QuantizePass):
    name = "quantize.int8"
    kind = "int8"
    description = ("Linears to int8 (weights symmetric per output channel; activations dynamic, per-token or "
                   "static from calibration), with optional SmoothQuant.")

    class Options(QuantizeOptions):
        activations: Literal["dynamic", "per_token", "static"] = Field(
            "dynamic", description="dynamic: per tensor at run time; per_token: per row at run time; static: per "
            "tensor from calibration (needed for tensorrt).")
        smoothquant: bool = Field(False, description="Smooth activation outliers into the weights first (calibrates).")
        alpha: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(
            0.5, description="SmoothQuant migration strength in [0, 1], or auto: chosen per group of linears reading "
            "one input, from a grid, by the output error on calibration rows (no smoothing is a candidate too).")
        alpha_grid: int = Field(20, ge=1, le=100, description="alpha: auto: alphas tried, 0 to 1 in this many steps.")
        alpha_rows: int = Field(512, ge=16, description="alpha: auto: calibration rows kept per input for the search.")
        observer: Literal["minmax", "percentile"] = Field(
            "minmax", description="static: activation range from min/max (no clipping) or a percentile of |x| "
            "(clips rare extremes).")
        percentile: float = Field(99.99, gt=50.0, le=100.0, description="percentile observer: which percentile.")
        fallback: Literal["float", "per_token"] = Field(
            "float", description="skip: auto: what the most sensitive layers become: float, or int8 with per-token "
            "activations (more accurate than per-tensor, cheaper than float on ORT CPU).")

    def quantize(self, program: Program, only: set[str] | None, keep_float: set[str]) -> PassResult:
        o = self.options
        per_token: set[str] = set()
        if o.fallback == "per_token" and o.activations != "per_token":
            per_token, keep_float = set(keep_float), set()  # skip: auto's layers stay int8, per-token
        picked = self.select(program, only, keep_float)
        if isinstance(picked, PassResult):
            return picked
        gm, edit, linears, selection = picked
        weights = {lin.name: lin.weight.detach().float() for lin in selection.chosen}
        inverse: dict[str, torch.Tensor] = {}
        smoothed: dict[str, str] = {}
        all_nodes = [lin.observed for lin in linears]
        alphas: dict[str, float | None] = {}
        gains: dict[str, float] = {}  # alpha: auto: the search's error reduction against no smoothing
        needs_ranges = o.smoothquant or (o.activations == "static" and o.observer == "minmax")
        search = o.smoothquant and o.alpha == "auto"
        # Every linear at once, rows too where alpha is searched: skip: auto asks again per candidate.
        observed = (self.observe(program, all_nodes, **({"keep_rows": o.alpha_rows} if search else {}))
                    if needs_ranges else {})
        if o.smoothquant:
            # The search runs on each input's whole group (every linear reading it), whichever of them this
            # call quantizes: skip: auto's one-layer-at-a-time calls then reuse it, and agree with the full run.
            whole = {lin.name: g for g in groups_by_input(linears) for lin in g}
            for group in groups_by_input(selection.chosen):
                obs = observed[group[0].observed]
                wmax = torch.stack([weights[lin.name].abs().amax(0) for lin in group]).amax(0)
                if search:
                    alpha, s, gain = self._searched_alpha(observed, whole[group[0].name], per_token)
                    for lin in group:
                        gains[lin.name] = gain
                else:
                    alpha, s = o.alpha, smoothing_scale(obs.channel_absmax, wmax, o.alpha)
                for lin in group:
                    alphas[lin.name] = alpha
                if s is None:
                    continue
                how = scale_input(edit, group, 1.0 / s, fold=True)
                for lin in group:
                    weights[lin.name] = weights[lin.name] * s
                    inverse[lin.name] = 1.0 / s
                    smoothed[lin.name] = how
        input_scales: dict[str, float] = {}
        if o.activations == "static":
            if o.observer == "minmax":
                # The smoothed input's range follows exactly from the per-channel ranges.
                for lin in selection.chosen:
                    obs = observed[lin.observed]
                    absmax = float((obs.channel_absmax * inverse[lin.name]).max()) if lin.name in inverse else obs.absmax
                    input_scales[lin.name] = max(absmax, 1e-8) / 127.0
            else:
                # A percentile of the tensor actually quantized: observe the smoothed input itself.
                staged = _smoothed_inputs(program, inverse) if smoothed else program
                staged_gm = staged.copy_graph()
                names = {lin.name: lin.observed
                         for lin in find_linears(WeightEdit(staged, staged_gm), staged_gm.graph)[0]}
                stats = observe_values(staged, self.context.calibration_batches(staged, self.name),
                                       {names[lin.name] for lin in selection.chosen}, observer="percentile",
                                       percentile=o.percentile)
                for lin in selection.chosen:
                    input_scales[lin.name] = max(stats[names[lin.name]].tensor_absmax(), 1e-8) / 127.0
        rows = []
        for lin in selection.chosen:
            w = weights[lin.name]
            q, scale = quant.quantize_weight_int8(w)
            qn = edit.add(f"{lin.name}.qweight", q)
            sn = edit.add(f"{lin.name}.weight_scale", scale)
            mode = "per_token" if lin.name in per_token else o.activations
            replace_node(lin.node, torch.ops.compilekit.int8_linear.default,
                         (lin.current_x, qn, sn, lin.bias, mode, input_scales.get(lin.name, 0.0)))
            rows.append({"name": lin.name, "shape": list(lin.shape), "activations": mode,
                         "smoothing": smoothed.get(lin.name),
                         **({"alpha": alphas[lin.name]} if lin.name in alphas else {}),
                         **({"smoothing_error_gain": gains[lin.name]} if lin.name in gains else {}),
                         "input_scale": input_scales.get(lin.name),
                         "weight_sqnr_db": round(quant.sqnr_db(w.t(), quant.dequantize_weight_int8(q, scale)), 2),
                         "bytes_before": weight_bytes(lin.weight), "bytes_after": weight_bytes(q) + weight_bytes(scale)})
        gm.graph.eliminate_dead_code()
        extra = f"{o.activations} activations"
        if o.smoothquant and search:
            chosen = sorted({a for a in alphas.values() if a is not None})
            groups = len(groups_by_input(selection.chosen))
            unsmoothed = len(groups_by_input([lin for lin in selection.chosen if alphas.get(lin.name) is None]))
            extra += (f", SmoothQuant alpha auto ({groups - unsmoothed} of {groups} input groups smoothed"
                      + (f", alpha {chosen[0]:g}-{chosen[-1]:g}" if chosen else "") + ")")
        elif o.smoothquant:
            extra += f", SmoothQuant alpha {o.alpha}"
        if o.activations == "static":
            extra += f", {o.observer} observer"
        if per_token:
            extra += f"; {len(per_token)} most sensitive with per-token activations"
        summary, stats = summarize("int8", rows, selection, extra)
        stats["activations"] = o.activations
        return PassResult(program.with_graph(gm, weights=edit), True, stats, summary)

    def _searched_alpha(self, observed: dict, group: list,
                        per_token: set[str]) -> tuple[float | None, torch.Tensor | None, float]:
        """alpha: auto for one input's group of linears: (alpha, s, error gain), or (None, None, gain) where
        smoothing does not pay. The gain is the best alpha's relative error reduction against no smoothing.
        Kept per calibration, group and activation modes (skip: auto quantizes once per candidate)."""
        o = self.options
        modes = ["per_token" if lin.name in per_token else o.activations for lin in group]
        key = (tuple(lin.name for lin in group), tuple(modes))
        cache = getattr(self, "_alpha_cache", None)
        if cache is None or cache[0] is not observed:
            cache = self._alpha_cache = (observed, {})
        if key not in cache[1]:
            obs = observed[group[0].observed]
            ws = [lin.weight.detach().float() for lin in group]
            wmax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
            rows = obs.sample_rows()
            reference = [rows @ w.t() for w in ws]
            unsmoothed = smoothing_error(rows, ws, reference, None, modes, obs)
            best = (float("inf"), None, None)
            for i in range(o.alpha_grid + 1):
                alpha = i / o.alpha_grid
                s = smoothing_scale(obs.channel_absmax, wmax, alpha)
                err = smoothing_error(rows, ws, reference, s, modes, obs)
                if err < best[0]:
                    best = (err, alpha, s)
            # Smoothing must earn its multiply: at least 1% less error than none.
            gain = round(1.0 - best[0] / unsmoothed, 4) if unsmoothed > 0 else 0.0
            cache[1][key] = (*best[1:], gain) if gain >= 0.01 else (None, None, gain)
        return cache[1][key]


def smoothing_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), bounded so no channel is scaled wildly."""
    return (act_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-3, 1e3)


def smoothing_error(rows: torch.Tensor, weights: list[torch.Tensor], reference: list[torch.Tensor],
                    s: torch.Tensor | None, modes: list[str], obs) -> float:
    """Squared output error of a group's int8 linears on calibration `rows` when their input is divided by
    `s` (None: not smoothed), each linear quantizing activations as `modes` says. Per-tensor ranges (dynamic,
    static) are the calibration's whole range of the smoothed input, from the observer's channel ranges."""
    inv = None if s is None else 1.0 / s
    x = rows if inv is None else rows * inv
    lo, hi = obs.channel_min, obs.channel_max
    if inv is not None:
        lo, hi = lo * inv, hi * inv
    lo, hi = min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)
    total = 0.0
    for w, ref, mode in zip(weights, reference, modes):
        q, scale = quant.quantize_weight_int8(w if s is None else w * s)
        wq = quant.dequantize_weight_int8(q, scale)  # [K, N]
        if mode == "per_token":
            xq, xs = quant.fake_quant_per_token_int8(x)
            xq = xq * xs
        elif mode == "dynamic":  # DynamicQuantizeLinear over the whole calibration range
            step = max(hi - lo, 1e-12) / 255.0
            zero = round(-lo / step)
            xq = ((x / step).round() + zero).clamp(0, 255).sub(zero) * step
        else:
            step = max(hi, -lo, 1e-12) / 127.0
            xq = quant.fake_quant_static_int8(x, step) * step
        total += float((xq @ wq - ref).pow(2).sum())
    return total


def _smoothed_inputs(program: Program, inverse: dict[str, torch.Tensor]) -> Program:
    """`program` smoothed in float: the named linears read `x * inverse` and their weights are divided by
    it, so every output (and every later linear's input) is the original's, and each smoothed linear's
    input is the tensor the quantizer will see. (Scaling the inputs alone would also rescale the
    activations downstream of each smoothed linear, and later layers would be observed wrongly.)"""
    gm = program.copy_graph()
    edit = WeightEdit(program, gm)
    chosen = [lin for lin in find_linears(edit, gm.graph)[0] if lin.name in inverse]
    for group in groups_by_input(chosen):
        scale_input(edit, group, inverse[group[0].name], fold=True)
        for lin in group:
            weight = edit.add(f"{lin.name}.smoothed_weight", (lin.weight / inverse[lin.name]).contiguous())
            lin.node.args = (lin.node.args[0], weight, *lin.node.args[2:])
    return program.with_graph(gm, weights=edit)
