"""`quantize.fp8`: linears to `compilekit::fp8_linear`, E4M3 weights and activations, one scale per tensor
each (weights: absmax / 448; activations: from calibration, min/max or a percentile of |x|).

Meant for TensorRT on Hopper and later, whose parser takes FP8 Q/DQ in strongly typed networks. Here the
reference semantics (torch.float8_e4m3fn rounding) are the check, and ONNX Runtime runs the same Q/DQ graph
on the CPU, so the lowered form is checked against them too.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compilekit import quant
from compilekit.ir import Program
from compilekit.pipeline import PassResult, register_pass

from ._base import QuantizeOptions, QuantizePass
from ._linears import replace_node, summarize, weight_bytes


@register_pass
class QuantizeFp8Pass(QuantizePass):
    name = "quantize.fp8"
    kind = "fp8"
    description = "Linears to FP8 E4M3 (weights and activations per tensor, activation scales from calibration)."

    class Options(QuantizeOptions):
        observer: Literal["minmax", "percentile"] = Field(
            "minmax", description="Activation range from min/max, or a percentile of |x| (clips rare extremes).")
        percentile: float = Field(99.99, gt=50.0, le=100.0, description="percentile observer: which percentile.")

    def quantize(self, program: Program, only: set[str] | None, keep_float: set[str]) -> PassResult:
        o = self.options
        picked = self.select(program, only, keep_float)
        if isinstance(picked, PassResult):
            return picked
        gm, edit, linears, selection = picked
        options = {"percentile": o.percentile} if o.observer == "percentile" else {}
        observed = self.observe(program, [lin.observed for lin in linears], observer=o.observer, **options)
        rows = []
        for lin in selection.chosen:
            w = lin.weight.detach().float()
            w_scale = quant.fp8_scale(w.abs().max())
            w8 = (w.t() / w_scale).clamp(-quant.FP8_E4M3_MAX, quant.FP8_E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
            x_scale = float(quant.fp8_scale(observed[lin.observed].tensor_absmax()))
            args = (lin.current_x, edit.add(f"{lin.name}.weight_fp8", w8), edit.add(f"{lin.name}.weight_scale", w_scale),
                    lin.bias, x_scale)
            replace_node(lin.node, torch.ops.compilekit.fp8_linear.default, args)
            rows.append({"name": lin.name, "shape": list(lin.shape), "input_scale": x_scale,
                         "weight_sqnr_db": round(quant.sqnr_db(w.t(), w8.float() * w_scale), 2),
                         "bytes_before": weight_bytes(lin.weight), "bytes_after": weight_bytes(w8) + 4})
        gm.graph.eliminate_dead_code()
        summary, stats = summarize("fp8 e4m3", rows, selection, f"per-tensor scales, {o.observer} observer")
        return PassResult(program.with_graph(gm, weights=edit), True, stats, summary)
