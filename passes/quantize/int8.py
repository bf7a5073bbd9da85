"""`quantize.int8`: linears to `compilekit::int8_linear`, int8 weights (symmetric, per output channel) with
dynamic or static int8 activations, optionally smoothed first (SmoothQuant).

SmoothQuant (Xiao et al., 2023): a linear's input X has a few channels with large outliers, which waste a
per-tensor int8 range. For a scale s per input channel, X W^T = (X / s)(W s)^T exactly; choosing
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves part of each outlier into the weight, which is quantized
per output channel and absorbs it. Linears that read the same tensor (q/k/v) share one s, computed over
their weights together. 1 / s is folded into the producing norm when nothing else reads it, else applied by
one multiply before the group (BERT's norms also feed the residual, so there it is a multiply).

Activation modes (see compilekit.quant): `dynamic` (per tensor, at run time; ORT's DynamicQuantizeMatMul,
the fastest int8 form on this CPU), `per_token` (per row, at run time; more accurate, and on ORT CPU
measured 2.6x faster than fp32 per layer on an AMX Xeon, about as fast as fp32 on an AVX-512 EPYC),
`static` (per tensor, the scale from calibration; the only form TensorRT takes).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compilekit import quant
from compilekit.calibrate import observe_inputs
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
        alpha: float = Field(0.5, ge=0.0, le=1.0, description="SmoothQuant migration strength.")
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
        all_nodes = [lin.node.name for lin in linears]
        needs_ranges = o.smoothquant or (o.activations == "static" and o.observer == "minmax")
        observed = self.observe(program, all_nodes) if needs_ranges else {}
        if o.smoothquant:
            for group in groups_by_input(selection.chosen):
                act = observed[group[0].node.name].channel_absmax
                wmax = torch.stack([weights[lin.name].abs().amax(0) for lin in group]).amax(0)
                s = (act.clamp_min(1e-5) ** o.alpha / wmax.clamp_min(1e-5) ** (1 - o.alpha)).clamp(1e-3, 1e3)
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
                    obs = observed[lin.node.name]
                    absmax = float((obs.channel_absmax * inverse[lin.name]).max()) if lin.name in inverse else obs.absmax
                    input_scales[lin.name] = max(absmax, 1e-8) / 127.0
            else:
                # A percentile of the tensor actually quantized: observe the smoothed input itself.
                staged = _smoothed_inputs(program, inverse) if smoothed else program
                names = {lin.name: lin.node.name
                         for lin in find_linears(WeightEdit(staged, staged.graph_module), staged.graph)[0]}
                stats = observe_inputs(staged, self.context.calibration_batches(staged, self.name),
                                       [names[lin.name] for lin in selection.chosen], observer="percentile",
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
                         "input_scale": input_scales.get(lin.name),
                         "weight_sqnr_db": round(quant.sqnr_db(w.t(), quant.dequantize_weight_int8(q, scale)), 2),
                         "bytes_before": weight_bytes(lin.weight), "bytes_after": weight_bytes(q) + weight_bytes(scale)})
        gm.graph.eliminate_dead_code()
        extra = f"{o.activations} activations" + (f", SmoothQuant alpha {o.alpha}" if o.smoothquant else "")
        if o.activations == "static":
            extra += f", {o.observer} observer"
        if per_token:
            extra += f"; {len(per_token)} most sensitive with per-token activations"
        summary, stats = summarize("int8", rows, selection.skipped, extra)
        stats["activations"] = o.activations
        return PassResult(program.with_graph(gm, weights=edit), True, stats, summary)


def _smoothed_inputs(program: Program, inverse: dict[str, torch.Tensor]) -> Program:
    """`program` with only the inputs of the named linears scaled (weights untouched): for observing the
    distribution the quantizer will see, not for running."""
    gm = program.copy_graph()
    edit = WeightEdit(program, gm)
    chosen = [lin for lin in find_linears(edit, gm.graph)[0] if lin.name in inverse]
    for group in groups_by_input(chosen):
        scale_input(edit, group, inverse[group[0].name], fold=True)
    return program.with_graph(gm, weights=edit)
