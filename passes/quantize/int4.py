"""`quantize.int4_weight_only`: linears to `compilekit::nbits_linear`, weights in int4 groups along the input
dim (one float scale per group; symmetric, or with a float offset per group), activations float (or int8
inside the kernel, `compute: int8`, as ORT's MatMulNBits does at accuracy_level 4). The lm_head, when asked
for, takes `lm_head_bits` (8 by default).

RTN rounds each weight to its nearest level. AWQ (Lin et al., 2024) first scales each input channel j of a
linear by s_j = mean|X_j|^r (normalized), quantizes W s, and divides the input by s: channels that carry
large activations get finer weight levels. r is chosen per group of linears reading the same input, from a
grid on [0, 1), minimizing || X W^T - X Q(W s)^T / s ||^2 on calibration rows. 1 / s must be free at run
time, so it is folded into what produces X: a norm's weight (q/k/v, gate/up) or the up-projection in
`silu(gate) * up` (down). A group whose input has no such producer (o_proj) keeps RTN, and the stats say so.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compilekit import quant
from compilekit.ir import Program, WeightEdit
from compilekit.pipeline import PassResult, register_pass

from ._base import QuantizeOptions, QuantizePass
from ._linears import (Linear, behind_views, groups_by_input, is_norm, replace_node, scale_input, summarize,
                       weight_bytes)

aten = torch.ops.aten


def _dequantized(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    q = quant.quantize_weight_nbits(w, group_size, bits=4, symmetric=symmetric)
    return quant.dequantize_weight_nbits(q.packed, q.scales, q.offsets, w.shape[1], 4)


def _awq_scale(x: torch.Tensor, w: torch.Tensor, act_mean: torch.Tensor, group_size: int, symmetric: bool,
               grid: int) -> tuple[torch.Tensor | None, float, float]:
    """The best input-channel scale for weight rows `w` [N, K] on rows `x` [R, K], its ratio r, and the
    relative error gain over RTN."""
    reference = x @ w.t()
    def error(s: torch.Tensor | None) -> float:
        approx = _dequantized(w, group_size, symmetric) if s is None else _dequantized(w * s, group_size, symmetric) / s
        return float((x @ approx.t() - reference).pow(2).mean())
    rtn = error(None)
    best, best_s, best_r = rtn, None, 0.0
    base = act_mean.clamp_min(1e-4)
    for i in range(1, grid):
        r = i / grid
        s = base.pow(r)
        s = s / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best:
            best, best_s, best_r = e, s, r
    return best_s, best_r, (1 - best / rtn) if rtn > 0 else 0.0


def _up_projection(x: torch.fx.Node, by_node: dict[torch.fx.Node, Linear]) -> Linear | None:
    """For x = act(gate) * up with `up` a linear read only by x: that linear."""
    if x.op != "call_function" or x.target is not aten.mul.Tensor:
        return None
    for arg in x.args[:2]:
        lin = by_node.get(arg) if isinstance(arg, torch.fx.Node) else None
        if lin is not None and set(arg.users) == {x}:
            return lin
    return None


@register_pass
class QuantizeInt4WeightOnlyPass(QuantizePass):
    name = "quantize.int4_weight_only"
    kind = "int4"
    description = "Linears to int4 weight-only groups (RTN or AWQ), ORT MatMulNBits layout; lm_head optional (8-bit)."

    class Options(QuantizeOptions):
        group_size: Literal[32, 64, 128] = Field(32, description="Weights per scale along the input dim.")
        symmetric: bool = Field(True, description="Symmetric levels; false: scale and float offset per group (the "
                                "min form of GGUF Q4_1, which it represents exactly).")
        algorithm: Literal["rtn", "awq"] = Field("rtn", description="rtn: round to nearest; awq: activation-aware "
                                                 "input-channel scales from calibration.")
        compute: Literal["int8", "float"] = Field(
            "int8", description="int8: activations quantized per group inside the kernel (MatMulNBits "
            "accuracy_level 4, the fastest on CPUs with VNNI); float: dequantize and multiply in float.")
        awq_grid: int = Field(20, ge=2, description="awq: ratios tried on [0, 1).")
        awq_rows: int = Field(512, ge=16, description="awq: calibration rows kept per linear for the search.")
        embeddings: bool = Field(
            False, description="Also store embedding tables as 8-bit symmetric groups (GGUF Q8_0's form): a lookup "
            "dequantizes only its rows. A tied lm_head quantized at 8 bits shares the same table.")
        lm_head_bits: Literal[4, 8] = Field(
            8, description="lm_head: true: its bits. 8 by default: the output projection is the layer whose error "
            "reaches the logits unfiltered (and tied lm_heads are often stored at 8 bits, e.g. GGUF Q8_0).")

    def quantize(self, program: Program, only: set[str] | None, keep_float: set[str]) -> PassResult:
        o = self.options
        picked = self.select(program, only, keep_float)
        if isinstance(picked, PassResult):
            return picked
        gm, edit, linears, selection = picked
        weights = {lin.name: lin.weight.detach().float() for lin in selection.chosen}
        awq: dict[str, dict] = {}
        if o.algorithm == "awq":
            awq = self._awq(program, edit, linears, selection.chosen, weights)
        rows = []
        tables: dict[int, tuple] = {}  # id(float weight) -> (packed node, scales node): shared by tied tables
        for lin in selection.chosen:
            w = weights[lin.name]
            bits = o.lm_head_bits if lin.is_lm_head else 4
            symmetric = o.symmetric or bits == 8  # 8-bit groups are symmetric (Q8_0's form)
            q = quant.quantize_weight_nbits(w, o.group_size, bits=bits, symmetric=symmetric)
            packed_node, scales_node = edit.add(f"{lin.name}.qweight", q.packed), edit.add(f"{lin.name}.scales", q.scales)
            if bits == 8 and (awq.get(lin.name) or {}).get("scale") is None:  # not AWQ-scaled: the table itself
                tables[id(lin.weight)] = (packed_node, scales_node)
            args = (lin.current_x, packed_node, scales_node,
                    edit.add(f"{lin.name}.offsets", q.offsets.t().contiguous()) if q.offsets is not None else None,
                    lin.bias, w.shape[1], o.group_size, bits, o.compute)
            replace_node(lin.node, torch.ops.compilekit.nbits_linear.default, args)
            deq = quant.dequantize_weight_nbits(q.packed, q.scales, q.offsets, w.shape[1], bits)
            awq.get(lin.name, {}).pop("scale", None)  # a tensor: not for the manifest
            rows.append({"name": lin.name, "shape": list(lin.shape), "bits": bits, "awq": awq.get(lin.name),
                         "weight_sqnr_db": round(quant.sqnr_db(w, deq), 2),
                         "bytes_before": weight_bytes(lin.weight),
                         "bytes_after": sum(weight_bytes(t) for t in (q.packed, q.scales, q.offsets))})
        gm.graph.eliminate_dead_code()
        extra = f"g{o.group_size}, {'symmetric' if o.symmetric else 'asymmetric (min offsets)'}, {o.algorithm}, {o.compute} compute"
        if any(r["bits"] == 8 for r in rows):
            extra += f", lm_head {o.lm_head_bits}-bit"
        if awq:
            scaled = sum(1 for a in awq.values() if a.get("folded"))
            extra += f", AWQ scales on {scaled} of {len(awq)} linears"
        summary, stats = summarize("int4", rows, selection, extra)
        embedding_rows = self._embeddings(gm, edit, tables) if o.embeddings else []
        embeddings = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default]
        emb_bytes = sum(weight_bytes(edit.value(n.args[0])) for n in embeddings if edit.value(n.args[0]) is not None)
        if embedding_rows:
            shared = sum(1 for r in embedding_rows if r["shared_with_lm_head"])
            summary += (f"; {len(embedding_rows)} embedding table(s) -> 8-bit groups"
                        + (f" ({shared} sharing the lm_head's table)" if shared else ""))
        if emb_bytes:
            summary += f"; embeddings kept float: {emb_bytes / 2**20:.1f} MiB"
        stats["embeddings"] = embedding_rows
        stats["embeddings_float_bytes"] = emb_bytes
        return PassResult(program.with_graph(gm, weights=edit), True, stats, summary)

    def _embeddings(self, gm: torch.fx.GraphModule, edit: WeightEdit, tables: dict[int, tuple]) -> list[dict]:
        """Embedding lookups -> compilekit::nbits_embedding over 8-bit groups (shared with a tied lm_head)."""
        o = self.options
        rows = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.embedding.default:
                continue
            weight = edit.value(node.args[0])
            if weight is None or weight.dim() != 2 or weight.shape[1] % o.group_size:
                continue
            shared = tables.get(id(weight))
            if shared is None:
                q = quant.quantize_weight_nbits(weight.detach().float(), o.group_size, bits=8)
                name = edit.target(node.args[0]) or node.name
                shared_flag = False
                packed_node = edit.add(f"{name}.qtable", q.packed)
                scales_node = edit.add(f"{name}.qscales", q.scales)
                tables[id(weight)] = (packed_node, scales_node)
                bytes_after = weight_bytes(q.packed) + weight_bytes(q.scales)
            else:
                packed_node, scales_node = shared
                shared_flag, bytes_after = True, 0
            replace_node(node, torch.ops.compilekit.nbits_embedding.default,
                         (node.args[1], packed_node, scales_node, weight.shape[1], o.group_size, 8))
            rows.append({"shape": list(weight.shape), "bits": 8, "shared_with_lm_head": shared_flag,
                         "bytes_before": weight_bytes(weight), "bytes_after": bytes_after})
        return rows

    def _awq(self, program: Program, edit: WeightEdit, linears: list[Linear], chosen: list[Linear],
             weights: dict[str, torch.Tensor]) -> dict[str, dict]:
        o = self.options
        # Every linear at once: skip: auto asks again per candidate, and gets these back.
        observed = self.observe(program, [lin.observed for lin in linears], keep_rows=o.awq_rows)
        by_node = {lin.node: lin for lin in linears}
        report: dict[str, dict] = {}
        for group in groups_by_input(chosen):
            obs = observed[group[0].observed]
            w = torch.cat([weights[lin.name] for lin in group])
            s, ratio, gain = _awq_scale(obs.sample_rows(), w, obs.channel_absmean, o.group_size, o.symmetric,
                                        o.awq_grid)
            how = None
            if s is not None:
                up = _up_projection(group[0].x, by_node)
                if up is not None and up.name in weights:
                    weights[up.name] = weights[up.name] / s[:, None]
                    if up.bias is not None:
                        up.bias = edit.add(f"{up.name}.awq_bias", edit.value(up.bias) / s)
                        up.node.args = (*up.node.args[:2], up.bias)
                    how = f"folded into {up.name}"
                elif up is None and is_norm(behind_views(group[0].x)[-1]):
                    how = scale_input(edit, group, 1.0 / s, fold=True)
                    if how == "mul":  # the norm's output is read elsewhere too: undo nothing, but say so
                        how = "explicit multiply (norm output also read elsewhere)"
                    else:
                        how = "folded into the norm"
                if how is None:
                    s = None
            for lin in group:
                if s is not None:
                    weights[lin.name] = weights[lin.name] * s
                report[lin.name] = {"ratio": ratio if s is not None else 0.0, "error_gain": round(gain, 4),
                                    "folded": how, "scale": s}
        return report
